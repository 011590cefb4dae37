"""`export()`: one dispatcher for every format x quantization, verified, written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from kerasft.exporters import exportdir, runtime
from kerasft.exporters.auto import latency_b1, rank_auto, recipe_label
from kerasft.exporters.contract import FormatContract
from kerasft.exporters.formats import (
    DEFAULT_FORMAT,
    FORMATS,
    MODULES,
    check_format,
    traced_with,
)
from kerasft.exporters.isolated import export_in_subprocess, log_progress, passed_on_errors
from kerasft.exporters.keras_graph import fused_attention, onnx_friendly_ops
from kerasft.exporters.model_card import write_model_card
from kerasft.exporters.onnx import DEFAULT_OPSET
from kerasft.exporters.source import cached_reference, load_source
from kerasft.exporters.tokenizer import write_tokenizer_assets
from kerasft.exporters.verify import (
    AUTO_MIN_AGREEMENT,
    INT8_MAX_ACCURACY_DROP,
    INT8_MIN_AGREEMENT,
    SERVING_BATCHES,
    VerificationError,
    verify,
)
from kerasft.exporters.vset import (
    VERIFY_PER_SPLIT,
    label_ids,
    quantization_feeds,
    verification_texts,
)
from kerasft.util.fileio import check_target_dir, publish_target
from kerasft.util.versions import package_versions

log = logging.getLogger("kerasft.export")

AUTO = "auto"


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


def _run_request(request_file: str, error_file: str) -> None:
    """The subprocess of `exports_in_subprocess`: `export` as requested, job by job; a
    documented error is written to `error_file` (type, message, report) for the parent to raise
    again."""
    log_progress()  # read by the parent
    request = json.loads(Path(request_file).read_text())
    for job in request["jobs"]:
        if job.get("fixed_shape") is not None:  # a tuple again (JSON gave a list)
            job["fixed_shape"] = tuple(job["fixed_shape"])
        try:
            export(request["source"], job.pop("out_dir"), **job)
        except tuple(passed_on_errors().values()) as e:
            error = {"type": type(e).__name__, "message": str(e),
                     "report": getattr(e, "report", None)}  # fmt: skip
            Path(error_file).write_text(json.dumps(error, default=str))
            raise


def export(
    source,
    out_dir: str | os.PathLike,
    format: str = DEFAULT_FORMAT,
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

    Traced from the backend-neutral `.keras` file under the format's graph source (in a
    subprocess when the current backend is another), verified through
    `kerasft.exporters.runtime` against the Keras model on labelled texts of every split
    (`kerasft.exporters.verify`: fp32 reproduces the logits, INT8 passes the gate or the next
    recipe is tried), published with tokenizer assets, `manifest.json` and a model card.

    Args:
        source: a `kerasft fit` run directory, a saved `.keras` file or a fitted tuner.
        out_dir: the export directory to create.
        format: one of `kerasft.exporters.formats.FORMATS` (default ONNX).
        overwrite: replace an existing non-empty `out_dir`.
        texts: real texts to verify with (default: the run's splits); optional `labels` (class
            names or ids, for the accuracy drop) and `splits` (`"train"`, `"validation"`,
            `"test"`: the drop is judged on held-out texts).
        calibration_texts: texts for INT8 calibration (default: 256 training texts).
        opset: ONNX opset (default 17).
        fixed_shape: `(batch, sequence)`, None for a dynamic axis (a fixed sequence caps texts).
        quantize: None (fp32), an INT8 mode of the format, or `"auto"`: the candidate recipes
            timed here, the fastest that passes the gate kept (fp32 where none is faster).
        min_agreement: INT8 gate: least label agreement with the fp32 model on held-out texts
            (default `INT8_MIN_AGREEMENT`, 0.99; `AUTO_MIN_AGREEMENT`, 0.993, for `"auto"`).
        max_accuracy_drop: INT8 gate: largest accuracy drop on held-out labelled texts.
        precision: OpenVINO's inference precision, `"f32"` or `"bf16"` (judged by the gate).
        verify_per_split: verification texts per split of the run.
        keep_fp32: ONNX dynamic/calibrated INT8: keep exactly N most sensitive nodes in fp32.
        graph_source: the Keras backend to trace under (None: the format's default).

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: unknown format, unsupported quantization or bad option (before any work).
        FileExistsError: `out_dir` is not empty, and `overwrite` is False.
        FileNotFoundError: no model at `source`.
        kerasft.util.fileio.LockError: another process is writing `out_dir`.
        kerasft.runs.rundir.DataChangedError: the run's data file changed since the fit.
        kerasft.exporters.verify.VerificationError: the artifact disagrees with the Keras model.

    Example:
        >>> export("runs/sarcasm", "exports/sarcasm-ov-int8", format="openvino", quantize="nncf")
    """
    options = {k: v for k, v in locals().items() if k not in ("source", "out_dir")}  # as given
    contract = check_format(format, quantize)
    if min_agreement is None:
        min_agreement = AUTO_MIN_AGREEMENT if quantize == AUTO else INT8_MIN_AGREEMENT
    graph_source = contract.resolve_source(graph_source)
    contract.check_installed(graph_source)
    _check_options(contract, quantize, min_agreement, max_accuracy_drop, precision,
                   verify_per_split, keep_fp32, fixed_shape)  # fmt: skip
    check_target_dir(out_dir, overwrite, "Export directory")
    options.update(min_agreement=min_agreement, graph_source=graph_source)  # as resolved
    import keras

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
    src = load_source(source, copy=quantize == "keras")  # never quantize the caller's model
    src.label_names = exportdir.label_strings(src.label_names)  # as every manifest holds them
    check = getattr(MODULES[contract.name], "check", None)  # a model the format cannot hold
    if check is not None:
        check(src.classifier)
    vset = verification_texts(src, texts, labels, splits, calibration_texts, verify_per_split)
    vset.label_ids = label_ids(vset.labels, src.label_names)  # checked before any work
    gate = {"min_agreement": min_agreement, "max_accuracy_drop": max_accuracy_drop}
    write_options = {k: write_options[k] for k in ("fixed_shape", "opset", "precision",
                                                     "keep_fp32", "graph_source")}  # fmt: skip
    manifest, served, keras_ids = _write_verified(
        contract, quantize, src, vset, tmp, gate=gate, **write_options
    )
    _describe(tmp, manifest, served, vset, keras_ids, src.run_dir, started)


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
    timed first, and the modes are tried fastest first (`rank_auto`).

    Raises:
        VerificationError: the last recipe failed too (the message lists the earlier ones).
    """
    graph_class = contract.graph_class(graph_source)
    clf = src.classifier
    shape = check_fixed_shape(fixed_shape, clf.backbone.max_sequence_length)
    with _serving_copy(contract, clf, shape), tempfile.TemporaryDirectory() as scratch:
        graph = graph_class(clf)  # dynamic: the Keras reference for every text
        reference = cached_reference(graph, clf, src, contract, vset.texts)
        if quantize == "keras":
            with warnings.catch_warnings():  # "Layer X has no quantize method" for each
                warnings.simplefilter("ignore")  # non-Dense layer: expected, not news
                graph.model.quantize("int8")
        if quantize == "keras" or shape != (None, None):
            graph = graph_class(clf, fixed_shape=shape)
        feeds = quantization_feeds(contract, quantize, clf, vset, src.label_names, shape)
        write = {"opset": opset or DEFAULT_OPSET, "backbone": clf.backbone, "precision": precision,
                 "max_accuracy_drop": gate["max_accuracy_drop"], "sensitivity": {},
                 "classifier": clf, "label_names": src.label_names, **feeds}  # fmt: skip

        def write_attempt(mode, attempt, settings, out: Path) -> dict:
            _clear(out)
            label = recipe_label(attempt, settings)
            log.info("writing %s %s", contract.name, label)
            info = MODULES[contract.name].write(graph, out, quantize=attempt,
                                                **{**write, **settings})  # fmt: skip
            if contract.needs_of(mode)[0]:
                info["calibration_texts"] = len(vset.calibration)
            return _manifest(contract, mode, attempt, info, src, clf, shape, graph_source, out)

        written, auto = {}, None
        plan = [(quantize, attempt, settings) for attempt, settings in contract.attempts(quantize)]
        if quantize == AUTO:
            plan, written, auto = rank_auto(contract, write_attempt, vset, Path(scratch))
        elif keep_fp32 is not None:
            plan = [(quantize, quantize, {"keep_fp32": keep_fp32})]
        failed = []
        for mode, attempt, settings in plan:
            label = recipe_label(attempt, settings)
            if (mode, label) in written:  # written and timed by `rank_auto`
                _clear(tmp)
                shutil.copytree(written[mode, label][0], tmp, dirs_exist_ok=True)
                manifest = written[mode, label][1]
            else:
                manifest = write_attempt(mode, attempt, settings, tmp)
            reduced = contract.reduced(mode, settings.get("precision", precision))
            batch_dependent = bool(mode) and contract.int8[mode].batch_dependent
            try:
                manifest["verification"], served = _verify(
                    tmp, vset, reference, gate, reduced, batch_dependent
                )
            except VerificationError as e:
                if (mode, attempt, settings) == plan[-1] or e.report.get("tokenizer_mismatches"):
                    _annotate(e, failed, reduced, contract, quantize)
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


@contextlib.contextmanager
def _serving_copy(contract: FormatContract, clf, shape):
    """The classifier as every serving graph is traced from it: capped at a fixed sequence
    length, attention through `ops.dot_product_attention`, and (ONNX graphs) GELU and LayerNorm
    in the forms onnxruntime fuses; restored on exit."""
    if contract.checkpoint:  # saved as trained: nothing rewritten
        yield clf
        return
    onnx_ops = onnx_friendly_ops(clf) if contract.onnx_graph else contextlib.nullcontext()
    with _serving_length(clf, shape[1]), fused_attention(clf), onnx_ops:
        yield clf


def _annotate(error, failed: list, reduced: bool, contract: FormatContract, quantize) -> None:
    """Adds to the last recipe's `VerificationError` the recipes that failed before it and,
    for a reduced-precision export, what to try instead."""
    if failed:
        error.args = (f"{error.args[0]} Earlier recipes also failed: {failed}",)
    if reduced and not error.report.get("tokenizer_mismatches"):
        error.args = (error.args[0] + _other_recipes(contract, quantize),)


def _other_recipes(contract: FormatContract, quantize) -> str:
    """What to try after a refused INT8 export: the format's other modes, or a wider gate."""
    others = [f"--int8 {mode}" for mode in contract.int8 if mode != quantize]
    return (
        f" Try {' or '.join(others)} (another recipe), or " if others else " Try "
    ) + "a wider gate (--min-agreement, --max-accuracy-drop)."


