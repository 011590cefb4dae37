"""Labelling a file of texts in bounded memory: read, predict and write a chunk at a time.

`label_file` reads rows from a `TextStream` (`kerasft.labelling.textstream.read_texts`), predicts
each chunk with any `predict_proba(texts) -> (N, K)` (a `TwoStageFineTuner`'s, or an export
runtime's) and writes one output row per input row, in input order, as JSON Lines or CSV. Memory
holds one chunk, so it stays flat in the file's size. A file target is written under a temporary
name and renamed when complete: a killed run leaves no half file under the target's name.

Example:
    >>> from kerasft.labelling.textstream import read_texts
    >>> summary = label_file(read_texts("tickets.csv"), tuner.predict_proba, tuner.label_names,
    ...                      out="labels.jsonl")
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kerasft.data import DataError, encode_labels
from kerasft.util.fileio import atomic_write_file
from kerasft.util.metrics import classification_metrics
from kerasft.util.wording import option

OUTPUT_FORMATS = ("jsonl", "csv")
CHUNK_ROWS = 1024


def label_file(
    stream,
    predict_proba: Callable[[list[str]], np.ndarray],
    label_names: list[str],
    out: str | Path | None = None,
    output_format: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Labels every row of `stream` and writes the predictions.

    Each output row holds `line` (the input's line, or record position in a JSON array), `id`
    (when the input has an id column), `label` and the probability of every class.

    Args:
        stream: a `TextStream`; with a label column, the predictions are scored too.
        predict_proba: class probabilities of a list of texts, `(N, len(label_names))`.
        label_names: the model's class names.
        out: the file to write; None writes to standard output.
        output_format: `"jsonl"` or `"csv"`; default: from `out`'s suffix, else JSON Lines.
        chunk_rows: rows read, predicted and written together.
        overwrite: replace an existing `out`.
        progress: show rows, rows/s and the time left on standard error.

    Returns:
        `{"rows", "skipped", "seconds", "rows_per_second"}`, and `"metrics"` (accuracy,
        precision, recall, F1, confusion matrix) when the stream has labels.

    Raises:
        FileExistsError: `out` exists and `overwrite` is False.
        DataError: a bad row (from the stream), an unknown output format, or a label that is
            not one of `label_names`.
    """
    output_format = _check_output(out, output_format, overwrite)
    writer = _Writer(stream.columns["id"] is not None, label_names, output_format)
    meter = _Progress(stream) if progress else None
    scored = stream.columns["label"] is not None
    truth, predicted = [], []
    start = time.perf_counter()

    def write(handle) -> int:
        rows = 0
        for chunk in _chunks(stream, chunk_rows):
            proba = np.asarray(predict_proba([text for _, text, _, _ in chunk]))
            ids = proba.argmax(axis=-1)
            writer.write(handle, chunk, ids, proba)
            if scored:
                truth.append(_label_ids(chunk, label_names, stream.name))
                predicted.append(ids)
            rows += len(chunk)
            if meter:
                meter.update(rows)
        if meter:
            meter.done(rows)
        return rows

    if out is None:
        rows = write(sys.stdout)
        sys.stdout.flush()
    else:
        counted = []
        atomic_write_file(out, lambda tmp: counted.append(_write_to(tmp, write)))
        rows = counted[0]
    seconds = time.perf_counter() - start
    summary = {"rows": rows, "skipped": stream.skipped, "seconds": seconds,
               "rows_per_second": rows / seconds if seconds else 0.0}  # fmt: skip
    if scored and rows:
        summary["metrics"] = classification_metrics(
            np.concatenate(truth), np.concatenate(predicted), len(label_names)
        )
    return summary


def _check_output(out, output_format: str | None, overwrite: bool) -> str:
    """The output format to write (`output_format`, else from `out`'s suffix).

    Raises:
        DataError: an unknown output format.
        FileExistsError: `out` exists and `overwrite` is False.
    """
    output_format = output_format or _format_of(out)
    if output_format not in OUTPUT_FORMATS:
        raise DataError(
            f"Unknown output format {output_format!r}. Supported: {list(OUTPUT_FORMATS)}."
        )
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} exists. Pass {option('overwrite', True)} to replace it."
        )
    return output_format


def _format_of(out) -> str:
    if out is not None and Path(out).suffix.lower() in (".csv", ".tsv"):
        return "csv"
    return "jsonl"


def _write_to(path: Path, write) -> int:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        return write(handle)


def _chunks(stream, size: int):
    rows = iter(stream)
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _label_ids(chunk, label_names: list[str], name: str) -> np.ndarray:
    try:
        ids, _ = encode_labels([label for _, _, label, _ in chunk], label_names)
    except DataError as e:
        raise DataError(f"{name}: lines {chunk[0][0]}-{chunk[-1][0]}: {e}") from None
    return ids


class _Writer:
    """Output rows: JSON Lines objects or CSV lines with a header."""

    def __init__(self, with_id: bool, label_names: list[str], output_format: str):
        self.with_id, self.names, self.format = with_id, list(label_names), output_format
        self.started = False

    def write(self, handle, chunk, ids: np.ndarray, proba: np.ndarray) -> None:
        if self.format == "csv":
            writer = csv.writer(handle)
            if not self.started:
                writer.writerow(["line", *(["id"] * self.with_id), "label",
                                 *(f"probability_{n}" for n in self.names)])  # fmt: skip
            for (row, _, _, row_id), k, p in zip(chunk, ids, proba, strict=True):
                writer.writerow([row, *([row_id] * self.with_id), self.names[k],
                                 *(f"{v:.6f}" for v in p)])  # fmt: skip
        else:
            lines = []
            for (row, _, _, row_id), k, p in zip(chunk, ids, proba, strict=True):
                record = {"line": row, **({"id": row_id} if self.with_id else {})}
                record["label"] = self.names[k]
                record["probabilities"] = {
                    n: round(float(v), 6) for n, v in zip(self.names, p, strict=True)
                }
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            handle.write("".join(lines))
        self.started = True


class _Progress:
    """`rows, rows/s, % of the file, time left` on standard error, at most twice a second."""

    def __init__(self, stream):
        self.stream, self.start, self.shown = stream, time.perf_counter(), 0.0

    def update(self, rows: int) -> None:
        now = time.perf_counter()
        if now - self.shown >= 0.5:
            self.shown = now
            sys.stderr.write("\r" + self._line(rows, now) + "\033[K")
            sys.stderr.flush()

    def done(self, rows: int) -> None:
        sys.stderr.write("\r" + self._line(rows, time.perf_counter()) + "\033[K\n")
        sys.stderr.flush()

    def _line(self, rows: int, now: float) -> str:
        seconds = max(now - self.start, 1e-9)
        line = f"[kerasft] {rows:,} rows, {rows / seconds:,.0f} rows/s"
        fraction = self.stream.fraction_read()
        if fraction:
            left = seconds * (1 - fraction) / fraction
            line += f", {fraction:.0%} of the file, {left // 60:.0f} min {left % 60:02.0f} s left"
        return line
