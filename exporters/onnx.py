"""ONNX export: `torch.onnx` (or tf2onnx), onnxruntime's transformer fusions, optional INT8.

INT8 recipes (onnxruntime's quantization tools):
- `calibrated`: `quantize_dynamic`'s integer graph (`MatMulInteger`, `QAttention`, INT8 weights),
  with each activation's quantization range calibrated once on training texts (MinMax, texts
  one at a time) instead of measured per call: the same integer kernels, and a text's output
  no longer depends on the rest of its batch. First, the few outlier channels of each weight
  input are scaled into the weight (`onnx_calibration.smooth_outliers`, SmoothQuant's transform on
  those channels only), so that one range resolves the other channels finely: on the reference run,
  115 -> 52 of 10,684 held-out labels changed with no node kept in fp32, for one `Mul` per
  input, and `--int8 auto` needs no fp32 node (`benchmarks/results/exports_amx.md`).
- `dynamic`: `quantize_dynamic`, INT8 weights (MatMul, embedding Gather), activations quantized on
  the fly, over the whole batch.
- `static`: `quantize_static` in QDQ format, activations calibrated on a sample of training texts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from kerasft.exporters.contract import FormatContract, int8
from kerasft.exporters.onnx_attention import fuse_attention
from kerasft.exporters.onnx_calibration import calibrate_activation_ranges, smooth_outliers
from kerasft.exporters.onnx_graph import (
    drop_index_wrap,
    drop_redundant_expand,
    fold_head_bias,
    fold_tensordot,
    gemm_to_matmul,
    global_average_pool_to_reduce_mean,
    lower_einsum,
    residual_add_to_sum,
)

DEFAULT_OPSET = 17
# Dynamic: every node quantized, then the 2, 4, 8 nodes whose quantization alone moves the
# logits most kept in fp32 (`node_sensitivity`, measured once on the calibration feeds).
KEEP_FP32 = (0, 2, 4, 8)
CONTRACT = FormatContract(
    "onnx",
    "ONNX with onnxruntime's transformer fusions (onnxruntime)",
    int8={
        "calibrated": int8(
            "calibrated",
            "integer INT8 with calibrated activation ranges",
            *(("calibrated", {"keep_fp32": k}) for k in KEEP_FP32),
            calibration=True,
        ),
        "dynamic": int8(
            "dynamic",
            "onnxruntime dynamic INT8",
            *(("dynamic", {"keep_fp32": k}) for k in KEEP_FP32),
            calibration=True,
            batch_dependent=True,  # activation ranges per call, over the whole batch
        ),
        "static": int8("static", "calibrated QDQ INT8", calibration=True),
    },
    # --int8 auto: the batch-independent recipes (a text's label never depends on its batch),
    # and fp32 where neither is faster on this CPU
    auto=(("calibrated", {}), ("static", {}), (None, {})),
    onnx_graph=True,
    needs=("onnx", "onnxruntime"),
    graph_sources=("torch", "tensorflow"),
    keep_fp32_modes=("calibrated", "dynamic"),
)
log = logging.getLogger(__name__)


@contextlib.contextmanager
def quantizer_logs_to_debug():
    """Routes onnxruntime's quantizer lines to this module's logger at DEBUG.

    `onnxruntime.quantization` logs through the root logger at INFO (one "Quantization
    parameters for tensor ... not specified" line per tensor), which floods any application
    that shows INFO. While quantizing, a filter on the root logger re-emits those records here at
    DEBUG and drops them from the root.
    """

    def demote(record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname:
            log.debug("onnxruntime: %s", record.getMessage())
            return False
        return True

    root = logging.getLogger()
    root.addFilter(demote)
    try:
        yield
    finally:
        root.removeFilter(demote)


def _optimize(
    raw_path: Path, out_path: Path, num_heads: int, hidden_size: int, model_type: str = "bert_tf"
) -> dict:
    """Applies onnxruntime's transformer graph fusions; returns what it fused.

    LayerNorm (`LayerNormalization`) and GELU fuse here; attention was fused before
    (`fuse_attention`), since Keras' einsum-based attention matches none of onnxruntime's
    patterns. The residual adds are kept out of `SkipLayerNormalization`, here and when the
    session loads (`residual_add_to_sum`).
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    model = optimizer.optimize_model(
        str(raw_path),
        model_type=model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=1,
        use_gpu=False,
    )
    gemm_to_matmul(model.model)
    residual_add_to_sum(model.model)
    model.save_model_to_file(str(out_path))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


class _Calibration:
    """onnxruntime `CalibrationDataReader` over tokenized calibration texts."""

    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


ATTENTION = ("onnxruntime", "traced")


def write_fp32(
    graph, out_dir: Path, opset: int = DEFAULT_OPSET, backbone=None, attention: str = "onnxruntime"
) -> dict:
    """Writes the fp32 `model.onnx`: the graph source's ONNX (`torch.onnx` or tf2onnx), then
    kerasft's graph passes, then (for onnxruntime) its fusions.

    Also the starting point of the OpenVINO export, which reads this file.

    Args:
        graph: a `kerasft.exporters.torch_graph.TorchServingGraph` or a
            `kerasft.exporters.keras_graph.ServingGraph`.
        out_dir: the (temporary) export directory.
        opset: ONNX opset.
        backbone: the KerasHub backbone the graph was traced from (attention weights, heads and
            hidden size for the fusions).
        attention: `"onnxruntime"`: each attention block becomes onnxruntime's fused
            `com.microsoft.Attention` (`fuse_attention`), then onnxruntime's optimizer fuses
            LayerNorm and GELU: the ONNX export. `"traced"`: attention stays as traced (from
            `scaled_dot_product_attention` under `keras_graph.fused_attention`) with its
            projections as MatMuls, and kerasft's other passes (`onnx_graph`) but no
            onnxruntime fusion: the graph OpenVINO reads, whose front end fuses each block
            into its own `ScaledDotProductAttention` (and breaks onnxruntime's `Attention`
            back into MatMuls and a Softmax).

    Returns:
        `{"model_file": "model.onnx", "opset", "fusions"}`.

    Raises:
        ValueError: for an unknown `attention`.
    """
    import onnx

    if attention not in ATTENTION:
        raise ValueError(f"Unknown attention={attention!r}. Supported: {list(ATTENTION)}")
    raw = out_dir / "raw.onnx"
    if graph.source == "torch":
        graph.write_onnx(raw, opset)
        proto = onnx.load(str(raw))
    else:
        import tf2onnx

        proto, _ = tf2onnx.convert.from_function(
            graph.serve, input_signature=graph.serve.input_signature, opset=opset
        )
    global_average_pool_to_reduce_mean(proto)
    fp32 = out_dir / "model.onnx"
    if attention == "traced":
        fusions = {"MatMul (Einsum lowered)": lower_einsum(proto)}
        fusions["Add (bias before the head split)"] = fold_head_bias(proto)
        fusions["Where (index wrap dropped)"] = drop_index_wrap(proto)
        fusions["Expand (dropped)"] = drop_redundant_expand(proto)
        fusions["MatMul (Tensordot folded)"] = fold_tensordot(proto)
        onnx.save(proto, str(fp32))
        raw.unlink(missing_ok=True)
        return {"model_file": fp32.name, "opset": opset, "fusions": fusions}
    attention_blocks = fuse_attention(proto, backbone)
    folded = fold_tensordot(proto)
    onnx.save(proto, str(raw))
    model_type = "bert" if graph.source == "torch" else "bert_tf"
    fusions = _optimize(raw, fp32, backbone.num_heads, backbone.hidden_dim, model_type)
    fusions["Attention"] = attention_blocks
    fusions["MatMul (Tensordot folded)"] = folded
    raw.unlink()
    return {"model_file": fp32.name, "opset": opset, "fusions": fusions}


DYNAMIC_OPS = ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"]


def quantizable_nodes(model) -> list[str]:
    """Names of the nodes dynamic INT8 quantizes: MatMul/Gather with a constant fp32 weight, and
    onnxruntime's fused `Attention`."""
    from onnx import TensorProto

    consts = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    names = []
    for node in model.graph.node:
        if node.op_type == "Attention" or (
            node.op_type in ("MatMul", "Gather")
            and node.input[1 if node.op_type == "MatMul" else 0] in consts
        ):
            names.append(node.name)
    return names


def node_sensitivity(fp32: Path, feeds: list[dict], work_dir: Path) -> list[tuple[str, float]]:
    """Measures how much quantizing each node alone moves the logits; most sensitive first.

    For every quantizable node, the fp32 model is dynamically quantized with that node only,
    and the mean |logit difference| from the fp32 model over `feeds` is its score. Errors of
    several nodes add up roughly, so the nodes with the largest scores are the ones worth
    keeping in fp32.

    The nodes are scored by up to two Python processes (`_score_nodes`, each on its own copy of
    the model, one thread each): writing each quantized model is most of the time, and it is
    single-threaded Python (on the reference model, 29 nodes: 44 s -> 29 s on 2 cores). They
    are started as `python -c`, not by `multiprocessing`, whose spawned children would import
    the caller's main script again.

    Args:
        fp32: the fused fp32 `model.onnx`.
        feeds: input feeds (`{"token_ids", "padding_mask"}`), e.g. calibration batches.
        work_dir: a scratch directory.

    Returns:
        `[(node name, score), ...]`, sorted by decreasing score.
    """
    import pickle
    import subprocess
    import sys

    import onnx

    names = quantizable_nodes(onnx.load(str(fp32), load_external_data=False))
    workers = max(1, min(2, os.cpu_count() or 1, len(names)))
    if workers == 1:
        return sorted(_score_nodes(fp32, names, feeds, work_dir), key=lambda item: -item[1])
    procs = []
    for i in range(workers):
        work = work_dir / f"scorer-{i}"
        work.mkdir(parents=True, exist_ok=True)
        (work / "job.pkl").write_bytes(pickle.dumps((fp32, names[i::workers], feeds, work)))
        code = "import sys; from kerasft.exporters.onnx import _score_job; _score_job(sys.argv[1])"
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(work / "job.pkl")]))
    if any([p.wait() for p in procs]):  # every one waited for
        raise RuntimeError(
            f"Scoring node sensitivity failed (exit codes {[p.returncode for p in procs]})."
        )
    parts = [work_dir / f"scorer-{i}" / "scores.pkl" for i in range(workers)]
    scores = [s for part in parts for s in pickle.loads(part.read_bytes())]
    return sorted(scores, key=lambda item: -item[1])


