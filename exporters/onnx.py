"""ONNX export: tf2onnx, onnxruntime's transformer fusions, then optional INT8 quantization.

INT8 recipes (onnxruntime's quantization tools):
- `dynamic`: `quantize_dynamic`, INT8 weights (MatMul, embedding Gather), activations quantized on
  the fly.
- `static`: `quantize_static` in QDQ format, activations calibrated on a sample of training texts.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_OPSET = 17


def _optimize(raw_path: Path, out_path: Path, num_heads: int, hidden_size: int) -> dict:
    """Applies onnxruntime's transformer graph fusions (attention, LayerNorm, GELU)."""
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(raw_path),
        model_type="bert_tf",
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=1,
        use_gpu=False,
    )
    model.save_model_to_file(str(out_path))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


class _Calibration:
    """onnxruntime `CalibrationDataReader` over tokenized calibration texts."""

    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def write(
    graph,
    out_dir: Path,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    num_heads: int = 12,
    hidden_size: int = 768,
    calibration=None,
    **_,
) -> dict:
    """Writes `model.onnx` (fp32, fused) and, when asked, `model.int8.onnx`.

    Args:
        graph: the `exporters.keras_graph.ServingGraph`.
        out_dir: the (temporary) export directory.
        quantize: None, `"dynamic"` or `"static"`.
        opset: ONNX opset.
        num_heads: attention heads (for the fusions).
        hidden_size: hidden size (for the fusions).
        calibration: for `"static"`, a list of input feeds `{"token_ids", "padding_mask"}`.

    Returns:
        `{"model_file", "opset", "fusions"}`.
    """
    import onnx
    import tf2onnx

    raw = out_dir / "raw.onnx"
    proto, _ = tf2onnx.convert.from_function(
        graph.serve, input_signature=graph.serve.input_signature, opset=opset
    )
    onnx.save(proto, str(raw))
    fp32 = out_dir / "model.onnx"
    fusions = _optimize(raw, fp32, num_heads, hidden_size)
    raw.unlink()
    info = {"model_file": fp32.name, "opset": opset, "fusions": fusions}
    if quantize is None:
        return info
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    int8 = out_dir / "model.int8.onnx"
    if quantize == "dynamic":
        quantize_dynamic(
            str(fp32),
            str(int8),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
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
        )
    fp32.unlink()
    info["model_file"] = int8.name
    return info
