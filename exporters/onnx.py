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
    """Applies onnxruntime's transformer graph fusions; returns what it fused.

    LayerNorm (as SkipLayerNormalization after residual adds) and GELU fuse; the attention block
    that Keras' einsum-based MultiHeadAttention becomes does not match onnxruntime's patterns.
    """
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(raw_path),
        model_type="bert_tf",
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=1,
        use_gpu=False,
    )
    gemm_to_matmul(model.model)
    model.save_model_to_file(str(out_path))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def global_average_pool_to_reduce_mean(model) -> int:
    """Rewrites `GlobalAveragePool` over a rank-3 tensor as `ReduceMean(axes=[2], keepdims=1)`.

    tf2onnx writes a last-axis mean of a `(batch, sequence, hidden)` tensor as a
    `GlobalAveragePool`; as the equivalent `ReduceMean` it forms the LayerNorm pattern
    onnxruntime fuses. Nodes whose input rank is not known to be 3 are left alone.

    Returns:
        The number of nodes rewritten.
    """
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    rank = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in list(inferred.graph.value_info) + list(inferred.graph.input)
        if v.type.tensor_type.HasField("shape")
    }
    rewritten = 0
    for node in model.graph.node:
        if node.op_type == "GlobalAveragePool" and rank.get(node.input[0]) == 3:
            node.op_type = "ReduceMean"
            del node.attribute[:]
            node.attribute.extend(
                [helper.make_attribute("axes", [2]), helper.make_attribute("keepdims", 1)]
            )
            rewritten += 1
    return rewritten


def gemm_to_matmul(model):
    """Rewrites each `Gemm` (alpha 1, beta 1 or no bias, A not transposed) as `MatMul` [+ `Add`].

    tf2onnx fuses Keras `Dense` layers into `Gemm`, which onnxruntime's dynamic quantizer does not
    quantize; as `MatMul` it does (the same arithmetic). Transposed constant weights are
    transposed once here.

    Returns:
        The number of nodes rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    uses = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        has_bias = len(node.input) > 2 and node.input[2]
        simple = attrs.get("alpha", 1.0) == 1.0 and (not has_bias or attrs.get("beta", 1.0) == 1.0)
        if node.op_type != "Gemm" or not simple or attrs.get("transA", 0):
            nodes.append(node)
            continue
        a, b = node.input[0], node.input[1]
        if attrs.get("transB", 0):
            if b not in inits or uses[b] > 1:
                nodes.append(node)
                continue
            weight = numpy_helper.to_array(inits[b]).T.copy()
            inits[b].CopyFrom(numpy_helper.from_array(weight, b))
        product = f"{node.name}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [a, b], [product], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], list(node.output), name=f"{node.name}_Add"
                )
            )
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


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
    global_average_pool_to_reduce_mean(proto)
    onnx.save(proto, str(raw))
    fp32 = out_dir / "model.onnx"
    fusions = _optimize(raw, fp32, num_heads, hidden_size)
    raw.unlink()
    info = {"model_file": fp32.name, "opset": opset, "fusions": fusions}
    if quantize is None:
        return info
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    int8 = out_dir / "model.int8.onnx"
    # Fused ops (com.microsoft domain) leave some tensors untyped for ONNX shape inference.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if quantize == "dynamic":
        quantize_dynamic(
            str(fp32),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
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
    fp32.unlink()
    info["model_file"] = int8.name
    return info
