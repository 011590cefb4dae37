"""Labelled text files: `load_dataset` reads them, with the rules `textstream` shares.

Supported files: JSON Lines (`.jsonl`/`.ndjson`), a JSON array of objects (`.json`), CSV (`.csv`)
and TSV (`.tsv`/`.tab`) with a header row or, for a two-column `label, text` file, without
one (detected, or `header=False`), each optionally gzipped (`.jsonl.gz`, ...), in UTF-8 or the
`encoding` given; a UTF-8 byte-order mark (as Excel writes) is ignored. A label that is empty,
null/None or NaN (in any spelling, "nan" included) is missing. Text and label columns are
auto-detected from common names (`headline`, `sentence`, `text`, ... / `is_sarcastic`, `label`,
...) and can be given by name.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from kerasft.data.dataset import DataError, TextDataset
from kerasft.data.labels import encode_labels, is_missing
from kerasft.util.wording import option

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


def check_data_file(path: str | Path) -> str:
    """The checks `load_dataset` makes before it reads a row: the file exists, its suffix names
    a supported format, and it is not empty. Returns the format.

    Raises:
        FileNotFoundError: no file at `path`.
        DataError: an unsupported suffix (the supported ones are listed), or an empty file.
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
    return fmt


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
    fmt = check_data_file(path)
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
