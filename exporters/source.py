"""What an export reads: the model (a run directory, a `.keras` file or a fitted tuner) and its
Keras reference logits on the verification texts, computed once per model file and texts."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kerasft.exporters.contract import FormatContract
from kerasft.exporters.vset import reference_logits
from kerasft.runs.rundir import MODEL_FILE

log = logging.getLogger("kerasft.export")


@dataclass
class Source:
    classifier: object
    label_names: list[str]
    backend: str
    run_dir: Path | None
    model_file: Path | None = None  # the .keras file it was read from


# The last Keras reference computed in this process, by what it depends on: the exports of one
# `exports_in_subprocess` call (the bench's artifacts) share it instead of recomputing it.
_LAST_REFERENCE: dict[tuple, tuple] = {}


def cached_reference(graph, clf, src: Source, contract: FormatContract, texts: list[str]):
    """`vset.reference_logits`, reused for the same model file, texts and serving graph."""
    key = None
    if src.model_file is not None:
        stat = src.model_file.stat()
        digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        key = (str(src.model_file.resolve()), stat.st_mtime_ns, stat.st_size, type(graph).__name__,
               contract.onnx_graph, clf.preprocessor.sequence_length, digest)  # fmt: skip
    if key is None or key not in _LAST_REFERENCE:
        log.info("Keras reference logits for %d verification texts", len(texts))
        reference = reference_logits(graph, clf, texts)
        if key is None:
            return reference
        _LAST_REFERENCE.clear()
        _LAST_REFERENCE[key] = reference
    return _LAST_REFERENCE[key]


def load_source(source, copy: bool) -> Source:
    """Opens the model to export; `copy` gives an in-memory tuner's model as a fresh copy."""
    # lazy: loads Keras, under the graph source's backend
    from kerasft.training.tuner import TwoStageFineTuner

    if isinstance(source, TwoStageFineTuner):
        if not copy:
            return Source(source._fitted(), source.label_names, source.backend or "", None)
        with tempfile.TemporaryDirectory() as tmp:
            source.save(Path(tmp) / MODEL_FILE)
            return Source(TwoStageFineTuner.load(Path(tmp) / MODEL_FILE).model,
                           source.label_names, source.backend or "", None)  # fmt: skip
    path = Path(source)
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise FileNotFoundError(
            f"No model at {str(model_path)!r}. Pass a `kerasft fit` run directory or a .keras file."
        )
    tuner = TwoStageFineTuner.load(model_path)
    return Source(tuner.model, tuner.label_names, tuner.backend or "",
                   path if path.is_dir() else None, model_path)  # fmt: skip
