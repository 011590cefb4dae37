"""`export()`: one dispatcher for every format x quantization, verified, written atomically."""

from __future__ import annotations

import contextlib
import importlib.util
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

from kerasft.data import DataError, encode_labels
from kerasft.exporters import exportdir
from kerasft.exporters.contract import FormatContract
from kerasft.exporters.formats import MODULES, check_format
from kerasft.exporters.onnx import DEFAULT_OPSET
from kerasft.exporters.openvino import PRECISIONS
from kerasft.exporters.verify import (
    AUTO_MIN_AGREEMENT,
    INT8_MAX_ACCURACY_DROP,
    INT8_MIN_AGREEMENT,
)
from kerasft.fileio import check_target_dir, publish_target
from kerasft.machine import cpu_model, isa
from kerasft.rundir import CONFIG_FILE, MODEL_FILE
from kerasft.versions import EXPORT, package_versions

log = logging.getLogger("kerasft.export")

AUTO = "auto"
# Verification texts per split of the run (train, validation, test): every split is used, each
# capped so that the cost stays bounded (the reference run: 6,000 + 5,342 + 5,342 texts).
VERIFY_PER_SPLIT = 6000
CALIBRATION_TEXTS = 256
ACCURACY_CONTROL_TEXTS = 1024


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
        label_ids: `labels` as the model's class ids (set by `export`).
    """

    texts: list[str]
    labels: np.ndarray | None
    splits: list[str] | None
    calibration: list[str]
    label_ids: np.ndarray | None = None

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
    """Feeds of the training token ids (`kerasft.batching.tokenize`, KerasHub's ids without
    TensorFlow), each padded to its longest text (as the runtime pads).

    With a fixed `shape` (batch, sequence), feeds are padded to it instead: the sequence with
    padding tokens, a short batch by repeating its first row.
    """
    from kerasft.batching import tokenize

    batch_size = shape[0] or batch_size
    tokens = tokenize(classifier.preprocessor, texts)
    for i in range(0, len(texts), batch_size):
        rows = np.arange(i, min(i + batch_size, len(texts)))
        width = shape[1] or int(tokens.lengths[rows].max())
        ids = tokens.padded(rows, width)
        feed = {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}
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
        logits.append(np.asarray(graph.serve(**feed)["logits"]))
        ids.append(np.pad(feed["token_ids"], ((0, 0), (0, width - feed["token_ids"].shape[1]))))
    return np.concatenate(ids), np.concatenate(logits)


def export_in_subprocess(source, out_dir, backend: str = "tensorflow", **options) -> Path:
    """Re-runs `export(source, out_dir, **options)` in a subprocess under Keras `backend`.

    Used when the current backend is not the one the format's graph is traced under (the
    `.keras` file is backend-neutral), and by the latency harness so that each export's memory
    is returned when it ends.

    Raises:
        The subprocess's own error where it is one `export` documents (`ValueError`,
        `FileExistsError`, `FileNotFoundError`, `LockError`, `DataChangedError`,
        `VerificationError` with its report), else `RuntimeError` with the subprocess's stderr.
    """
    exports_in_subprocess(source, [(out_dir, options)], backend)
    return Path(out_dir)


def exports_in_subprocess(source, jobs: list[tuple], backend: str = "tensorflow") -> None:
    """`export(source, out_dir, **options)` for each `(out_dir, options)` of `jobs`, in order,
    in one subprocess under Keras `backend`: the libraries load once for all of them.

    Raises:
        As `export_in_subprocess`, for the first export that fails (the later ones do not run;
        those before it are complete).
    """
    with tempfile.TemporaryDirectory() as tmp:
        if not isinstance(source, (str, os.PathLike)):
            source.save(Path(tmp) / MODEL_FILE)
            source = tmp
        requests = []
        for out_dir, options in jobs:
            request = {"out_dir": str(out_dir), **options}
            if request.get("labels") is not None:
                request["labels"] = [str(v) for v in request["labels"]]
            requests.append(request)
        (Path(tmp) / "request.json").write_text(json.dumps({"source": str(source),
                                                            "jobs": requests}))  # fmt: skip
        error_file = Path(tmp) / "error.json"
        env = {**os.environ, "KERAS_BACKEND": backend}
        proc = subprocess.run(
            [sys.executable, "-m", "kerasft.exporters.dispatch", str(Path(tmp) / "request.json"),
             str(error_file)],
            env=env,
            capture_output=True,
            text=True,
        )  # fmt: skip
        if proc.returncode:
            if error_file.is_file():
                raise _subprocess_error(json.loads(error_file.read_text())) from None
            raise RuntimeError(f"Export under the {backend} backend failed:\n{proc.stderr[-4000:]}")


def _passed_on_errors() -> dict[str, type[Exception]]:
    """The errors `export` documents, by name: raised again as themselves by the parent of an
    export subprocess."""
    from kerasft.exporters.verify import VerificationError
    from kerasft.fileio import LockError
    from kerasft.rundir import DataChangedError

    kinds = (ValueError, FileExistsError, FileNotFoundError, LockError, DataChangedError,
             DataError)  # fmt: skip
    return {kind.__name__: kind for kind in (*kinds, VerificationError)}


def _subprocess_error(error: dict) -> Exception:
    """The exception an export subprocess wrote to its error file (`_run_request`)."""
    from kerasft.exporters.verify import VerificationError

    kind = _passed_on_errors()[error["type"]]
    if kind is VerificationError:
        return VerificationError(error["message"], error["report"])
    return kind(error["message"])


def _run_request(request_file: str, error_file: str) -> None:
    """The subprocess of `exports_in_subprocess`: `export` as requested, job by job; a
    documented error is written to `error_file` (type, message, report) for the parent to raise
    again."""
    request = json.loads(Path(request_file).read_text())
    for job in request["jobs"]:
        if job.get("fixed_shape") is not None:  # a tuple again (JSON gave a list)
            job["fixed_shape"] = tuple(job["fixed_shape"])
        try:
            export(request["source"], job.pop("out_dir"), **job)
        except tuple(_passed_on_errors().values()) as e:
            error = {"type": type(e).__name__, "message": str(e),
                     "report": getattr(e, "report", None)}  # fmt: skip
            Path(error_file).write_text(json.dumps(error, default=str))
            raise


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
    min_agreement: float | None = None,
    max_accuracy_drop: float = INT8_MAX_ACCURACY_DROP,
    precision: str = "f32",
    verify_per_split: int = VERIFY_PER_SPLIT,
    keep_fp32: int | None = None,
    graph_source: str | None = None,
) -> Path:
    """Exports a fine-tuned classifier, verifies it with its own runtime, and publishes it.

    The model is traced from its backend-neutral `.keras` file under the format's graph source:
    PyTorch for ONNX and OpenVINO (no TensorFlow needed), TensorFlow for SavedModel and LiteRT
    (in a subprocess when the current backend is another). The artifact is verified through
    `kerasft.exporters.runtime` on labelled texts of every split of the run against the Keras
    model (`kerasft.exporters.verify`): fp32 must reproduce the Keras logits; INT8 must pass the
    gate, else the format's next recipe is tried (`kerasft.exporters.formats`). The directory
    gets the model, tokenizer assets, `manifest.json` and a model card (`README.md`).

    Args:
        source: a `kerasft fit` run directory, a `.keras` file saved by `TwoStageFineTuner.save`,
            or a fitted `TwoStageFineTuner`.
        out_dir: the export directory to create.
        format: `"saved_model"`, `"onnx"`, `"openvino"` or `"litert"`.
        overwrite: replace an existing non-empty `out_dir`.
        texts: real texts to verify with (default: the run's splits, see above).
        labels: class names (or ids) of `texts`, for the accuracy-drop check; optional.
        splits: the split of each of `texts` (`"train"`, `"validation"`, `"test"`), so that
            the accuracy drop is judged on held-out texts; optional (all labelled texts then).
        calibration_texts: texts for INT8 calibration (default: 256 training texts).
        opset: ONNX opset (default 17).
        fixed_shape: `(batch, sequence)` to fix either axis (None: dynamic); a fixed sequence
            also caps the tokens per text.
        quantize: None (fp32), an INT8 mode of the format (`FORMATS[format].int8`), or
            `"auto"`: each candidate recipe timed on this machine, the fastest that passes the
            gate kept (fp32 where no INT8 recipe is faster here).
        min_agreement: INT8 gate: least label agreement with the fp32 model on held-out texts
            (default `INT8_MIN_AGREEMENT`, 0.99; `AUTO_MIN_AGREEMENT`, 0.993, for `"auto"`).
        max_accuracy_drop: INT8 gate: largest accuracy drop on held-out labelled texts.
        precision: OpenVINO inference precision to verify with and record: `"f32"` (default)
            or `"bf16"` (then judged by the INT8 gate).
        verify_per_split: verification texts per split of the run.
        keep_fp32: ONNX dynamic INT8: keep exactly this many of the most sensitive nodes in
            fp32 (None: all quantized, more kept only if the gate needs it).
        graph_source: the Keras backend to trace the graph under, one of the format's
            `graph_sources` (None: its default; ONNX and OpenVINO also take `"tensorflow"`).

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: unknown format, unsupported quantization or bad option (before any work).
        FileExistsError: `out_dir` is not empty, and `overwrite` is False.
        FileNotFoundError: no model at `source`.
        kerasft.fileio.LockError: another process is writing `out_dir`.
        kerasft.rundir.DataChangedError: the run's data file changed since the fit.
        kerasft.exporters.verify.VerificationError: the artifact disagrees with the Keras model.

    Example:
        >>> export("runs/sarcasm", "exports/sarcasm-ov-int8", format="openvino", quantize="nncf")
    """
    contract = check_format(format, quantize)
    if min_agreement is None:
        min_agreement = AUTO_MIN_AGREEMENT if quantize == AUTO else INT8_MIN_AGREEMENT
    graph_source = _check_graph_source(contract, graph_source)
    _check_installed(contract, graph_source)
    _check_options(format, quantize, min_agreement, max_accuracy_drop, precision,
                   verify_per_split, keep_fp32)  # fmt: skip
    check_target_dir(out_dir, overwrite, "Export directory")
    import keras

    options = {"format": format, "quantize": quantize, "overwrite": overwrite, "texts": texts,
               "labels": labels, "splits": splits, "calibration_texts": calibration_texts,
               "opset": opset, "fixed_shape": fixed_shape, "min_agreement": min_agreement,
               "max_accuracy_drop": max_accuracy_drop, "precision": precision,
               "verify_per_split": verify_per_split, "keep_fp32": keep_fp32,
               "graph_source": graph_source}  # fmt: skip
    if keras.backend.backend() != graph_source:
        return export_in_subprocess(source, out_dir, backend=graph_source, **options)
    with publish_target(out_dir, overwrite, "Export directory") as tmp:
        _export_here(source, tmp, contract, **options)
    return Path(out_dir)


def _export_here(
    source, tmp: Path, contract: FormatContract, *, quantize, texts, labels, splits,
    calibration_texts, verify_per_split, min_agreement, max_accuracy_drop, **write_options,
) -> None:  # fmt: skip
    """`export` in this process (under the graph source's backend), into the work directory
    `tmp`: the Keras reference, then write and verify, then the model card and the manifest."""
    started = time.perf_counter()
    src = _load_source(source, copy=quantize == "keras")  # never quantize the caller's model
    vset = _verification_texts(src, texts, labels, splits, calibration_texts, verify_per_split)
    vset.label_ids = _label_ids(vset.labels, src.label_names)  # checked before any work
    gate = {"min_agreement": min_agreement, "max_accuracy_drop": max_accuracy_drop}
    write_options = {k: write_options[k] for k in ("fixed_shape", "opset", "precision",
                                                     "keep_fp32", "graph_source")}  # fmt: skip
    manifest, served, keras_ids = _write_verified(
        contract, quantize, src, vset, tmp, gate=gate, **write_options
    )
    _describe(tmp, manifest, served, vset, keras_ids, src.run_dir, started)


def _verification_texts(src, texts, labels, splits, calibration_texts, per_split):
    """The `VerificationSet`: the given texts, or the run's own splits."""
    if texts is None:
        vset = verification_set(src.run_dir, per_split)
        vset.calibration = list(calibration_texts or vset.calibration)
        return vset
    if splits is not None and len(splits) != len(texts):
        raise ValueError(f"splits has {len(splits)} entries for {len(texts)} texts.")
    return VerificationSet(
        list(texts),
        None if labels is None else np.asarray(labels),
        list(splits) if splits is not None else None,
        list(calibration_texts or texts),
    )


@contextlib.contextmanager
def _serving_length(classifier, tokens: int | None):
    """Caps the preprocessor at `tokens` (a fixed sequence axis) while exporting; restores it."""
    before = classifier.preprocessor.sequence_length
    if tokens:
        classifier.preprocessor.sequence_length = tokens
    try:
        yield
    finally:
        classifier.preprocessor.sequence_length = before


def _write_verified(
    contract: FormatContract, quantize, src, vset, tmp: Path, *, fixed_shape, opset, precision,
    keep_fp32, graph_source, gate,
) -> tuple[dict, object, np.ndarray]:  # fmt: skip
    """Writes the format's recipes in order until one passes verification; returns its
    manifest, its loaded runtime and the Keras token ids of the verification texts.

    With `quantize="auto"`, the first recipe of each of the format's `auto` modes is written and
    timed first, and the modes are tried fastest first (`_rank_auto`).

    Raises:
        VerificationError: the last recipe failed too (the message lists the earlier ones).
    """
    from kerasft.exporters.keras_graph import fused_attention, onnx_friendly_ops
    from kerasft.exporters.verify import VerificationError

    graph_class = _graph_class(graph_source)
    clf = src.classifier
    shape = check_fixed_shape(fixed_shape, clf.backbone.max_sequence_length)
    onnx_ops = onnx_friendly_ops(clf) if contract.onnx_graph else contextlib.nullcontext()
    with (
        _serving_length(clf, shape[1]),
        fused_attention(clf),
        onnx_ops,
        tempfile.TemporaryDirectory() as scratch,
    ):
        graph = graph_class(clf)  # dynamic: the Keras reference for every text
        log.info("Keras reference logits for %d verification texts", len(vset.texts))
        reference = _reference(graph, clf, vset.texts)
        if quantize == "keras":
            with warnings.catch_warnings():  # "Layer X has no quantize method" for each
                warnings.simplefilter("ignore")  # non-Dense layer: expected, not news
                graph.model.quantize("int8")
        if quantize == "keras" or shape != (None, None):
            graph = graph_class(clf, fixed_shape=shape)
        feeds = _quantization_feeds(contract, quantize, clf, vset, src.label_names, shape)
        write = {"opset": opset or DEFAULT_OPSET, "backbone": clf.backbone, "precision": precision,
                 "max_accuracy_drop": gate["max_accuracy_drop"], "sensitivity": {},
                 **feeds}  # fmt: skip

        def write_attempt(mode, attempt, settings, out: Path) -> dict:
            _clear(out)
            label = _recipe_label(attempt, settings)
            log.info("writing %s %s", contract.name, label)
            info = MODULES[contract.name].write(graph, out, quantize=attempt,
                                                **{**write, **settings})  # fmt: skip
            return _manifest(contract, mode, attempt, info, src, clf, shape, graph_source, out)

        written, auto = {}, None
        plan = [(quantize, attempt, settings) for attempt, settings in contract.attempts(quantize)]
        if quantize == AUTO:
            plan, written, auto = _rank_auto(contract, write_attempt, vset, Path(scratch))
        elif keep_fp32 is not None:
            plan = [(quantize, quantize, {"keep_fp32": keep_fp32})]
        failed = []
        for mode, attempt, settings in plan:
            label = _recipe_label(attempt, settings)
            if (mode, label) in written:  # written and timed by `_rank_auto`
                _clear(tmp)
                shutil.copytree(written[mode, label][0], tmp, dirs_exist_ok=True)
                manifest = written[mode, label][1]
            else:
                manifest = write_attempt(mode, attempt, settings, tmp)
            reduced = _reduced(mode, contract, settings.get("precision", precision))
            batch_dependent = bool(mode) and contract.int8[mode].batch_dependent
            try:
                manifest["verification"], served = _verify(
                    tmp, vset, reference, gate, reduced, batch_dependent
                )
            except VerificationError as e:
                if (mode, attempt, settings) == plan[-1] or e.report.get("tokenizer_mismatches"):
                    if failed:
                        e.args = (f"{e.args[0]} Earlier recipes also failed: {failed}",)
                    if reduced and not e.report.get("tokenizer_mismatches"):
                        e.args = (e.args[0] + _other_recipes(contract, quantize),)
                    raise
                failed.append({"mode": mode or "fp32", "recipe": label, "error": str(e)})
                log.info("%s missed the gate (%s); trying the next recipe", label, e)
                continue
            manifest["verification"]["recipes_failed"] = failed
            if auto is not None:
                auto["chosen"] = {"mode": mode or "fp32", "recipe": label}
                manifest["int8_auto"] = auto
            return manifest, served, reference[0]
    raise AssertionError("unreachable: the last attempt returns or raises")


def _recipe_label(attempt, settings: dict) -> str:
    return " ".join([attempt or "fp32", *(f"{k}={v}" for k, v in settings.items())])


def _rank_auto(contract: FormatContract, write_attempt, vset, scratch: Path):
    """`--int8 auto`: writes every recipe of each candidate mode (the fallbacks too: fp32
    nodes cost time), times each on this machine at every serving batch size, and orders them
    fastest first; the modes' `untimed` recipes follow, in their modes' order.

    Returns:
        `(plan, written, report)`: the recipes as `(mode, attempt, settings)`, fastest first;
        those already written (`{(mode, label): (dir, manifest)}`); and what was measured, for
        the manifest.
    """
    from kerasft.exporters import runtime
    from kerasft.exporters.verify import SERVING_BATCHES

    timed, untimed, written = [], [], {}
    for mode, overrides in _auto_candidates(contract):
        for attempt, settings in contract.attempts(mode):
            step = (mode, attempt, {**settings, **overrides})
            if mode and attempt in contract.int8[mode].untimed:
                untimed.append(step)
                continue
            label = _recipe_label(attempt, step[2])
            out = scratch / str(len(written))
            out.mkdir()
            written[mode, label] = (out, write_attempt(mode, attempt, step[2], out))
            served = runtime.load(out)
            p50 = {size: _p50_ms(served, vset.texts, size) for size in SERVING_BATCHES}
            timed.append((p50, step, {"mode": mode or "fp32", "recipe": label, "p50_ms": p50}))
    # fastest first: the product of the p50s at the serving batch sizes (each size counts alike)
    timed.sort(key=lambda item: float(np.prod(list(item[0].values()))))
    report = {
        "candidates": [entry for _, _, entry in timed],
        "order": "fastest first on this machine: product of p50 at batch sizes "
        + ", ".join(map(str, SERVING_BATCHES)),
        "cpu": cpu_model(),
        "isa": isa(),
    }
    return [step for _, step, _ in timed] + untimed, written, report


def _auto_candidates(contract: FormatContract) -> list[tuple[str, dict]]:
    """The format's `auto` candidates this CPU can run as meant (bf16 ones need bf16 hardware)."""
    from kerasft.machine import computes_bf16

    return [(mode, over) for mode, over in contract.auto
            if over.get("precision") != "bf16" or computes_bf16()]  # fmt: skip


def _p50_ms(served, texts: list[str], batch: int, seconds: float = 1.0) -> float:
    """Median latency (ms) of `served.logits` on `batch` verification texts of median length."""
    feed = served.encode(texts[: max(batch, 64)])
    lengths = feed["padding_mask"].sum(axis=1)
    rows = np.argsort(np.abs(lengths - np.median(lengths)), kind="stable")[:batch]
    width = int(lengths[rows].max())
    feed = {k: np.ascontiguousarray(v[rows, :width]) for k, v in feed.items()}
    for _ in range(3):
        served.logits(feed)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        served.logits(feed)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 3)


def _other_recipes(contract: FormatContract, quantize) -> str:
    """What to try after a refused INT8 export: the format's other modes, or a wider gate."""
    others = [f"--int8 {mode}" for mode in contract.int8 if mode != quantize]
    return (
        f" Try {' or '.join(others)} (another recipe), or " if others else " Try "
    ) + "a wider gate (--min-agreement, --max-accuracy-drop)."


def _reduced(quantize, contract: FormatContract, precision: str) -> bool:
    """Whether the export computes in reduced precision (judged by the INT8 gate)."""
    return quantize is not None or (contract.name == "openvino" and precision != "f32")


def _quantization_feeds(contract, quantize, clf, vset, label_names, shape) -> dict:
    """`calibration` (and `validation`, for accuracy control) feeds for the INT8 recipes."""
    calibration, validation = contract.needs_of(quantize)
    feeds = {"calibration": None, "validation": None}
    if calibration:
        feeds["calibration"] = list(
            _keras_batches(clf, vset.calibration, contract.calibration_batch, shape=shape)
        )
    if validation and vset.splits is not None:
        val_texts, val_names = vset.subset("validation", ACCURACY_CONTROL_TEXTS)
        feeds["validation"] = (list(_keras_batches(clf, val_texts, 1, shape=shape)),
                               _label_ids(val_names, label_names))  # fmt: skip
    return feeds


def _manifest(contract, quantize, attempt, info, src, clf, shape, graph_source, tmp: Path) -> dict:
    """Writes the tokenizer assets and a manifest for what `write` just wrote."""
    from kerasft.exporters.tokenizer import write_tokenizer_assets

    tokenizer = write_tokenizer_assets(
        clf.preprocessor.tokenizer, clf.preprocessor.sequence_length, tmp
    )
    manifest = {
        "format": contract.name,
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
        "graph_source": graph_source,
        "versions": package_versions(_traced_with(graph_source)),
    }
    return exportdir.write_manifest(tmp, manifest)


def _verify(
    tmp: Path, vset, reference, gate, reduced: bool, batch_dependent: bool
) -> tuple[dict, object]:
    """Loads the export with its own runtime and verifies it against the Keras reference (at
    every serving batch size when the recipe's output depends on the batch)."""
    from kerasft.exporters import runtime
    from kerasft.exporters.verify import SERVING_BATCHES, verify

    served = runtime.load(tmp)
    sizes = f" at batch sizes {list(SERVING_BATCHES)}" if reduced and batch_dependent else ""
    log.info("verifying on %d texts with %s%s", len(vset.texts), type(served).__name__, sizes)
    keras_ids, keras_logits = reference
    report = verify(
        served, vset.texts, keras_ids, keras_logits, reduced,
        labels=vset.label_ids, splits=vset.splits, batch_dependent=batch_dependent, **gate,
    )  # fmt: skip
    return report, served


def _describe(tmp: Path, manifest: dict, served, vset, keras_ids, run_dir, started: float) -> None:
    """Adds the batch-1 latency and export time, writes the model card and the final manifest."""
    from kerasft.exporters.model_card import write_model_card

    manifest["latency"] = _latency_b1(served, vset.texts, keras_ids)
    manifest["export_seconds"] = round(time.perf_counter() - started, 1)
    write_model_card(tmp, manifest, run_dir)
    exportdir.write_manifest(tmp, manifest)


def _traced_with(graph_source: str) -> tuple[str, ...]:
    """The packages whose versions the manifest records: the export's, and the graph source's."""
    other = ("tensorflow", "tf2onnx") if graph_source == "torch" else ("torch",)
    return tuple(n for n in (*EXPORT, "torch") if n not in other)


def _graph_class(graph_source: str):
    """The serving-graph class that traces under `graph_source`."""
    if graph_source == "torch":
        from kerasft.exporters.torch_graph import TorchServingGraph

        return TorchServingGraph
    from kerasft.exporters.keras_graph import ServingGraph

    return ServingGraph


def _check_graph_source(contract: FormatContract, graph_source: str | None) -> str:
    """The graph source to use: `graph_source`, or the format's default.

    Raises:
        ValueError: a source the format cannot be traced under.
    """
    if graph_source is None:
        return contract.default_source
    if graph_source not in contract.graph_sources:
        raise ValueError(
            f"format {contract.name!r} is traced under {' or '.join(contract.graph_sources)}. "
            f"Received: graph_source={graph_source!r}"
        )
    return graph_source


def _check_installed(contract: FormatContract, graph_source: str) -> None:
    """Raises `RuntimeError` naming the extra to install when a module the format needs is
    missing (TensorFlow, above all, for SavedModel and LiteRT in a JAX- or PyTorch-only
    environment)."""
    needs = contract.needs_with(graph_source)
    missing = [name for name in needs if not _installed(name)]
    if missing:
        extra = "export" if "tensorflow" in missing or "tf2onnx" in missing else "edge"
        raise RuntimeError(
            f"format {contract.name!r} needs {', '.join(needs)} to export (not "
            f"installed: {', '.join(missing)}): pip install 'kerasft[{extra}]'"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses the module
        return False


def _check_options(
    format, quantize, min_agreement, max_accuracy_drop, precision, verify_per_split, keep_fp32
) -> None:
    """Raises `ValueError` naming the first bad option, its value and what is allowed."""
    if keep_fp32 is not None and not (
        format == "onnx" and quantize in ("dynamic", "calibrated")
        and isinstance(keep_fp32, int) and keep_fp32 >= 0
    ):  # fmt: skip
        raise ValueError(
            "keep_fp32 must be an int >= 0 and applies to format='onnx' with quantize='dynamic' "
            f"or 'calibrated' only. Received: keep_fp32={keep_fp32!r} with format={format!r}, "
            f"quantize={quantize!r}"
        )

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
    """Class names -> the model's class ids (`kerasft.data.encode_labels`: labels are names,
    integers included: `1` is the class named `"1"`); None stays None.

    Raises:
        ValueError: a label that is not one of `label_names`.
    """
    if labels is None:
        return None
    try:
        ids, _ = encode_labels(np.asarray(labels).tolist(), label_names)
    except DataError as e:
        raise ValueError(f"Verification labels: {e}") from None
    return ids.astype("int64")


def _clear(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


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


if __name__ == "__main__":  # the subprocess of `exports_in_subprocess`
    _run_request(sys.argv[1], sys.argv[2])