def _manifest(contract, quantize, attempt, info, src, clf, shape, graph_source, tmp: Path) -> dict:
    """Writes the tokenizer assets and a manifest for what `write` just wrote."""
    assets = tmp / contract.tokenizer_dir
    assets.mkdir(exist_ok=True)
    tokenizer = write_tokenizer_assets(
        clf.preprocessor.tokenizer, clf.preprocessor.sequence_length, assets
    )
    manifest = {
        "format": contract.name,
        "quantization": quantize and f"int8-{quantize}",
        "quantization_recipe": info.get("quantization_recipe", attempt),
        "model_file": info["model_file"],
        "label_names": src.label_names,
        "sequence_length": clf.preprocessor.sequence_length,
        "tokenizer": tokenizer,
        "tokenizer_file": (Path(contract.tokenizer_dir) / exportdir.TOKENIZER_FILE).as_posix(),
        "inputs": ["token_ids", "padding_mask"],
        "input_shape": list(shape),
        "opset": info.get("opset"),
        "fusions": info.get("fusions"),
        "kept_fp32": info.get("kept_fp32"),
        "calibration_texts": info.get("calibration_texts"),
        "inference_precision": info.get("inference_precision"),
        "source_backend": src.backend,
        "graph_source": graph_source,
        "versions": package_versions(traced_with(graph_source)),
    }
    return exportdir.write_manifest(tmp, manifest)


