"""The reference recipe's steps as small public functions; `TwoStageFineTuner` is built from them.

The steps, as in the course material: load a pretrained classifier, compile it with a learning
rate, train one stage with `train_base=False` (backbone frozen, head only) then `train_base=True`
(everything, lower learning rate).

Example:
    >>> clf = load_pretrained_classifier("all_minilm_l6_v2", num_classes=2, sequence_length=64)
    >>> train = encode(clf, texts, labels, num_classes=2, shuffle=True)
    >>> h1 = train_stage(clf, train, epochs=1, learning_rate=1e-3, train_base=False)
    >>> h2 = train_stage(clf, train, epochs=2, learning_rate=1e-4, train_base=True,
    ...                  linear_decay=True)
"""

from __future__ import annotations

import math

import keras
import numpy as np

from kerasft.devices import distribute
from kerasft.devices.allocator import keep_freed_memory
from kerasft.model.encoder import cls_features, last_layer_at_cls
from kerasft.model.lora import adapted_layers
from kerasft.model.presets import load_classifier
from kerasft.tokens.batching import BucketedBatches, inference_batch_size, one_hot, tokenize
from kerasft.training.config import default_bucket_width
from kerasft.training.dropout import rand_masks
from kerasft.training.optimizers import adam

load_pretrained_classifier = load_classifier


def initialize_head(classifier, seed: int, stddev: float = 0.02) -> None:
    """Draws the classification head's weights from NumPy with `seed`: the same on every backend.

    Keras initializers draw from each backend's own RNG, so the same seed gives a different head
    on JAX, TensorFlow and PyTorch. This uses KerasHub's DistilBERT head initialisation
    (truncated normal, `stddev` 0.02, zero biases) from one NumPy generator instead, so runs on
    different backends start from identical weights.

    Args:
        classifier: a KerasHub `DistilBertTextClassifier`.
        seed: the generator's seed.
        stddev: standard deviation of the truncated normal (cut at 2 stddev).
    """
    rng = np.random.default_rng(seed)
    for layer in (classifier.pooled_dense, classifier.output_dense):
        shape = tuple(layer.kernel.shape)
        values = rng.normal(0.0, stddev, size=shape)
        while np.any(out := np.abs(values) > 2 * stddev):
            values[out] = rng.normal(0.0, stddev, size=int(out.sum()))
        layer.kernel.assign(values.astype(layer.kernel.dtype))
        layer.bias.assign(np.zeros(tuple(layer.bias.shape), dtype=layer.bias.dtype))


def compile_classifier(
    model: keras.Model,
    learning_rate,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    gradient_accumulation_steps: int = 1,
    loss_scale: bool = False,
    weighted_metrics: bool = False,
    label_smoothing: float = 0.0,
) -> keras.Model:
    """Compiles `model` with the recipe's loss: a fresh Adam, one-hot CE from logits, accuracy.

    A fresh optimizer every time: after `trainable` changes Keras needs a recompile, and Adam's
    moments from another stage (or none) must not leak in. On PyTorch the update runs as one
    fused kernel (`kerasft.training.optimizers`).

    Args:
        model: a classifier, or any model that outputs logits.
        learning_rate: Adam's learning rate (> 0) or a `keras.optimizers.schedules` schedule.
        weight_decay: > 0 uses AdamW with this decoupled decay; biases and LayerNorm
            `gamma`/`beta` are excluded, as Hugging Face Trainer excludes them.
        max_grad_norm: clip the gradients' global norm (Keras' `global_clipnorm`).
        gradient_accumulation_steps: > 1 applies the averaged gradients of that many batches
            (Keras' `gradient_accumulation_steps`).
        loss_scale: wrap the optimizer in `keras.optimizers.LossScaleOptimizer` (float16).
        weighted_metrics: accuracy and F1 honour sample weights (Keras' `weighted_metrics`):
            for data-parallel evaluation, whose padding rows weigh 0. With `class_weight`
            they are then class-weighted too.
        label_smoothing: the loss's target smoothing (Keras' `label_smoothing`).

    Returns:
        `model`, compiled.

    Raises:
        ValueError: for a non-positive learning rate.
    """
    schedule = isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule)
    if not schedule and not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0. Received: learning_rate={learning_rate!r}")
    options = {}
    if max_grad_norm is not None:
        options["global_clipnorm"] = max_grad_norm
    if gradient_accumulation_steps > 1:
        options["gradient_accumulation_steps"] = gradient_accumulation_steps
    optimizer = adam(learning_rate, weight_decay=weight_decay, **options)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=NO_WEIGHT_DECAY)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    metrics = [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        F1Score(int(model.output.shape[-1]), name="f1"),
    ]
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing
        ),
        **{"weighted_metrics" if weighted_metrics else "metrics": metrics},
    )
    return model


