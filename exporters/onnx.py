"""ONNX export: `torch.onnx` (or tf2onnx), onnxruntime's transformer fusions, optional INT8.

INT8 recipes (onnxruntime's quantization tools):
- `calibrated`: `quantize_dynamic`'s integer graph (`MatMulInteger`, `QAttention`, INT8 weights),
  with each activation's quantization range calibrated once on training texts (onnxruntime's
  MinMax calibrator) instead of measured per call: the same integer kernels, and a text's output
  no longer depends on the rest of its batch.
- `dynamic`: `quantize_dynamic`, INT8 weights (MatMul, embedding Gather), activations quantized on
  the fly, over the whole batch.
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


def _blocks_by_name(graph, backbone) -> dict:
    """tf2onnx graphs: `{layer: (block input, output-projection bias add node)}` by node names."""
    producers = {out: node for node in graph.node for out in node.output}
    queries = {int(_QUERY_ADD.search(n.name).group(1)): n for n in graph.node
               if _QUERY_ADD.search(n.name)}  # fmt: skip
    outputs = {int(_OUTPUT_ADD.search(n.name).group(1)): n for n in graph.node
               if _OUTPUT_ADD.search(n.name)}  # fmt: skip
    if sorted(queries) != list(range(backbone.num_layers)) or sorted(outputs) != sorted(queries):
        return {}
    return {i: (_attention_input(producers, queries[i]), outputs[i]) for i in queries}


def _blocks_by_weights(graph, backbone) -> dict:
    """Any producer (`torch.onnx` names nodes `/m/Einsum_5`): `{layer: (block input,
    output-projection bias add node)}`, found by the Keras weights the graph holds.

    The query and output projections are the nodes that read the constants equal to the layer's
    query and output kernels (trained or random: one per layer; biases are not used to find
    nodes, since equal ones, e.g. all zero, may be one shared constant). The query's data
    input, looked up through `Cast`s, is the block input; the output is the `Add` that follows
    the output projection, through `Cast`s. Where any of this is ambiguous, `{}` (no fusion).
    """
    from onnx import numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    consts = [(i.name, numpy_helper.to_array(i)) for i in graph.initializer]

    def reader_of(weight, op_types):
        weight = np.asarray(weight.numpy(), dtype="float32")
        names = [n for n, v in consts if v.shape == weight.shape and np.array_equal(v, weight)]
        nodes = [r for n in names for r in readers.get(n, []) if r.op_type in op_types]
        return nodes[0] if len(nodes) == 1 else None

    def add_after(node):
        while node is not None and node.op_type != "Add":
            following = readers.get(node.output[0], [])
            ok = len(following) == 1 and following[0].op_type in ("Cast", "Add")
            node = following[0] if ok else None
        return node

    blocks = {}
    for i, layer in enumerate(backbone.transformer_layers):
        att = layer._self_attention_layer
        query = reader_of(att.query_dense.kernel, ("Einsum", "MatMul"))
        out_add = add_after(reader_of(att.output_dense.kernel, ("Einsum", "MatMul")))
        if query is None or out_add is None:
            return {}
        x = query.input[0]
        while x in producers and producers[x].op_type == "Cast":
            x = producers[x].input[0]
        blocks[i] = (x, out_add)
    if len({id(add) for _, add in blocks.values()}) < len(blocks):
        return {}
    return blocks


def fuse_attention(model, backbone, mask_input: str = "padding_mask") -> int:
    """Replaces each Keras self-attention block with onnxruntime's fused `Attention` operator.

    Neither tf2onnx nor `torch.onnx` writes Keras' einsum-based `MultiHeadAttention`
    (projections, masked softmax, transposes) in a shape onnxruntime's attention fusion
    recognises. Here each block, from its input to the output projection's bias add, becomes
    `com.microsoft.Attention(x, W_qkv, b_qkv, padding_mask)` followed by the output projection
    as `MatMul` + `Add`, with the weights taken from the Keras layers; the nodes left unused are
    removed. The blocks are found by tf2onnx's node names, else by the weights they read. The
    fused operator is what onnxruntime's dynamic quantizer turns into `QAttention`. Export
    verification compares the result with the Keras model.

    Args:
        model: an `onnx.ModelProto` of the serving graph (tf2onnx or `torch.onnx`).
        backbone: the KerasHub `DistilBertBackbone` the graph was traced from.
        mask_input: the graph input holding the `(batch, sequence)` 0/1 padding mask.

    Returns:
        The number of attention blocks fused.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    blocks = _blocks_by_name(graph, backbone) or _blocks_by_weights(graph, backbone)
    if not blocks:
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
        x, output = blocks[i]
        new_nodes[output.name] = [
            helper.make_node(
                "Attention", [x, f"{p}_qkv_weight", f"{p}_qkv_bias", mask_input], [f"{p}_context"],
                name=f"{p}", domain="com.microsoft", num_heads=backbone.num_heads,
            ),
            helper.make_node("MatMul", [f"{p}_context", f"{p}_out_weight"], [f"{p}_projected"],
                             name=f"{p}_out_MatMul"),
            helper.make_node("Add", [f"{p}_projected", f"{p}_out_bias"], list(output.output),
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


ATTENTION = ("onnxruntime", "traced")


def lower_einsum(model) -> int:
    """Rewrites each attention projection's `Einsum` with a constant kernel as `MatMul` + `Reshape`.

    Keras' `EinsumDense` projections reach ONNX as `Einsum("abc,cde->abde", x, W)` (query, key,
    value: hidden -> heads x head size) and `Einsum("abcd,cde->abe", x, W)` (output: heads x
    head size -> hidden). Here they become `MatMul(x, W as (c, d*e))` then `Reshape` to
    `(0, 0, d, e)`, and `Reshape` of x to `(0, 0, c*d)` then `MatMul(W as (c*d, e))` (a 0 in an
    ONNX `Reshape` copies that axis, so batch and sequence stay dynamic): the same arithmetic,
    in the plain form engines quantize and fuse. OpenVINO keeps the einsums as `Einsum` ops:
    with them its fp32 IR ran 1.09-1.20x slower than with MatMuls, side by side on an AMX Xeon
    at 2 threads when this was written. Einsums of other equations, or without a constant
    kernel, are left alone.

    Returns:
        The number of `Einsum` nodes rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        equation = attrs.get("equation", b"")
        equation = equation.decode() if isinstance(equation, bytes) else equation
        kernel = node.input[1] if node.op_type == "Einsum" and len(node.input) == 2 else None
        if kernel not in inits or equation not in ("abc,cde->abde", "abcd,cde->abe"):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[kernel])
        x, out, p = node.input[0], node.output[0], f"kerasft_einsum_{rewritten}"
        if equation == "abc,cde->abde":  # project, then split the heads
            weight, shape = w.reshape(w.shape[0], -1), [0, 0, *w.shape[1:]]
            steps = [("MatMul", [x, f"{p}_weight"], f"{p}_product"),
                     ("Reshape", [f"{p}_product", f"{p}_shape"], out)]  # fmt: skip
        else:  # merge the heads, then project
            weight = w.reshape(-1, w.shape[-1])
            shape = [0, 0, weight.shape[0]]
            steps = [("Reshape", [x, f"{p}_shape"], f"{p}_merged"),
                     ("MatMul", [f"{p}_merged", f"{p}_weight"], out)]  # fmt: skip
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(weight), f"{p}_weight"),
            numpy_helper.from_array(np.array(shape, dtype="int64"), f"{p}_shape"),
        ])  # fmt: skip
        nodes += [helper.make_node(op, i, [o], name=f"{p}_{op}") for op, i, o in steps]
        rewritten += 1
    _replace_nodes(graph, nodes)
    return rewritten


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
            projections as MatMuls (`lower_einsum`), and no onnxruntime fusion: the graph
            OpenVINO reads, whose front end fuses each block into its own
            `ScaledDotProductAttention` (and breaks onnxruntime's `Attention` back into MatMuls
            and a Softmax).

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
        graph: the serving graph (see `write_fp32`).
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
    if quantize in ("dynamic", "calibrated") and keep_fp32:
        import tempfile

        sensitivity = {} if sensitivity is None else sensitivity
        if "ranking" not in sensitivity:
            with tempfile.TemporaryDirectory(dir=out_dir) as work:
                sensitivity["ranking"] = node_sensitivity(fp32, calibration, Path(work))
        keep = sensitivity["ranking"][:keep_fp32]
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
    kept = f", {len(keep)} most sensitive nodes kept in fp32" if keep else ""
    info["quantization_recipe"] = {
        "dynamic": "onnxruntime quantize_dynamic, per-channel QInt8 weights" + kept,
        "calibrated": "onnxruntime quantize_dynamic, per-channel QInt8 weights, activation ranges "
        "calibrated (MinMax, one text at a time)" + kept,
        "static": "onnxruntime quantize_static, QDQ, per-channel QInt8",
    }[quantize]
    return info


def activation_ranges(fp32: Path, tensors: list[str], feeds: list[dict]) -> dict:
    """The (min, max) of each of `tensors` of the fp32 model over `feeds`, texts one at a time.

    Each feed row is run alone and unpadded (as a text is served at batch 1), so padding
    positions never widen a range.

    Returns:
        `{tensor: (min, max)}`.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(fp32))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in known
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    low, high = dict.fromkeys(tensors, np.inf), dict.fromkeys(tensors, -np.inf)
    for feed in feeds:
        for row, width in enumerate(feed["padding_mask"].sum(axis=1)):
            one = {k: v[row : row + 1, : int(width)] for k, v in feed.items()}
            for name, value in zip(tensors, session.run(tensors, one), strict=True):
                low[name] = min(low[name], float(value.min()))
                high[name] = max(high[name], float(value.max()))
    return {t: (low[t], high[t]) for t in tensors}


def calibrate_activation_ranges(fp32: Path, int8: Path, calibration: list[dict]) -> int:
    """Turns `quantize_dynamic`'s per-call activation quantization into calibrated constants.

    Each `DynamicQuantizeLinear(x) -> (x_q, scale, zero_point)` of the INT8 model becomes
    `QuantizeLinear(x, scale, zero_point)` with uint8 asymmetric constants from the range of `x`
    on `calibration` (`activation_ranges`, widened to include 0). The integer nodes it feeds
    (`MatMulInteger`, which onnxruntime fuses into `MatMulIntegerToFloat`, and `QAttention`)
    are unchanged, so the model computes in integers as fast as before; a text's output no
    longer depends on the other texts of its batch. Values outside the calibrated range
    saturate.

    Args:
        fp32: the fused fp32 model the INT8 one was quantized from (same tensor names).
        int8: the `quantize_dynamic` model, rewritten in place.
        calibration: input feeds of training texts.

    Returns:
        The number of activations given constant ranges.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(int8))
    dynamic = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    ranges = activation_ranges(fp32, [n.input[0] for n in dynamic], calibration)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        low, high = ranges[node.input[0]]
        low, high = min(low, 0.0), max(high, 0.0)
        scale = np.float32((high - low) / 255.0 or 1.0)
        zero_point = np.uint8(np.clip(round(-low / scale), 0, 255))
        x_q, scale_name, zero_point_name = node.output
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(scale, dtype="float32"), scale_name),
            numpy_helper.from_array(np.array(zero_point, dtype="uint8"), zero_point_name),
        ])  # fmt: skip
        nodes.append(
            helper.make_node(
                "QuantizeLinear", [node.input[0], scale_name, zero_point_name], [x_q],
                name=f"{node.name}_calibrated",
            )
        )  # fmt: skip
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    matmul_integer_to_float(model)
    onnx.save(model, str(int8))
    return len(dynamic)


def matmul_integer_to_float(model) -> int:
    """Writes each `MatMulInteger -> Cast -> Mul(a_scale * b_scale)` as one
    `com.microsoft.MatMulIntegerToFloat`.

    onnxruntime makes this fusion itself when the activation scale comes from a
    `DynamicQuantizeLinear`, but not when it is a constant (the scale product is folded
    first and the pattern no longer matches), which left the calibrated model with three nodes
    where the dynamic one has one. Same arithmetic, in one kernel.

    Returns:
        The number of `MatMulInteger` nodes rewritten.
    """
    from onnx import helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    replaced, rewritten = {}, 0
    for node in graph.node:
        after = readers.get(node.output[0], []) if node.op_type == "MatMulInteger" else []
        cast = after[0] if len(after) == 1 and after[0].op_type == "Cast" else None
        scaled = readers.get(cast.output[0], []) if cast is not None else []
        if len(scaled) != 1 or scaled[0].op_type != "Mul":
            continue
        mul = scaled[0]
        scales = producers.get(mul.input[1])
        if scales is None or scales.op_type != "Mul" or len(node.input) != 4:
            continue
        a, b, a_zero_point, b_zero_point = node.input
        replaced[mul.name] = helper.make_node(
            "MatMulIntegerToFloat",
            [a, b, scales.input[0], scales.input[1], a_zero_point, b_zero_point],
            list(mul.output), name=f"{node.name}_to_float", domain="com.microsoft",
        )  # fmt: skip
        rewritten += 1
    _replace_nodes(graph, [replaced.get(node.name, node) for node in graph.node])
    return rewritten


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
