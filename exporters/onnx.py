"""ONNX export: tf2onnx, onnxruntime's transformer fusions, then optional INT8 quantization.

INT8 recipes (onnxruntime's quantization tools):
- `dynamic`: `quantize_dynamic`, INT8 weights (MatMul, embedding Gather), activations quantized on
  the fly.
- `static`: `quantize_static` in QDQ format, activations calibrated on a sample of training texts.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np

from kerasft.exporters.contract import FormatContract, int8

DEFAULT_OPSET = 17
# Dynamic: every node quantized, then the 2, 4, 8 nodes whose quantization alone moves the
# logits most kept in fp32 (`node_sensitivity`, measured once on the calibration feeds).
CONTRACT = FormatContract(
    "onnx",
    "ONNX with onnxruntime's transformer fusions (onnxruntime)",
    int8={
        "dynamic": int8(
            "dynamic",
            "onnxruntime dynamic INT8",
            *(("dynamic", {"keep_fp32": k}) for k in (0, 2, 4, 8)),
            calibration=True,
            batch_dependent=True,  # activation ranges per call, over the whole batch
        ),
        "static": int8("static", "calibrated QDQ INT8", calibration=True),
    },
    onnx_graph=True,
    needs=("tensorflow", "tf2onnx", "onnxruntime"),
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


def _optimize(raw_path: Path, out_path: Path, num_heads: int, hidden_size: int) -> dict:
    """Applies onnxruntime's transformer graph fusions; returns what it fused.

    LayerNorm (`LayerNormalization`) and GELU fuse here; attention was fused before
    (`fuse_attention`), since Keras' einsum-based attention matches none of onnxruntime's
    patterns. The residual adds are kept out of `SkipLayerNormalization`, here and when the
    session loads (`residual_add_to_sum`).
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert_tf")
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    model = optimizer.optimize_model(
        str(raw_path),
        model_type="bert_tf",
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


def residual_add_to_sum(model) -> int:
    """Writes each `Add` that feeds a `LayerNormalization` as the equivalent two-input `Sum`.

    onnxruntime fuses `Add` + `LayerNormalization` into `SkipLayerNormalization` when a session
    loads (and in its offline optimizer), whenever it can prove both addends have the same
    shape. Its 1.31 CPU kernel is slower than the two nodes it replaces: ~250 us against ~60 us
    (DistilBERT-base shape, 128 tokens) and 77 us against 23 us at 32 tokens; keeping it out
    made the dynamic INT8 model 10-13% faster at 128 tokens. `Sum` is the same arithmetic and
    matches no fusion pattern.

    Returns:
        The number of nodes rewritten.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    rewritten = 0
    for node in model.graph.node:
        add = producers.get(node.input[0]) if node.op_type == "LayerNormalization" else None
        if add is not None and add.op_type == "Add" and not add.attribute:
            add.op_type = "Sum"
            rewritten += 1
    return rewritten


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


_QUERY_ADD = re.compile(r"transformer_layer_(\d+)[^/]*/self_attention_layer[^/]*/query[^/]*/Add$")
_OUTPUT_ADD = re.compile(
    r"transformer_layer_(\d+)[^/]*/self_attention_layer[^/]*/attention_output[^/]*/BiasAdd$"
)


def _attention_input(producers: dict, query_add) -> str:
    """Walks up the query projection (Squeeze/Reshape/MatMul/Unsqueeze) to the block's input."""
    tensor = query_add.input[0]
    while tensor in producers and producers[tensor].op_type in (
        "Squeeze", "Reshape", "MatMul", "Gemm", "Unsqueeze",
    ):  # fmt: skip
        tensor = producers[tensor].input[0]
    return tensor


def fuse_attention(model, backbone, mask_input: str = "padding_mask") -> int:
    """Replaces each Keras self-attention block with onnxruntime's fused `Attention` operator.

    tf2onnx writes Keras' einsum-based `MultiHeadAttention` (projections, masked softmax with
    `SelectV2`, transposes) in a shape onnxruntime's attention fusion does not recognise. Here
    each block, from its input to the output projection's bias add, becomes
    `com.microsoft.Attention(x, W_qkv, b_qkv, padding_mask)` followed by the output projection
    as `MatMul` + `Add`, with the weights taken from the Keras layers; the nodes left unused are
    removed. The fused operator is what onnxruntime's dynamic quantizer turns into
    `QAttention`. Export verification compares the result with the Keras model.

    Args:
        model: an `onnx.ModelProto` written by tf2onnx from the serving graph.
        backbone: the KerasHub `DistilBertBackbone` the graph was traced from.
        mask_input: the graph input holding the `(batch, sequence)` 0/1 padding mask.

    Returns:
        The number of attention blocks fused.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    queries = {int(_QUERY_ADD.search(n.name).group(1)): n for n in graph.node
               if _QUERY_ADD.search(n.name)}  # fmt: skip
    outputs = {int(_OUTPUT_ADD.search(n.name).group(1)): n for n in graph.node
               if _OUTPUT_ADD.search(n.name)}  # fmt: skip
    if sorted(queries) != list(range(backbone.num_layers)) or sorted(outputs) != sorted(queries):
        return 0
    h = backbone.hidden_dim
    value = lambda w: np.asarray(w.numpy(), dtype="float32")  # noqa: E731
    new_nodes = {}
    for i, layer in enumerate(backbone.transformer_layers):
        att = layer._self_attention_layer
        dense = (att.query_dense, att.key_dense, att.value_dense)
        w_qkv = np.concatenate([value(d.kernel).reshape(h, h) for d in dense], axis=1)
        b_qkv = np.concatenate([value(d.bias).reshape(h) for d in dense])
        w_out = value(att.output_dense.kernel).reshape(h, h)
        b_out = value(att.output_dense.bias)
        p = f"kerasft_attention_{i}"
        graph.initializer.extend(
            numpy_helper.from_array(a, f"{p}_{n}")
            for a, n in ((w_qkv, "qkv_weight"), (b_qkv, "qkv_bias"), (w_out, "out_weight"),
                         (b_out, "out_bias"))
        )  # fmt: skip
        x = _attention_input(producers, queries[i])
        new_nodes[outputs[i].name] = [
            helper.make_node(
                "Attention", [x, f"{p}_qkv_weight", f"{p}_qkv_bias", mask_input], [f"{p}_context"],
                name=f"{p}", domain="com.microsoft", num_heads=backbone.num_heads,
            ),
            helper.make_node("MatMul", [f"{p}_context", f"{p}_out_weight"], [f"{p}_projected"],
                             name=f"{p}_out_MatMul"),
            helper.make_node("Add", [f"{p}_projected", f"{p}_out_bias"], list(outputs[i].output),
                             name=f"{p}_out_Add"),
        ]  # fmt: skip
    nodes = []
    for node in graph.node:
        nodes += new_nodes.get(node.name, [node])
    _replace_nodes(graph, nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(new_nodes)


def fold_tensordot(model) -> int:
    """Rewrites tf2onnx's `Tensordot` (Reshape to 2-D, MatMul, Reshape back) as one `MatMul`.

    A Keras `Dense` on a `(batch, sequence, features)` tensor reaches ONNX as
    `Reshape(x, [-1, K]) -> MatMul(W) -> Reshape(., Concat(Gather(Shape(x), [0, 1]), [N]))`, the
    target shape computed at run time by `Shape`/`Cast`/`Gather`/`Concat` nodes. ONNX `MatMul`
    broadcasts over the leading axes, so `MatMul(x, W)` is the same tensor. Without the reshapes
    between them, onnxruntime also folds the bias `Add` into the (quantized) MatMul. On the
    DistilBERT feed-forward layers this removes 8 small nodes per `Dense` (profiled: ~10% of the
    node time at batch 1 / 32 tokens); the dynamic INT8 model got 2-4% faster at batch 1.

    Returns:
        The number of `Tensordot` blocks rewritten.
    """
    from onnx import numpy_helper

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def source(tensor, *ops):
        """The node making `tensor`, looking through `Cast`; None unless its type is in `ops`."""
        node = producers.get(tensor)
        while node is not None and node.op_type == "Cast":
            node = producers.get(node.input[0])
        return node if node is not None and node.op_type in ops else None

    def shape_of_leading_axes(tensor, x, n_out) -> bool:
        """Whether `tensor` computes `concat(shape(x)[:-1], [n_out])`."""
        concat = source(tensor, "Concat")
        if concat is None or len(concat.input) != 2 or concat.input[1] not in consts:
            return False
        gather = source(concat.input[0], "Gather")
        if gather is None or gather.input[1] not in consts:
            return False
        shape = source(gather.input[0], "Shape")
        indices = consts[gather.input[1]]
        return (
            shape is not None and shape.input[0] == x and not shape.attribute
            and list(indices) == list(range(len(indices)))
            and list(consts[concat.input[1]]) == [n_out]
        )  # fmt: skip

    rewritten, dropped = 0, set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in consts:
            continue
        weight = consts[node.input[1]]
        flatten = source(node.input[0], "Reshape")
        after = consumers.get(node.output[0], [])
        if (
            weight.ndim != 2 or flatten is None or flatten.output[0] != node.input[0]
            or flatten.input[1] not in consts
            or list(consts[flatten.input[1]]) != [-1, weight.shape[0]]
            or len(after) != 1 or after[0].op_type != "Reshape"
            or not shape_of_leading_axes(after[0].input[1], flatten.input[0], weight.shape[1])
        ):  # fmt: skip
            continue
        node.input[0] = flatten.input[0]
        node.output[0] = after[0].output[0]
        dropped.add(id(after[0]))
        rewritten += 1
    _replace_nodes(graph, [node for node in graph.node if id(node) not in dropped])
    return rewritten


def _replace_nodes(graph, nodes: list) -> None:
    """Sets the graph's nodes to the live ones of `nodes` and drops unused initializers."""
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _live(nodes: list, outputs: set) -> list:
    """The nodes that contribute to `outputs`, in their original order."""
    producers = {out: node for node in nodes for out in node.output}
    needed, stack = set(), list(outputs)
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    return [node for node in nodes if id(node) in needed]


class _Calibration:
    """onnxruntime `CalibrationDataReader` over tokenized calibration texts."""

    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def write_fp32(graph, out_dir: Path, opset: int = DEFAULT_OPSET, backbone=None) -> dict:
    """Writes the fused fp32 `model.onnx` (tf2onnx, kerasft's graph passes, onnxruntime's fusions).

    Also the starting point of the OpenVINO export, which reads this file.

    Args:
        graph: the `kerasft.exporters.keras_graph.ServingGraph`.
        out_dir: the (temporary) export directory.
        opset: ONNX opset.
        backbone: the KerasHub backbone the graph was traced from (attention weights, heads and
            hidden size for the fusions).

    Returns:
        `{"model_file": "model.onnx", "opset", "fusions"}`.
    """
    import onnx
    import tf2onnx

    raw = out_dir / "raw.onnx"
    proto, _ = tf2onnx.convert.from_function(
        graph.serve, input_signature=graph.serve.input_signature, opset=opset
    )
    global_average_pool_to_reduce_mean(proto)
    attention = fuse_attention(proto, backbone)
    folded = fold_tensordot(proto)
    onnx.save(proto, str(raw))
    fp32 = out_dir / "model.onnx"
    fusions = _optimize(raw, fp32, backbone.num_heads, backbone.hidden_dim)
    fusions["Attention"] = attention
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

    Args:
        fp32: the fused fp32 `model.onnx`.
        feeds: input feeds (`{"token_ids", "padding_mask"}`), e.g. calibration batches.
        work_dir: a scratch directory.

    Returns:
        `[(node name, score), ...]`, sorted by decreasing score.
    """
    import onnx
    import onnxruntime as ort

    def logits(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, feed)[0] for feed in feeds])

    reference = logits(fp32)
    single = work_dir / "single.onnx"
    scores = []
    for name in quantizable_nodes(onnx.load(str(fp32), load_external_data=False)):
        with quantizer_logs_to_debug():
            _quantize(fp32, single, "dynamic", None, {"DefaultTensorType": 1}, only=[name])
        scores.append((name, float(np.mean(np.abs(logits(single) - reference)))))
        single.unlink()
    return sorted(scores, key=lambda item: -item[1])


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
        graph: the `kerasft.exporters.keras_graph.ServingGraph`.
        out_dir: the (temporary) export directory.
        quantize: None, `"dynamic"` or `"static"`.
        opset: ONNX opset.
        backbone: the KerasHub backbone the graph was traced from (attention weights, heads and
            hidden size for the fusions).
        calibration: input feeds `{"token_ids", "padding_mask"}`: static INT8 calibrates on
            them, and `keep_fp32` measures node sensitivity on them.
        keep_fp32: with `"dynamic"`, keep this many nodes in fp32, the ones whose quantization
            alone moves the logits most on `calibration` (`node_sensitivity`).
        sensitivity: a dict that keeps the measured ranking between calls (same graph).

    Returns:
        `{"model_file", "opset", "fusions", "quantization_recipe"}` (+ `"kept_fp32"`, the
        nodes kept and their sensitivity, with `keep_fp32`).
    """
    import onnx

    info = write_fp32(graph, out_dir, opset, backbone)
    fp32 = out_dir / info["model_file"]
    if quantize is None:
        return info
    int8 = out_dir / "model.int8.onnx"
    keep = []
    if quantize == "dynamic" and keep_fp32:
        import tempfile

        sensitivity = {} if sensitivity is None else sensitivity
        if "ranking" not in sensitivity:
            with tempfile.TemporaryDirectory(dir=out_dir) as work:
                sensitivity["ranking"] = node_sensitivity(fp32, calibration, Path(work))
        keep = sensitivity["ranking"][:keep_fp32]
        info["kept_fp32"] = [{"node": n, "mean_abs_logit_diff": v} for n, v in keep]
    # Fused ops (com.microsoft domain) leave some tensors untyped for ONNX shape inference.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    with quantizer_logs_to_debug():
        _quantize(fp32, int8, quantize, calibration, extra, exclude=[n for n, _ in keep])
    fp32.unlink()
    info["model_file"] = int8.name
    info["quantization_recipe"] = (
        "onnxruntime quantize_dynamic, per-channel QInt8 weights"
        + (f", {len(keep)} most sensitive nodes kept in fp32" if keep else "")
        if quantize == "dynamic"
        else "onnxruntime quantize_static, QDQ, per-channel QInt8"
    )
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