# Variable names kept out of weight decay: Dense/Embedding biases and LayerNorm's scale and offset.
NO_WEIGHT_DECAY = ["bias", "gamma", "beta"]


@keras.saving.register_keras_serializable(package="kerasft")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then constant or linear decay to 0.

    The schedule of Hugging Face's `get_linear_schedule_with_warmup` (or
    `get_constant_schedule_with_warmup` with `decay=False`).

    Args:
        peak: the learning rate reached after warm-up.
        warmup_steps: steps of the linear rise (>= 1).
        total_steps: all steps of the stage; with `decay`, the rate reaches 0 there.
        decay: decay linearly after warm-up; False keeps `peak`.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: bool = True):
        self.peak, self.warmup_steps, self.total_steps, self.decay = (
            float(peak), int(warmup_steps), int(total_steps), bool(decay)
        )  # fmt: skip

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        rise = self.peak * step / max(1, self.warmup_steps)
        after = self.peak
        if self.decay:
            left = ops.maximum(0.0, self.total_steps - step)
            after = self.peak * left / max(1, self.total_steps - self.warmup_steps)
        return ops.where(step < self.warmup_steps, rise, after)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "decay": self.decay,
        }


def stage_schedule(learning_rate: float, steps: int, linear_decay: bool, warmup_ratio: float = 0.0):
    """A stage's learning rate: constant, linear decay to 0, either after a linear warm-up.

    Args:
        learning_rate: the peak rate.
        steps: the stage's batches (epochs x batches per epoch).
        linear_decay: decay linearly to 0 at `steps`.
        warmup_ratio: fraction of `steps` (rounded up) spent rising from 0; 0 for none.

    Returns:
        A float (constant) or a `LearningRateSchedule`.
    """
    steps = max(1, steps)
    if warmup_ratio > 0:
        warmup = min(steps, math.ceil(warmup_ratio * steps))
        return LinearWarmup(learning_rate, warmup, steps, decay=linear_decay)
    if linear_decay:
        return keras.optimizers.schedules.PolynomialDecay(
            learning_rate, decay_steps=steps, end_learning_rate=0.0
        )
    return learning_rate


