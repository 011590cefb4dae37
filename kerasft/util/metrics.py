"""Classification metrics with scikit-learn, in the JSON shape `metrics.json` uses."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Returns accuracy, precision, recall, F1 and the confusion matrix.

    Binary tasks score the positive class (id 1, e.g. "sarcastic"); more classes use macro
    averages.

    Args:
        y_true: true class ids.
        y_pred: predicted class ids.
        num_classes: number of classes (fixes the confusion matrix size).

    Returns:
        `{"accuracy", "precision", "recall", "f1", "confusion_matrix", "rows"}`; the matrix is
        a list of lists, rows = true class, columns = predicted class.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    average = "binary" if num_classes == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average=average, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion_matrix": confusion_matrix(
            y_true, y_pred, labels=np.arange(num_classes)
        ).tolist(),
        "rows": int(len(y_true)),
    }


def confusion_metrics(confusion) -> dict:
    """`classification_metrics` of the predictions that a confusion matrix counts.

    Every score depends on the counts alone, so they are computed exactly as
    `classification_metrics` computes them, on one `(true, predicted)` pair per counted row.

    Args:
        confusion: `(K, K)` non-negative counts, rows = true class, columns = predicted class.

    Returns:
        The `classification_metrics` dict.

    Raises:
        ValueError: if `confusion` is not a square matrix of non-negative integers.
    """
    counts = np.asarray(confusion)
    if (
        counts.ndim != 2
        or counts.shape[0] != counts.shape[1]
        or (counts < 0).any()
        or (counts != np.rint(counts)).any()
    ):
        raise ValueError(
            f"confusion must be a square matrix of non-negative counts. Received: {counts!r}"
        )
    counts = counts.astype("int64")
    k = counts.shape[0]
    true = np.repeat(np.arange(k), counts.sum(axis=1))
    predicted = np.concatenate([np.repeat(np.arange(k), row) for row in counts])
    return classification_metrics(true, predicted, k)
