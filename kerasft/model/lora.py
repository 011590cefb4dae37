"""LoRA for stage 2, on KerasHub's own `Backbone.enable_lora`, and the adapter file.

`finetune_method="lora"` keeps stage 1 as it is. Before stage 2 the backbone gets low-rank
adapters on its attention projections (KerasHub's default targets: `query` and `value`), which
freezes every base weight; the adapters train with the head. Keras merges the adapters into the
kernels whenever a layer is saved, so `model.keras` is an ordinary classifier that every
exporter handles unchanged. The adapter on its own (the low-rank factors and the head, a few
hundred KB) is `save_adapter`'s directory, which `kerasft.training.tuner.load_adapter` puts back
onto the same base preset.

Example:
    >>> tuner = TwoStageFineTuner(finetune_method="lora", lora_rank=8)
    >>> tuner.fit(train, validation_data=val)
    >>> tuner.save_adapter("sarcasm-lora")  # small; tuner.save() writes the merged model
    >>> again = kerasft.training.tuner.load_adapter("sarcasm-lora")  # base preset + adapter
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np

from kerasft.model.presets import load_classifier
from kerasft.util.fileio import atomic_write_text

ADAPTER_FILE = "adapter.lora.h5"  # KerasHub's `save_lora_weights` format (the backbone's part)
HEAD_FILE = "head.weights.h5"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_FORMAT = 1


def enable_lora(classifier, rank: int, alpha: float | None = None, targets=None) -> int:
    """Adds LoRA adapters to the classifier's backbone (KerasHub's `enable_lora`).

    Every base weight of the backbone is frozen, the adapted layers' biases included; the
    adapters and the head are trainable. The
    adapters' output is scaled by `alpha / rank` (Keras' `lora_alpha`; `alpha=None` is `rank`,
    a scale of 1, KerasHub's default).

    Args:
        classifier: a KerasHub text classifier.
        rank: the adapters' rank (>= 1).
        alpha: the LoRA scaling numerator, or None for `rank`.
        targets: layer names to adapt, or None for KerasHub's default (`query`, `value`).

    Returns:
        The number of adapted layers.

    Raises:
        ValueError: no layer of the backbone is named in `targets` (the message lists the
            names that can be adapted).
    """
    backbone = classifier.backbone
    names = list(targets) if targets is not None else backbone.default_lora_layer_names()
    backbone.enable_lora(rank, target_layer_names=names)
    layers = adapted_layers(classifier)
    if not layers:
        known = sorted({la.name for la in backbone._flatten_layers() if hasattr(la, "enable_lora")})
        raise ValueError(
            f"lora_targets {names} name no layer of this backbone. Layers LoRA can adapt: {known}"
        )
    for layer in layers:
        if alpha is not None:
            layer.lora_alpha = alpha
        # Keras' LoRA freezes the kernel only; the adapted layers' biases stay frozen too, so
        # that the adapters are all that changes in the backbone (PEFT's `bias="none"`).
        if getattr(layer, "bias", None) is not None:
            layer.bias.trainable = False
    return len(layers)


def adapted_layers(classifier) -> list:
    """The backbone's LoRA-enabled layers, in KerasHub's order (empty without LoRA)."""
    backbone = classifier.backbone
    indices = getattr(backbone, "_lora_enabled_layers", [])
    weighted = [la for la in backbone._flatten_layers(include_self=False) if la.weights]
    return [weighted[i] for i in indices]


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """`{"trainable": ..., "total": ...}` parameters of `model` as it trains now."""

    def count(variables) -> int:
        return int(sum(np.prod(v.shape) for v in variables))

    return {"trainable": count(model.trainable_variables), "total": count(model.weights)}


def _head_model(classifier) -> keras.Model:
    """The head's layers in a small model, so their weights save to one file."""
    inputs = keras.Input((classifier.backbone.hidden_dim,))
    return keras.Model(inputs, classifier.output_dense(classifier.pooled_dense(inputs)))


def save_adapter(
    classifier, directory: str | os.PathLike, config: dict, label_names: list[str]
) -> Path:
    """Writes the adapter of a LoRA-fitted classifier: LoRA factors, head, `adapter.json`.

    Args:
        classifier: a classifier with LoRA enabled (`enable_lora`), after training.
        directory: the directory to create (must not hold an adapter already).
        config: the recipe (`RecipeConfig.to_dict()`): preset, rank, alpha, targets, length.
        label_names: the class names.

    Returns:
        The directory.

    Raises:
        ValueError: the classifier has no LoRA adapters.
        FileExistsError: `directory` already holds an adapter.
    """
    layers = adapted_layers(classifier)
    if not layers:
        raise ValueError("This model has no LoRA adapters: fit with finetune_method='lora'.")
    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).exists():
        raise FileExistsError(f"{str(directory)!r} already holds an adapter.")
    directory.mkdir(parents=True, exist_ok=True)
    classifier.backbone.save_lora_weights(str(directory / ADAPTER_FILE))
    _head_model(classifier).save_weights(directory / HEAD_FILE)
    meta = {
        "format": ADAPTER_FORMAT,
        "preset": config["preset"],
        "sequence_length": config["sequence_length"],
        "lora_rank": config["lora_rank"],
        "lora_alpha": layers[0].lora_alpha,
        "lora_targets": config.get("lora_targets"),
        "label_names": list(label_names),
        "recipe": config,
    }
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    return directory


def load_adapter_classifier(directory: str | os.PathLike, preset: str | None = None):
    """The base preset's classifier with a saved adapter put back on it (not merged).

    `kerasft.training.tuner.load_adapter` wraps it in a fitted `TwoStageFineTuner`.

    Args:
        directory: a `save_adapter` directory.
        preset: the base preset to load, if not the one recorded (it must be the same model).

    Returns:
        `(classifier, meta)`: the classifier and the adapter's `adapter.json`.

    Raises:
        FileNotFoundError: `directory` holds no adapter.
    """
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"No {ADAPTER_CONFIG} in {str(directory)!r}: not an adapter.")
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    classifier = load_classifier(
        preset or meta["preset"], len(meta["label_names"]), meta["sequence_length"]
    )
    enable_lora(classifier, meta["lora_rank"], meta["lora_alpha"], meta["lora_targets"])
    classifier.backbone.load_lora_weights(str(directory / ADAPTER_FILE))
    _head_model(classifier).load_weights(directory / HEAD_FILE)
    return classifier, meta
