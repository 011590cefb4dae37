"""Data: labelled text files read (`files`), label rules (`labels`), the `TextDataset` the rest
of kerasft takes (`dataset`) and the reference 60/20/20 split (`splits`).

The public names are re-exported here: `from kerasft.data import load_dataset` is the way in.

May import: `kerasft.util` (scikit-learn, for the splits, loads on first use).
"""

from kerasft.data.dataset import DataError, TextDataset, as_texts
from kerasft.data.files import (
    DATA_ENV,
    FILE_FORMATS,
    HEAD_LINES,
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    check_data_file,
    decode_error,
    detect_header,
    headerless_columns,
    load_dataset,
    pick_column,
    records,
)
from kerasft.data.labels import (
    MISSING_LABELS,
    align_labels,
    class_weight_ids,
    encode_labels,
    is_missing,
    label_ids,
    label_values,
    texts_and_labels,
    training_classes,
)
from kerasft.data.splits import (
    MIN_PER_CLASS,
    REFERENCE_SEED,
    holdout_split,
    reference_split,
    split_dataset,
    stratified_limit,
)

__all__ = [
    "DATA_ENV", "FILE_FORMATS", "HEAD_LINES", "LABEL_COLUMNS", "MIN_PER_CLASS", "MISSING_LABELS",
    "REFERENCE_SEED", "TEXT_COLUMNS", "align_labels", "as_texts", "check_data_file",
    "class_weight_ids", "DataError", "decode_error", "detect_header", "encode_labels",
    "headerless_columns", "holdout_split", "is_missing", "label_ids", "label_values",
    "load_dataset", "pick_column", "records", "reference_split", "split_dataset",
    "stratified_limit", "TextDataset", "texts_and_labels", "training_classes",
]  # fmt: skip
