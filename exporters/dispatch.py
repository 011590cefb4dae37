"""`export()`: one dispatcher for every format x quantization, verified, written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasft.exporters.verify import INT8_MAX_ACCURACY_DROP, INT8_MIN_AGREEMENT
from kerasft.fileio import (
    check_target_dir,
    publish_dir,
    remove_stale_temp_dirs,
    target_lock,
    temp_dir_beside,
)
from kerasft.machine import cpu_model, isa
from kerasft.rundir import CONFIG_FILE, MODEL_FILE
from kerasft.versions import EXPORT, package_versions

log = logging.getLogger("kerasft.export")

# format -> allowed `quantize` values (None = fp32).
SUPPORTED = {
    "saved_model": (None, "keras"),
    "onnx": (None, "dynamic", "static"),
    "openvino": (None, "nncf"),
    "litert": (None, "dynamic"),
}
# Every (format, quantize) pair export() supports, fp32 first within each format.
VARIANTS = [(fmt, quantize) for fmt, allowed in SUPPORTED.items() for quantize in allowed]
# What each INT8 recipe writes, in order: the next one is tried only when the previous one
# misses the verification gate. OpenVINO: NNCF's plain recipe, then its accuracy control. ONNX
# dynamic: every node quantized, then the 2, 4, 8 nodes whose quantization alone moves the
# logits most kept in fp32 (`kerasft.exporters.onnx.node_sensitivity`, measured once).
ATTEMPTS = {
    ("openvino", "nncf"): (("nncf", {}), ("nncf-accuracy-control", {})),
    ("onnx", "dynamic"): tuple(("dynamic", {"keep_fp32": k}) for k in (0, 2, 4, 8)),
}
# Verification texts per split of the run (train, validation, test): every split is used, each
# capped so that the cost stays bounded (the reference run: 6,000 + 5,342 + 5,342 texts).
VERIFY_PER_SPLIT = 6000
CALIBRATION_TEXTS = 256
ACCURACY_CONTROL_TEXTS = 1024


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


@dataclass
class VerificationSet:
    """Labelled texts to verify an export with, and training texts to calibrate INT8 with.

    Attributes:
        texts: verification texts, drawn from every split of the run.
        labels: their class names (as in the model's `label_names`), or None when unknown.
        splits: the split of each text (`"train"`, `"validation"`, `"test"`), or None.
        calibration: training texts for INT8 calibration (none of them among `texts`).
    """

    texts: list[str]
    labels: np.ndarray | None
    splits: list[str] | None
    calibration: list[str]

    def subset(self, split: str, limit: int) -> tuple[list[str], np.ndarray]:
        """Up to `limit` labelled texts of one split, in order."""
        rows = [i for i, s in enumerate(self.splits or []) if s == split][:limit]
        return [self.texts[i] for i in rows], self.labels[rows]


def verification_set(
    run_dir: Path | None, per_split: int = VERIFY_PER_SPLIT, seed: int = 30
) -> VerificationSet:
    """Verification and calibration texts from a `kerasft fit` run's own splits.

    Up to `per_split` texts of each split (train, validation, test), drawn with `seed`, with
    their labels; `CALIBRATION_TEXTS` other training texts (at most half of them) for
    calibration.

    Raises:
        ValueError: if `run_dir` is not a run directory (then texts must be passed).
    """
    from kerasft.rundir import run_splits

    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(
            "No texts to verify the export with: pass texts=[...] (and calibration_texts for "
            "static INT8), or export a `kerasft fit` run directory whose data file is readable."
        )
    rng = np.random.default_rng(seed)
    texts, labels, splits, calibration = [], [], [], []
    for name, data in zip(("train", "validation", "test"), run_splits(run_dir), strict=True):
        order = rng.permutation(len(data))
        if name == "train":
            n_calibration = min(CALIBRATION_TEXTS, len(data) // 2)
            calibration = [data.texts[i] for i in np.sort(order[:n_calibration])]
            order = order[n_calibration:]
        rows = np.sort(order[:per_split])
        texts += [data.texts[i] for i in rows]
        labels += [data.label_names[k] for k in data.labels[rows]]
        splits += [name] * len(rows)
    return VerificationSet(texts, np.asarray(labels), splits, calibration)


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


def export_in_subprocess(source, out_dir, **options) -> Path:
    """Re-runs `export(source, out_dir, **options)` in a TensorFlow-backend subprocess.

    Used when the current backend is not TensorFlow (the `.keras` file is backend-neutral), and
    by the latency harness so that each export's memory is returned when it ends. Raises
    `RuntimeError` with the subprocess's stderr.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if not isinstance(source, (str, os.PathLike)):
            source.save(Path(tmp) / MODEL_FILE)
            source = tmp
        request = {"source": str(source), "out_dir": str(out_dir), **options}
        if request.get("labels") is not None:
            request["labels"] = [str(v) for v in request["labels"]]
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        proc = subprocess.run(
            [sys.executable, "-m", "kerasft.exporters.dispatch", str(Path(tmp) / "request.json")],
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
    labels: list | None = None,
    splits: list[str] | None = None,
    calibration_texts: list[str] | None = None,
    opset: int | None = None,
    fixed_shape: tuple[int | None, int | None] | None = None,
    min_agreement: float = INT8_MIN_AGREEMENT,
    max_accuracy_drop: float = INT8_MAX_ACCURACY_DROP,
    precision: str = "f32",
    verify_per_split: int = VERIFY_PER_SPLIT,
    keep_fp32: int | None = None,
) -> Path:
    """Exports a fine-tuned classifier, verifies it with its own runtime, and publishes it.

    The model is always traced under the TensorFlow backend from its backend-neutral `.keras`
    file (a subprocess is used when the current backend is JAX or PyTorch), so a model trained
    on any backend exports the same way.

    Verification runs the artifact through `kerasft.exporters.runtime` on labelled texts from
    every split
    of the run (up to `verify_per_split` each) against the Keras model: fp32 must reproduce the
    Keras logits; INT8 must agree with the fp32 labels on `min_agreement` of the texts and lose
    at most `max_accuracy_drop` accuracy on the held-out splits (`kerasft.exporters.verify`).
    OpenVINO's
    `nncf` recipe falls back to NNCF's accuracy control when its plain recipe misses that gate.
    The export directory gets the model, tokenizer assets, `manifest.json` (sha256 of every
    file, verification numbers) and a model card (`README.md`).

    Args:
        source: a `kerasft fit` run directory, a `.keras` file saved by `TwoStageFineTuner.save`,
            or a fitted `TwoStageFineTuner`.
        out_dir: the export directory to create.
        format: `"saved_model"`, `"onnx"`, `"openvino"` or `"litert"`.
        quantize: None (fp32); `"dynamic"` or `"static"` for ONNX; `"nncf"` for OpenVINO;
            `"dynamic"` for LiteRT; `"keras"` (Keras' native `quantize("int8")`) for SavedModel.
        overwrite: replace an existing non-empty `out_dir`.
        texts: real texts to verify with (default: the run's splits, see above).
        labels: class names (or ids) of `texts`, for the accuracy-drop check; optional.
        splits: the split of each of `texts` (`"train"`, `"validation"`, `"test"`), so that
            the accuracy drop is judged on held-out texts; optional (all labelled texts then).
        calibration_texts: texts for INT8 calibration (default: 256 training texts).
        opset: ONNX opset (default 17).
        fixed_shape: `(batch, sequence)` to fix either input axis (None keeps it dynamic; the
            default keeps both). A fixed sequence length also caps the tokens per text; the
            runtime pads every call to the fixed shape.
        min_agreement: INT8 gate: least label agreement with the fp32 model (default 0.99).
        max_accuracy_drop: INT8 gate: largest accuracy drop on held-out labelled texts
            (default 0.01, one point).
        precision: OpenVINO inference precision to verify with and record: `"f32"` (default)
            or `"bf16"` (then judged by the INT8 gate).
        verify_per_split: verification texts per split of the run.
        keep_fp32: ONNX dynamic INT8 only: keep exactly this many of the most sensitive nodes
            in fp32 (default None: all quantized, and more kept only if the gate needs it).

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: unknown format, unsupported quantization or bad option (checked before
            any work).
        FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False.
        kerasft.fileio.LockError: another process is writing `out_dir`.
        kerasft.rundir.DataChangedError: the run's data file changed since the fit.
        kerasft.exporters.verify.VerificationError: the artifact disagrees with the Keras model.

    Example:
        >>> export("runs/sarcasm", "exports/sarcasm-ov-int8", format="openvino", quantize="nncf")
    """
    check_format(format, quantize)
    _check_gate(min_agreement, max_accuracy_drop, precision, verify_per_split)
    if keep_fp32 is not None and not (
        (format, quantize) == ("onnx", "dynamic") and isinstance(keep_fp32, int) and keep_fp32 >= 0
    ):
        raise ValueError(
            "keep_fp32 must be an int >= 0 and applies to format='onnx', quantize='dynamic' "
            f"only. Received: keep_fp32={keep_fp32!r} with format={format!r}, "
            f"quantize={quantize!r}"
        )
    check_target_dir(out_dir, overwrite, "Export directory")
    import keras

    options = {
        "format": format, "quantize": quantize, "overwrite": overwrite, "texts": texts,
        "labels": labels, "splits": splits, "calibration_texts": calibration_texts,
        "opset": opset,
        "fixed_shape": fixed_shape, "min_agreement": min_agreement,
        "max_accuracy_drop": max_accuracy_drop, "precision": precision,
        "verify_per_split": verify_per_split, "keep_fp32": keep_fp32,
    }  # fmt: skip
    if keras.backend.backend() != "tensorflow":
        return export_in_subprocess(source, out_dir, **options)
    with target_lock(out_dir, "Export directory"):
        remove_stale_temp_dirs(out_dir)
        check_target_dir(out_dir, overwrite, "Export directory")  # again, now that we own it
        return _export_here(source, Path(out_dir), **options)


def _export_here(
    source, out_dir, *, format, quantize, overwrite, texts, labels, splits, calibration_texts,
    opset, fixed_shape, min_agreement, max_accuracy_drop, precision, verify_per_split, keep_fp32,
) -> Path:  # fmt: skip
    """`export` in this process (TensorFlow backend), holding the lock on `out_dir`."""
    from kerasft.exporters import litert, onnx, openvino, runtime, saved_model
    from kerasft.exporters.keras_graph import ServingGraph, onnx_friendly_ops
    from kerasft.exporters.model_card import write_model_card
    from kerasft.exporters.tokenizer import write_tokenizer_assets
    from kerasft.exporters.verify import VerificationError, verify

    started = time.perf_counter()
    src = _load_source(source, copy=quantize == "keras")  # never quantize the caller's model
    if texts is None:
        vset = verification_set(src.run_dir, verify_per_split)
        vset.calibration = list(calibration_texts or vset.calibration)
    else:
        if splits is not None and len(splits) != len(texts):
            raise ValueError(f"splits has {len(splits)} entries for {len(texts)} texts.")
        vset = VerificationSet(
            list(texts),
            None if labels is None else np.asarray(labels),
            list(splits) if splits is not None else None,
            list(calibration_texts or texts),
        )
    label_ids = _label_ids(vset.labels, src.label_names)
    clf = src.classifier
    shape = check_fixed_shape(fixed_shape, clf.backbone.max_sequence_length)
    reduced = quantize is not None or (format == "openvino" and precision != "f32")
    out_dir = Path(out_dir)
    tmp = temp_dir_beside(out_dir)
    max_tokens = clf.preprocessor.sequence_length
    try:
        if shape[1]:  # a fixed sequence caps tokens per text; restored below
            clf.preprocessor.sequence_length = shape[1]
        onnx_graph = format in ("onnx", "openvino")
        with onnx_friendly_ops(clf) if onnx_graph else contextlib.nullcontext():
            graph = ServingGraph(clf)  # dynamic: the Keras reference for every text
            log.info("Keras reference logits for %d verification texts", len(vset.texts))
            keras_ids, keras_logits = _reference(graph, clf, vset.texts)
            if quantize == "keras":
                with warnings.catch_warnings():  # "Layer X has no quantize method" for each
                    warnings.simplefilter("ignore")  # non-Dense layer: expected, not news
                    graph.model.quantize("int8")
            if quantize == "keras" or shape != (None, None):
                graph = ServingGraph(clf, fixed_shape=shape)
            writer = {"saved_model": saved_model, "onnx": onnx, "openvino": openvino,
                      "litert": litert}[format]  # fmt: skip
            # NNCF calibrates on single texts, as the runtime serves them; onnxruntime on batches.
            per_text = 1 if format == "openvino" else 32
            calibration = (
                list(_keras_batches(clf, vset.calibration, per_text, shape=shape))
                if quantize in ("static", "nncf", "dynamic") else None
            )  # fmt: skip
            validation = None
            if format == "openvino" and quantize and vset.splits is not None:
                val_texts, val_names = vset.subset("validation", ACCURACY_CONTROL_TEXTS)
                validation = (list(_keras_batches(clf, val_texts, 1, shape=shape)),
                              _label_ids(val_names, src.label_names))  # fmt: skip
            attempts = ATTEMPTS.get((format, quantize), ((quantize, {}),))
            if keep_fp32 is not None:
                attempts = ((quantize, {"keep_fp32": keep_fp32}),)
            failed, sensitivity = [], {}
            for attempt, settings in attempts:
                _clear(tmp)
                label = " ".join([attempt or "fp32", *(f"{k}={v}" for k, v in settings.items())])
                log.info("writing %s %s", format, label)
                info = writer.write(
                    graph, tmp, quantize=attempt, opset=opset or onnx.DEFAULT_OPSET,
                    backbone=clf.backbone, calibration=calibration, validation=validation,
                    max_accuracy_drop=max_accuracy_drop, precision=precision,
                    sensitivity=sensitivity, **settings,
                )  # fmt: skip
                tokenizer = write_tokenizer_assets(
                    clf.preprocessor.tokenizer, clf.preprocessor.sequence_length, tmp
                )
                manifest = {
                    "format": format,
                    "quantization": quantize and f"int8-{quantize}",
                    "quantization_recipe": info.get("quantization_recipe", attempt),
                    "model_file": info["model_file"],
                    "label_names": src.label_names,
                    "sequence_length": clf.preprocessor.sequence_length,
                    "tokenizer": tokenizer,
                    "inputs": ["token_ids", "padding_mask"],
                    "input_shape": list(shape),
                    "opset": info.get("opset"),
                    "fusions": info.get("fusions"),
                    "kept_fp32": info.get("kept_fp32"),
                    "inference_precision": info.get("inference_precision"),
                    "source_backend": src.backend,
                    "versions": package_versions(EXPORT),
                }
                _write_manifest(tmp, manifest)
                served = runtime.load(tmp)
                log.info("verifying on %d texts with %s", len(vset.texts), type(served).__name__)
                try:
                    report = verify(
                        served, vset.texts, keras_ids, keras_logits, reduced, labels=label_ids,
                        splits=vset.splits, min_agreement=min_agreement,
                        max_accuracy_drop=max_accuracy_drop,
                    )  # fmt: skip
                except VerificationError as e:
                    last = (attempt, settings) == attempts[-1]
                    if last or e.report.get("tokenizer_mismatches"):
                        if failed:
                            e.args = (f"{e.args[0]} Earlier recipes also failed: {failed}",)
                        raise
                    failed.append({"recipe": label, "error": str(e)})
                    log.info("%s missed the gate (%s); trying the next recipe", label, e)
                    continue
                break
        report["recipes_failed"] = failed
        manifest["verification"] = report
        manifest["latency"] = _latency_b1(served, vset.texts, keras_ids)
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        write_model_card(tmp, manifest, src.run_dir)
        _write_manifest(tmp, manifest)
        publish_dir(tmp, out_dir)
    finally:
        clf.preprocessor.sequence_length = max_tokens
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_gate(min_agreement, max_accuracy_drop, precision, verify_per_split) -> None:
    """Raises `ValueError` naming the first bad gate option, its value and what is allowed."""
    from kerasft.exporters.openvino import PRECISIONS

    def fraction(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1

    checks = (
        ("min_agreement", min_agreement, fraction(min_agreement), "a number in [0, 1]"),
        ("max_accuracy_drop", max_accuracy_drop, fraction(max_accuracy_drop),
         "a number in [0, 1]"),
        ("precision", precision, precision in PRECISIONS, f"one of {list(PRECISIONS)}"),
        ("verify_per_split", verify_per_split,
         isinstance(verify_per_split, int) and verify_per_split >= 1, "an int >= 1"),
    )  # fmt: skip
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}. Received: {name}={value!r}")


def _label_ids(labels, label_names: list[str]) -> np.ndarray | None:
    """Class names (or ids) -> the model's class ids; None stays None."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        return labels.astype("int64")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({str(v) for v in labels} - set(index))
    if unknown:
        raise ValueError(f"Verification labels {unknown[:5]} are not among {label_names}.")
    return np.array([index[str(v)] for v in labels], dtype="int64")


def _clear(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _write_manifest(directory: Path, manifest: dict) -> None:
    """Lists every file but the manifest with its sha256, then writes `manifest.json`."""
    from kerasft.exporters.runtime import sha256_file

    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest["files"] = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    manifest["size_bytes"] = sum(p.stat().st_size for p in files if p.name not in ("README.md",))
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _latency_b1(served, texts: list[str], keras_ids: np.ndarray, calls: int = 50) -> dict:
    """Batch-1 latency of `served.predict([text])` (tokenization included) on this machine, for
    a verification text of the median token length."""

    lengths = (keras_ids != 0).sum(axis=1)
    median = int(np.median(lengths))
    text = texts[int(np.argmin(np.abs(lengths - median)))]
    for _ in range(5):
        served.predict([text])
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        served.predict([text])
        seconds.append(time.perf_counter() - start)
    return {
        "batch": 1,
        "tokens": median,
        "p50_ms": round(float(np.median(seconds)) * 1e3, 3),
        "calls": calls,
        "threads": "runtime default",
        "cpu": cpu_model(),
        "isa": isa(),
        "cores": os.cpu_count(),
    }


if __name__ == "__main__":  # the TensorFlow-backend subprocess of `export_in_subprocess`
    request = json.loads(Path(sys.argv[1]).read_text())
    export(request.pop("source"), request.pop("out_dir"), **request)
