"""The resumable two-stage training loop: a Keras classifier, a `RecipeConfig`, encoded batches.

`StageLoop(classifier, recipe).run(train, validation)` trains stage 1 (backbone frozen) and
stage 2 (everything, or LoRA adapters), tracks the best stage-2 epoch, stops early, and with a
`kerasft.training.checkpoint.CheckpointDir` saves after every epoch and resumes from its state so
that a resumed run ends with the same weights as an uninterrupted one. It knows nothing of texts,
labels or files: `kerasft.training.tuner.TwoStageFineTuner` gives it encoded batches.

Example:
    >>> loop = StageLoop(classifier, RecipeConfig(warmup_epochs=1, finetune_epochs=1))
    >>> result = loop.run(train_batches, validation_batches)
    >>> result.history.history["val_accuracy"]
"""

from __future__ import annotations

import dataclasses
import logging
import time

import keras
import numpy as np

from kerasft.model import lora
from kerasft.training import recipe
from kerasft.training.checkpoint import (
    CheckpointDir,
    restore_optimizer,
    set_global_rng_state,
    weights_sha256,
)
from kerasft.training.config import STAGES, RecipeConfig
from kerasft.training.dropout import rand_masks

log = logging.getLogger("kerasft.training.tuner")


@dataclasses.dataclass
class TrainingResult:
    """What `StageLoop.run` reports.

    Attributes:
        history: the merged `History` (stage 1 then stage 2; `history["stage"]` per epoch).
        seconds: wall seconds per stage (and `"checkpoints"`: the part spent writing them).
        samples_per_second: training rows per second of each stage.
        selected_epoch: which epoch the final weights come from, and why.
        parameters: trainable and total parameters as stage 2 trained them.
        validated: `(confusion matrix, weights' SHA-256)` of the selected epoch's validation
            pass as `fit` scored it, or None (no validation, a stage-1 epoch, or one from
            before a resume).
        compile_seconds: per stage, the part of its seconds spent compiling or building
            kernels (`_CompileTime`).
    """

    history: keras.callbacks.History
    seconds: dict[str, float]
    samples_per_second: dict[str, float]
    selected_epoch: dict
    parameters: dict[str, int]
    validated: tuple[np.ndarray, str] | None = None
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


