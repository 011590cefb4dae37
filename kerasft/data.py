"""Labelled text loading, the reference 60/20/20 split and stratified subsampling.

Supported files: JSON Lines (`.jsonl`/`.ndjson`), a JSON array of objects (`.json`), CSV (`.csv`)
and TSV (`.tsv`/`.tab`) with a header row or, for a two-column `label, text` file, without
one (detected, or `header=False`), each optionally gzipped (`.jsonl.gz`, ...), in UTF-8 or the
`encoding` given; a UTF-8 byte-order mark (as Excel writes) is ignored. A label that is empty,
null/None or NaN (in any spelling, "nan" included) is missing. Text and label columns are
auto-detected from common names (`headline`, `sentence`, `text`, ... / `is_sarcastic`, `label`,
...) and can be given by name.
Labels are class names, in files and in the Python API alike (`encode_labels`): the distinct
values in sorted order (numeric when all are integers) become class ids `0..K-1`, and their string
forms are kept in `TextDataset.label_names`; `{1, 2}` is a 2-class task named "1" and "2".
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kerasft.wording import option

logger = logging.getLogger(__name__)

DATA_ENV = "KERASFT_DATA"
TEXT_COLUMNS = ("text", "sentence", "headline", "review", "content", "document", "title")
LABEL_COLUMNS = ("label", "labels", "is_sarcastic", "target", "class", "category", "sentiment")
FILE_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
}
REFERENCE_SEED = 30
MISSING_LABELS = ("", "nan", "none", "null")


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


def _open_text(path: Path, encoding: str = "utf-8"):
    """Opens a (possibly gzipped) text file; a UTF-8 byte-order mark (Excel's) is dropped."""
    encoding = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return path.open(encoding=encoding, newline="")


def decode_error(path: Path, encoding: str, error: UnicodeDecodeError) -> DataError:
    """Where a file stops being `encoding`: its line and byte, read again from the raw bytes."""
    raw = gzip.open(path).read() if path.suffix.lower() == ".gz" else path.read_bytes()
    try:
        raw.decode(encoding)
        at = error.start  # (not reached: the file did not decode)
    except UnicodeDecodeError as e:
        at = e.start
    line = raw.count(b"\n", 0, at) + 1
    return DataError(
        f"{path}: line {line}: byte 0x{raw[at]:02x} (offset {at}) is not {encoding}. Pass the "
        f"file's encoding: {option('encoding', 'latin-1')} (or cp1252, ...)."
    )


def _json_error(
    path, line: int, error: json.JSONDecodeError, expected: str = "one JSON object per line"
) -> DataError:
    """A JSON syntax error as a user reads it: line, column, the problem, what was expected."""
    problem = error.msg.removesuffix(" starting at").removesuffix(" at")
    at = error.doc[error.pos : error.pos + 1]
    control = problem == "Invalid control character"
    if problem == "Unterminated string" or (control and at in "\r\n"):
        hint = " (the line ends inside a string: cut short?)"
    elif control:
        hint = f" ({at!r} inside a string; JSON writes it escaped)"
    else:
        hint = ""
    return DataError(
        f"{path}: line {line}, column {error.colno}: malformed JSON: {problem}{hint}. "
        f'Expected {expected}, such as {{"text": "...", "label": 1}}.'
    )


def _format_of(path: Path) -> str | None:
    """The format from the suffix, looking through a trailing `.gz`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FILE_FORMATS.get(suffixes[-1]) if suffixes else None


def is_missing(value) -> bool:
    """A missing label in any spelling: None/null, NaN, or "", "nan", "none", "null"."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING_LABELS


def _read_records(
    path: Path, fmt: str, encoding: str = "utf-8", header: bool = True
) -> Iterator[tuple[int, dict]]:
    """`records` of a file (a JSON array is parsed whole first)."""
    with _open_text(path, encoding) as f:
        yield from records(f, fmt, header, path)


def records(lines, fmt: str, header: bool, name) -> Iterator[tuple[int, dict]]:
    """Yields `(row number, record)` one at a time from an iterable of text lines.

    Row numbers are lines for JSON Lines, CSV/TSV (the header is line 1) and text files (one
    text per line: `{"text": line}`, blank lines skipped), positions for a JSON array. Only the
    caller's text and label survive each record: a large file is never held as dicts.
    """
    if fmt == "lines":
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                yield lineno, {"text": line.rstrip("\r\n")}
        return
    if fmt == "jsonl":
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _json_error(name, lineno, e) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{name}: line {lineno}: expected a JSON object, got {type(record).__name__}."
                )
            yield lineno, record
        return
    if fmt == "json":
        try:
            data = json.loads("".join(lines))
        except json.JSONDecodeError as e:
            raise _json_error(name, e.lineno, e, "one JSON array of objects") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{name}: expected a JSON array of objects.")
        yield from enumerate(data, start=1)
        return
    delimiter = "\t" if fmt == "tsv" else ","
    if not header:  # columns are named by position: "0", "1", ...
        reader = csv.reader(lines, delimiter=delimiter)
        for row in reader:
            if row:
                yield reader.line_num, {str(i): v for i, v in enumerate(row)}
        return
    reader = csv.DictReader(lines, delimiter=delimiter)
    for record in reader:
        if None in record:
            raise DataError(
                f"{name}: line {reader.line_num}: more fields than the header {reader.fieldnames}."
            )
        yield reader.line_num, record


