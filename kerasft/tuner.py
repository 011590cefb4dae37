"""`TwoStageFineTuner`: warm up the head on a frozen backbone, then fine-tune everything."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from kerasft import recipe
from kerasft.config import RecipeConfig
from kerasft.data import DataError, TextDataset
from kerasft.fileio import atomic_write_text

STAGES = ("warmup", "finetune")


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
        callbacks: Keras callbacks for both stages (not part of `get_config`).
        verbose: Keras verbosity for fit/predict progress.

    Attributes:
        model: the fitted KerasHub classifier (raw strings in, logits out), or None before `fit`.
        label_names: class names, index = class id.
        history: the merged `History` of the last `fit`.
        backend: the Keras backend the model was trained on.
        stage_seconds: wall seconds per stage of the last `fit`.

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
        )
        for name, value in self.recipe.to_dict().items():
            setattr(self, name, value)
        self.callbacks = list(callbacks or [])
        self.verbose = verbose
        self.model = None
        self.label_names: list[str] | None = None
        self.history: keras.callbacks.History | None = None
        self.backend: str | None = None
        self.stage_seconds: dict[str, float] = {}
        self.stage_samples_per_second: dict[str, float] = {}

    # --- config -------------------------------------------------------------------------------

    def get_config(self) -> dict:
        """Returns every constructor argument except `callbacks` (not serialisable)."""
        return {**self.recipe.to_dict(), "verbose": self.verbose}

    @classmethod
    def from_config(cls, config: dict) -> TwoStageFineTuner:
        """Rebuilds an (unfitted) tuner from `get_config()`."""
        return cls(**config)

    # --- training -----------------------------------------------------------------------------

    def fit(self, x, y=None, validation_data=None) -> keras.callbacks.History:
        """Runs both stages and returns one merged `History`.

        Args:
            x: texts (list/array of str) or a `kerasft.data.TextDataset` (then `y` is None).
            y: labels: ints (class ids), strings (class names) or a one-hot `(N, K)` array.
            validation_data: `(texts, labels)` or a `TextDataset`, scored after every epoch.

        Returns:
            A `keras.callbacks.History` whose lists are stage 1 then stage 2;
            `history.history["stage"]` holds 1 or 2 per epoch.

        Raises:
            DataError: mismatched lengths, fewer rows than one batch, a single class, or labels
                outside the known classes.
        """
        texts, labels = self._texts_and_labels(x, y, fitting=True)
        val = None
        if validation_data is not None:  # labels matched to the training classes by name
            if isinstance(validation_data, TextDataset):
                validation_data = (validation_data, None)
            val_texts, val_labels = self._texts_and_labels(*validation_data)
        keras.utils.set_random_seed(self.seed)
        self.backend = keras.backend.backend()
        self.model = recipe.load_pretrained_classifier(
            self.preset, self.num_classes, self.sequence_length
        )
        recipe.initialize_head(self.model, self.seed)
        train = recipe.encode(
            self.model, texts, labels, batch_size=self.batch_size, shuffle=True, seed=self.seed
        )
        if validation_data is not None:
            val = recipe.encode(self.model, val_texts, val_labels, batch_size=self.batch_size)

        warmup = self._run_stage("warmup", train, val, train_base=False, initial_epoch=0)
        finetune = self._run_stage(
            "finetune", train, val, train_base=True, initial_epoch=self.warmup_epochs
        )
        self.history = merge_histories(warmup, finetune)
        return self.history

    def _run_stage(self, stage, train, val, train_base, initial_epoch):
        epochs = getattr(self, f"{stage}_epochs")
        start = time.perf_counter()
        history = recipe.train_stage(
            self.model,
            train,
            val,
            epochs=epochs,
            learning_rate=getattr(self, f"{stage}_learning_rate"),
            train_base=train_base,
            initial_epoch=initial_epoch,
            callbacks=self.callbacks,
            cache_features=self.cache_features,
            linear_decay=stage == "finetune" and self.finetune_schedule == "linear",
            verbose=self.verbose,
        )
        seconds = time.perf_counter() - start
        self.stage_seconds[stage] = seconds
        self.stage_samples_per_second[stage] = (
            len(train.lengths) * epochs / seconds if epochs else 0.0
        )
        self.model.backbone.trainable = True
        return history

    # --- inference ----------------------------------------------------------------------------

    def predict_proba(self, x) -> np.ndarray:
        """Returns class probabilities, shape `(N, num_classes)`, in input order."""
        data = recipe.encode(self._fitted(), self._texts(x), batch_size=self.batch_size)
        logits = self._core().predict(data, verbose=0)
        return keras.ops.convert_to_numpy(keras.ops.softmax(data.restore_order(logits), axis=-1))

    def predict(self, x) -> np.ndarray:
        """Returns predicted class ids (index into `label_names`)."""
        return np.argmax(self.predict_proba(x), axis=-1)

    def evaluate(self, x, y=None) -> dict:
        """Returns `{"loss", "accuracy"}` of the fitted model on `x`, `y` (labels as in `fit`)."""
        texts, labels = self._texts_and_labels(x, y)
        data = recipe.encode(self._fitted(), texts, labels, batch_size=self.batch_size)
        core = self._core()
        if not core.compiled:
            recipe.compile_classifier(core, 1e-3)  # the rate is unused: loss and metric only
        return core.evaluate(data, verbose=0, return_dict=True)

    def score(self, x, y=None) -> dict:
        """Returns accuracy, precision, recall, F1 and the confusion matrix on `x`, `y`.

        Labels are given as in `fit`; string labels are matched to `label_names` by name.
        See `kerasft.metrics.classification_metrics`.
        """
        from kerasft.metrics import classification_metrics

        texts, labels = self._texts_and_labels(x, y)
        return classification_metrics(labels, self.predict(texts), self.num_classes)

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
            atomic_write_text(_meta_path(path), json.dumps(meta, indent=2))
            os.replace(tmp_model, path)
        finally:
            if os.path.exists(tmp_model):
                os.remove(tmp_model)

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
            self._check_training_rows(texts, ids)
            k = self.num_classes or len(names)
            if len(names) > k:
                raise DataError(
                    f"Labels hold {len(names)} classes {names[:10]}, more than num_classes={k}."
                )
            self.label_names = names + [str(i) for i in range(len(names), k)]
            self.num_classes = self.recipe.num_classes = k
        if ids.min() < 0 or ids.max() >= self.num_classes:
            raise DataError(
                f"Labels must be class ids in [0, {self.num_classes}). "
                f"Received: min={ids.min()}, max={ids.max()}"
            )
        return texts, ids

    def _check_training_rows(self, texts, ids):
        if len(texts) < self.batch_size:
            raise DataError(
                f"Fewer training rows than one batch. Received: rows={len(texts)}, "
                f"batch_size={self.batch_size}"
            )
        if len(np.unique(ids)) < 2:
            raise DataError(
                f"Training labels hold a single class ({int(ids[0])}); need at least two."
            )


def _label_ids(y, known: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class ids and class names from int ids, one-hot rows or string names."""
    y = np.asarray(y)
    if y.size == 0:
        raise DataError("No labels given (empty y).")
    if y.ndim == 2:
        return np.argmax(y, axis=1), [str(i) for i in range(y.shape[1])]
    if y.dtype.kind in "iu":
        return y.astype("int64"), [str(i) for i in range(int(y.max()) + 1)]
    names = list(known) if known is not None else sorted({str(v) for v in y})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in y} - set(index))
    if unknown:
        raise DataError(f"Unknown labels {unknown[:5]}. Known labels: {names}")
    return np.array([index[str(v)] for v in y], dtype="int64"), names


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
