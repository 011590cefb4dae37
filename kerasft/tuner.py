"""`TwoStageFineTuner`: warm up the head on a frozen backbone, then fine-tune everything."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from kerasft import distribute, lora, recipe
from kerasft.checkpoint import CheckpointDir, restore_optimizer, set_global_rng_state
from kerasft.config import STAGES, RecipeConfig
from kerasft.data import DataError, TextDataset, encode_labels, label_values
from kerasft.fileio import atomic_write_text, default_file_mode
from kerasft.precision import check_mixed_precision, policy_name, to_float32

log = logging.getLogger(__name__)


class TwoStageFineTuner:
    """Two-stage fine-tuning of a KerasHub `DistilBertTextClassifier`.

    Stage 1 freezes the backbone and trains the classification head at
    `warmup_learning_rate`; stage 2 unfreezes every layer and trains at `finetune_learning_rate`.
    Both stages use a fresh Adam, batches of `batch_size`, one-hot labels with
    `CategoricalCrossentropy(from_logits=True)` and accuracy. Texts are tokenized once, batches
    are padded only to their length bucket and reshuffled every epoch with `seed`. Runs unchanged
    on the JAX, TensorFlow and PyTorch backends; the new head starts from the same seeded
    weights on each of them.

    Args:
        preset: KerasHub preset name, local preset/checkpoint directory, or `"all_minilm_l6_v2"`
            (offline, default).
        num_classes: number of classes; None infers it from the labels given to `fit`.
        sequence_length: maximum tokens per text.
        warmup_epochs: stage-1 epochs.
        warmup_learning_rate: stage-1 learning rate.
        finetune_epochs: stage-2 epochs.
        finetune_learning_rate: stage-2 learning rate.
        batch_size: rows per batch.
        seed: seed for initialisation, dropout and shuffling.
        cache_features: train stage 1 on backbone features computed once.
        finetune_schedule: `"constant"` or `"linear"` (decay to 0) stage-2 learning rate.
        select_best: `"accuracy"`, `"f1"` or `"loss"`: restore the stage-2 epoch with the best
            validation score before returning (needs `validation_data`); None keeps the last.
        early_stopping_patience: stop stage 2 after this many epochs without improvement of
            the validation score; None never stops early.
        weight_decay: AdamW's decoupled weight decay, one float or `[warmup, finetune]`; 0
            keeps Adam.
        warmup_ratio: fraction of stage 2's steps with a linear learning-rate warm-up.
        max_grad_norm: clip gradients to this global norm; None does not clip.
        gradient_accumulation_steps: batches whose gradients make one optimizer step.
        mixed_precision: `"bfloat16"` or `"float16"` mixed precision; None is float32.
        class_weight: `"balanced"` or `{label name: weight}`; None weighs every row 1.
        finetune_method: `"full"` or `"lora"` (stage 2 trains low-rank adapters and the head).
        lora_rank: LoRA rank. lora_alpha: LoRA scale numerator (None: the rank).
        lora_targets: backbone layers to adapt (None: attention query and value).
            See `kerasft.config.RecipeConfig` for each option.
        distribution: data-parallel training: None (one device), a device count, `"all"`, or a
            ready `keras.distribution.DataParallel` / `tf.distribute.Strategy`; see
            `kerasft.distribute.data_parallel` (JAX and TensorFlow only). `batch_size` stays
            the global batch and must be a multiple of the device count.
        callbacks: Keras callbacks for both stages (not part of `get_config`). They see the
            whole classifier (raw strings in), so a `ModelCheckpoint` saves a usable model.
        verbose: Keras verbosity for fit/predict progress.

    Attributes:
        model: the fitted KerasHub classifier (raw strings in, logits out), or None before `fit`.
        label_names: class names, index = class id.
        history: the merged `History` of the last `fit`.
        backend: the Keras backend the model was trained on.
        stage_seconds: wall seconds per stage of the last `fit` (and `"checkpoints"`: the part
            of them spent writing checkpoints, with `checkpoint_dir`).
        data_parallel: how the last `fit` was distributed (e.g. `"DataParallel over 2 devices
            (cpu:0, cpu:1)"`), or None on one device.

    Example:
        >>> tuner = TwoStageFineTuner("all_minilm_l6_v2", warmup_epochs=1, finetune_epochs=1)
        >>> history = tuner.fit(texts, labels, validation_data=(val_texts, val_labels))
        >>> tuner.predict(["area man wins argument with toaster"])
        array([1])
    """

    def __init__(
        self,
        preset: str = RecipeConfig.preset,
        num_classes: int | None = None,
        sequence_length: int = RecipeConfig.sequence_length,
        warmup_epochs: int = RecipeConfig.warmup_epochs,
        warmup_learning_rate: float = RecipeConfig.warmup_learning_rate,
        finetune_epochs: int = RecipeConfig.finetune_epochs,
        finetune_learning_rate: float = RecipeConfig.finetune_learning_rate,
        batch_size: int = RecipeConfig.batch_size,
        seed: int = RecipeConfig.seed,
        cache_features: bool = RecipeConfig.cache_features,
        finetune_schedule: str = RecipeConfig.finetune_schedule,
        select_best: str | None = RecipeConfig.select_best,
        early_stopping_patience: int | None = RecipeConfig.early_stopping_patience,
        weight_decay: float | list[float] = RecipeConfig.weight_decay,
        warmup_ratio: float = RecipeConfig.warmup_ratio,
        max_grad_norm: float | None = RecipeConfig.max_grad_norm,
        gradient_accumulation_steps: int = RecipeConfig.gradient_accumulation_steps,
        mixed_precision: str | None = RecipeConfig.mixed_precision,
        class_weight: str | dict | None = RecipeConfig.class_weight,
        finetune_method: str = RecipeConfig.finetune_method,
        lora_rank: int = RecipeConfig.lora_rank,
        lora_alpha: float | None = RecipeConfig.lora_alpha,
        lora_targets: list[str] | None = RecipeConfig.lora_targets,
        distribution=None,
        callbacks: list | None = None,
        verbose: int | str = "auto",
    ):
        self.recipe = RecipeConfig(
            preset=preset,
            num_classes=num_classes,
            sequence_length=sequence_length,
            warmup_epochs=warmup_epochs,
            warmup_learning_rate=warmup_learning_rate,
            finetune_epochs=finetune_epochs,
            finetune_learning_rate=finetune_learning_rate,
            batch_size=batch_size,
            seed=seed,
            cache_features=cache_features,
            finetune_schedule=finetune_schedule,
            select_best=select_best,
            early_stopping_patience=early_stopping_patience,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            max_grad_norm=max_grad_norm,
            gradient_accumulation_steps=gradient_accumulation_steps,
            mixed_precision=mixed_precision,
            class_weight=class_weight,
            finetune_method=finetune_method,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
        )
        for name, value in self.recipe.to_dict().items():
            setattr(self, name, value)
        self.callbacks = list(callbacks or [])
        self.distribution = distribution
        self.verbose = verbose
        self._plan = None  # the data-parallel plan predictions run under (set by `fit`)
        self.data_parallel: str | None = None  # how the last `fit` was distributed, if it was
        self.model = None
        self.label_names: list[str] | None = None
        self.history: keras.callbacks.History | None = None
        self.backend: str | None = None
        self.stage_seconds: dict[str, float] = {}
        self.stage_samples_per_second: dict[str, float] = {}
        self.selected_epoch: dict | None = None
        self.parameters: dict[str, int] = {}
        self.adapter_model = None  # with finetune_method="lora": the classifier with adapters

    # --- config -------------------------------------------------------------------------------

    def get_config(self) -> dict:
        """Returns every constructor argument except `callbacks` (not serialisable).

        A `distribution` given as an engine object (not a device count) is left out (None).
        """
        distribution = self.distribution
        if not (distribution is None or isinstance(distribution, (int, str))):
            distribution = None
        return {**self.recipe.to_dict(), "distribution": distribution, "verbose": self.verbose}

    @classmethod
    def from_config(cls, config: dict) -> TwoStageFineTuner:
        """Rebuilds an (unfitted) tuner from `get_config()`."""
        return cls(**config)

    # --- training -----------------------------------------------------------------------------

    def fit(
        self,
        x,
        y=None,
        validation_data=None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> keras.callbacks.History:
        """Runs both stages and returns one merged `History`.

        With `checkpoint_dir`, the run is saved there after every epoch of both stages (weights,
        optimizer, data order, history; see `kerasft.checkpoint`). Calling `fit` again with the
        same arguments and directory resumes from the last completed epoch and ends with the
        same weights as an uninterrupted run; a finished checkpoint returns at once.

        Args:
            x: texts (list/array of str) or a `kerasft.data.TextDataset` (then `y` is None).
            y: labels, one per row: ints or strings, both class *names* as in data files
                (`{1, 2}` is 2 classes named "1" and "2"; see `kerasft.data.encode_labels`),
                or one-hot rows `(N, K)`.
            validation_data: `(texts, labels)` or a `TextDataset`, scored after every epoch.
                Required by `select_best` and `early_stopping_patience`.
            checkpoint_dir: directory for per-epoch checkpoints, or None (no checkpoints).

        Returns:
            A `keras.callbacks.History` whose lists are stage 1 then stage 2;
            `history.history["stage"]` holds 1 or 2 per epoch. `self.selected_epoch` says which
            epoch the final weights come from.

        Raises:
            DataError: mismatched lengths, fewer rows than one batch, a single class, or labels
                outside the known classes.
            ValueError: `select_best` or `early_stopping_patience` without `validation_data`.
            kerasft.checkpoint.CheckpointMismatchError: `checkpoint_dir` holds another run.

        Example:
            >>> tuner = TwoStageFineTuner(select_best="f1", early_stopping_patience=2)
            >>> tuner.fit(train, validation_data=val, checkpoint_dir="ckpt")  # again: resumes
        """
        texts, labels = self._texts_and_labels(x, y, fitting=True)
        val = None
        if validation_data is not None:  # labels matched to the training classes by name
            if isinstance(validation_data, TextDataset):
                validation_data = (validation_data, None)
            val_texts, val_labels = self._texts_and_labels(*validation_data)
        elif self.recipe.monitor is not None:
            raise ValueError(
                "select_best and early_stopping_patience score the validation set. Received: "
                f"select_best={self.select_best!r}, early_stopping_patience="
                f"{self.early_stopping_patience!r}, validation_data=None"
            )
        self._class_weights = self._class_weight_ids(labels)
        plan = self._data_parallel(checkpoint_dir)
        store = None
        if checkpoint_dir is not None:
            store = CheckpointDir(checkpoint_dir, self._fingerprint(texts, labels))
        state = store.load() if store is not None else None
        if self.mixed_precision is not None:
            check_mixed_precision(self.mixed_precision)  # a clear error, before any loading
        keras.utils.set_random_seed(self.seed)
        self.backend = keras.backend.backend()
        replicas, shard = (plan.replicas, plan.shard) if plan is not None else (1, None)
        with distribute.maybe_scope(plan):
            self.model = recipe.load_pretrained_classifier(
                self.preset,
                self.num_classes,
                self.sequence_length,
                policy_name(self.mixed_precision),
            )
            recipe.initialize_head(self.model, self.seed)
            log.info("tokenizing %d training texts", len(texts))
            train = recipe.encode(
                self.model, texts, labels, batch_size=self.batch_size, shuffle=True,
                seed=self.seed, verbose=self.verbose, replicas=replicas, shard=shard,
            )  # fmt: skip
            if validation_data is not None:
                val = recipe.encode(
                    self.model, val_texts, val_labels, batch_size=self.batch_size,
                    verbose=self.verbose, replicas=replicas, shard=shard,
                )  # fmt: skip
            if plan is not None:
                self._log_remainders(train, val)
                if plan.shard is not None and self.cache_features and self.warmup_epochs:
                    log.info("multi-process: stage 1 runs the frozen backbone on every step "
                             "(a feature cache would need every process's rows)")  # fmt: skip

            run = _RunState(state, self.recipe.monitor)
            self.adapter_model = None
            lora_resume = state is not None and state["stage"] == "finetune"
            if lora_resume and self.finetune_method == "lora":
                self._enable_lora()  # the checkpoint holds the adapters' weights
            if state is not None:
                run.optimizer, run.rng = store.restore(state, self._core())
                train.set_epoch(state["train_epoch"])
                log.info(
                    "resuming from %s: %d of %d epochs done (%s)",
                    store.directory,
                    state["epochs_done"],
                    self.warmup_epochs + self.finetune_epochs,
                    state["stage"],
                )
            for stage in STAGES:
                self._run_stage(stage, train, val, run, store)
            self._select(run, store)
            self.parameters = lora.parameter_counts(self._core())  # as stage 2 trained it
        if lora.adapted_layers(self.model):
            self.adapter_model = self.model
        # What is saved and exported: float32, adapters merged into the kernels. In a
        # multi-process run, a copy local to this process: predictions need no other process.
        local = plan is not None and plan.process_count > 1
        self._plan = None if local else plan
        self.data_parallel = None if plan is None else plan.describe()
        with distribute.maybe_scope(self._plan):
            self.model = to_float32(self.model, copy=local)
        self.stage_seconds = dict(run.seconds)
        if store is not None:  # part of the stage seconds above, reported apart
            self.stage_seconds["checkpoints"] = store.seconds
        self.stage_samples_per_second = {
            stage: len(train.lengths) * run.epochs(stage) / run.seconds[stage]
            if run.seconds.get(stage)
            else 0.0
            for stage in STAGES
        }
        self.history = run.history()
        return self.history

    def _run_stage(self, stage, train, val, run, store):
        epochs = getattr(self, f"{stage}_epochs")
        first = 0 if stage == "warmup" else self.warmup_epochs
        train_base = stage == "finetune"
        lora_stage = train_base and self.finetune_method == "lora"
        if epochs == 0 or run.stage_done(stage):
            if not lora_stage:  # LoRA: `enable_lora` froze the base; its flags stay as they are
                self.model.backbone.trainable = True
            return
        if lora_stage:
            if not lora.adapted_layers(self.model):
                self._enable_lora()
            train_base = "lora"
        else:
            self.model.backbone.trainable = train_base
        # Stage seconds include preparing it (stage 1: the backbone's pass over the data).
        base_seconds, start = run.seconds.get(stage, 0.0), time.perf_counter()
        model, fit_x, fit_val = recipe.prepare_stage(
            self.model,
            train,
            val,
            epochs=epochs,
            learning_rate=getattr(self, f"{stage}_learning_rate"),
            train_base=train_base,
            # Multi-process: no feature cache (gathering predictions needs every process).
            cache_features=self.cache_features and train.shard is None,
            linear_decay=stage == "finetune" and self.finetune_schedule == "linear",
            warmup_ratio=self.warmup_ratio if stage == "finetune" else 0.0,
            verbose=self.verbose,
            weight_decay=self.recipe.stage_weight_decay(stage),
            max_grad_norm=self.max_grad_norm,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            loss_scale=self.mixed_precision == "float16",
        )
        done = run.epochs(stage)
        if done:  # resuming inside this stage
            fit_x.set_epoch(run.state["data_epoch"])
            restore_optimizer(model, run.optimizer)
        if run.rng is not None and not done:
            # A stage-end checkpoint: taken after `fit` returned, so continue from before `fit`.
            set_global_rng_state(run.rng)
            run.rng = None
        tracker = _EpochEnd(self, stage, run, store, fit_x, train, first + epochs, run.rng)
        tracker.val_loss_scale = _padding_scale(fit_val)
        run.rng = None
        callbacks = [tracker] + [_OnClassifier(cb, self.model) for cb in self.callbacks]
        tracker.start = start
        model.fit(
            fit_x,
            validation_data=fit_val,
            epochs=first + epochs,
            initial_epoch=first + done,
            callbacks=callbacks,
            class_weight=self._class_weights,
            verbose=self.verbose,
            shuffle=False,  # `fit_x` reshuffles itself from the seed and its epoch number
        )
        run.seconds[stage] = base_seconds + time.perf_counter() - start
        run.finish_stage(stage, train.epoch)
        if store is not None:
            store.save(run.to_state(stage), self._core(), model.optimizer)
        if train_base != "lora":
            self.model.backbone.trainable = True

    def _data_parallel(self, checkpoint_dir):
        """The run's `DataParallelPlan` (None for one device), checked against the options."""
        plan = distribute.data_parallel(self.distribution)
        if plan is None:
            return None
        plan.check_batch_size(self.batch_size)
        if plan.process_count > 1 and checkpoint_dir is not None:
            raise ValueError(
                "checkpoint_dir is not supported in a multi-process run: every process would "
                "have to read the same checkpoint to resume. Received: checkpoint_dir="
                f"{str(checkpoint_dir)!r} with {plan.process_count} processes."
            )
        log.info(
            "data parallel: %s; batch %d = %d rows per device",
            plan.describe(), self.batch_size, self.batch_size // plan.replicas,
        )  # fmt: skip
        return plan

    def _log_remainders(self, train, val) -> None:
        """Says how batches were made even across the devices (see `BucketedBatches`)."""
        n, bs, replicas = len(train.lengths), self.batch_size, train.replicas
        cached = self.cache_features and self.warmup_epochs and train.shard is None
        cached = n % bs % replicas if cached else train.dropped
        log.info(
            "even batches across %d devices: training leaves out %d row(s) per epoch "
            "(stage 1: %d), other rows each epoch; validation pads its "
            "last batch with %d zero-weight row(s)",
            replicas, train.dropped, cached, 0 if val is None else val.padded,
        )  # fmt: skip

    def _enable_lora(self) -> None:
        count = lora.enable_lora(self.model, self.lora_rank, self.lora_alpha, self.lora_targets)
        log.info(
            "LoRA: rank %d adapters on %d layers; the base weights are frozen",
            self.lora_rank,
            count,
        )

    def _select(self, run, store):
        """Restores the best stage-2 epoch when `select_best` asks for it; records the choice."""
        last = len(run.logs)
        self.selected_epoch = {"epoch": last, "stage": run.logs[-1]["stage"] if last else None}
        self.selected_epoch.update(reason="last epoch", stopped_early=run.stopped_early)
        best = run.best
        if self.select_best is None or best is None:
            return
        monitor = f"val_{self.select_best}"
        self.selected_epoch = {
            "epoch": best["epoch"],
            "stage": 2,
            "reason": f"best {monitor} of stage 2 (select_best={self.select_best!r})",
            monitor: best["value"],
            "stopped_early": run.stopped_early,
        }
        if best["epoch"] != last:
            if store is not None:
                store.restore_best(self._core())
            else:
                for v, value in zip(self._core().weights, run.best_weights, strict=True):
                    v.assign(value)
            log.info("restored epoch %d (best %s %.4f)", best["epoch"], monitor, best["value"])

    def _fingerprint(self, texts, labels) -> dict:
        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode("utf-8") + b"\0")
        digest.update(np.asarray(labels, dtype="int64").tobytes())
        recipe_config = {k: v for k, v in self.recipe.to_dict().items()}
        return {
            "recipe": recipe_config,
            "label_names": self.label_names,
            "train_sha256": digest.hexdigest(),
            "backend": keras.backend.backend(),
        }

    # --- inference ----------------------------------------------------------------------------

    def predict_proba(self, x) -> np.ndarray:
        """Returns class probabilities, shape `(N, num_classes)`, in input order."""
        data = self._encode(self._texts(x))
        with distribute.maybe_scope(self._plan):
            logits = self._core().predict(data, verbose=0)
        return keras.ops.convert_to_numpy(keras.ops.softmax(data.restore_order(logits), axis=-1))

    def predict(self, x) -> np.ndarray:
        """Returns predicted labels as the training data held them, comparable with its file.

        Ints when every label name is an integer (`"0"`, `"1"`, or `"1"`..`"5"` stars), else
        strings. `predict_proba(x).argmax(-1)` gives class ids (indices into `label_names`).
        """
        ids = np.argmax(self.predict_proba(x), axis=-1)  # raises first if not fitted
        return label_values(self.label_names)[ids]

    def evaluate(self, x, y=None) -> dict:
        """Returns `{"loss", "accuracy"}` of the fitted model on `x`, `y` (labels as in `fit`)."""
        texts, labels = self._texts_and_labels(x, y)
        data = self._encode(texts, labels)
        with distribute.maybe_scope(self._plan):
            core = self._core()
            if not core.compiled:
                # the rate is unused: loss and metrics only
                recipe.compile_classifier(core, 1e-3, weighted_metrics=self._plan is not None)
            result = core.evaluate(data, verbose=0, return_dict=True)
        result["loss"] *= _padding_scale(data)  # the mean over the real rows
        return result

    def _encode(self, texts, labels=None):
        """Unshuffled batches for inference, even across the devices predictions run on."""
        replicas = self._plan.replicas if self._plan is not None else 1
        return recipe.encode(
            self._fitted(), texts, labels, batch_size=self.batch_size, replicas=replicas
        )

    def score(self, x, y=None) -> dict:
        """Returns accuracy, precision, recall, F1 and the confusion matrix on `x`, `y`.

        Labels are given as in `fit`; string labels are matched to `label_names` by name.
        See `kerasft.metrics.classification_metrics`.
        """
        from kerasft.metrics import classification_metrics

        texts, labels = self._texts_and_labels(x, y)
        predicted = np.argmax(self.predict_proba(texts), axis=-1)
        return classification_metrics(labels, predicted, self.num_classes)

    # --- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Saves the classifier to `path` (`.keras`) and labels/config to `<path>.json`.

        Both files are written to temporary names first and renamed, so an interrupted save
        never leaves a half-written model.

        Raises:
            ValueError: if `path` does not end with `.keras`.
            RuntimeError: if the tuner is not fitted.
        """
        path = Path(path)
        if path.suffix != ".keras":
            raise ValueError(f"save() needs a path ending in .keras. Received: path={str(path)!r}")
        self._fitted()
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "label_names": self.label_names,
            "config": self.get_config(),
            "backend": self.backend,
        }
        fd, tmp_model = tempfile.mkstemp(suffix=".keras", dir=path.parent, prefix=".tmp-")
        os.close(fd)
        try:
            self.model.save(tmp_model)
            os.chmod(tmp_model, default_file_mode())
            atomic_write_text(_meta_path(path), json.dumps(meta, indent=2))
            os.replace(tmp_model, path)
        finally:
            if os.path.exists(tmp_model):
                os.remove(tmp_model)

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Writes the LoRA adapter alone: low-rank factors, head and `adapter.json`.

        `kerasft.lora.load_adapter(directory)` puts it back onto the base preset. `save` writes
        the merged model instead (an ordinary classifier).

        Raises:
            ValueError: the last `fit` was not a LoRA fit.
        """
        if self.adapter_model is None:
            raise ValueError(
                "No LoRA adapter to save: fit with finetune_method='lora' first. "
                f"Received: finetune_method={self.finetune_method!r}"
            )
        return lora.save_adapter(
            self.adapter_model, directory, self.recipe.to_dict(), self.label_names
        )

    def save_run(
        self,
        run_dir: str | os.PathLike,
        *,
        train=None,
        validation=None,
        test=None,
        source=None,
        overwrite: bool = False,
    ) -> Path:
        """Writes a run directory, as `kerasft fit` does, that `kerasft export`, `predict`,
        `evaluate` and `bench` accept.

        The model is saved first, then `validation` and `test` are scored into `metrics.json`.
        Without `source`, the given splits are stored in the run (`splits/*.jsonl`) so that an
        export verifies against them; with a `kerasft.rundir.DataSource`, the run records the
        data file (hashed) and rebuilds the splits from it. The directory is built beside
        `run_dir` and renamed into place, under a lock on `run_dir`.

        Args:
            run_dir: the run directory to create.
            train: training split (`(texts, labels)` or a `TextDataset`), stored with the run.
            validation: validation split, scored and stored.
            test: test split, scored and stored.
            source: the data file the splits were drawn from by the reference split, or None.
            overwrite: replace an existing non-empty `run_dir`.

        Returns:
            `run_dir` as a `Path`.

        Raises:
            RuntimeError: the tuner is not fitted.
            FileExistsError: `run_dir` is not empty and `overwrite` is False.
            kerasft.fileio.LockError: another process is writing `run_dir`.

        Example:
            >>> tuner.fit(train_texts, train_labels, validation_data=(val_texts, val_labels))
            >>> tuner.save_run("runs/mine", validation=(val_texts, val_labels),
            ...                test=(test_texts, test_labels))
            >>> # then: kerasft export runs/mine --format onnx --int8 dynamic --out exports/mine
        """
        from kerasft import rundir
        from kerasft.fileio import check_target_dir, remove_stale_temp_dirs, target_lock

        self._fitted()
        splits = {
            name: None if split is None else self._as_dataset(split)
            for name, split in (("train", train), ("validation", validation), ("test", test))
        }
        run_dir = Path(run_dir)
        with target_lock(run_dir, "Run directory"):
            remove_stale_temp_dirs(run_dir)
            check_target_dir(run_dir, overwrite, "Run directory")
            work = rundir.partial_dir(run_dir)
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            rundir.write_run(work, self, source=source, **splits)
            rundir.finish(work, run_dir)
        return run_dir

    def _as_dataset(self, split) -> TextDataset:
        if isinstance(split, TextDataset):
            texts, ids = self._texts_and_labels(split, None)
        else:
            texts, ids = self._texts_and_labels(*split)
        return TextDataset(texts, ids, list(self.label_names))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TwoStageFineTuner:
        """Loads a tuner saved with `save` (model, label names and recipe).

        Raises:
            FileNotFoundError: if the model or its `.json` sidecar is missing.
        """
        import keras_hub  # noqa: F401  (registers the KerasHub classes for deserialisation)

        path = Path(path)
        for p in (path, _meta_path(path)):
            if not p.is_file():
                raise FileNotFoundError(f"Saved tuner file not found: {str(p)!r}")
        meta = json.loads(_meta_path(path).read_text())
        tuner = cls.from_config(meta["config"])
        tuner.model = keras.saving.load_model(path)
        tuner.label_names = meta["label_names"]
        tuner.num_classes = len(tuner.label_names)
        tuner.backend = meta.get("backend")
        return tuner

    # --- helpers ------------------------------------------------------------------------------

    def _core(self) -> keras.Model:
        """The preprocessor-free view of `self.model`, built once per model (no retracing)."""
        cached = getattr(self, "_core_cache", None)
        if cached is None or cached[0] is not self._fitted():
            self._core_cache = (self.model, recipe.core_model(self.model))
        return self._core_cache[1]

    def _fitted(self):
        if self.model is None:
            raise RuntimeError("This TwoStageFineTuner is not fitted yet. Call fit() or load().")
        return self.model

    @staticmethod
    def _texts(x) -> list[str]:
        if isinstance(x, TextDataset):
            return x.texts
        if isinstance(x, str):
            raise DataError("Expected a list of texts, got a single string. Wrap it in a list.")
        texts = list(x)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise DataError(
                f"Texts must be strings. Received: x[{bad[0]}]={texts[bad[0]]!r} "
                f"({type(texts[bad[0]]).__name__})"
            )
        return texts

    def _texts_and_labels(self, x, y, fitting: bool = False) -> tuple[list[str], np.ndarray]:
        if isinstance(x, TextDataset):
            if y is not None:
                raise DataError("Pass either a TextDataset or (x, y), not both.")
            texts, y = x.texts, np.asarray(x.label_names)[x.labels]
            known = x.label_names if fitting else self.label_names
        else:
            texts, known = self._texts(x), None if fitting else self.label_names
            if y is None:
                raise DataError("Labels are required: pass y=... or a TextDataset.")
        ids, names = _label_ids(y, known)
        if len(ids) != len(texts):
            raise DataError(
                f"x and y differ in length. Received: len(x)={len(texts)}, len(y)={len(ids)}"
            )
        if fitting:
            self._check_training_rows(texts, ids, names)
            k = self.recipe.num_classes or len(names)  # what the user asked for, or inferred
            if len(names) > k:
                raise DataError(
                    f"Labels hold {len(names)} classes {names[:10]}, more than num_classes={k}."
                )
            self.label_names = names + _unused_names(names, k - len(names))
            self.num_classes = k  # of this fit; `self.recipe` keeps what the user passed
        return texts, ids

    def _class_weight_ids(self, ids: np.ndarray) -> dict[int, float] | None:
        """`class_weight` as Keras takes it: `{class id: weight}` for every class."""
        if self.class_weight is None:
            return None
        k = self.num_classes
        if self.class_weight == "balanced":  # scikit-learn's n / (k * count), absent classes 1
            counts = np.bincount(ids, minlength=k)
            present = counts > 0
            weights = np.ones(k)
            weights[present] = len(ids) / (present.sum() * counts[present])
            return {i: float(w) for i, w in enumerate(weights)}
        unknown = sorted(set(self.class_weight) - set(self.label_names))
        if unknown:
            raise DataError(
                f"class_weight names labels {unknown} that are not in the training labels "
                f"{self.label_names}."
            )
        weights = self.class_weight
        return {i: float(weights.get(name, 1.0)) for i, name in enumerate(self.label_names)}

    def _check_training_rows(self, texts, ids, names):
        if len(texts) < self.batch_size:
            raise DataError(
                f"Fewer training rows than one batch. Received: rows={len(texts)}, "
                f"batch_size={self.batch_size}"
            )
        if len(np.unique(ids)) < 2:
            raise DataError(
                f"Training labels hold a single class ({names[int(ids[0])]!r}); need at least two."
            )