def pick_column(columns: list[str], given: str | None, candidates, role: str, path: Path) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(
                f"{path}: {role} column {given!r} not found. Available columns: {columns}."
            )
        return given
    lowered = {c.lower(): c for c in columns}
    found = [lowered[c] for c in candidates if c in lowered]
    if not found:
        raise DataError(
            f"{path}: no {role} column found among {columns}. Expected one of {list(candidates)}, "
            f"or name it with {option(role + '_column')}."
        )
    if len(found) > 1:
        raise DataError(
            f"{path}: ambiguous {role} column: {found} all match. Choose one with "
            f"{option(role + '_column')}."
        )
    return found[0]


def headerless_columns(rows: list[dict]) -> tuple[str, str]:
    """`(text column, label column)` of a headerless two-column file's rows: labels repeat."""
    distinct = [len({r.get(str(i)) for r in rows}) for i in (0, 1)]
    return ("1", "0") if distinct[0] < distinct[1] else ("0", "1")


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


def load_dataset(
    path: str | Path,
    text_column: str | None = None,
    label_column: str | None = None,
    skip_invalid: bool = False,
    encoding: str = "utf-8",
    header: bool | None = None,
) -> TextDataset:
    """Loads labelled texts from a JSONL, JSON, CSV or TSV file.

    Args:
        path: the file. Its suffix picks the format (`.jsonl`, `.ndjson`, `.json`, `.csv`,
            `.tsv`, `.tab`).
        text_column: the text column; auto-detected when None.
        label_column: the label column; auto-detected when None.
        skip_invalid: drop rows with an empty text or label instead of failing (the count is
            logged and kept in `TextDataset.skipped`).
        encoding: the file's text encoding (a UTF-8 byte-order mark is dropped).
        header: CSV/TSV (ignored otherwise): whether the first row names the columns. None
            (default) decides:
            a two-column file whose first row names no known column is read without a header
            when one column holds few distinct values (the labels) and the other many (the
            texts). Without a header the columns are named `"0"`, `"1"`, ...

    Returns:
        A `TextDataset`.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: unknown format, empty file, text that is not `encoding` (line and byte
            named), malformed row, missing/ambiguous columns, a missing label, or a single
            class.

    Example:
        >>> ds = load_dataset("../shared/data/sarcasm_headlines_v1.jsonl")
        >>> ds.label_names
        ['0', '1']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {str(path)!r}")
    fmt = _format_of(path)
    if fmt is None:
        raise DataError(
            f"{path}: unsupported file type {''.join(path.suffixes)!r}. Supported: "
            f"{sorted(FILE_FORMATS)}, each optionally gzipped (.gz)."
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty.")
    try:
        if header is None and fmt in ("csv", "tsv") and text_column is label_column is None:
            header = _has_header(path, fmt, encoding)
        return _load(path, fmt, text_column, label_column, skip_invalid, encoding, header)
    except UnicodeDecodeError as e:
        raise decode_error(path, encoding, e) from None


HEAD_LINES = 10000  # the lines header and column detection look at


def _has_header(path: Path, fmt: str, encoding: str) -> bool:
    with _open_text(path, encoding) as f:
        return detect_header(list(itertools.islice(f, HEAD_LINES)), fmt, path)


def detect_header(head: list[str], fmt: str, name, one_column_is_text: bool = False) -> bool:
    """Whether a CSV/TSV file's first lines (`head`) start with a header row.

    False for a two-column file whose first row names no known column and whose columns look
    like labels (few distinct values, the first row's among them) and texts (many), and, with
    `one_column_is_text`, for a one-column file whose first row names no known column; else
    True.
    """
    first = next(csv.reader(head, delimiter="\t" if fmt == "tsv" else ","), [])
    known = {c.lower() for c in (*TEXT_COLUMNS, *LABEL_COLUMNS)}
    if any(c.strip().lower() in known for c in first):
        return True
    if len(first) == 1 and one_column_is_text:
        return False
    if len(first) != 2:
        return True
    rows = [r for _, r in records(head, fmt, False, name)]
    distinct = [len({r.get(str(i)) for r in rows}) for i in (0, 1)]
    label = str(int(distinct[1] < distinct[0]))
    repeats = rows[0].get(label) in {r.get(label) for r in rows[1:]}  # a header name would not
    return not (repeats and min(distinct) <= max(2, min(50, len(rows) // 10)) < max(distinct))


def _load(path, fmt, text_column, label_column, skip_invalid, encoding, header) -> TextDataset:
    unit = "record" if fmt == "json" else "line"
    stream = _read_records(path, fmt, encoding, header is not False)
    first = next(stream, None)
    if first is None:
        raise DataError(f"{path}: the file has no data rows.")
    columns = list(first[1])
    if header is False and text_column is label_column is None and len(columns) == 2:
        head = itertools.islice(_read_records(path, fmt, encoding, False), HEAD_LINES)
        text_column, label_column = headerless_columns([r for _, r in head])
    try:
        text_col = pick_column(columns, text_column, TEXT_COLUMNS, "text", path)
        label_col = pick_column(columns, label_column, LABEL_COLUMNS, "label", path)
    except DataError as e:
        known = {c.lower() for c in (*TEXT_COLUMNS, *LABEL_COLUMNS)}
        if (
            header is not False
            and fmt in ("csv", "tsv")
            and not known & {c.lower() for c in columns}
        ):
            e.args = (f"{e.args[0]} If the first row is data, not column names, pass "
                      f"{option('header', False)}.",)  # fmt: skip
        raise

    texts, raw_labels, skipped = [], [], 0
    for row, record in itertools.chain([first], stream):
        text, label = record.get(text_col), record.get(label_col)
        problem = None
        if is_missing(label):
            problem = f"missing label ({label!r}) in column {label_col!r}"
        elif not isinstance(text, str) or not text.strip():
            problem = f"missing text in column {text_col!r}"
        if problem:
            if skip_invalid:
                skipped += 1
                continue
            raise DataError(
                f"{path}: {unit} {row}: {problem}. Fix the row or pass "
                f"{option('skip_invalid', True)} to drop such rows."
            )
        texts.append(text)
        raw_labels.append(label.strip() if isinstance(label, str) else label)
    if skipped:
        logger.warning("%s: skipped %d invalid rows (%s).", path, skipped,
                       option("skip_invalid", True))  # fmt: skip
    if not texts:
        raise DataError(f"{path}: no valid rows left (skipped {skipped}).")
    labels, names = encode_labels(raw_labels)
    if len(names) < 2:
        raise DataError(
            f"{path}: only one class ({names[0]!r}) in column {label_col!r}; classification "
            "needs at least two."
        )
    return TextDataset(
        texts,
        labels,
        names,
        str(path),
        skipped,
        {"text": text_col, "label": label_col},
        header=None if fmt not in ("csv", "tsv") else header is not False,
    )


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


# --- inputs of the Python API (`TwoStageFineTuner.fit/evaluate/score`) -------------------------


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
