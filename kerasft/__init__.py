"""kerasft: two-stage fine-tuning of KerasHub DistilBERT classifiers on JAX, TensorFlow, PyTorch.

Importing `kerasft` is cheap: Keras and KerasHub load when a public name is first used.

Example:
    >>> from kerasft import TwoStageFineTuner, load_dataset
    >>> data = load_dataset("../shared/data/sarcasm_headlines_v1.jsonl")
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TwoStageFineTuner": "kerasft.tuner",
    "merge_histories": "kerasft.stages",
    "RecipeConfig": "kerasft.config",
    "load_dataset": "kerasft.data",
    "reference_split": "kerasft.data",
    "stratified_limit": "kerasft.data",
    "TextDataset": "kerasft.data",
    "DataError": "kerasft.data",
    "load_classifier": "kerasft.presets",
    "load_pretrained_classifier": "kerasft.recipe",
    "compile_classifier": "kerasft.recipe",
    "initialize_head": "kerasft.recipe",
    "encode": "kerasft.recipe",
    "train_stage": "kerasft.recipe",
    "classification_metrics": "kerasft.metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kerasft' has no attribute {name!r}")
