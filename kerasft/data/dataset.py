"""`TextDataset`: texts with integer class ids, and `DataError`, the error of unusable input.

`as_texts` takes the texts of the Python API (`TwoStageFineTuner.fit/evaluate/predict`): a
`TextDataset` or a list of strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Raised for unusable input data; the message names the file, row and problem."""


@dataclass
class TextDataset:
    """Texts with integer class ids.

    Attributes:
        texts: the texts, in file order.
        labels: int array of class ids, `labels[i]` indexes `label_names`.
        label_names: class names; ints are kept as their string form (`"0"`, `"1"`).
        source: where the rows came from.
        skipped: rows dropped by `skip_invalid=True` (always 0 otherwise).
        columns: `{"text": ..., "label": ...}`, the columns the rows were read from.
        header: CSV/TSV: whether the file's first row named the columns; None otherwise.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    source: str = ""
    skipped: int = 0
    columns: dict = field(default_factory=dict)
    header: bool | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> TextDataset:
        """Returns the rows at `indices` (same label names)."""
        indices = np.asarray(indices)
        return TextDataset(
            [self.texts[i] for i in indices],
            self.labels[indices],
            self.label_names,
            self.source,
            columns=self.columns,
        )


def as_texts(x) -> list[str]:
    """`x` (a `TextDataset` or a sequence of strings) as a list of texts.

    Raises:
        DataError: a single string, or an item that is not a string (its index is named).
    """
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