def _score_job(job: str) -> None:
    """A `node_sensitivity` subprocess: `_score_nodes` on a pickled job, scores beside it."""
    import pickle

    scores = _score_nodes(*pickle.loads(Path(job).read_bytes()))
    (Path(job).parent / "scores.pkl").write_bytes(pickle.dumps(scores))


def _score_nodes(fp32: Path, names: list[str], feeds: list[dict], work: Path) -> list:
    """`node_sensitivity` for `names`, in a scratch directory of its own (onnxruntime's
    quantizer writes its shape-inferred copy next to the model it reads)."""
    import shutil

    import onnxruntime as ort

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.onnx"
    shutil.copyfile(fp32, model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def logits(path):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, feed)[0] for feed in feeds])

    reference = logits(model)
    single = work / "single.onnx"
    scores = []
    for name in names:
        with quantizer_logs_to_debug():
            _quantize(model, single, "dynamic", None, {"DefaultTensorType": 1}, only=[name])
        scores.append((name, float(np.mean(np.abs(logits(single) - reference)))))
        single.unlink()
    return scores


def write(
    graph,
    out_dir: Path,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    backbone=None,
    calibration=None,
    keep_fp32: int = 0,
    sensitivity: dict | None = None,
    **_,
) -> dict:
    """Writes `model.onnx` (fp32, fused) and, when asked, `model.int8.onnx`.

    Args:
        graph: the serving graph (see `write_fp32`).
        out_dir: the (temporary) export directory.
        quantize: None, `"calibrated"`, `"dynamic"` or `"static"`.
        opset: ONNX opset.
        backbone: the KerasHub backbone the graph was traced from (attention weights, heads and
            hidden size for the fusions).
        calibration: input feeds `{"token_ids", "padding_mask"}`: static and calibrated INT8
            calibrate on them (calibrated INT8 smooths outlier channels by them first,
            `smooth_outliers`), and `keep_fp32` measures node sensitivity on them.
        keep_fp32: with `"calibrated"` or `"dynamic"`, keep this many nodes in fp32, the
            ones whose quantization alone moves the logits most on `calibration`
            (`node_sensitivity`).
        sensitivity: a dict that keeps each recipe's measured ranking between calls (same
            graph).

    Returns:
        `{"model_file", "opset", "fusions", "quantization_recipe"}` (+ `"kept_fp32"`, the
        nodes kept and their sensitivity, with `keep_fp32`; + `"smoothed_inputs"` and
        `"calibrated_inputs"` with `"calibrated"`).
    """
    import onnx

    info = write_fp32(graph, out_dir, opset, backbone)
    fp32 = out_dir / info["model_file"]
    if quantize is None:
        return info
    int8 = out_dir / "model.int8.onnx"
    if quantize == "calibrated":
        info["smoothed_inputs"] = smooth_outliers(fp32, calibration)
    keep = []
    if quantize in ("dynamic", "calibrated") and keep_fp32:
        import tempfile

        sensitivity = {} if sensitivity is None else sensitivity
        if quantize not in sensitivity:  # the calibrated recipe ranks its smoothed graph
            with tempfile.TemporaryDirectory(dir=out_dir) as work:
                sensitivity[quantize] = node_sensitivity(fp32, calibration, Path(work))
        keep = sensitivity[quantize][:keep_fp32]
        info["kept_fp32"] = [{"node": n, "mean_abs_logit_diff": v} for n, v in keep]
    # Fused ops (com.microsoft domain) leave some tensors untyped for ONNX shape inference.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    recipe = "dynamic" if quantize == "calibrated" else quantize
    with quantizer_logs_to_debug():
        _quantize(fp32, int8, recipe, calibration, extra, exclude=[n for n, _ in keep])
    if quantize == "calibrated":
        info["calibrated_inputs"] = calibrate_activation_ranges(fp32, int8, calibration)
    fp32.unlink()
    info["model_file"] = int8.name
    recipe = {
        "dynamic": "onnxruntime quantize_dynamic, per-channel QInt8 weights",
        "calibrated": "onnxruntime quantize_dynamic, per-channel QInt8 weights, activation ranges "
        "calibrated (MinMax, one text at a time)",
        "static": "onnxruntime quantize_static, QDQ, per-channel QInt8",
    }[quantize]
    if info.get("smoothed_inputs"):
        smoothed = info["smoothed_inputs"]
        recipe += f", outlier input channels of {smoothed} nodes moved into their weights"
    if keep:
        recipe += f", {len(keep)} most sensitive nodes kept in fp32"
    info["quantization_recipe"] = recipe
    return info


def _quantize(
    fp32: Path, int8: Path, quantize: str, calibration, extra: dict, exclude=(), only=None
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if quantize == "dynamic":
        quantize_dynamic(
            str(fp32),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=DYNAMIC_OPS,
            nodes_to_quantize=only,
            nodes_to_exclude=list(exclude),
            extra_options=extra,
        )
    else:
        quantize_static(
            str(fp32),
            str(int8),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options=extra,
        )
