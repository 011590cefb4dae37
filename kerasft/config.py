"""`RecipeConfig`: the validated two-stage recipe, one place for every hyperparameter."""

from __future__ import annotations

import dataclasses
import os

from kerasft.presets import DEFAULT_PRESET

SELECT_BEST = ("accuracy", "f1", "loss")
MIXED_PRECISION = ("bfloat16", "float16")
FINETUNE_METHODS = ("full", "lora")
STAGES = ("warmup", "finetune")


@dataclasses.dataclass
class RecipeConfig:
    """Hyperparameters of the two-stage recipe.

    Stage 1 ("warm-up") trains the head with the backbone frozen; stage 2 ("fine-tune") trains
    every layer at a lower learning rate. Both use Adam, one-hot labels and
    `CategoricalCrossentropy(from_logits=True)`.

    Args:
        preset: KerasHub preset name, local directory, or `"all_minilm_l6_v2"`.
        num_classes: number of classes; None infers it from the training labels.
        sequence_length: maximum tokens per text (batches are padded only as far as needed).
        warmup_epochs: stage-1 epochs (>= 0).
        warmup_learning_rate: stage-1 Adam learning rate.
        finetune_epochs: stage-2 epochs (>= 0).
        finetune_learning_rate: stage-2 Adam learning rate (the peak, with the linear schedule).
        batch_size: rows per batch.
        seed: seed for weight init, dropout and the per-epoch reshuffle.
        cache_features: in stage 1, run the frozen backbone once and train the head on cached
            features instead of recomputing them every epoch.
        finetune_schedule: stage-2 learning rate over time: `"constant"` or `"linear"` (decays
            linearly to 0 over the stage, the usual BERT fine-tuning schedule).
        select_best: `"accuracy"`, `"f1"` or `"loss"`: after stage 2, restore the stage-2 epoch
            with the best validation score (like Trainer's `load_best_model_at_end` with
            `metric_for_best_model`); None (default) keeps the last epoch.
        early_stopping_patience: stop stage 2 after this many epochs without a better
            validation score (`select_best`, or validation loss when that is None); None
            (default) never stops early.
        weight_decay: decoupled weight decay (AdamW, as Trainer's `weight_decay`): one float
            for both stages or `[warmup, finetune]`. Biases and LayerNorm weights are not
            decayed. 0 (default) keeps plain Adam.
        warmup_ratio: fraction of stage 2's steps over which its learning rate rises linearly
            from 0 to `finetune_learning_rate`, before `finetune_schedule` applies (Trainer's
            `warmup_ratio`); 0 (default): no warm-up.
        max_grad_norm: clip the gradients' global norm to this value in both stages (Trainer's
            `max_grad_norm`); None (default): no clipping.
        gradient_accumulation_steps: apply the optimizer once every this many batches, with
            their gradients averaged (Keras' optimizer option); 1 (default): every batch.
        mixed_precision: `"bfloat16"` or `"float16"`: train with a Keras mixed dtype policy
            (float32 variables; float16 adds loss scaling). The fitted model is returned and
            saved in float32. None (default): float32 throughout.
        class_weight: `"balanced"` (weights `n / (k * count)`, as scikit-learn computes them)
            or a mapping `{label: weight}` by label name; classes not named weigh 1. Scales
            the training loss per row in both stages. None (default): every row weighs 1.
        finetune_method: `"full"` (default) trains every weight in stage 2; `"lora"` freezes
            the backbone and trains low-rank adapters with the head (`kerasft.lora`).
        lora_rank: the adapters' rank (LoRA only).
        lora_alpha: the adapters' scale is `lora_alpha / lora_rank`; None (default) is
            `lora_rank` (scale 1, KerasHub's default).
        lora_targets: backbone layer names to adapt; None (default) is KerasHub's choice, the
            attention `query` and `value` projections.

    Raises:
        ValueError: on construction, for any out-of-range value (the message names it).
    """

    preset: str = DEFAULT_PRESET
    num_classes: int | None = None
    sequence_length: int = 128
    warmup_epochs: int = 2
    warmup_learning_rate: float = 1e-3
    finetune_epochs: int = 2
    finetune_learning_rate: float = 1e-4
    batch_size: int = 32
    seed: int = 30
    cache_features: bool = True
    finetune_schedule: str = "linear"
    select_best: str | None = None
    early_stopping_patience: int | None = None
    weight_decay: float | list[float] = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    class_weight: str | dict[str, float] | None = None
    finetune_method: str = "full"
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.preset, os.PathLike):
            self.preset = os.fspath(self.preset)
        if isinstance(self.lora_targets, tuple):
            self.lora_targets = list(self.lora_targets)
        if isinstance(self.weight_decay, tuple):
            self.weight_decay = list(self.weight_decay)
        if isinstance(self.class_weight, dict):  # label names, as in `label_names`
            self.class_weight = {str(k): v for k, v in self.class_weight.items()}
        checks = {
            "num_classes": (
                self.num_classes is None or _is_int(self.num_classes, 2),
                ">= 2 or None",
            ),
            "sequence_length": (_is_int(self.sequence_length, 8, 512), "an int in [8, 512]"),
            "warmup_epochs": (_is_int(self.warmup_epochs, 0), "an int >= 0"),
            "finetune_epochs": (_is_int(self.finetune_epochs, 0), "an int >= 0"),
            "batch_size": (_is_int(self.batch_size, 1), "an int >= 1"),
            "seed": (_is_int(self.seed, 0), "an int >= 0"),
            "warmup_learning_rate": (_is_rate(self.warmup_learning_rate), "a float in (0, 1]"),
            "finetune_learning_rate": (_is_rate(self.finetune_learning_rate), "a float in (0, 1]"),
            "preset": (isinstance(self.preset, str) and bool(self.preset), "a non-empty string"),
            "cache_features": (isinstance(self.cache_features, bool), "True or False"),
            "finetune_schedule": (
                self.finetune_schedule in ("constant", "linear"),
                "'constant' or 'linear'",
            ),
            "select_best": (
                self.select_best in (None, *SELECT_BEST),
                f"one of {list(SELECT_BEST)} or None",
            ),
            "early_stopping_patience": (
                self.early_stopping_patience is None or _is_int(self.early_stopping_patience, 1),
                "an int >= 1 or None",
            ),
            "weight_decay": (
                _is_fraction(self.weight_decay)
                or (
                    isinstance(self.weight_decay, list)
                    and len(self.weight_decay) == 2
                    and all(_is_fraction(w) for w in self.weight_decay)
                ),
                "a float in [0, 1), or [warmup, finetune] of two such floats",
            ),
            "warmup_ratio": (_is_fraction(self.warmup_ratio), "a float in [0, 1)"),
            "max_grad_norm": (
                self.max_grad_norm is None or _is_positive(self.max_grad_norm),
                "a float > 0 or None",
            ),
            "gradient_accumulation_steps": (
                _is_int(self.gradient_accumulation_steps, 1),
                "an int >= 1",
            ),
            "mixed_precision": (
                self.mixed_precision in (None, *MIXED_PRECISION),
                f"one of {list(MIXED_PRECISION)} or None",
            ),
            "class_weight": (
                self.class_weight in (None, "balanced")
                or (
                    isinstance(self.class_weight, dict)
                    and bool(self.class_weight)
                    and all(_is_positive(w) for w in self.class_weight.values())
                ),
                "'balanced', a non-empty {label: weight > 0} mapping, or None",
            ),
            "finetune_method": (
                self.finetune_method in FINETUNE_METHODS,
                f"one of {list(FINETUNE_METHODS)}",
            ),
            "lora_rank": (_is_int(self.lora_rank, 1, 1024), "an int in [1, 1024]"),
            "lora_alpha": (
                self.lora_alpha is None or _is_positive(self.lora_alpha),
                "a number > 0 or None",
            ),
            "lora_targets": (
                self.lora_targets is None
                or (
                    isinstance(self.lora_targets, list)
                    and bool(self.lora_targets)
                    and all(isinstance(t, str) and t for t in self.lora_targets)
                ),
                "a non-empty list of layer names, or None",
            ),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(
                    f"{name} must be {allowed}. Received: {name}={getattr(self, name)!r}"
                )
        if self.warmup_epochs + self.finetune_epochs == 0:
            raise ValueError(
                "At least one stage needs epochs. Received: warmup_epochs=0, finetune_epochs=0"
            )

    @property
    def monitor(self) -> tuple[str, str] | None:
        """`(log key, "max" | "min")` that picks the best stage-2 epoch, or None."""
        if self.select_best is None and self.early_stopping_patience is None:
            return None
        metric = self.select_best or "loss"
        return f"val_{metric}", "min" if metric == "loss" else "max"

    def stage_weight_decay(self, stage: str) -> float:
        """The weight decay of `stage` (`"warmup"` or `"finetune"`)."""
        if isinstance(self.weight_decay, list):
            return float(self.weight_decay[STAGES.index(stage)])
        return float(self.weight_decay)

    def to_dict(self) -> dict:
        """Returns the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> RecipeConfig:
        """Rebuilds a config; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown recipe keys {unknown}. Allowed: {sorted(known)}")
        return cls(**config)


def _is_int(value, low: int, high: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _is_positive(value) -> bool:
    return _is_number(value) and 0 < value < float("inf")


def _is_fraction(value) -> bool:
    return _is_number(value) and 0 <= value < 1


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
