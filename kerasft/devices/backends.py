"""One framework per run: the Keras backend's own, not TensorFlow behind a PyTorch or JAX run.

keras-hub 0.32 imports TensorFlow (and tensorflow-text) whenever they are installed, whatever
the backend (`keras_hub.src.utils.tensor_utils`). On PyTorch or JAX that import costs seconds
and about 600 MB, and prints TensorFlow's start-up lines to the user's terminal: "oneDNN custom
operations are on", "Could not find cuda drivers", "failed call to cuInit: INTERNAL: CUDA error".
`keep_to_backend` makes TensorFlow look not installed to the rest of the process, as in a
TensorFlow-free install, where kerasft's whole JAX and PyTorch path runs and is tested (the
`tf_free` tests): KerasHub, transformers and the rest take their own TensorFlow-free paths.

The `kerasft` command calls it once its backend is chosen. A Python program that imports
kerasft decides for itself (call it before `import keras_hub`).
"""

from __future__ import annotations

import sys

TENSORFLOW = ("tensorflow", "tensorflow_text", "tf_keras")  # what KerasHub and others look for


def keep_to_backend(backend: str) -> bool:
    """On a backend other than TensorFlow, keeps TensorFlow out of this process from now on.

    Python's own way to mark a module absent: `sys.modules[name] = None` makes `import name`
    raise ImportError and `importlib.util.find_spec(name)` return None, so libraries that look
    before they import see no TensorFlow either.

    Args:
        backend: the Keras backend the process runs (`KERAS_BACKEND`).

    Returns:
        True when TensorFlow is kept out; False on the TensorFlow backend, or when TensorFlow
        is already imported (then nothing changes).

    Example:
        >>> keep_to_backend("torch")  # before `import keras_hub`
        True
    """
    if backend == "tensorflow" or any(sys.modules.get(name) for name in TENSORFLOW):
        return False
    for name in TENSORFLOW:
        sys.modules.setdefault(name, None)
    return True
