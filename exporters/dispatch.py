"""`export()`: one dispatcher for every format x quantization, verified, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasft.cli import MODEL_FILE
from kerasft.fileio import check_target_dir, publish_dir, temp_dir_beside
from kerasft.versions import EXPORT, package_versions

# format -> allowed `quantize` values (None = fp32).
SUPPORTED = {
    "saved_model": (None, "keras"),
    "onnx": (None, "dynamic", "static"),
    "litert": (None, "dynamic"),
}
# Every (format, quantize) pair export() supports, fp32 first within each format.
VARIANTS = [(fmt, quantize) for fmt, allowed in SUPPORTED.items() for quantize in allowed]
VERIFY_TEXTS = 512
CALIBRATION_TEXTS = 256


def check_format(format: str, quantize: str | None) -> None:
    """Raises `ValueError` for an unknown format or a quantization the format does not support."""
    if format not in SUPPORTED:
        raise ValueError(
            f"Unrecognized format={format!r}. Supported formats are: {list(SUPPORTED)}"
        )
    if quantize not in SUPPORTED[format]:
        raise ValueError(
            f"format={format!r} does not support quantize={quantize!r}. "
            f"Supported for {format}: {list(SUPPORTED[format])}"
        )


@dataclass
class _Source:
    classifier: object
    label_names: list[str]
    backend: str
    run_dir: Path | None


def _load_source(source, copy: bool) -> _Source:
    """Opens the model to export; `copy` gives an in-memory tuner's model as a fresh copy."""
    from kerasft.tuner import TwoStageFineTuner

    if isinstance(source, TwoStageFineTuner):
        if not copy:
            return _Source(source._fitted(), source.label_names, source.backend or "", None)
        with tempfile.TemporaryDirectory() as tmp:
            source.save(Path(tmp) / MODEL_FILE)
            return _Source(TwoStageFineTuner.load(Path(tmp) / MODEL_FILE).model,
                           source.label_names, source.backend or "", None)  # fmt: skip
    path = Path(source)
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise FileNotFoundError(
            f"No model at {str(model_path)!r}. Pass a `kerasft fit` run directory or a .keras file."
        )
    tuner = TwoStageFineTuner.load(model_path)
    return _Source(
        tuner.model, tuner.label_names, tuner.backend or "", path if path.is_dir() else None
    )


def verification_texts(run_dir: Path | None, seed: int = 30) -> tuple[list[str], list[str]]:
    """Test-split texts (verification) and training texts (calibration) of a run's data."""
    from kerasft.data import run_splits

    if run_dir is None or not (run_dir / "config.json").is_file():
        raise ValueError(
            "No texts to verify the export with: pass texts=[...] (and calibration_texts for "
            "static INT8), or export a `kerasft fit` run directory whose data file is readable."
        )
    train, _, test = run_splits(run_dir)
    rng = np.random.default_rng(seed)
    pick = lambda ds, n: [ds.texts[i] for i in np.sort(rng.permutation(len(ds))[:n])]  # noqa: E731
    return pick(test, VERIFY_TEXTS), pick(train, CALIBRATION_TEXTS)


def _keras_batches(classifier, texts: list[str], batch_size: int = 32, shape=(None, None)):
    """KerasHub-tokenized feeds, each padded to its longest text (as the runtime pads).

    With a fixed `shape` (batch, sequence), feeds are padded to it instead: the sequence with
    padding tokens, a short batch by repeating its first row.
    """
    import keras

    batch_size = shape[0] or batch_size
    for i in range(0, len(texts), batch_size):
        out = classifier.preprocessor(texts[i : i + batch_size])
        mask = keras.ops.convert_to_numpy(out["padding_mask"]).astype("int32")
        width = shape[1] or int(mask.sum(1).max())
        ids = keras.ops.convert_to_numpy(out["token_ids"]).astype("int32")
        feed = {"token_ids": ids[:, :width], "padding_mask": mask[:, :width]}
        if shape[0] and len(ids) < shape[0]:
            rows = np.r_[np.arange(len(ids)), np.zeros(shape[0] - len(ids), dtype=int)]
            feed = {k: v[rows] for k, v in feed.items()}
        yield feed


