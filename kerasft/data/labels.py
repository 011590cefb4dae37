"""Label rules, one for files and for the Python API: labels are class names.

The distinct values in sorted order (numeric when all are integers) become class ids `0..K-1`,
and their string forms are the class names; `{1, 2}` is a 2-class task named "1" and "2". A label
that is empty, null/None or NaN (in any spelling, "nan" included) is missing.
"""

from __future__ import annotations

import math

import numpy as np

from kerasft.data.dataset import DataError, TextDataset, as_texts

MISSING_LABELS = ("", "nan", "none", "null")


def is_missing(value) -> bool:
    """A missing label in any spelling: None/null, NaN, or "", "nan", "none", "null"."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING_LABELS


def encode_labels(values, known: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class ids and names of labels: one rule for files and for the Python API.

    Labels are class *names*. The distinct values, sorted (numerically when every value is an
    integer: `1`, `1.0` and `"1"` alike), are the classes `0..K-1`; `label_names` holds their
    string forms. So `{1, 2}` is a 2-class task whose classes are named `"1"` and `"2"`, and
    `{0, 1}` keeps ids 0 and 1. Given `known` names (a fitted model's), values are matched to
    them by name instead.

    Args:
        values: one label per row (ints, integral floats or strings; surrounding spaces of
            strings are ignored).
        known: the class names to match against, or None to derive them from `values`.

    Returns:
        `(ids, names)`: int32 class ids indexing `names`.

    Raises:
        DataError: a missing label (None, NaN, "", "nan", "null", ...), or with `known`, a
            label that is not one of them.

    Example:
        >>> encode_labels([2, 1, 2])
        (array([1, 0, 1], dtype=int32), ['1', '2'])
    """
    values = [v.strip() if isinstance(v, str) else v for v in values]
    missing = next((i for i, v in enumerate(values) if is_missing(v)), None)
    if missing is not None:
        raise DataError(f"Missing label ({values[missing]!r}) at row index {missing}.")
    as_int = _integers(values)
    keys = [str(v) for v in (as_int if as_int is not None else values)]
    if known is None:
        distinct = sorted(set(as_int)) if as_int is not None else sorted(set(keys))
        known = [str(v) for v in distinct]
    index = {name: i for i, name in enumerate(known)}
    unknown = sorted(set(keys) - set(index))
    if unknown:
        raise DataError(f"Unknown labels {unknown[:5]}. Known labels: {list(known)}")
    return np.array([index[k] for k in keys], dtype="int32"), list(known)


def _integers(values: list) -> list[int] | None:
    """The values as ints when every one is an integer (int, integral float, "12"), else None."""
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            return None
        try:
            i = int(v)
        except (TypeError, ValueError, OverflowError):
            return None
        if isinstance(v, (float, np.floating)) and v != i:
            return None
        out.append(i)
    return out


def label_values(names: list[str]) -> np.ndarray:
    """Label names as a user's data holds them: ints when every name is an integer, else str."""
    as_int = _integers(names)
    return np.array(as_int if as_int is not None else names)


def align_labels(data: TextDataset, label_names: list[str]) -> TextDataset:
    """`data` with its labels re-numbered to `label_names` (an evaluation file's labels matched
    to the training file's classes by name).

    Raises:
        DataError: `data` holds a label that is not in `label_names` (the file and the labels
            are named).
    """
    try:
        index, _ = encode_labels(data.label_names, label_names)
    except DataError:
        unknown = sorted(set(data.label_names) - set(label_names))
        raise DataError(
            f"{data.source}: labels {unknown[:5]} are not among the training labels "
            f"{list(label_names)}."
        ) from None
    return TextDataset(
        data.texts, index[data.labels], list(label_names), data.source, data.skipped, data.columns
    )


def texts_and_labels(x, y, known: list[str] | None) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, class ids and class names of `(x, y)` or of a `TextDataset` `x` (then `y` is None).

    Args:
        x: texts or a `TextDataset`.
        y: labels, one per row: names as in data files (`encode_labels`), or one-hot rows.
        known: a fitted model's class names to match labels to, or None when fitting (a
            `TextDataset` keeps its own names then).

    Returns:
        `(texts, ids, names)`.

    Raises:
        DataError: no labels, both a dataset and `y`, lengths that differ, or a bad label.
    """
    if isinstance(x, TextDataset):
        if y is not None:
            raise DataError("Pass either a TextDataset or (x, y), not both.")
        texts, y = x.texts, np.asarray(x.label_names)[x.labels]
        known = x.label_names if known is None else known
    else:
        texts = as_texts(x)
        if y is None:
            raise DataError("Labels are required: pass y=... or a TextDataset.")
    ids, names = label_ids(y, known)
    if len(ids) != len(texts):
        raise DataError(
            f"x and y differ in length. Received: len(x)={len(texts)}, len(y)={len(ids)}"
        )
    return texts, ids, names


def label_ids(y, known: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class ids and names from labels (`encode_labels`: labels are names) or one-hot rows.

    Raises:
        DataError: empty labels, a column vector, rows that are not one-hot, or a shape other
            than 1-D or 2-D.
    """
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


def training_classes(
    texts: list[str], ids: np.ndarray, names: list[str], num_classes: int | None, batch_size: int
) -> list[str]:
    """Checks training rows and returns the model's class names (`num_classes` of them).

    Classes the labels do not hold (`num_classes` > the labels' classes) get the next free
    integer names.

    Raises:
        DataError: fewer rows than one batch, a single class, or more classes than
            `num_classes`.
    """
    if len(texts) < batch_size:
        raise DataError(
            f"Fewer training rows than one batch. Received: rows={len(texts)}, "
            f"batch_size={batch_size}"
        )
    if len(np.unique(ids)) < 2:
        raise DataError(
            f"Training labels hold a single class ({names[int(ids[0])]!r}); need at least two."
        )
    k = num_classes or len(names)
    if len(names) > k:
        raise DataError(
            f"Labels hold {len(names)} classes {names[:10]}, more than num_classes={k}."
        )
    values = label_values(names)
    taken, extra, i = set(names), [], int(values.max()) + 1 if values.dtype.kind == "i" else 0
    while len(extra) < k - len(names):
        if str(i) not in taken:
            extra.append(str(i))
        i += 1
    return names + extra


def class_weight_ids(
    class_weight: str | dict[str, float] | None, ids: np.ndarray, label_names: list[str]
) -> dict[int, float] | None:
    """`class_weight` (`"balanced"` or `{label name: weight}`) as Keras takes it: `{id: weight}`.

    Raises:
        DataError: a label name that is not among `label_names`.
    """
    if class_weight is None:
        return None
    k = len(label_names)
    if class_weight == "balanced":  # scikit-learn's n / (k * count), absent classes 1
        counts = np.bincount(ids, minlength=k)
        present = counts > 0
        weights = np.ones(k)
        weights[present] = len(ids) / (present.sum() * counts[present])
        return {i: float(w) for i, w in enumerate(weights)}
    unknown = sorted(set(class_weight) - set(label_names))
    if unknown:
        raise DataError(
            f"class_weight names labels {unknown} that are not in the training labels "
            f"{label_names}."
        )
    return {i: float(class_weight.get(name, 1.0)) for i, name in enumerate(label_names)}
