"""OpenVINO IR export (`model.xml` + `model.bin`), fp32 or post-training INT8 (NNCF, or QDQ).

The IR is converted by `openvino.convert_model` from the ONNX graph the ONNX export starts from
(`kerasft.exporters.onnx.write_fp32`, traced under PyTorch by default), taken before
onnxruntime's fusions (`attention="traced"`): attention traced from
`scaled_dot_product_attention` (`kerasft.exporters.keras_graph.fused_attention`) with its
projections as MatMuls. OpenVINO's front end fuses each attention block into one
`ScaledDotProductAttention`, each LayerNorm into `MVN` and each GELU into `Gelu`; onnxruntime's
fused `Attention` operator, which the ONNX export holds, it would break back into MatMuls and a
Softmax.

INT8 recipe `qdq`: the ONNX export's calibrated QDQ INT8 (onnxruntime's `quantize_static`),
which OpenVINO reads as INT8 `FakeQuantize` operations. It is read from onnxruntime's fused
graph (so its IR has a `ScaledDotProductAttention` only where that graph has onnxruntime's
`MultiHeadAttention`: the last layer, computed at `[CLS]` alone), and `--int8 auto` does not
try it.

INT8 recipe `nncf`: `nncf.quantize` with `ModelType.TRANSFORMER` (NNCF's scheme for transformer
encoders: the attention scores, softmax and LayerNorm stay in floating point), calibrated on
training texts fed one at a time, unpadded, as the runtime sees them. Where that recipe misses
the export gate, `nncf.quantize_with_accuracy_control` is used instead: it keeps the layers that
cost the most accuracy in floating point until the drop on labelled validation texts is within
the gate (see `kerasft.exporters.dispatch.export`).

Inference precision: OpenVINO's CPU plugin runs in bfloat16 by default where the CPU supports it.
The export records the precision it was verified with (`inference_precision`, `"f32"` unless
asked otherwise); `kerasft.exporters.runtime` applies it at load, and
`load(..., precision=...)` overrides
it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

from kerasft.exporters import onnx as onnx_export
from kerasft.exporters.contract import FormatContract, int8

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")
# NNCF's plain recipe, then its accuracy control when the plain one misses the gate.
CONTRACT = FormatContract(
    "openvino",
    "OpenVINO IR (model.xml + model.bin) for Intel CPUs, GPUs and NPUs",
    int8={
        "nncf": int8(
            "nncf",
            "NNCF post-training INT8",
            ("nncf", {}),
            ("nncf-accuracy-control", {}),
            calibration=True,
            validation=True,
            untimed=("nncf-accuracy-control",),
        ),
        "qdq": int8("qdq", "onnxruntime's calibrated QDQ INT8, run by OpenVINO", calibration=True),
    },
    # --int8 auto: NNCF INT8, fp32 where it is not faster on this CPU, and each in bf16 on CPUs
    # that compute it (OpenVINO's own default there); all with fused attention (not `qdq`)
    auto=(
        ("nncf", {}),
        (None, {}),
        ("nncf", {"precision": "bf16"}),
        (None, {"precision": "bf16"}),
    ),
    onnx_graph=True,
    calibration_batch=1,  # NNCF calibrates on single texts, as the runtime serves them
    needs=("onnx", "onnxruntime", "openvino", "nncf"),
    graph_sources=("torch", "tensorflow"),
    precisions=PRECISIONS,
    companion_suffixes=(".bin",),
)
MODEL_FILE = "model.xml"


@contextlib.contextmanager
def _nncf_quiet():
    """NNCF logs every step at INFO and draws rich progress bars on stdout: both go to this
    module's logger at DEBUG (the bars are captured and logged once NNCF is done)."""
    import nncf

    nncf.set_log_level(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        if captured.getvalue().strip():
            log.debug("nncf: %s", captured.getvalue().strip())


def fold_constant_shapes(model) -> int:
    """Replaces each `ShapeOf` of a constant with the constant shape it computes.

    TensorFlow's embedding lookup reads the shape of the embedding table, so the converted IR
    keeps `ShapeOf(table)`. After NNCF stores the table in INT8 for the lookup, that `ShapeOf`
    would keep a second, fp32 copy of the table alive: 47 MB of the 71 MB INT8 IR on
    all-MiniLM-L6-v2, which is 23.7 MB once folded. The values are unchanged.

    Returns:
        The number of `ShapeOf` nodes folded.
    """
    import numpy as np
    import openvino.opset13 as ops

    folded = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "ShapeOf" and op.input_value(0).get_node().get_type_name() == (
            "Constant"
        ):
            dtype = op.get_output_element_type(0).to_dtype()
            shape = ops.constant(np.array(list(op.get_input_shape(0)), dtype=dtype))
            op.output(0).replace(shape.output(0))
            folded += 1
    model.validate_nodes_and_infer_types()
    return folded


def quantize_nncf(model, calibration: list[dict]):
    """Post-training INT8 of an OpenVINO model with NNCF's transformer scheme.

    Args:
        model: an `openvino.Model`.
        calibration: input feeds `{"token_ids", "padding_mask"}` (one text each, unpadded).

    Returns:
        The quantized `openvino.Model`.
    """
    import nncf

    with _nncf_quiet():
        return nncf.quantize(
            model,
            nncf.Dataset(calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
        )


def quantize_nncf_accuracy_control(model, calibration: list[dict], validation, max_drop: float):
    """NNCF INT8 that keeps the most accuracy-sensitive layers in floating point.

    Args:
        model: an `openvino.Model`.
        calibration: input feeds, as for `quantize_nncf`.
        validation: `(feeds, labels)`: labelled validation feeds and their class ids.
        max_drop: the largest accuracy drop (absolute, 0.01 = 1 point) NNCF may accept.

    Returns:
        The quantized `openvino.Model`.
    """
    import nncf
    import numpy as np

    feeds, labels = validation

    def accuracy(compiled, items) -> float:
        output = compiled.output(0)
        hits = [int(np.argmax(compiled(feed)[output]) == y) for feed, y in items]
        return float(np.mean(hits))

    with _nncf_quiet():
        return nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(calibration),
            nncf.Dataset(list(zip(feeds, labels, strict=True)), lambda item: item[0]),
            validation_fn=accuracy,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
        )


def write(
    graph,
    out_dir: Path,
    quantize: str | None = None,
    opset: int = onnx_export.DEFAULT_OPSET,
    backbone=None,
    calibration=None,
    validation=None,
    max_accuracy_drop: float | None = None,
    precision: str = "f32",
    **_,
) -> dict:
    """Writes `model.xml` + `model.bin`, fp32 or NNCF INT8.

    Args:
        graph: the `kerasft.exporters.keras_graph.ServingGraph`.
        out_dir: the (temporary) export directory.
        quantize: None, `"nncf"`, `"nncf-accuracy-control"` (used by `export` when the
            plain recipe misses the gate) or `"qdq"`.
        opset: ONNX opset of the intermediate graph.
        backbone: the KerasHub backbone the graph was traced from (for the ONNX fusions).
        calibration: for INT8, input feeds of training texts.
        validation: for `"nncf-accuracy-control"`, `(feeds, labels)` of validation texts.
        max_accuracy_drop: for `"nncf-accuracy-control"`, NNCF's `max_drop`.
        precision: OpenVINO's inference precision to record (`"f32"` or `"bf16"`).

    Returns:
        `{"model_file", "opset", "fusions", "inference_precision", "quantization_recipe"}`.

    Raises:
        ValueError: for an unknown `precision`.
    """
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision={precision!r}. Supported: {list(PRECISIONS)}")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        if quantize == "qdq":  # OpenVINO runs each Quantize/DequantizeLinear pair in INT8
            # onnxruntime's QDQ of its own fused graph, whose `Attention` OpenVINO decomposes:
            # on the traced graph (activations quantized around every MatMul) it agreed with
            # fp32 on 97.4% of 1,024 test texts of the reference run, against 99.8% here
            info = onnx_export.write(graph, Path(tmp), "static", opset, backbone, calibration)
        else:
            info = onnx_export.write_fp32(graph, Path(tmp), opset, backbone, attention="traced")
        model = ov.convert_model(str(Path(tmp) / info["model_file"]))
        info["fusions"]["ScaledDotProductAttention"] = sum(
            op.get_type_name() == "ScaledDotProductAttention" for op in model.get_ordered_ops()
        )
        info["fusions"]["ShapeOf (constant, folded)"] = fold_constant_shapes(model)
        # Saved and read back: NNCF 3.4 cannot build its graph of the IR converted in memory
        # from the PyTorch-traced ONNX ("Could not find a node Gather_93 in NNCFGraph"); the
        # same IR read from disk quantizes.
        ov.save_model(model, str(Path(tmp) / MODEL_FILE), compress_to_fp16=False)
        model = ov.Core().read_model(str(Path(tmp) / MODEL_FILE))
    recipe = None
    if quantize == "qdq":
        recipe = "onnxruntime quantize_static (QDQ, per-channel QInt8), run by OpenVINO"
    elif quantize == "nncf":
        model, recipe = quantize_nncf(model, calibration), "nncf.quantize (TRANSFORMER)"
    elif quantize == "nncf-accuracy-control":
        model = quantize_nncf_accuracy_control(model, calibration, validation, max_accuracy_drop)
        recipe = f"nncf.quantize_with_accuracy_control (TRANSFORMER, max_drop {max_accuracy_drop})"
    ov.save_model(model, str(out_dir / MODEL_FILE), compress_to_fp16=False)
    return {
        "model_file": MODEL_FILE,
        "opset": opset,
        "fusions": info["fusions"],
        "inference_precision": precision,
        "quantization_recipe": recipe,
    }
