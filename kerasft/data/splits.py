"""The reference 60/20/20 split, the 75/25 hold-out and stratified subsampling (scikit-learn).

Every split depends only on the labels and the seed, so splitting row indices selects the very
rows `train_test_split` selects on the data itself.
"""

from __future__ import annotations

import numpy as np

from kerasft.data.dataset import DataError, TextDataset

REFERENCE_SEED = 30


def reference_split(
    labels: np.ndarray, seed: int = REFERENCE_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns train/validation/test row indices of the reference 60/20/20 split.

    Exactly scikit-learn's `train_test_split(X, y, test_size=0.2, stratify=y, random_state=30)`
    followed by `train_test_split(X_rest, y_rest, test_size=0.25, stratify=y_rest,
    random_state=30)`: the selection depends only on `y` and the seed, so splitting row indices
    selects the very same rows in the same order.

    Args:
        labels: class ids, one per row.
        seed: `random_state` for both splits.

    Returns:
        `(train_idx, val_idx, test_idx)` int arrays.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest], random_state=seed)
    return train, val, test


MIN_PER_CLASS = 3  # the two stratified splits of the reference split fail below this


def _check_class_sizes(data: TextDataset, least: int, split: str) -> None:
    counts = np.bincount(data.labels, minlength=len(data.label_names))
    present = np.flatnonzero(counts)
    smallest = present[np.argmin(counts[present])]
    if counts[smallest] < least:
        raise DataError(
            f"{data.source}: class {data.label_names[smallest]!r} has {counts[smallest]} row(s); "
            f"the stratified {split} split needs at least {least} rows of every class. "
            "Add rows of that class or remove it."
        )


def split_dataset(
    data: TextDataset, seed: int = REFERENCE_SEED
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """`reference_split` applied to a dataset: its `(train, validation, test)` subsets.

    Raises:
        DataError: a class has fewer than `MIN_PER_CLASS` rows; the message names the file, the
            class and its count.
    """
    _check_class_sizes(data, MIN_PER_CLASS, "60/20/20")
    return tuple(data.subset(i) for i in reference_split(data.labels, seed))


def holdout_split(data: TextDataset, seed: int = REFERENCE_SEED) -> tuple[TextDataset, TextDataset]:
    """A stratified 75/25 split (the reference's train:validation ratio): `(train, held_out)`.

    Used when one evaluation set comes from its own file and the other from the training file.

    Raises:
        DataError: a class has fewer than 2 rows (named with the file and count).
    """
    from sklearn.model_selection import train_test_split

    _check_class_sizes(data, 2, "75/25")
    idx = np.arange(len(data))
    train, held = train_test_split(idx, test_size=0.25, stratify=data.labels, random_state=seed)
    return data.subset(train), data.subset(held)


def stratified_limit(labels: np.ndarray, limit: int, seed: int = REFERENCE_SEED) -> np.ndarray:
    """Returns sorted indices of a stratified subsample of `limit` rows.

    Raises:
        DataError: if `limit` is not in `[4 * num_classes, len(labels)]`.
    """
    from sklearn.model_selection import train_test_split

    n, k = len(labels), len(np.unique(labels))
    if not isinstance(limit, int) or not 4 * k <= limit <= n:
        raise DataError(f"limit must be an int in [{4 * k}, {n}]. Received: limit={limit!r}")
    if limit == n:
        return np.arange(n)
    keep, _ = train_test_split(np.arange(n), train_size=limit, stratify=labels, random_state=seed)
    return np.sort(keep)