def check_fixed_shape(fixed_shape, max_positions: int) -> tuple[int | None, int | None]:
    """Validates `fixed_shape` = (batch or None, sequence or None); returns it as a tuple.

    Raises:
        ValueError: naming the bad value and what is allowed.
    """
    shape = tuple(fixed_shape) if fixed_shape is not None else (None, None)
    ok = len(shape) == 2 and all(v is None or (isinstance(v, int) and v >= 1) for v in shape)
    if not ok or (shape[1] is not None and not 2 <= shape[1] <= max_positions):
        raise ValueError(
            "fixed_shape must be (batch, sequence) with positive ints or None for a dynamic axis, "
            f"sequence in [2, {max_positions}]. Received: fixed_shape={fixed_shape!r}"
        )
    return shape


def _reference(graph, classifier, texts):
    ids, logits = [], []
    width = classifier.preprocessor.sequence_length
    for feed in _keras_batches(classifier, texts):
        logits.append(graph.serve(**feed)["logits"].numpy())
        ids.append(np.pad(feed["token_ids"], ((0, 0), (0, width - feed["token_ids"].shape[1]))))
    return np.concatenate(ids), np.concatenate(logits)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_in_subprocess(
    source, out_dir, format, quantize, overwrite, texts, calibration_texts, fixed_shape
):
    """Re-runs `export` in a TensorFlow-backend subprocess on the backend-neutral `.keras` file.

    Used when the current backend is not TensorFlow, and by the latency harness so that each
    export's memory is returned when it ends. Raises `RuntimeError` with the subprocess's stderr.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if not isinstance(source, (str, os.PathLike)):
            source.save(Path(tmp) / MODEL_FILE)
            source = tmp
        request = {
            "source": str(source),
            "out_dir": str(out_dir),
            "format": format,
            "quantize": quantize,
            "overwrite": overwrite,
            "texts": texts,
            "calibration_texts": calibration_texts,
            "fixed_shape": fixed_shape,
        }
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        proc = subprocess.run(
            [sys.executable, "-m", "exporters.dispatch", str(Path(tmp) / "request.json")],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(
                f"Export under the TensorFlow backend failed:\n{proc.stderr[-4000:]}"
            )
    return Path(out_dir)


def export(
    source,
    out_dir: str | os.PathLike,
    format: str = "onnx",
    quantize: str | None = None,
    *,
    overwrite: bool = False,
    texts: list[str] | None = None,
    calibration_texts: list[str] | None = None,
    opset: int | None = None,
    fixed_shape: tuple[int | None, int | None] | None = None,
) -> Path:
    """Exports a fine-tuned classifier, verifies it with its own runtime, and publishes it.

    The model is always traced under the TensorFlow backend from its backend-neutral `.keras`
    file (a subprocess is used when the current backend is JAX or PyTorch), so a model trained
    on any backend exports the same way.

    Args:
        source: a `kerasft fit` run directory, a `.keras` file saved by `TwoStageFineTuner.save`,
            or a fitted `TwoStageFineTuner`.
        out_dir: the export directory to create.
        format: `"saved_model"`, `"onnx"` or `"litert"`.
        quantize: None (fp32); `"dynamic"` or `"static"` for ONNX; `"dynamic"` for LiteRT;
            `"keras"` (Keras' native `quantize("int8")`) for SavedModel.
        overwrite: replace an existing non-empty `out_dir`.
        texts: real texts to verify with (default: 512 test-split texts of the run's data).
        calibration_texts: texts for static INT8 calibration (default: 256 training texts).
        opset: ONNX opset (default 17).
        fixed_shape: `(batch, sequence)` to fix either input axis (None keeps it dynamic; the
            default keeps both). A fixed sequence length also caps the tokens per text; the
            runtime pads every call to the fixed shape.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: unknown format or unsupported quantization (checked before any work).
        FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False.
        exporters.verify.VerificationError: the artifact disagrees with the Keras model.

    Example:
        >>> export("runs/sarcasm", "exports/sarcasm-onnx-int8", format="onnx", quantize="dynamic")
    """
    check_format(format, quantize)
    check_target_dir(out_dir, overwrite, "Export directory")
    import keras

    if keras.backend.backend() != "tensorflow":
        return export_in_subprocess(
            source, out_dir, format, quantize, overwrite, texts, calibration_texts, fixed_shape
        )
    from exporters import litert, onnx, runtime, saved_model
    from exporters.keras_graph import ServingGraph, onnx_friendly_ops
    from exporters.tokenizer import write_tokenizer_assets
    from exporters.verify import verify

    src = _load_source(source, copy=quantize == "keras")  # never quantize the caller's model
    if texts is None:
        texts, default_calibration = verification_texts(src.run_dir)
        calibration_texts = calibration_texts or default_calibration
    texts = list(texts)
    clf = src.classifier
    shape = check_fixed_shape(fixed_shape, clf.backbone.max_sequence_length)
    out_dir = Path(out_dir)
    tmp = temp_dir_beside(out_dir)
    max_tokens = clf.preprocessor.sequence_length
    try:
        if shape[1]:  # a fixed sequence caps tokens per text; restored below
            clf.preprocessor.sequence_length = shape[1]
        with onnx_friendly_ops(clf) if format == "onnx" else contextlib.nullcontext():
            graph = ServingGraph(clf)  # dynamic: the Keras reference for every text
            keras_ids, keras_logits = _reference(graph, clf, texts)
            if quantize == "keras":
                with warnings.catch_warnings():  # "Layer X has no quantize method" for each
                    warnings.simplefilter("ignore")  # non-Dense layer: expected, not news
                    graph.model.quantize("int8")
            if quantize == "keras" or shape != (None, None):
                graph = ServingGraph(clf, fixed_shape=shape)
            writer = {"saved_model": saved_model, "onnx": onnx, "litert": litert}[format]
            info = writer.write(
                graph,
                tmp,
                quantize=quantize,
                opset=opset or onnx.DEFAULT_OPSET,
                backbone=clf.backbone,
                calibration=(
                    list(_keras_batches(clf, list(calibration_texts or texts), shape=shape))
                    if quantize == "static"
                    else None
                ),
            )
        tokenizer = write_tokenizer_assets(
            clf.preprocessor.tokenizer, clf.preprocessor.sequence_length, tmp
        )
        manifest = {
            "format": format,
            "quantization": quantize and f"int8-{quantize}",
            "model_file": info["model_file"],
            "label_names": src.label_names,
            "sequence_length": clf.preprocessor.sequence_length,
            "tokenizer": tokenizer,
            "inputs": ["token_ids", "padding_mask"],
            "input_shape": list(shape),
            "opset": info.get("opset"),
            "fusions": info.get("fusions"),
            "source_backend": src.backend,
            "versions": package_versions(EXPORT),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        report = verify(runtime.load(tmp), texts, keras_ids, keras_logits, quantize is not None)
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != "manifest.json")
        manifest["verification"] = report
        manifest["files"] = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        manifest["size_bytes"] = sum(p.stat().st_size for p in files)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        publish_dir(tmp, out_dir)
    finally:
        clf.preprocessor.sequence_length = max_tokens
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


if __name__ == "__main__":  # the TensorFlow-backend subprocess of `export_in_subprocess`
    request = json.loads(Path(sys.argv[1]).read_text())
    export(request.pop("source"), request.pop("out_dir"), **request)
