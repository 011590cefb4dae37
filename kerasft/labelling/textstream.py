"""Texts to label, read one row at a time from a file or standard input.

`read_texts` takes the files `load_dataset` takes (JSON Lines, a JSON array, CSV, TSV, each
optionally gzipped, a UTF-8 byte-order mark ignored, any `encoding`), plus plain text files of
one text per line (`.txt`, and standard input by default). Labels are optional: a label column is
read only when asked for (to score predictions). Memory stays flat in the file's size, except
for a JSON array, which is parsed whole.

Column rules are `load_dataset`'s: the text column is detected (`headline`, `text`, ...) or
named; a two-column CSV/TSV without a header (`label, text`) is recognised; a one-column CSV/TSV
is one text per row, its first row a header only when it names a known text column.

Example:
    >>> stream = read_texts("tickets.csv", text_column="body")
    >>> for row, text, label, row_id in stream:
    ...     ...
"""

from __future__ import annotations

import gzip
import io
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from kerasft.data import (
    FILE_FORMATS,
    HEAD_LINES,
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    DataError,
    decode_error,
    detect_header,
    headerless_columns,
    is_missing,
    pick_column,
    records,
)
from kerasft.util.wording import option

STDIN = "-"
INPUT_FORMATS = ("jsonl", "json", "csv", "tsv", "lines")
_SUFFIXES = {**FILE_FORMATS, ".txt": "lines", ".text": "lines"}
ID_COLUMNS = ("id",)


class TextStream:
    """The rows of one file of texts: iterate for `(row, text, label, id)`.

    `row` is the line number (the record's position in a JSON array), `label` the raw label or
    None without a label column, `id` the id column's value or None. Open it with `read_texts`.

    Attributes:
        name: the path, or `<stdin>`.
        format: one of `INPUT_FORMATS`.
        columns: `{"text", "label", "id"}` column names (None: absent or not read).
        skipped: rows dropped so far for a missing text (with `skip_invalid`).
    """

    def __init__(self, path, fmt, encoding, header, text_column, label_column, id_column,
                 labels, skip_invalid):  # fmt: skip
        self.path, self.format, self.encoding = path, fmt, encoding
        self.name = "<stdin>" if path == STDIN else str(path)
        self.skip_invalid, self.skipped = skip_invalid, 0
        self._raw, self._handle = _open(path, encoding)
        self._closed = False
        try:
            self._start(header, text_column, label_column, id_column, labels)
        except BaseException:
            self.close()
            raise

    def _start(self, header, text_column, label_column, id_column, labels) -> None:
        """Reads the first lines: the header and columns, then chains them back."""
        fmt, handle = self.format, self._handle
        try:  # a JSON array is parsed whole, so read whole
            head = list(handle if fmt == "json" else itertools.islice(handle, HEAD_LINES))
        except UnicodeDecodeError as e:
            raise self._decode_error(e) from None
        if header is None and fmt in ("csv", "tsv") and text_column is None:
            header = detect_header(head, fmt, self.name, one_column_is_text=True)
        self._lines = itertools.chain(head, handle)
        first = next(records(head, fmt, header is not False, self.name), None)
        columns = list(first[1]) if first else []
        self.columns = self._columns(columns, head, header, text_column, label_column,
                                     id_column, labels)  # fmt: skip
        self._header = header is not False

    def _columns(self, columns, head, header, text_column, label_column, id_column, labels):
        found = {"text": "text" if self.format == "lines" else None, "label": None, "id": None}
        if self.format == "lines" or not columns:
            return found
        name = self.name
        if header is False and text_column is None and len(columns) <= 2:
            rows = [r for _, r in records(head, self.format, False, name)]
            text, label = ("0", None) if len(columns) == 1 else headerless_columns(rows)
            found.update(text=text, label=label if labels or label_column else None)
            return found
        found["text"] = pick_column(columns, text_column, TEXT_COLUMNS, "text", name)
        if labels or label_column is not None:
            found["label"] = pick_column(columns, label_column, LABEL_COLUMNS, "label", name)
        if id_column is not None:
            found["id"] = pick_column(columns, id_column, (), "id", name)
        else:
            found["id"] = next((c for c in columns if c.lower() in ID_COLUMNS), None)
        return found

    def __iter__(self) -> Iterator[tuple[int, str, object, object]]:
        text_col, label_col, id_col = (self.columns[k] for k in ("text", "label", "id"))
        try:
            for row, record in records(self._lines, self.format, self._header, self.name):
                text = record.get(text_col)
                if not isinstance(text, str) or not text.strip():
                    if self.skip_invalid:
                        self.skipped += 1
                        continue
                    unit = "record" if self.format == "json" else "line"
                    raise DataError(
                        f"{self.name}: {unit} {row}: missing text in column {text_col!r}. Fix "
                        f"the row or pass {option('skip_invalid', True)} to drop such rows."
                    )
                label = record.get(label_col) if label_col is not None else None
                if label_col is not None and is_missing(label):
                    raise DataError(
                        f"{self.name}: line {row}: missing label ({label!r}) in column "
                        f"{label_col!r}; scoring needs every row's label."
                    )
                yield row, text, label, record.get(id_col) if id_col is not None else None
        except UnicodeDecodeError as e:
            raise self._decode_error(e) from None
        finally:
            self.close()

    def fraction_read(self) -> float | None:
        """How much of the file is read, in [0, 1]; None for standard input."""
        if self._raw is None or self._raw.closed:
            return None
        size = Path(self.path).stat().st_size
        return min(1.0, self._raw.tell() / size) if size else 1.0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._raw is None:  # standard input: let go of it, open
            self._handle.detach()
        else:
            self._handle.close()
            self._raw.close()

    def decode_error(self, error: UnicodeDecodeError) -> DataError:
        if self.path == STDIN:
            return DataError(
                f"<stdin>: the input is not {self.encoding} ({error.reason} at byte "
                f"0x{error.object[error.start]:02x}). Pass its encoding: "
                f"{option('encoding', 'latin-1')} (or cp1252, ...)."
            )
        return decode_error(Path(self.path), self.encoding, error)


