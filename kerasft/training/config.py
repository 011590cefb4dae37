"""`RecipeConfig`: the validated two-stage recipe, one place for every hyperparameter.

Each field declares its default, its validation and its `kerasft fit` flag with help text
(`option`); the CLI's flags, `config.json`, the `--resume` comparison and
`TwoStageFineTuner(**options)` all derive from the fields. Adding an option means adding a field
here and using it where it acts (`kerasft.training.recipe` or `kerasft.training.stages`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from kerasft.model.presets import DEFAULT_PRESET, SEQUENCE_LENGTHS
from kerasft.util import wording

SELECT_BEST = ("accuracy", "f1", "loss")
MIXED_PRECISION = ("bfloat16", "float16")
# `mixed_precision="auto"` (the default): bfloat16 where the backend trains faster in it on this
# CPU class (`kerasft.training.precision.AUTO_BF16`, measured), else float32; resolved when `fit`
# starts (`kerasft.training.precision.resolve_mixed_precision`) and recorded resolved in
# config.json.
AUTO_PRECISION = "auto"
FINETUNE_METHODS = ("full", "lora")
SCHEDULES = ("constant", "linear")
STAGES = ("warmup", "finetune")
# `bucket_width`'s default (None: resolved when `fit` starts, by
# `kerasft.tokens.batching.default_bucket_width`, and recorded resolved in config.json): a batch is
# padded to a multiple of this many tokens. XLA (JAX, TensorFlow) compiles every distinct batch
# shape, and 8 keeps those to about 6 on the reference data for ~3.5 padding tokens per row:
# `BUCKET_WIDTH`. Eager PyTorch compiles nothing and takes 4 (`BUCKET_WIDTHS`): it held accuracy
# over 3 seeds of the reference run in float32 on an AVX2 CPU (0.9250 against 0.9252,
# reference_run.md at commit a1e883e) and its steps are faster side by side (train_speed.md).
# Width 1 (texts grouped by exact length, no padding) was decided against over 3 seeds of the
# reference run on PyTorch in bfloat16 (#32, benchmarks/results/speed_options.md): test
# accuracy 0.9222 mean against 0.9247 (-0.25 points; the bar was 0.1), for a fine-tune stage
# 3.6% shorter.
BUCKET_WIDTH = 8
BUCKET_WIDTHS = {"torch": 4}  # backends whose default is not `BUCKET_WIDTH`


def default_bucket_width(backend: str) -> int:
    """`bucket_width`'s default on a Keras backend: 4 on PyTorch, else 8 (`BUCKET_WIDTH`).

    JAX and TensorFlow compile every distinct batch shape, which 8 keeps to about 6 on the
    reference data; eager PyTorch compiles nothing and pads less at 4 (16.0 instead of 18.1
    tokens per row there). Why these: the comment above.

    Example:
        >>> default_bucket_width("torch")
        4
    """
    return BUCKET_WIDTHS.get(backend, BUCKET_WIDTH)


def option(
    default,
    help: str,
    *,
    check: tuple[Callable[[Any], bool], str],
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    nargs: str | None = None,
):
    """A `RecipeConfig` field with everything that derives from it: its validation, its
    `kerasft fit` flag and help text.

    Args:
        default: the default value (immutable).
        help: the flag's help text.
        check: `(predicate, allowed)`: a value is valid when `predicate(value)` is true;
            `allowed` says what is, in the error message.
        parse: turns the flag's text into a value (None: a string, or `choices`).
        flag: the flag, if not `--` + the field name with dashes. A boolean field is a flag
            without a value: one starting `--no-` stores False where the default is True,
            any other stores True where the default is False.
        choices: the allowed strings.
        metavar: the flag's placeholder in `--help`.
        nargs: argparse's `nargs` (`"+"`: one value or more; one value is given to the field
            as itself, more as a list).
    """
    metadata = {"help": help, "check": check, "parse": parse, "flag": flag, "choices": choices,
                "metavar": metavar, "nargs": nargs}  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata)


def parse_mixed_precision(text: str) -> str | None:
    """`--mixed-precision` text: `"none"` -> None (float32); `"auto"`, `"bfloat16"`,
    `"float16"` as they are.

    Raises:
        ValueError: any other text.
    """
    if text == "none":
        return None
    if text in (AUTO_PRECISION, *MIXED_PRECISION):
        return text
    allowed = ", ".join((AUTO_PRECISION, "none", *MIXED_PRECISION))
    raise ValueError(f"--mixed-precision must be one of {allowed}. Received: {text!r}")


def parse_class_weight(text: str) -> str | dict[str, float]:
    """`"balanced"`, or `"LABEL=WEIGHT,LABEL=WEIGHT"` (label names as in the data file).

    Raises:
        ValueError: the text is neither.
    """
    if text == "balanced":
        return text
    weights = {}
    for item in text.split(","):
        name, sep, weight = item.rpartition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"expected 'balanced' or LABEL=WEIGHT[,LABEL=WEIGHT...], got {text!r}")
    return weights


def parse_names(text: str) -> list[str]:
    """`"a,b"` -> `["a", "b"]`."""
    return [name.strip() for name in text.split(",")]


def flag_name(field: dataclasses.Field) -> str:
    """The `kerasft fit` flag of a `RecipeConfig` field."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


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
            saved in float32. None: float32 throughout. `"auto"` (default): `"bfloat16"` where
            the backend trains faster in it on this CPU class
            (`kerasft.training.precision.AUTO_BF16`: PyTorch and TensorFlow on CPUs with AVX512_BF16
            or AMX-BF16; JAX never), else None; `fit` replaces it with the value it resolved to
            (what config.json records).
        class_weight: `"balanced"` (weights `n / (k * count)`, as scikit-learn computes them)
            or a mapping `{label: weight}` by label name; classes not named weigh 1. Scales
            the training loss per row in both stages. None (default): every row weighs 1.
        finetune_method: `"full"` (default) trains every weight in stage 2; `"lora"` freezes
            the backbone and trains low-rank adapters with the head (`kerasft.model.lora`).
        lora_rank: the adapters' rank (LoRA only).
        lora_alpha: the adapters' scale is `lora_alpha / lora_rank`; None (default) is
            `lora_rank` (scale 1, KerasHub's default).
        lora_targets: backbone layer names to adapt; None (default) is KerasHub's choice, the
            attention `query` and `value` projections.
        freeze_word_embeddings: in stage 2, keep the backbone's word-embedding table (11.7 M
            of the offline preset's 22.7 M weights) as pretrained and train the rest: no
            gradient or optimizer update for the table. False (default) trains it.
        bucket_width: training and validation batches are padded to a multiple of this many
            tokens; 1 groups texts of equal length and pads nothing. It decides which texts
            share a batch, so it changes the run. None (default): 4 on PyTorch, 8 on JAX and
            TensorFlow, which compile every batch shape (`kerasft.training.config.BUCKET_WIDTHS`);
            `fit` replaces it with the value it resolved to (what config.json records).
            (Unshuffled passes on PyTorch always cut a batch to its longest text:
            `kerasft.tokens.batching.unshuffled_bucket_width`.)

    Raises:
        ValueError: on construction, for any out-of-range value (the message names it).
    """

    preset: str = option(
        DEFAULT_PRESET,
        f"preset name or directory (default {DEFAULT_PRESET}: offline; KerasHub presets such "
        "as distil_bert_base_en_uncased download from Kaggle)",
        check=(lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    )
    num_classes: int | None = option(
        None,
        "number of classes (default: the classes of the training labels)",
        check=(lambda v: v is None or _is_int(v, 2), ">= 2 or None"),
        parse=int,
        metavar="K",
    )
    sequence_length: int = option(
        128,
        "maximum tokens per text (default 128)",
        check=(
            lambda v: _is_int(v, *SEQUENCE_LENGTHS),
            "an int in [{}, {}]".format(*SEQUENCE_LENGTHS),
        ),
        parse=int,
    )
    warmup_epochs: int = option(
        2, "stage-1 epochs (default 2)", check=(lambda v: _is_int(v, 0), "an int >= 0"), parse=int
    )
    warmup_learning_rate: float = option(
        1e-3,
        "stage-1 Adam learning rate (default 1e-3)",
        check=(_is_rate, "a float in (0, 1]"),
        parse=float,
        flag="--warmup-lr",
    )
    finetune_epochs: int = option(
        2, "stage-2 epochs (default 2)", check=(lambda v: _is_int(v, 0), "an int >= 0"), parse=int
    )
    finetune_learning_rate: float = option(
        1e-4,
        "stage-2 Adam learning rate, the peak of its schedule (default 1e-4)",
        check=(_is_rate, "a float in (0, 1]"),
        parse=float,
        flag="--finetune-lr",
    )
    batch_size: int = option(
        32, "rows per batch (default 32)", check=(lambda v: _is_int(v, 1), "an int >= 1"), parse=int
    )
    seed: int = option(
        30,
        "seed of weight init, dropout, shuffling and --limit (default 30)",
        check=(lambda v: _is_int(v, 0), "an int >= 0"),
        parse=int,
    )
    cache_features: bool = option(
        True,
        "stage 1 runs the frozen backbone on every step instead of once (slower; the batch "
        "order of a multi-process run)",
        check=(lambda v: isinstance(v, bool), "True or False"),
        flag="--no-feature-cache",
    )
    finetune_schedule: str = option(
        "linear",
        "stage-2 learning rate: constant, or linear decay to 0",
        check=(lambda v: v in SCHEDULES, f"one of {list(SCHEDULES)}"),
        choices=SCHEDULES,
    )
    select_best: str | None = option(
        None,
        "after stage 2, keep the epoch with the best validation score (default: the last)",
        check=(lambda v: v in (None, *SELECT_BEST), f"one of {list(SELECT_BEST)} or None"),
        choices=SELECT_BEST,
    )
    early_stopping_patience: int | None = option(
        None,
        "stop stage 2 after N epochs without a better validation score",
        check=(lambda v: v is None or _is_int(v, 1), "an int >= 1 or None"),
        parse=int,
        metavar="N",
    )
    weight_decay: float | list[float] = option(
        0.0,
        "AdamW weight decay: one value for both stages, or two (warm-up, fine-tune); default 0 "
        "(Adam)",
        check=(
            lambda v: (
                _is_fraction(v)
                or (isinstance(v, list) and len(v) == 2 and all(_is_fraction(w) for w in v))
            ),
            "a float in [0, 1), or [warmup, finetune] of two such floats",
        ),
        parse=float,
        metavar="X",
        nargs="+",
    )
    warmup_ratio: float = option(
        0.0,
        "fraction of stage 2's steps with a linear learning-rate warm-up (default 0)",
        check=(_is_fraction, "a float in [0, 1)"),
        parse=float,
    )
    max_grad_norm: float | None = option(
        None,
        "clip gradients to this global norm (default: none)",
        check=(lambda v: v is None or _is_positive(v), "a float > 0 or None"),
        parse=float,
    )
    gradient_accumulation_steps: int = option(
        1,
        "one optimizer step per N batches (default 1)",
        check=(lambda v: _is_int(v, 1), "an int >= 1"),
        parse=int,
        metavar="N",
    )
    mixed_precision: str | None = option(
        AUTO_PRECISION,
        "train under Keras' mixed_bfloat16 / mixed_float16 policy (saved in float32); none: "
        "float32; auto (default): bfloat16 where the CPU computes it (AVX512_BF16, AMX), else "
        "float32",
        check=(
            lambda v: v in (None, AUTO_PRECISION, *MIXED_PRECISION),
            f"one of {[AUTO_PRECISION, *MIXED_PRECISION]} or None",
        ),
        parse=parse_mixed_precision,
        metavar="|".join((AUTO_PRECISION, "none", *MIXED_PRECISION)),
    )
    class_weight: str | dict[str, float] | None = option(
        None,
        "weigh the training loss per class: 'balanced' or e.g. '1=2.5' (default: none)",
        check=(
            lambda v: (
                v in (None, "balanced")
                or (isinstance(v, dict) and bool(v) and all(_is_positive(w) for w in v.values()))
            ),
            "'balanced', a non-empty {label: weight > 0} mapping, or None",
        ),
        parse=parse_class_weight,
        metavar="balanced|LABEL=W,...",
    )
    finetune_method: str = option(
        "full",
        "stage 2: full (every weight) or lora (low-rank adapters + head; base frozen)",
        check=(lambda v: v in FINETUNE_METHODS, f"one of {list(FINETUNE_METHODS)}"),
        choices=FINETUNE_METHODS,
    )
    lora_rank: int = option(
        8,
        "LoRA adapters' rank (default 8)",
        check=(lambda v: _is_int(v, 1, 1024), "an int in [1, 1024]"),
        parse=int,
    )
    lora_alpha: float | None = option(
        None,
        "LoRA scale numerator (default: the rank)",
        check=(lambda v: v is None or _is_positive(v), "a number > 0 or None"),
        parse=float,
    )
    lora_targets: list[str] | None = option(
        None,
        "backbone layers to adapt (default: KerasHub's, attention query,value)",
        check=(
            lambda v: (
                v is None
                or (isinstance(v, list) and bool(v) and all(isinstance(t, str) and t for t in v))
            ),
            "a non-empty list of layer names, or None",
        ),
        parse=parse_names,
        metavar="A,B",
    )

    freeze_word_embeddings: bool = option(
        False,
        "stage 2 leaves the word-embedding table as pretrained (trains every other weight)",
        check=(lambda v: isinstance(v, bool), "True or False"),
    )
    bucket_width: int | None = option(
        None,
        "pad each batch's texts to a multiple of N tokens; 1: group texts of equal length, no "
        f"padding (default {BUCKET_WIDTHS['torch']} on PyTorch, {BUCKET_WIDTH} on JAX and "
        "TensorFlow; on PyTorch the padding is skipped outside attention)",
        check=(lambda v: v is None or _is_int(v, 1, 512), "an int in [1, 512] or None"),
        parse=int,
        metavar="N",
    )

    label_smoothing: float = option(
        0.0,
        "smooth the one-hot targets: 1 - X on the label, X / K spread over all K classes "
        "(Keras' CategoricalCrossentropy label_smoothing); default 0",
        check=(_is_fraction, "a float in [0, 1)"),
        parse=float,
    )

    def __post_init__(self):
        if isinstance(self.preset, os.PathLike):
            self.preset = os.fspath(self.preset)
        for name in ("lora_targets", "weight_decay"):  # JSON and the CLI give lists
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.class_weight, dict):  # label names, as in `label_names`
            self.class_weight = {str(k): v for k, v in self.class_weight.items()}
        for field in dataclasses.fields(self):
            ok, allowed = field.metadata["check"]
            value = getattr(self, field.name)
            if not ok(value):
                received = f"{field.name}={value!r}"
                if wording.on_command_line():
                    received = f"{flag_name(field)} {value}"
                raise ValueError(f"{field.name} must be {allowed}. Received: {received}")
        if self.warmup_epochs + self.finetune_epochs == 0:
            raise ValueError(
                "At least one stage needs epochs. Received: "
                f"{wording.option('warmup_epochs', 0)}, {wording.option('finetune_epochs', 0)}"
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

    def stage_options(self, stage: str) -> dict:
        """The optimizer, schedule and frozen-weight options of `stage` (`"warmup"` or
        `"finetune"`), as `kerasft.training.recipe.prepare_stage` takes them: the one place that
        maps the recipe's per-stage values (`<stage>_learning_rate`, `weight_decay`, the stage-2
        schedule, `freeze_word_embeddings`) to a stage."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}. Received: stage={stage!r}")
        finetune = stage == "finetune"
        return {
            "learning_rate": getattr(self, f"{stage}_learning_rate"),
            "linear_decay": finetune and self.finetune_schedule == "linear",
            "warmup_ratio": self.warmup_ratio if finetune else 0.0,
            "weight_decay": self.stage_weight_decay(stage),
            "max_grad_norm": self.max_grad_norm,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "loss_scale": self.mixed_precision == "float16",
            "label_smoothing": self.label_smoothing,
            "freeze_word_embeddings": finetune and self.freeze_word_embeddings,
        }

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
