"""One framework per run: the Keras backend's own, not TensorFlow behind a PyTorch or JAX run.

keras-hub 0.32 imports TensorFlow (and tensorflow-text) whenever they are installed, whatever
the backend (`keras_hub.src.utils.tensor_utils`). On PyTorch or JAX that import costs seconds
and about 600 MB, and prints TensorFlow's start-up lines to the user's terminal: "oneDNN custom
operations are on", "Could not find cuda drivers", "failed call to cuInit: INTERNAL: CUDA error".
`keep_to_backend` makes `import tensorflow` fail in the rest of the process, as in a
TensorFlow-free install, where kerasft's whole JAX and PyTorch path runs and is tested (the
`tf_free` tests): KerasHub, transformers and OpenVINO's converter take their TensorFlow-free
paths.

The `kerasft` command calls it once its backend is chosen. A Python program that imports
kerasft decides for itself (call it before `import keras_hub`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

TENSORFLOW = ("tensorflow", "tensorflow_text", "tf_keras")  # what KerasHub and others import


class _NotHere(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `names` and refuses to load them: `import tensorflow` raises ModuleNotFoundError
    (`except ImportError` paths run), where a finder returning None would let the next finder
    load it. (Python's other way, `sys.modules[name] = None`, trips libraries that test
    `"tensorflow" in sys.modules` before they import it: OpenVINO's `convert_model` does.)"""

    def __init__(self, names: tuple[str, ...], why: str):
        self.names, self.why = names, why

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} ({self.why})", name=spec.name)

    def exec_module(self, module):  # (not reached: create_module refuses)
        raise ModuleNotFoundError(module.__name__)


def keep_to_backend(backend: str) -> bool:
    """On a backend other than TensorFlow, keeps TensorFlow out of this process from now on.

    `import tensorflow` (tensorflow-text, tf-keras) raises ModuleNotFoundError from then on;
    `USE_TF=0` (unless set) tells transformers, which asks `importlib.util.find_spec` first,
    not to try.

    Args:
        backend: the Keras backend the process runs (`KERAS_BACKEND`).

    Returns:
        True when TensorFlow is kept out; False on the TensorFlow backend, or when TensorFlow
        is already imported (then nothing changes).

    Example:
        >>> keep_to_backend("torch")  # before `import keras_hub`
        True
    """
    if backend == "tensorflow" or any(name in sys.modules for name in TENSORFLOW):
        return False
    if not any(isinstance(f, _NotHere) for f in sys.meta_path):
        why = f"kept out of a KERAS_BACKEND={backend} run by kerasft.devices.backends"
        sys.meta_path.insert(0, _NotHere(TENSORFLOW, why))
    # transformers asks `find_spec` whether TensorFlow is there (it finds this finder's spec):
    # its own switch tells it not to look
    os.environ.setdefault("USE_TF", "0")
    return True
