"""KerasHub preset export: the fine-tuned classifier as a folder `TextClassifier.from_preset`
loads on JAX, TensorFlow and PyTorch (and Kaggle or the Hugging Face Hub host as it is).

KerasHub's own `save_to_preset` writes the backbone (`config.json`, `model.weights.h5`), the
preprocessor and tokenizer (`preprocessor.json`, `tokenizer.json`, `assets/tokenizer/`), and the
task with its trained head (`task.json`, `task.weights.h5`); the run's label names go into the
preset's `metadata.json` (`label_names`). A LoRA run's `model.keras` already holds the merged
weights, so its preset is a plain classifier. Saving needs no TensorFlow. Loading does not
either, but KerasHub's preprocessing of raw strings does (or `grain`): without them,
`from_preset(DIR).predict(texts)` says so in its own ImportError, and kerasft's runtime (which
tokenizes with its Rust twin, `serving/tokenizer.json`) serves the preset anyway.

Example:
    >>> import keras_hub
    >>> classifier = keras_hub.models.TextClassifier.from_preset("exports/sarcasm-keras-hub")
"""

from __future__ import annotations

import json
from pathlib import Path

from kerasft.exporters.contract import FormatContract

CONTRACT = FormatContract(
    "keras_hub",
    "KerasHub preset: TextClassifier.from_preset(DIR) on any backend (share on Kaggle or the Hub)",
    graph_sources=("torch", "tensorflow"),
    needs=("keras_hub",),
    packages=("keras-hub",),
    checkpoint=True,
    tokenizer_dir="serving",
)
# the model card's library and use (`kerasft.exporters.model_card`)
CARD_LIBRARY = "keras-hub"
CARD_USE = (
    "import keras_hub",
    'classifier = keras_hub.models.TextClassifier.from_preset("path/to/this/dir")',
    'classifier.predict(["some text"])  # raw strings: with TensorFlow (or grain) installed',
)
METADATA_FILE = "metadata.json"  # KerasHub's; kerasft adds `label_names`
TASK_WEIGHTS = "task.weights.h5"


def write(graph, out_dir: Path, *, classifier, label_names: list[str], **_) -> dict:
    """Saves `classifier` as a KerasHub preset in `out_dir`, with its label names.

    Args:
        graph: the serving graph (unused: the preset is the classifier itself).
        out_dir: the (temporary) export directory.
        classifier: the fine-tuned KerasHub `TextClassifier`, float32.
        label_names: the class names, in class-id order.

    Returns:
        `{"model_file": "task.weights.h5"}`.

    """
    classifier.save_to_preset(str(out_dir))
    metadata_path = Path(out_dir) / METADATA_FILE
    metadata = json.loads(metadata_path.read_text())
    metadata["label_names"] = list(label_names)
    metadata_path.write_text(json.dumps(metadata, indent=4))
    return {"model_file": TASK_WEIGHTS}