def _verify(
    tmp: Path, vset, reference, gate, reduced: bool, batch_dependent: bool
) -> tuple[dict, object]:
    """Loads the export with its own runtime and verifies it against the Keras reference (at
    every serving batch size when the recipe's output depends on the batch)."""
    served = runtime.load(tmp)
    sizes = f" at batch sizes {list(SERVING_BATCHES)}" if reduced and batch_dependent else ""
    log.info("verifying on %d texts with %s%s", len(vset.texts), type(served).__name__, sizes)
    keras_ids, keras_logits = reference
    report = verify(
        served, vset.texts, keras_ids, keras_logits, reduced,
        labels=vset.label_ids, splits=vset.splits, batch_dependent=batch_dependent, **gate,
    )  # fmt: skip
    checks = getattr(served, "checks", None)  # what the format's own users load, checked too
    if checks is not None:
        report.update(checks(vset.texts, keras_ids))
    return report, served


def _describe(tmp: Path, manifest: dict, served, vset, keras_ids, run_dir, started: float) -> None:
    """Adds the batch-1 latency and export time, writes the model card and the final manifest."""
    manifest["latency"] = latency_b1(served, vset.texts, keras_ids)
    manifest["export_seconds"] = round(time.perf_counter() - started, 1)
    write_model_card(tmp, manifest, run_dir)
    exportdir.write_manifest(tmp, manifest)