class StageLoop:
    """Both stages of the recipe on one classifier, resumable from a checkpoint directory.

    Args:
        classifier: the KerasHub classifier to train (in place).
        recipe: the `RecipeConfig`.
        store: a `CheckpointDir` to save every epoch to and resume from, or None.
        callbacks: user callbacks; they see the whole classifier (`_OnClassifier`).
        class_weight: `{class id: weight}` for Keras' `fit`, or None.
        verbose: Keras verbosity.
    """

    def __init__(
        self,
        classifier,
        recipe: RecipeConfig,
        *,
        store: CheckpointDir | None = None,
        callbacks: list | None = None,
        class_weight: dict[int, float] | None = None,
        verbose: int | str = "auto",
    ):
        self.classifier, self.recipe, self.store = classifier, recipe, store
        self.callbacks, self.class_weight = list(callbacks or []), class_weight
        self.verbose = verbose
        self._core = None

    def core(self) -> keras.Model:
        """The preprocessor-free view of the classifier (built once)."""
        if self._core is None:
            self._core = recipe.core_model(self.classifier)
        return self._core

    def run(self, train, validation=None, state: dict | None = None) -> TrainingResult:
        """Trains both stages (from `state`, a checkpoint's, when resuming).

        Args:
            train: shuffled `BucketedBatches` of the training rows.
            validation: unshuffled batches scored after every epoch, or None.
            state: the checkpoint state to resume from (`store.load()`), or None.

        Returns:
            A `TrainingResult`.
        """
        run = RunState(state, self.recipe.monitor)
        if state is not None:
            if state["stage"] == "finetune" and self.recipe.finetune_method == "lora":
                self.enable_lora()  # the checkpoint holds the adapters' weights
            run.optimizer, run.rng = self.store.restore(state, self.core())
            train.set_epoch(state["train_epoch"])
            log.info(
                "resuming from %s: %d of %d epochs done (%s)",
                self.store.directory, state["epochs_done"],
                self.recipe.warmup_epochs + self.recipe.finetune_epochs, state["stage"],
            )  # fmt: skip
        for stage in STAGES:
            self._run_stage(stage, train, validation, run)
        seconds = dict(run.seconds)
        selected = self._select(run)
        if self.store is not None:  # part of the stage seconds above, reported apart
            seconds["checkpoints"] = self.store.seconds
        return TrainingResult(
            history=run.history(),
            seconds=seconds,
            samples_per_second={
                stage: len(train.lengths) * run.epochs(stage) / run.seconds[stage]
                if run.seconds.get(stage)
                else 0.0
                for stage in STAGES
            },  # fmt: skip
            selected_epoch=selected,
            # as stage 2 trained them (its frozen weights), or as they are when it did not run here
            parameters=run.parameters or lora.parameter_counts(self.core()),
            validated=run.validated.get(selected["epoch"]),
            compile_seconds=dict(run.compile_seconds),
        )

    def enable_lora(self) -> None:
        """Puts the recipe's LoRA adapters on the backbone (freezing its base weights)."""
        r = self.recipe
        count = lora.enable_lora(self.classifier, r.lora_rank, r.lora_alpha, r.lora_targets)
        log.info("LoRA: rank %d adapters on %d layers; the base weights are frozen",
                 r.lora_rank, count)  # fmt: skip

    def _run_stage(self, stage: str, train, val, run: RunState) -> None:
        r, classifier = self.recipe, self.classifier
        epochs = r.warmup_epochs if stage == "warmup" else r.finetune_epochs
        first = 0 if stage == "warmup" else r.warmup_epochs
        train_base = stage == "finetune"
        lora_stage = train_base and r.finetune_method == "lora"
        if epochs == 0 or run.stage_done(stage):
            if not lora_stage:  # LoRA: `enable_lora` froze the base; its flags stay as they are
                classifier.backbone.trainable = True
            return
        if lora_stage:
            if not lora.adapted_layers(classifier):
                self.enable_lora()
            train_base = "lora"
        else:
            classifier.backbone.trainable = train_base
        # Stage seconds include preparing it (stage 1: the backbone's pass over the data).
        base_seconds, start = run.seconds.get(stage, 0.0), time.perf_counter()
        model, fit_x, fit_val = recipe.prepare_stage(
            classifier, train, val, epochs=epochs, train_base=train_base, verbose=self.verbose,
            **r.stage_options(stage),
            # Multi-process: no feature cache (gathering predictions needs every process).
            cache_features=r.cache_features and train.shard is None,
        )  # fmt: skip
        if stage == "finetune":
            run.parameters = lora.parameter_counts(model)
        done = run.epochs(stage)
        if done:  # resuming inside this stage
            fit_x.set_epoch(run.state["data_epoch"])
            restore_optimizer(model, run.optimizer)
        if run.rng is not None and not done:
            # A stage-end checkpoint: taken after `fit` returned, so continue from before `fit`.
            set_global_rng_state(run.rng)
            run.rng = None
        tracker = _EpochEnd(self, stage, run, fit_x, train, first + epochs, run.rng)
        tracker.val_loss_scale, tracker.start = padding_scale(fit_val), start
        run.rng = None
        compiling = _CompileTime(fit_x, fit_val)
        with rand_masks(model):
            model.fit(
                fit_x,
                validation_data=fit_val,
                epochs=first + epochs,
                initial_epoch=first + done,
                callbacks=[tracker, compiling]
                + [_OnClassifier(cb, classifier) for cb in self.callbacks],
                class_weight=self.class_weight,
                verbose=self.verbose,
                shuffle=False,  # `fit_x` reshuffles itself from the seed and its epoch number
            )
        run.seconds[stage] = base_seconds + time.perf_counter() - start
        run.compile_seconds[stage] = run.compile_seconds.get(stage, 0.0) + compiling.seconds()
        run.finish_stage(stage, train.epoch)
        if self.store is not None:
            self.store.save(run.to_state(stage), self.core(), model.optimizer)
        if train_base != "lora":  # trainable again, as saved. The word table by name: on
            # TensorFlow, Keras' `KerasAutoTrackable.__setattr__` skips `x.trainable = True` when
            # `x.trainable is True` already, so the backbone's recursive setter never reaches it.
            classifier.backbone.trainable = True
            classifier.backbone.token_embedding.trainable = True

    def _select(self, run: RunState) -> dict:
        """Restores the best stage-2 epoch when `select_best` asks for it; returns the choice."""
        last, select_best, best = len(run.logs), self.recipe.select_best, run.best
        selected = {"epoch": last, "stage": run.logs[-1]["stage"] if last else None,
                    "reason": "last epoch", "stopped_early": run.stopped_early}  # fmt: skip
        if select_best is None or best is None:
            return selected
        monitor = f"val_{select_best}"
        selected = {
            "epoch": best["epoch"],
            "stage": 2,
            "reason": f"best {monitor} of stage 2 (select_best={select_best!r})",
            monitor: best["value"],
            "stopped_early": run.stopped_early,
        }
        if best["epoch"] != last:
            if self.store is not None:
                self.store.restore_best(self.core())
            else:
                for v, value in zip(self.core().weights, run.best_weights, strict=True):
                    v.assign(value)
            log.info("restored epoch %d (best %s %.4f)", best["epoch"], monitor, best["value"])
        return selected