def read_texts(
    path: str | Path,
    text_column: str | None = None,
    label_column: str | None = None,
    id_column: str | None = None,
    encoding: str = "utf-8",
    header: bool | None = None,
    input_format: str | None = None,
    labels: bool = False,
    skip_invalid: bool = False,
) -> TextStream:
    """Opens a file of texts (or `"-"`, standard input) to read row by row.

    Args:
        path: the file, or `"-"` for standard input.
        text_column: the text column; detected when None.
        label_column: the label column to read (implies `labels`).
        id_column: a column to carry to the output; default: a column named `id`, if any.
        encoding: the text encoding (a UTF-8 byte-order mark is dropped).
        header: CSV/TSV: whether the first row names the columns (None: detected).
        input_format: one of `INPUT_FORMATS`; default: from the suffix, `lines` for stdin.
        labels: read the label column (detected when `label_column` is None).
        skip_invalid: drop rows without a text instead of failing.

    Returns:
        A `TextStream`; iterating it closes the file at the end.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: an unknown format or suffix, a missing or ambiguous column, text that is not
            `encoding`.

    Example:
        >>> [text for _, text, _, _ in read_texts("headlines.txt")][:1]
        ['area man wins argument with toaster']
    """
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise DataError(f"Unknown input format {input_format!r}. Supported: {list(INPUT_FORMATS)}.")
    if path != STDIN:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Data file not found: {str(path)!r}")
    fmt = input_format or ("lines" if path == STDIN else _input_format(path))
    return TextStream(path, fmt, encoding, header, text_column, label_column, id_column,
                      labels, skip_invalid)  # fmt: skip


def _input_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    fmt = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DataError(
            f"{path}: unsupported file type {''.join(path.suffixes)!r}. Supported: "
            f"{sorted(_SUFFIXES)}, each optionally gzipped (.gz), or name the format with "
            f"{option('input_format')}."
        )
    return fmt


def _open(path, encoding: str):
    """`(raw binary file or None, text handle)`; UTF-8 drops a byte-order mark."""
    encoding = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    if path == STDIN:
        return None, io.TextIOWrapper(sys.stdin.buffer, encoding=encoding, newline="")
    raw = open(path, "rb")  # noqa: SIM115 (closed by TextStream.close)
    binary = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
    return raw, io.TextIOWrapper(binary, encoding=encoding, newline="")
