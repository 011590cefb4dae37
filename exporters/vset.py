"""What an export is verified with: labelled texts of the run's splits, calibration texts, and
the Keras feeds and reference logits built from them.

`kerasft.exporters.dispatch` builds a `VerificationSet` (the run's own splits, or texts passed
in), computes the Keras reference on it, and gives the INT8 recipes their calibration (and,
for accuracy control, validation) feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasft.data import DataError, encode_labels
from kerasft.runs.rundir import CONFIG_FILE, run_splits

# Verification texts per split of the run (train, validation, test): every split is used, each
# capped so that the cost stays bounded (the reference run: 6,000 + 5,342 + 5,342 texts).
VERIFY_PER_SPLIT = 6000


CALIBRATION_TEXTS = 256


ACCURACY_CONTROL_TEXTS = 1024


@dataclass
class VerificationSet:
    """Labelled texts to verify an export with, and training texts to calibrate INT8 with.

    Attributes:
        texts: verification texts, drawn from every split of the run.
        labels: their class names (as in the model's `label_names`), or None when unknown.
        splits: the split of each text (`"train"`, `"validation"`, `"test"`), or None.
        calibration: training texts for INT8 calibration (none of them among `texts`).
        label_ids: `labels` as the model's class ids (set by `export`).
    """

    texts: list[str]
    labels: np.ndarray | None
    splits: list[str] | None
    calibration: list[str]
    label_ids: np.ndarray | None = None

    def subset(self, split: str, limit: int) -> tuple[list[str], np.ndarray]:
        """Up to `limit` labelled texts of one split, in order."""
        rows = [i for i, s in enumerate(self.splits or []) if s == split][:limit]
        return [self.texts[i] for i in rows], self.labels[rows]


def verification_set(
    run_dir: Path | None, per_split: int = VERIFY_PER_SPLIT, seed: int = 30
) -> VerificationSet:
    """Verification and calibration texts from a `kerasft fit` run's own splits.

    Up to `per_split` texts of each split (train, validation, test), drawn with `seed`, with
    their labels; `CALIBRATION_TEXTS` other training texts (at most half of them) for
    calibration.

    Raises:
        ValueError: if `run_dir` is not a run directory (then texts must be passed).
    """
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(
            "No texts to verify the export with: pass texts=[...] (and calibration_texts for "
            "static INT8), or export a `kerasft fit` run directory whose data file is readable."
        )
    rng = np.random.default_rng(seed)
    texts, labels, splits, calibration = [], [], [], []
    for name, data in zip(("train", "validation", "test"), run_splits(run_dir), strict=True):
        order = rng.permutation(len(data))
        if name == "train":
            n_calibration = min(CALIBRATION_TEXTS, len(data) // 2)
            calibration = [data.texts[i] for i in np.sort(order[:n_calibration])]
            order = order[n_calibration:]
        rows = np.sort(order[:per_split])
        texts += [data.texts[i] for i in rows]
        labels += [data.label_names[k] for k in data.labels[rows]]
        splits += [name] * len(rows)
    return VerificationSet(texts, np.asarray(labels), splits, calibration)


def keras_batches(classifier, texts: list[str], batch_size: int = 32, shape=(None, None)):
    """Feeds of the training token ids (`kerasft.tokens.batching.tokenize`, KerasHub's ids without
    TensorFlow), each padded to its longest text (as the runtime pads).

    With a fixed `shape` (batch, sequence), feeds are padded to it instead: the sequence with
    padding tokens, a short batch by repeating its first row.
    """
    # lazy: loads Keras; importing the exporters must not
    from kerasft.tokens.batching import tokenize

    batch_size = shape[0] or batch_size
    tokens = tokenize(classifier.preprocessor, texts)
    for i in range(0, len(texts), batch_size):
        rows = np.arange(i, min(i + batch_size, len(texts)))
        width = shape[1] or int(tokens.lengths[rows].max())
        ids = tokens.padded(rows, width)
        feed = {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}
        if shape[0] and len(ids) < shape[0]:
            rows = np.r_[np.arange(len(ids)), np.zeros(shape[0] - len(ids), dtype=int)]
            feed = {k: v[rows] for k, v in feed.items()}
        yield feed


def reference_logits(graph, classifier, texts):
    ids, logits = [], []
    width = classifier.preprocessor.sequence_length
    for feed in keras_batches(classifier, texts):
        logits.append(np.asarray(graph.serve(**feed)["logits"]))
        ids.append(np.pad(feed["token_ids"], ((0, 0), (0, width - feed["token_ids"].shape[1]))))
    return np.concatenate(ids), np.concatenate(logits)


def verification_texts(src, texts, labels, splits, calibration_texts, per_split):
    """The `VerificationSet`: the given texts, or the run's own splits."""
    if texts is None:
        vset = verification_set(src.run_dir, per_split)
        vset.calibration = list(calibration_texts or vset.calibration)
        return vset
    if splits is not None and len(splits) != len(texts):
        raise ValueError(f"splits has {len(splits)} entries for {len(texts)} texts.")
    return VerificationSet(
        list(texts),
        None if labels is None else np.asarray(labels),
        list(splits) if splits is not None else None,
        list(calibration_texts or texts),
    )


def label_ids(labels, label_names: list[str]) -> np.ndarray | None:
    """Class names -> the model's class ids (`kerasft.data.encode_labels`: labels are names,
    integers included: `1` is the class named `"1"`); None stays None.

    Raises:
        ValueError: a label that is not one of `label_names`.
    """
    if labels is None:
        return None
    try:
        ids, _ = encode_labels(np.asarray(labels).tolist(), label_names)
    except DataError as e:
        raise ValueError(f"Verification labels: {e}") from None
    return ids.astype("int64")


def quantization_feeds(contract, quantize, clf, vset, label_names, shape) -> dict:
    """`calibration` (and `validation`, for accuracy control) feeds for the INT8 recipes."""
    calibration, validation = contract.needs_of(quantize)
    feeds = {"calibration": None, "validation": None}
    if calibration:
        feeds["calibration"] = list(
            keras_batches(clf, vset.calibration, contract.calibration_batch, shape=shape)
        )
    if validation and vset.splits is not None:
        val_texts, val_names = vset.subset("validation", ACCURACY_CONTROL_TEXTS)
        feeds["validation"] = (list(keras_batches(clf, val_texts, 1, shape=shape)),
                               label_ids(val_names, label_names))  # fmt: skip
    return feeds