def merge_histories(*histories: keras.callbacks.History) -> keras.callbacks.History:
    """Concatenates stage histories into one `History`; `history["stage"]` numbers the stages.

    Args:
        *histories: one `History` per stage, in order (empty ones are allowed).

    Returns:
        A new `keras.callbacks.History`.
    """
    merged = keras.callbacks.History()
    merged.history, merged.epoch = {"stage": []}, []
    for stage, h in enumerate(histories, start=1):
        n = len(h.epoch) if getattr(h, "epoch", None) else 0
        for key, values in (h.history if n else {}).items():
            merged.history.setdefault(key, [None] * len(merged.epoch)).extend(values)
        merged.history["stage"] += [stage] * n
        merged.epoch += list(range(len(merged.epoch), len(merged.epoch) + n))
    return merged


class RunState:
    """What a run has done so far: per-epoch logs, finished stages, best epoch, seconds."""

    def __init__(self, state: dict | None, monitor: tuple[str, str] | None):
        self.state = state or {}
        self.logs: list[dict] = list(self.state.get("history", []))
        self.stages_done: list[str] = list(self.state.get("stages_done", []))
        self.seconds: dict[str, float] = dict(self.state.get("seconds", {}))
        self.compile_seconds: dict[str, float] = dict(self.state.get("compile_seconds", {}))
        self.best: dict | None = self.state.get("best")
        self.wait: int = self.state.get("wait", 0)
        self.stopped_early: int | None = self.state.get("stopped_early")
        self.monitor = monitor
        self.optimizer: dict = {}
        self.best_weights: list | None = None
        self.rng: dict | None = None
        self.parameters: dict[str, int] | None = None  # counted as stage 2 starts
        # stage-2 epoch (1-based) -> (validation confusion matrix, SHA-256 of the weights it scored)
        self.validated: dict[int, tuple[np.ndarray, str]] = {}

    def epochs(self, stage: str) -> int:
        number = STAGES.index(stage) + 1
        return sum(1 for logs in self.logs if logs["stage"] == number)

    def stage_done(self, stage: str) -> bool:
        return stage in self.stages_done

    def finish_stage(self, stage: str, train_epoch: int) -> None:
        self.stages_done.append(stage)
        self.state["train_epoch"] = train_epoch

    def to_state(self, stage: str, **extra) -> dict:
        return {
            "stage": stage,
            "epochs_done": len(self.logs),
            "stages_done": self.stages_done,
            "history": self.logs,
            "best": self.best,
            "wait": self.wait,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "train_epoch": self.state.get("train_epoch", 0),
            **extra,
        }

    def history(self) -> keras.callbacks.History:
        merged = keras.callbacks.History()
        keys = [k for logs in self.logs for k in logs if k != "stage"]
        merged.history = {k: [logs.get(k) for logs in self.logs] for k in dict.fromkeys(keys)}
        merged.history["stage"] = [logs["stage"] for logs in self.logs]
        merged.epoch = list(range(len(self.logs)))
        return merged


def padding_scale(validation) -> float:
    """What makes `val_loss` the mean over the real rows when validation batches were padded.

    Keras weighs each batch's loss by its row count, padding rows included, so with `pad`
    zero-weight rows it reports `sum(real losses) / (n + pad)`; times `(n + pad) / n` is the mean.
    """
    pad = getattr(validation, "padded", 0)
    if not pad:
        return 1.0
    n = len(validation.lengths) if hasattr(validation, "lengths") else len(validation.features)
    return (n + pad) / n