def _label_ids(y, known: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class ids and names from labels (`kerasft.data.encode_labels`) or one-hot rows."""
    y = np.asarray(y)
    if y.size == 0:
        raise DataError("No labels given (empty y).")
    if y.ndim == 2 and y.shape[1] == 1:
        raise DataError(
            f"y has shape {y.shape}: a column of labels. Pass one label per row as a 1-D array "
            "(y.ravel()), or one-hot rows of shape (N, num_classes)."
        )
    if y.ndim == 2:
        ones, zeros = (y == 1).sum(axis=1), (y == 0).sum(axis=1)
        bad = np.flatnonzero((ones != 1) | (ones + zeros != y.shape[1]))
        if bad.size:
            raise DataError(
                f"2-D y must be one-hot rows (a single 1, the rest 0); row {int(bad[0])} is "
                f"{y[bad[0]].tolist()[:10]}. Multi-label and soft targets are not supported: "
                "pass one label per row."
            )
        names = list(known) if known is not None else [str(i) for i in range(y.shape[1])]
        if y.shape[1] != len(names):
            raise DataError(
                f"One-hot y has {y.shape[1]} columns; the model has {len(names)} classes {names}."
            )
        return np.argmax(y, axis=1).astype("int32"), names
    if y.ndim != 1:
        raise DataError(f"y must be 1-D labels or 2-D one-hot rows. Received: shape {y.shape}")
    return encode_labels(y.tolist(), known)


def _unused_names(names: list[str], count: int) -> list[str]:
    """Names for classes the training labels do not hold (`num_classes` > labels found)."""
    values = label_values(names)
    start = int(values.max()) + 1 if values.dtype.kind == "i" else 0
    taken, extra, i = set(names), [], start
    while len(extra) < count:
        if str(i) not in taken:
            extra.append(str(i))
        i += 1
    return extra


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


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class _RunState:
    """What a run has done so far: per-epoch logs, finished stages, best epoch, seconds."""

    def __init__(self, state: dict | None, monitor: tuple[str, str] | None):
        self.state = state or {}
        self.logs: list[dict] = list(self.state.get("history", []))
        self.stages_done: list[str] = list(self.state.get("stages_done", []))
        self.seconds: dict[str, float] = dict(self.state.get("seconds", {}))
        self.best: dict | None = self.state.get("best")
        self.wait: int = self.state.get("wait", 0)
        self.stopped_early: int | None = self.state.get("stopped_early")
        self.monitor = monitor
        self.optimizer: dict = {}
        self.best_weights: list | None = None
        self.rng: dict | None = None

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


def _padding_scale(validation) -> float:
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

    def __init__(self, tuner, stage, run, store, fit_x, train, last_epoch, rng=None):
        super().__init__()
        self.rng = rng
        self.tuner, self.stage, self.run, self.store = tuner, stage, run, store
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
            self.store.save(state, self.tuner._core(), self.model.optimizer)

    def _track(self, logs):
        run = self.run
        key, mode = run.monitor
        if key not in logs:
            raise ValueError(f"{key!r} is not in the epoch logs {sorted(logs)}.")
        value = logs[key]
        best = run.best
        if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
            run.best, run.wait = {"epoch": len(run.logs), "value": value, "monitor": key}, 0
            if self.tuner.select_best is not None:
                core = self.tuner._core()
                if self.store is not None:
                    self.store.save_best(core)
                else:
                    run.best_weights = [keras.ops.convert_to_numpy(v) for v in core.weights]
            return
        run.wait += 1
        patience = self.tuner.early_stopping_patience
        if patience is not None and run.wait >= patience:
            self.model.stop_training = True
            run.stopped_early = len(run.logs)
            log.info("early stopping after epoch %d: %s did not improve for %d epochs",
                     len(run.logs), key, run.wait)  # fmt: skip


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
