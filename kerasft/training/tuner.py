"""`TwoStageFineTuner`: warm up the head on a frozen backbone, then fine-tune everything.

The tuner is a facade that reads like the recipe: `fit` checks the data
(`kerasft.data`), loads the classifier (`kerasft.training.recipe`), encodes the texts and hands the
batches to the resumable stage loop (`kerasft.training.stages`); `save`/`load` persist the model
with its label names and `RecipeConfig`; `save_run` writes a run directory (`kerasft.runs.rundir`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np

from kerasft.data import (
    TextDataset,
    as_texts,
    class_weight_ids,
    label_values,
    texts_and_labels,
    training_classes,
)
from kerasft.devices import distribute
from kerasft.devices.allocator import keep_freed_memory
from kerasft.devices.compile_cache import persistent_compile_cache, quicker_compiles
from kerasft.model import lora
from kerasft.runs import rundir
from kerasft.tokens.batching import inference_batch_size
from kerasft.training import recipe
from kerasft.training.checkpoint import CheckpointDir, rows_sha256, run_fingerprint, weights_sha256
from kerasft.training.config import RecipeConfig, default_bucket_width
from kerasft.training.precision import (
    check_mixed_precision,
    policy_name,
    resolve_mixed_precision,
    to_float32,
)
from kerasft.training.stages import StageLoop, padding_scale
from kerasft.util import machine
from kerasft.util.fileio import atomic_write_file, atomic_write_text
from kerasft.util.metrics import classification_metrics, confusion_metrics

log = logging.getLogger(__name__)

_RECIPE_FIELDS = frozenset(RecipeConfig.__dataclass_fields__)


class TwoStageFineTuner:
    """Two-stage fine-tuning of a KerasHub `DistilBertTextClassifier`.

    Stage 1 freezes the backbone and trains the head at `warmup_learning_rate`; stage 2 trains
    every layer at `finetune_learning_rate`. Both use a fresh Adam, batches of `batch_size`,
    one-hot labels with `CategoricalCrossentropy(from_logits=True)`. Runs unchanged on the JAX,
    TensorFlow and PyTorch backends, from the same seeded head on each.

    Args:
        preset: KerasHub preset name, local preset/checkpoint directory, or `"all_minilm_l6_v2"`
            (offline, the default).
        recipe: a ready `RecipeConfig` (then pass no other recipe option).
        distribution: data-parallel training: None (one device), a device count, `"all"`, or a
            ready `keras.distribution.DataParallel` / `tf.distribute.Strategy`; on PyTorch,
            one process per device started by `torchrun` (then `"all"`); see
            `kerasft.devices.distribute.data_parallel`. `batch_size` stays the global batch and must
            be a multiple of the device count.
        callbacks: Keras callbacks for both stages (not part of `get_config`). They see the
            whole classifier (raw strings in), so a `ModelCheckpoint` saves a usable model.
        verbose: Keras verbosity for fit/predict progress.
        **options: any other `kerasft.training.config.RecipeConfig` field (`warmup_epochs`,
            `finetune_learning_rate`, `select_best`, `finetune_method`, ...), validated there;
            each is readable as an attribute (`tuner.batch_size`).

    Attributes:
        recipe: the `RecipeConfig`.
        model: the fitted KerasHub classifier (raw strings in, logits out), or None before `fit`.
        label_names: class names, index = class id.
        num_classes: `len(label_names)` once fitted, else the recipe's `num_classes`.
        history: the merged `History` of the last `fit`.
        backend: the Keras backend the model was trained on.
        stage_seconds: wall seconds per stage of the last `fit` (`"checkpoints"`: writing them).
        compile_seconds: the part of each stage's seconds spent compiling or building kernels.
        data_parallel: how the last `fit` was distributed, or None on one device.

    Raises:
        ValueError: an unknown or out-of-range recipe option (the message names it).

    Example:
        >>> tuner = TwoStageFineTuner("all_minilm_l6_v2", warmup_epochs=1, finetune_epochs=1)
        >>> history = tuner.fit(texts, labels, validation_data=(val_texts, val_labels))
        >>> tuner.predict(["area man wins argument with toaster"])
        array([1])
    """

    def __init__(
        self,
        preset: str | os.PathLike | None = None,
        *,
        recipe: RecipeConfig | None = None,
        distribution=None,
        callbacks: list | None = None,
        verbose: int | str = "auto",
        **options,
    ):
        if preset is not None:
            options["preset"] = preset
        if recipe is not None and options:
            raise ValueError(
                f"Pass either recipe=RecipeConfig(...) or recipe options, not both. Received: "
                f"recipe and {sorted(options)}"
            )
        self.recipe = recipe if recipe is not None else RecipeConfig.from_dict(options)
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
        self.compile_seconds: dict[str, float] = {}
        self.stage_samples_per_second: dict[str, float] = {}
        self.selected_epoch: dict | None = None
        self.parameters: dict[str, int] = {}
        self.adapter_model = None  # with finetune_method="lora": the classifier with adapters
        # (validation rows' hash, scored weights' hash, confusion matrix): `fit`'s validation of
        # the selected epoch, which `score` returns for the same rows and weights (`_keep`)
        self._validated: tuple[str, str, np.ndarray] | None = None

    def __getattr__(self, name):
        recipe = self.__dict__.get("recipe")
        if recipe is not None and name in _RECIPE_FIELDS:  # `tuner.batch_size` reads the recipe
            return getattr(recipe, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def num_classes(self) -> int | None:
        """`len(label_names)` once fitted or loaded, else the recipe's `num_classes`."""
        return len(self.label_names) if self.label_names else self.recipe.num_classes

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

    def _resolved_recipe(self) -> RecipeConfig:
        """The recipe with what `fit` resolves on this machine and backend: `auto` precision
        (`kerasft.training.precision.AUTO_BF16`) and the default bucket width; config.json
        records it."""
        recipe = self.recipe
        precision = resolve_mixed_precision(recipe.mixed_precision)
        if precision != recipe.mixed_precision:  # "auto": what trains fastest here
            log.info("mixed_precision=auto -> %s on this CPU (%s) and backend", precision or
                     "float32", ", ".join(machine.isa()) or "ISA unknown")  # fmt: skip
            recipe = dataclasses.replace(recipe, mixed_precision=precision)
        if recipe.bucket_width is None:  # the backend's default, recorded resolved
            width = default_bucket_width(keras.backend.backend())
            recipe = dataclasses.replace(recipe, bucket_width=width)
        return recipe

    def fit(
        self,
        x,
        y=None,
        validation_data=None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> keras.callbacks.History:
        """Runs both stages and returns one merged `History`.

        With `checkpoint_dir`, the run is saved there after every epoch of both stages (weights,
        optimizer, data order, history; see `kerasft.training.checkpoint`). Calling `fit` again with
        the same arguments and directory resumes from the last completed epoch and ends with the
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
            kerasft.training.checkpoint.CheckpointMismatchError: `checkpoint_dir` holds another run.

        Example:
            >>> tuner = TwoStageFineTuner(select_best="f1", early_stopping_patience=2)
            >>> tuner.fit(train, validation_data=val, checkpoint_dir="ckpt")  # again: resumes
        """
        # Before any computation: on JAX, XLA's threads must find malloc's settings made.
        keep_freed_memory(keras.backend.backend())
        persistent_compile_cache(keras.backend.backend())  # JAX: compiled once, across runs
        quicker_compiles(keras.backend.backend())  # and at -O1
        self.recipe = r = self._resolved_recipe()
        texts, labels, val_texts, val_labels = self._fit_inputs(x, y, validation_data)
        self._class_weights = class_weight_ids(r.class_weight, labels, self.label_names)
        plan = distribute.plan_for(self.distribution, r.batch_size, checkpoint_dir)
        store = None
        if checkpoint_dir is not None:
            fingerprint = run_fingerprint(r.to_dict(), self.label_names, texts, labels)
            if plan is not None and plan.process_count > 1:  # a resume needs as many
                fingerprint["processes"] = plan.process_count
            store = CheckpointDir(checkpoint_dir, fingerprint, plan is None or plan.is_writer)
        state = store.load() if store is not None else None
        if r.mixed_precision is not None:
            check_mixed_precision(r.mixed_precision)  # a clear error, before any loading
        keras.utils.set_random_seed(r.seed)
        self.backend = keras.backend.backend()
        replicas, shard = (plan.replicas, plan.shard) if plan is not None else (1, None)
        with distribute.maybe_scope(plan):
            self.model = recipe.load_pretrained_classifier(
                r.preset, self.num_classes, r.sequence_length, policy_name(r.mixed_precision)
            )
            recipe.initialize_head(self.model, r.seed)
            distribute.seed_process(r.seed)  # several processes: each its own dropout masks
            log.info("tokenizing %d training texts", len(texts))
            encode = {"batch_size": r.batch_size, "verbose": self.verbose, "replicas": replicas,
                      "shard": shard, "bucket_width": r.bucket_width}  # fmt: skip
            train = recipe.encode(self.model, texts, labels, shuffle=True, seed=r.seed, **encode)
            val = None
            if val_texts is not None:
                encode["batch_size"] = inference_batch_size(r.batch_size)
                val = recipe.encode(self.model, val_texts, val_labels, **encode)
            if plan is not None:
                distribute.log_remainders(train, val, r)
            loop = StageLoop(self.model, r, store=store, callbacks=self.callbacks,
                             class_weight=self._class_weights, verbose=self.verbose)  # fmt: skip
            self.adapter_model = None
            result = loop.run(train, val, state)
        self._keep(result, plan, None if val is None else rows_sha256(val_texts, val_labels))
        return self.history

    def _fit_inputs(self, x, y, validation_data) -> tuple:
        """Training and validation texts and class ids; sets `label_names` (`kerasft.data`)."""
        r = self.recipe
        texts, labels, names = texts_and_labels(x, y, None)
        self.label_names = training_classes(texts, labels, names, r.num_classes, r.batch_size)
        if validation_data is not None:  # labels matched to the training classes by name
            if isinstance(validation_data, TextDataset):
                validation_data = (validation_data, None)
            val_texts, val_labels, _ = texts_and_labels(*validation_data, self.label_names)
            return texts, labels, val_texts, val_labels
        if r.monitor is not None:
            raise ValueError(
                "select_best and early_stopping_patience score the validation set. Received: "
                f"select_best={r.select_best!r}, early_stopping_patience="
                f"{r.early_stopping_patience!r}, validation_data=None"
            )
        return texts, labels, None, None

    def _keep(self, result, plan, validation_sha256: str | None) -> None:
        """Keeps what the stage loop reports and the model to save and export: float32, with
        LoRA adapters merged into the kernels (the adapted model stays `adapter_model`).

        When that model is the one whose validation pass `fit` last scored (float32 all along,
        no adapters, one device), it keeps that pass's confusion matrix for `score`.
        """
        if lora.adapted_layers(self.model):
            self.adapter_model = self.model
        # In a multi-process run, a copy local to this process: predictions need no other one.
        local = plan is not None and plan.process_count > 1
        self._plan = None if local else plan
        self.data_parallel = None if plan is None else plan.describe()
        trained = self.model
        with distribute.maybe_scope(self._plan):
            self.model = to_float32(self.model, copy=local)
        self._validated = None
        if plan is None and self.model is trained and validation_sha256 and result.validated:
            confusion, weights = result.validated
            self._validated = (validation_sha256, weights, confusion)
        self.history, self.stage_seconds = result.history, result.seconds
        self.compile_seconds = result.compile_seconds
        self.stage_samples_per_second = result.samples_per_second
        self.selected_epoch, self.parameters = result.selected_epoch, result.parameters

    # --- inference ----------------------------------------------------------------------------

    def predict_proba(self, x) -> np.ndarray:
        """Returns class probabilities, shape `(N, num_classes)`, in input order."""
        data = self._encode(as_texts(x))
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
        texts, labels, _ = texts_and_labels(x, y, self._fitted_labels())
        data = self._encode(texts, labels)
        with distribute.maybe_scope(self._plan):
            core = self._core()
            if not core.compiled:  # the rate is unused: loss and metrics only
                recipe.compile_classifier(core, 1e-3, weighted_metrics=self._plan is not None)
            result = core.evaluate(data, verbose=0, return_dict=True)
        result["loss"] *= padding_scale(data)  # the mean over the real rows
        return result

    def _encode(self, texts, labels=None):
        """Unshuffled batches for inference, even across the devices predictions run on."""
        replicas = self._plan.replicas if self._plan is not None else 1
        r = self.recipe  # batched as `fit` batched its validation rows
        return recipe.encode(self._fitted(), texts, labels, replicas=replicas,
                             batch_size=inference_batch_size(r.batch_size),
                             bucket_width=r.bucket_width)  # fmt: skip

    def score(self, x, y=None) -> dict:
        """Returns accuracy, precision, recall, F1 and the confusion matrix on `x`, `y` (labels
        as in `fit`, matched to `label_names` by name; `kerasft.util.metrics`).

        Scoring `fit`'s own `validation_data` with the weights it selected reuses the confusion
        matrix of that epoch's validation pass instead of predicting again, where it is the
        same computation: float32 training, no LoRA, one device, weights unchanged since (the
        rows and weights compared by hash). Elsewhere it predicts.

        Example:
            >>> tuner.score(test_texts, test_labels)["f1"]
        """
        texts, labels, _ = texts_and_labels(x, y, self._fitted_labels())
        if self._validated is not None and self._validated[0] == rows_sha256(texts, labels):
            _, weights, confusion = self._validated
            if weights == weights_sha256(self._fitted()):  # the weights it scored, unchanged
                log.info("(the scores of fit's validation pass: the same rows and weights)")
                return confusion_metrics(confusion)
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

        def write(tmp: Path) -> None:  # the model last: a reader sees both files complete
            self.model.save(tmp)
            atomic_write_text(_meta_path(path), json.dumps(meta, indent=2))

        atomic_write_file(path, write)

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Writes the LoRA adapter alone: low-rank factors, head and `adapter.json`.

        `load_adapter(directory)` puts it back onto the base preset. `save` writes
        the merged model instead (an ordinary classifier).

        Raises:
            ValueError: the last `fit` was not a LoRA fit.
        """
        if self.adapter_model is None:
            raise ValueError(
                "No LoRA adapter to save: fit with finetune_method='lora' first. "
                f"Received: finetune_method={self.recipe.finetune_method!r}"
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
        `evaluate` and `bench` accept; see `kerasft.runs.rundir.save_run` for the arguments.

        Example:
            >>> tuner.save_run("runs/mine", validation=(val_x, val_y), test=(test_x, test_y))
        """
        splits = {
            name: None if split is None else self._as_dataset(split)
            for name, split in (("train", train), ("validation", validation), ("test", test))
        }
        self._fitted()
        return rundir.save_run(run_dir, self, source=source, overwrite=overwrite, **splits)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TwoStageFineTuner:
        """Loads a tuner saved with `save` (model, label names and recipe).

        Raises:
            FileNotFoundError: if the model or its `.json` sidecar is missing.
            ValueError: the model file is damaged (a truncated or corrupted archive).
        """
        import keras_hub  # noqa: F401  (registers the KerasHub classes for deserialisation)

        path = Path(path)
        for p in (path, _meta_path(path)):
            if not p.is_file():
                raise FileNotFoundError(f"Saved tuner file not found: {str(p)!r}")
        meta = json.loads(_meta_path(path).read_text())
        tuner = cls.from_config(meta["config"])
        damaged = f"{str(path)!r} is damaged: not a complete Keras archive"
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{damaged} (truncated or overwritten). Restore it or fit again.")
        try:
            # compile=False: a KerasHub task compiles itself with its defaults when built, and
            # Keras skips a custom compile() from the saved config anyway, warning each load.
            tuner.model = keras.saving.load_model(path, compile=False)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a member cut or corrupted
            raise ValueError(f"{damaged} ({type(e).__name__}: {e}). Restore it.") from e
        tuner.label_names = meta["label_names"]
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

    def _fitted_labels(self) -> list[str]:
        self._fitted()
        return self.label_names

    def _as_dataset(self, split) -> TextDataset:
        x, y = (split, None) if isinstance(split, TextDataset) else split
        texts, ids, _ = texts_and_labels(x, y, self._fitted_labels())
        return TextDataset(texts, ids, list(self.label_names))


def load_tuner(run_dir: str | os.PathLike) -> TwoStageFineTuner:
    """Loads the fitted `TwoStageFineTuner` of a `kerasft fit` run directory.

    Raises:
        FileNotFoundError: `run_dir` has no `model.keras`.

    Example:
        >>> tuner = load_tuner("runs/sarcasm")
    """
    return TwoStageFineTuner.load(rundir.model_path(run_dir))


def load_adapter(directory: str | os.PathLike, preset: str | None = None) -> TwoStageFineTuner:
    """A fitted `TwoStageFineTuner` of the base preset with a saved LoRA adapter put back on it.

    Args:
        directory: a `TwoStageFineTuner.save_adapter` directory (`RUN/adapter`).
        preset: the base preset to load, if not the one recorded (it must be the same model).

    Returns:
        A tuner whose `model` carries the adapters (not merged).

    Raises:
        FileNotFoundError: `directory` holds no adapter.

    Example:
        >>> tuner = load_adapter("runs/lora/adapter")
    """
    classifier, meta = lora.load_adapter_classifier(directory, preset)
    tuner = TwoStageFineTuner.from_config({**meta["recipe"], "preset": preset or meta["preset"]})
    tuner.model, tuner.label_names = classifier, meta["label_names"]
    tuner.backend = keras.backend.backend()
    return tuner


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")