class _EpochEnd(keras.callbacks.Callback):
    """Records each epoch's logs, tracks the best stage-2 epoch and writes the checkpoint."""

    def __init__(self, loop: StageLoop, stage, run, fit_x, train, last_epoch, rng=None):
        super().__init__()
        self.rng = rng
        self.loop, self.stage, self.run, self.store = loop, stage, run, loop.store
        self.fit_x, self.train, self.last_epoch = fit_x, train, last_epoch
        self.data_start = fit_x.epoch - run.epochs(stage)
        self.base_seconds = run.seconds.get(stage, 0.0)
        self.start = time.perf_counter()
        self.val_loss_scale = 1.0

    def on_epoch_begin(self, epoch, logs=None):
        if self.rng is not None:
            # An epoch-end checkpoint: the global random streams (torch's dropout and data
            # loader) continue at the same point of the epoch loop as in an uninterrupted run.
            set_global_rng_state(self.rng)
            self.rng = None

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val_loss" in logs and self.val_loss_scale != 1.0:
            logs["val_loss"] = float(logs["val_loss"]) * self.val_loss_scale
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.run.logs.append({**logs, "stage": STAGES.index(self.stage) + 1})
        if self.stage == "finetune" and "val_loss" in logs:  # Keras' metrics hold validation's
            confusion = recipe.validation_confusion(self.model)
            if confusion is not None:  # with the weights it scored, before any callback's change
                weights = weights_sha256(self.loop.classifier)
                self.run.validated[len(self.run.logs)] = (confusion, weights)
        if self.stage == "finetune" and self.run.monitor is not None:
            self._track(logs)
        self.run.seconds[self.stage] = self.base_seconds + time.perf_counter() - self.start
        # The stage's last epoch is saved by `_run_stage` once `fit` returns.
        if self.store is not None and epoch + 1 < self.last_epoch and not self.model.stop_training:
            state = self.run.to_state(
                self.stage,
                data_epoch=self.data_start + self.run.epochs(self.stage),
                train_epoch=self.train.epoch,
            )
            self.store.save(state, self.loop.core(), self.model.optimizer)

    def _track(self, logs):
        run, recipe_config = self.run, self.loop.recipe
        key, mode = run.monitor
        if key not in logs:
            raise ValueError(f"{key!r} is not in the epoch logs {sorted(logs)}.")
        value = logs[key]
        best = run.best
        if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
            run.best, run.wait = {"epoch": len(run.logs), "value": value, "monitor": key}, 0
            if recipe_config.select_best is not None:
                core = self.loop.core()
                if self.store is not None:
                    self.store.save_best(core)
                else:
                    run.best_weights = [keras.ops.convert_to_numpy(v) for v in core.weights]
            return
        run.wait += 1
        patience = recipe_config.early_stopping_patience
        if patience is not None and run.wait >= patience:
            self.model.stop_training = True
            run.stopped_early = len(run.logs)
            log.info("early stopping after epoch %d: %s did not improve for %d epochs",
                     len(run.logs), key, run.wait)  # fmt: skip


class _CompileTime(keras.callbacks.Callback):
    """Seconds a stage spent compiling or building kernels, on every backend alike: for each
    batch shape, its first step's time beyond that shape's usual step (XLA compiles the train
    and validation steps once per shape on JAX and TensorFlow; PyTorch's oneDNN builds its
    kernels for a new shape), training and validation steps apiece.

    A shape's usual step is the median of its other steps (of every other step, for a shape
    seen once). The first epoch of a run pays them; a resumed or cached run pays less.
    """

    def __init__(self, train, validation):
        super().__init__()
        self.data = {"train": train, "test": validation}
        self.steps: dict[str, dict] = {"train": {}, "test": {}}  # phase -> shape -> [seconds]
        self._start = 0.0

    def _begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def _end(self, phase: str, batch: int) -> None:
        seconds = time.perf_counter() - self._start
        shape_of = getattr(self.data[phase], "shape_of", None)
        shape = shape_of(batch) if shape_of is not None else None
        self.steps[phase].setdefault(shape, []).append(seconds)

    on_train_batch_begin = on_test_batch_begin = _begin

    def on_train_batch_end(self, batch, logs=None):
        self._end("train", batch)

    def on_test_batch_end(self, batch, logs=None):
        self._end("test", batch)

    def seconds(self) -> float:
        """The stage's compile seconds so far."""
        total = 0.0
        for shapes in self.steps.values():
            later = [s for times in shapes.values() for s in times[1:]]
            for times in shapes.values():
                usual = times[1:] or later
                total += max(0.0, times[0] - (float(np.median(usual)) if usual else 0.0))
        return total


class _OnClassifier(keras.callbacks.Callback):
    """Shows a user's callback the whole classifier (raw strings in) instead of the model that
    trains (the head alone in a cached stage 1, the preprocessor-free graph in stage 2).

    Both share their variables, so `ModelCheckpoint` or `EarlyStopping(restore_best_weights=True)`
    save and restore the real model; a `stop_training` request is passed on to the trainer.
    """

    def __init__(self, callback: keras.callbacks.Callback, classifier):
        super().__init__()
        self.callback, self.classifier, self.trainer = callback, classifier, None

    def set_model(self, model):
        self.trainer = model
        self.classifier.stop_training = False
        self.callback.set_model(self.classifier)

    def set_params(self, params):
        self.callback.set_params(params)


def _forward(name):
    def hook(self, *args, **kwargs):
        getattr(self.callback, name)(*args, **kwargs)
        if getattr(self.classifier, "stop_training", False) and self.trainer is not None:
            self.trainer.stop_training = True

    hook.__name__ = name
    return hook


_MODES, _ENDS = ("train", "test", "predict"), ("begin", "end")
for _hook in (
    *(f"on_{mode}_{end}" for mode in _MODES for end in _ENDS),
    *(f"on_{mode}_batch_{end}" for mode in _MODES for end in _ENDS),
    "on_epoch_begin",
    "on_epoch_end",
):
    setattr(_OnClassifier, _hook, _forward(_hook))