def _check_options(
    contract, quantize, min_agreement, max_accuracy_drop, precision, verify_per_split, keep_fp32,
    fixed_shape,
) -> None:  # fmt: skip
    """Raises `ValueError` naming the first bad option, its value and what is allowed."""
    if contract.checkpoint and fixed_shape not in (None, (None, None)):
        traced = [name for name, c in FORMATS.items() if not c.checkpoint]
        raise ValueError(
            f"fixed_shape (--batch-size, --sequence-length) applies to the traced formats "
            f"({', '.join(traced)}); format {contract.name!r} saves the model as it is. "
            f"Received: fixed_shape={fixed_shape!r}"
        )
    if keep_fp32 is not None and not (
        quantize in contract.keep_fp32_modes and isinstance(keep_fp32, int) and keep_fp32 >= 0
    ):
        takers = [f"format={f!r} with quantize={' or '.join(map(repr, c.keep_fp32_modes))}"
                  for f, c in FORMATS.items() if c.keep_fp32_modes]  # fmt: skip
        raise ValueError(
            f"keep_fp32 must be an int >= 0 and applies to {'; '.join(takers)} only. Received: "
            f"keep_fp32={keep_fp32!r} with format={contract.name!r}, quantize={quantize!r}"
        )

    def fraction(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1

    precisions = contract.precisions or ("f32",)

    checks = (
        ("min_agreement", min_agreement, fraction(min_agreement), "a number in [0, 1]"),
        ("max_accuracy_drop", max_accuracy_drop, fraction(max_accuracy_drop),
         "a number in [0, 1]"),
        ("precision", precision, precision in precisions, f"one of {list(precisions)}"),
        ("verify_per_split", verify_per_split,
         isinstance(verify_per_split, int) and verify_per_split >= 1, "an int >= 1"),
    )  # fmt: skip
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}. Received: {name}={value!r}")


def _clear(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":  # the subprocess of `exports_in_subprocess`
    _run_request(sys.argv[1], sys.argv[2])
