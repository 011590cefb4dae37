"""kerasft: two-stage fine-tuning of KerasHub DistilBERT classifiers on JAX, TensorFlow, PyTorch.

Importing `kerasft` is cheap: Keras and KerasHub load when a public name is first used.

Example:
    >>> from kerasft import TwoStageFineTuner, load_dataset
    >>> data = load_dataset("../shared/data/sarcasm_headlines_v1.jsonl")
"""

import importlib
import os

__version__ = "0.1.0"

_EXPORTS = {
    "TwoStageFineTuner": "kerasft.training.tuner",
    "merge_histories": "kerasft.training.stages",
    "RecipeConfig": "kerasft.training.config",
    "load_dataset": "kerasft.data",
    "reference_split": "kerasft.data",
    "stratified_limit": "kerasft.data",
    "TextDataset": "kerasft.data",
    "DataError": "kerasft.data",
    "load_classifier": "kerasft.model.presets",
    "load_pretrained_classifier": "kerasft.training.recipe",
    "compile_classifier": "kerasft.training.recipe",
    "initialize_head": "kerasft.training.recipe",
    "encode": "kerasft.training.recipe",
    "train_stage": "kerasft.training.recipe",
    "classification_metrics": "kerasft.util.metrics",
}
__all__ = sorted(_EXPORTS)


BACKENDS = ("jax", "tensorflow", "torch")


def check_backend() -> None:
    """Refuses a `KERAS_BACKEND` kerasft does not run on, listing the ones it does.

    Raises:
        ValueError: `KERAS_BACKEND` is set to another name (Keras' own message would not list
            the backends).
    """
    backend = os.environ.get("KERAS_BACKEND")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"KERAS_BACKEND={backend!r} is not a backend kerasft runs on. Set it to one of: "
            f"{', '.join(BACKENDS)}."
        )


def __getattr__(name):
    if name in _EXPORTS:
        check_backend()
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kerasft' has no attribute {name!r}")