@keras.saving.register_keras_serializable(package="kerasft")
class F1Score(keras.metrics.Metric):
    """F1 of one-hot targets vs logits, as `kerasft.util.metrics.classification_metrics` scores it.

    Binary tasks score the positive class (id 1); more classes take the macro average. Keras'
    own `F1Score` thresholds each class separately; this takes the argmax, like `predict`.

    Args:
        num_classes: number of classes.
        name: the metric's name in the logs.
    """

    def __init__(self, num_classes: int, name: str = "f1", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.confusion = self.add_variable(
            shape=(num_classes, num_classes), initializer="zeros", name="confusion"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        k = self.num_classes
        true = keras.ops.one_hot(keras.ops.argmax(y_true, axis=-1), k)
        pred = keras.ops.one_hot(keras.ops.argmax(y_pred, axis=-1), k)
        if sample_weight is not None:  # weight 0: padding rows of a data-parallel batch
            weight = keras.ops.cast(keras.ops.reshape(sample_weight, (-1, 1)), true.dtype)
            true = true * weight
        self.confusion.assign_add(keras.ops.matmul(keras.ops.transpose(true), pred))

    def result(self):
        ops, cm = keras.ops, self.confusion
        tp = ops.diagonal(cm)
        f1 = ops.divide_no_nan(2.0 * tp, ops.sum(cm, axis=0) + ops.sum(cm, axis=1))
        return f1[1] if self.num_classes == 2 else ops.mean(f1)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def validation_confusion(model: keras.Model) -> np.ndarray | None:
    """The confusion matrix (int64, rows = true class) in `model`'s compiled `F1Score`.

    Read at the end of a `fit` epoch that validated, it is the validation pass's: Keras resets
    the compiled metrics before `evaluate` and calls `on_epoch_end` after it. None when the
    model has no `F1Score` (not compiled by `compile_classifier`).
    """
    for metric in model.metrics:
        for inner in [metric, *getattr(metric, "metrics", [])]:
            if isinstance(inner, F1Score):
                return np.rint(keras.ops.convert_to_numpy(inner.confusion)).astype("int64")
    return None


def encode(
    classifier,
    texts: list[str],
    labels: np.ndarray | None = None,
    num_classes: int | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    verbose: int | str = 0,
    replicas: int = 1,
    shard: tuple[int, int] | None = None,
    bucket_width: int | None = None,
) -> BucketedBatches:
    """Tokenizes `texts` once with the classifier's preprocessor into length-bucketed batches.

    Args:
        classifier: a KerasHub text classifier with a preprocessor.
        texts: the texts.
        labels: int class ids, or None for prediction.
        num_classes: classes for the one-hot targets (defaults to `classifier.num_classes`).
        batch_size: rows per batch (over every device).
        shuffle: reshuffle every epoch (training data).
        seed: seed of the shuffles.
        verbose: progress bar while tokenizing large inputs (Keras verbosity).
        replicas: data-parallel devices each batch is split across (see `BucketedBatches`).
        shard: `(process index, process count)` in a multi-process run, else None.
        bucket_width: batches are padded to a multiple of this many tokens; None: the
            backend's default (`kerasft.training.config.default_bucket_width`).

    Returns:
        A `BucketedBatches` dataset usable by `fit`, `evaluate` and `predict` on every backend.
    """
    return BucketedBatches(
        tokenize(classifier.preprocessor, texts, verbose=verbose),
        labels=labels,
        num_classes=num_classes or classifier.num_classes,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        replicas=replicas,
        shard=shard,
        bucket_width=bucket_width or default_bucket_width(keras.backend.backend()),
    )


def core_model(classifier, skip_padding: bool = True) -> keras.Model:
    """The classifier's graph without its preprocessor: token ids in, logits out, shared weights.

    KerasHub's `Task.fit` re-applies the preprocessor to its input; training this plain functional
    view on pre-tokenized batches avoids that while updating the classifier's own variables. The
    view computes only what `[CLS]` needs (`kerasft.model.encoder`): the same logits, to float
    rounding, for less work. Every export's serving graph is traced from it too.

    Args:
        classifier: a KerasHub text classifier.
        skip_padding: see `kerasft.model.encoder.cls_features` (False for a traced graph).

    Returns:
        A functional `keras.Model` taking `{"token_ids", "padding_mask"}`.
    """
    backbone = classifier.backbone
    if not last_layer_at_cls(backbone):  # another layout: the classifier's own graph
        return keras.Model(classifier.input, classifier.output, name="core")
    logits = _head(classifier, cls_features(backbone, backbone.input, skip_padding))
    return keras.Model(backbone.input, logits, name="core")


def _head(classifier, features):
    """The classifier's head on `[CLS]` features (its own layers)."""
    x = classifier.pooled_dense(features)
    x = classifier.output_dropout(x)
    return classifier.output_dense(x)


def _head_parts(classifier) -> tuple[keras.Model, keras.Model]:
    backbone = classifier.backbone
    features = cls_features(backbone, backbone.input)
    extractor = keras.Model(backbone.input, features, name="cls_features")
    inputs = keras.Input((backbone.hidden_dim,), name="cls_features")
    head = keras.Model(inputs, _head(classifier, inputs), name="head")
    return extractor, head


class _FeatureBatches(keras.utils.PyDataset):
    """Cached backbone features (float16) with one-hot targets built per batch.

    Shuffled batches are reordered every epoch from the seed; like `BucketedBatches`, a
    shuffled epoch leaves out the rows that would make its last batch uneven across `replicas`
    devices, and an unshuffled pass pads instead, with weight 0.
    """

    def __init__(self, features, like: BucketedBatches, shuffle: bool):
        super().__init__()
        self.features, self.labels, self.num_classes = features, like.labels, like.num_classes
        self.batch_size, self.replicas = like.batch_size, like.replicas
        self.shuffle, self.seed, self.epoch = shuffle, like.seed, 0
        self.padded = 0
        self.order = self._order()

    def _order(self):
        n = len(self.features)
        if not self.shuffle:
            order = np.arange(n)
            self.padded = (-(n % self.batch_size)) % self.replicas if n % self.batch_size else 0
            return np.concatenate([order, np.repeat(order[-1:], self.padded)])
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        dropped = n % self.batch_size % self.replicas
        return order[: n - dropped]

    def __len__(self):
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, i):
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        weights = None
        if self.padded:
            weights = np.ones(len(rows), dtype="float32")
            if i == len(self) - 1:
                weights[len(rows) - self.padded :] = 0.0
        x = self.features[rows].astype("float32")
        y = one_hot(self.labels[rows], self.num_classes)
        return (x, y) if weights is None else (x, y, weights)

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Reorders the rows as they are in epoch `epoch` (resuming a run)."""
        self.epoch = epoch
        self.order = self._order()


class _SomeBatches(keras.utils.PyDataset):
    """Some batches of an unshuffled `BucketedBatches`, by index (a part of one pass)."""

    def __init__(self, data: BucketedBatches, indices: list[int]):
        super().__init__()
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


FEATURE_CHUNK_BATCHES = 256


def _same_shape_parts(data: BucketedBatches, most: int) -> list[list[int]]:
    """Batch indices in pass order, cut where the batch shape changes and after `most`.

    One shape per `predict` call: on TensorFlow, Keras infers a `PyDataset`'s signature from its
    first batches, which a part of mixed shapes would not represent (see
    `BucketedBatches._lead_with_distinct_shapes`).
    """
    parts, last = [], None
    for i, rows in enumerate(data.batches):
        shape = (len(rows), int(data.bucket_len[rows].max()))
        if shape != last or len(parts[-1]) == most:
            parts.append([])
        parts[-1].append(i)
        last = shape
    return parts


def extract_features(classifier, data: BucketedBatches, verbose: int | str = "auto") -> np.ndarray:
    """Runs the (frozen) backbone once; returns the `[CLS]` features in input order, float16.

    float16 halves the cache (the head trains on float32 copies of each batch); the features of
    a frozen backbone are layer-normalised activations of moderate size, well inside its range.
    The pass runs at most `FEATURE_CHUNK_BATCHES` batches per `predict` call and stores each
    part as float16 at once, so the float32 outputs never exist for all rows together.
    """
    extractor, _ = _head_parts(classifier)
    unshuffled = BucketedBatches(
        data.token_ids,
        batch_size=inference_batch_size(data.batch_size),
        shuffle=False,
        replicas=data.replicas,  # (one process: a multi-process run caches no features)
        bucket_width=data.bucket_width,
    )
    progress = None
    if verbose:
        verbose = 1 if verbose == "auto" else verbose
        progress = keras.utils.Progbar(len(unshuffled), verbose=verbose, unit_name="step")
    features, done = None, 0
    for indices in _same_shape_parts(unshuffled, FEATURE_CHUNK_BATCHES):
        part = extractor.predict(_SomeBatches(unshuffled, indices), verbose=0)
        if features is None:
            features = np.empty((len(data.lengths), *part.shape[1:]), dtype="float16")
        # a padding copy writes its row's own features again
        features[np.concatenate([unshuffled.batches[i] for i in indices])] = part
        done += len(indices)
        if progress is not None:
            progress.update(done)
    return features


def prepare_stage(
    classifier,
    train: BucketedBatches,
    validation: BucketedBatches | None = None,
    *,
    epochs: int,
    learning_rate: float,
    train_base: bool | str,
    cache_features: bool = True,
    linear_decay: bool = False,
    warmup_ratio: float = 0.0,
    freeze_word_embeddings: bool = False,
    verbose: int | str = "auto",
    **optimizer_options,
) -> tuple[keras.Model, keras.utils.PyDataset, keras.utils.PyDataset | None]:
    """Freezes or unfreezes the backbone and returns what `fit` needs for one stage.

    See `train_stage` for the arguments. `epochs` sizes the learning-rate schedule. On PyTorch
    and JAX it also keeps freed memory in the process for reuse (`kerasft.devices.allocator`).

    Returns:
        `(model, fit_x, fit_validation)`: the compiled model that trains (the head alone on
        cached features, or the preprocessor-free classifier; its variables are the
        classifier's own), and the batches to train and validate it on. Pass `shuffle=False`
        to `fit`: `fit_x` reorders itself every epoch from its seed and epoch number, so the
        order never depends on global random state and a resumed run sees the same batches.
    """
    if train_base == "lora":  # the adapters and the head train; `enable_lora` set the flags
        if not adapted_layers(classifier):
            raise ValueError(
                "train_base='lora' needs adapters: call kerasft.model.lora.enable_lora."
            )
    else:
        classifier.backbone.trainable = train_base
        if train_base and freeze_word_embeddings:  # the rest of the backbone trains
            classifier.backbone.token_embedding.trainable = False
    keep_freed_memory(keras.backend.backend())  # every step frees and reallocates big buffers
    learning_rate = stage_schedule(learning_rate, epochs * len(train), linear_decay, warmup_ratio)
    # Data parallel: evaluation batches carry zero-weight padding rows (see `BucketedBatches`).
    optimizer_options.setdefault("weighted_metrics", train.replicas > 1)
    if train_base or not cache_features:
        model = compile_classifier(core_model(classifier), learning_rate, **optimizer_options)
        if train.shard is not None:  # one process of several: PyTorch needs to be told
            distribute.share_across_processes(model)
        return model, train, validation
    _, model = _head_parts(classifier)
    compile_classifier(model, learning_rate, **optimizer_options)
    fit_x = _FeatureBatches(extract_features(classifier, train, verbose), train, train.shuffle)
    fit_val = None
    if validation is not None:
        features = extract_features(classifier, validation, verbose)
        fit_val = _FeatureBatches(features, validation, shuffle=False)
    return model, fit_x, fit_val


def train_stage(
    classifier,
    train: BucketedBatches,
    validation: BucketedBatches | None = None,
    *,
    epochs: int,
    learning_rate: float,
    train_base: bool,
    initial_epoch: int = 0,
    callbacks: list | None = None,
    cache_features: bool = True,
    linear_decay: bool = False,
    warmup_ratio: float = 0.0,
    freeze_word_embeddings: bool = False,
    class_weight: dict[int, float] | None = None,
    verbose: int | str = "auto",
    **optimizer_options,
) -> keras.callbacks.History:
    """Trains one stage of the recipe.

    `train_base=False` freezes the backbone and trains the head only. With `cache_features=True`
    (default) the frozen backbone runs once over the data (inference mode) and the head trains on
    the cached `[CLS]` features: the same gradient steps on the head without recomputing what a
    frozen backbone already computed. `train_base=True` unfreezes every layer.

    Args:
        classifier: a KerasHub `DistilBertTextClassifier`.
        train: training batches (`encode(..., shuffle=True)`).
        validation: optional validation batches.
        epochs: epochs of this stage (0 returns an empty History).
        learning_rate: Adam's learning rate for this stage.
        train_base: whether the backbone is trained: True, False, or `"lora"` (only its LoRA
            adapters, added by `kerasft.model.lora.enable_lora` beforehand).
        initial_epoch: first epoch number (to continue numbering across stages).
        callbacks: Keras callbacks; they see the model that trains (see `prepare_stage`).
        cache_features: use cached backbone features when the backbone is frozen.
        linear_decay: decay the learning rate linearly to 0 over the stage's steps (the usual
            BERT fine-tuning schedule) instead of keeping it constant.
        warmup_ratio: fraction of the stage's steps spent rising linearly from 0 first.
        freeze_word_embeddings: with `train_base=True`, keep the backbone's word-embedding
            table as it is (no gradient, no optimizer update) and train every other weight.
        class_weight: `{class id: weight}` scaling the training loss per row (Keras' own).
        verbose: Keras verbosity.
        **optimizer_options: `weight_decay`, `max_grad_norm`, `gradient_accumulation_steps`,
            `loss_scale`; see `compile_classifier`.

    Returns:
        The stage's `keras.callbacks.History`.
    """
    if epochs == 0:
        if train_base != "lora":
            classifier.backbone.trainable = train_base
        return keras.callbacks.History()
    model, fit_x, fit_val = prepare_stage(
        classifier,
        train,
        validation,
        epochs=epochs,
        learning_rate=learning_rate,
        train_base=train_base,
        cache_features=cache_features,
        linear_decay=linear_decay,
        warmup_ratio=warmup_ratio,
        freeze_word_embeddings=freeze_word_embeddings,
        verbose=verbose,
        **optimizer_options,
    )
    with rand_masks(model):  # PyTorch: faster dropout masks (`kerasft.training.dropout`)
        return model.fit(
            fit_x,
            validation_data=fit_val,
            epochs=initial_epoch + epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            class_weight=class_weight,
            verbose=verbose,
            shuffle=False,  # the batches shuffle themselves (seeded); see `prepare_stage`
        )
