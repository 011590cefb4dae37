"""Each Keras attention block of a traced graph as onnxruntime's fused `Attention` operator.

A pass of the ONNX export (`kerasft.exporters.onnx`), beside `onnx_graph`'s: it keeps the
function the graph computes and returns how many blocks it fused, which the manifest records.
The blocks are found by their node names where the tracer kept Keras' layer names, else by the
weights they read.
"""

from __future__ import annotations

import re

import numpy as np

from kerasft.exporters.onnx_graph import replace_nodes

# tf2onnx's node names: `.../transformer_layer_3/self_attention_layer/query/Add`, or for the
# last layer, which `kerasft.model.encoder.ClsEncoder` calls at [CLS] itself,
# `.../cls_encoder/self_attention_layer/query/Add` (no layer index: the last one).
_LAYER = r"(?:transformer_layer_(\d+)[^/]*|cls_encoder[^/]*)/self_attention_layer[^/]*/"


_QUERY_ADD = re.compile(_LAYER + r"query[^/]*/Add$")


_KEY_ADD = re.compile(_LAYER + r"key[^/]*/Add$")


_OUTPUT_ADD = re.compile(_LAYER + r"attention_output[^/]*/BiasAdd$")


def _attention_input(producers: dict, query_add) -> str:
    """Walks up the query projection (Squeeze/Reshape/MatMul/Unsqueeze) to the block's input."""
    tensor = query_add.input[0]
    while tensor in producers and producers[tensor].op_type in (
        "Squeeze", "Reshape", "MatMul", "Gemm", "Unsqueeze",
    ):  # fmt: skip
        tensor = producers[tensor].input[0]
    return tensor


def _blocks_by_name(graph, backbone) -> dict:
    """tf2onnx graphs: `{layer: (query input, key/value input, output-projection bias add
    node)}` by node names."""
    producers = {out: node for node in graph.node for out in node.output}
    last = backbone.num_layers - 1

    def layer(match) -> int:
        return last if match.group(1) is None else int(match.group(1))

    found = [
        {layer(pattern.search(n.name)): n for n in graph.node if pattern.search(n.name)}
        for pattern in (_QUERY_ADD, _KEY_ADD, _OUTPUT_ADD)
    ]
    if any(sorted(nodes) != list(range(backbone.num_layers)) for nodes in found):
        return {}
    queries, keys, outputs = found
    return {
        i: (_attention_input(producers, queries[i]), _attention_input(producers, keys[i]),
            outputs[i])
        for i in queries
    }  # fmt: skip


def _blocks_by_weights(graph, backbone) -> dict:
    """Any producer (`torch.onnx` names nodes `/m/Einsum_5`): `{layer: (query input, key/value
    input, output-projection bias add node)}`, found by the Keras weights the graph holds.

    The query, key and output projections are the nodes that read the constants equal to the
    layer's query, key and output kernels (trained or random: one per layer; biases are not used
    to find nodes, since equal ones, e.g. all zero, may be one shared constant). The query's and
    the key's data inputs, looked up through `Cast`s, are the block's inputs (the same tensor
    but in a last layer computed at `[CLS]` alone); the output is the `Add` that follows the
    output projection, through `Cast`s. Where any of this is ambiguous, `{}` (no fusion).
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
        key = reader_of(att.key_dense.kernel, ("Einsum", "MatMul"))
        out_add = add_after(reader_of(att.output_dense.kernel, ("Einsum", "MatMul")))
        if query is None or key is None or out_add is None:
            return {}
        inputs = []
        for x in (query.input[0], key.input[0]):
            while x in producers and producers[x].op_type == "Cast":
                x = producers[x].input[0]
            inputs.append(x)
        blocks[i] = (*inputs, out_add)
    if len({id(block[-1]) for block in blocks.values()}) < len(blocks):
        return {}
    return blocks


def fuse_attention(model, backbone, mask_input: str = "padding_mask") -> int:
    """Replaces each Keras self-attention block with one of onnxruntime's fused attention ops.

    Neither tf2onnx nor `torch.onnx` writes Keras' einsum-based `MultiHeadAttention`
    (projections, masked softmax, transposes) in a shape onnxruntime's attention fusion
    recognises. Here each block, from its input to the output projection's bias add, becomes
    `com.microsoft.Attention(x, W_qkv, b_qkv, padding_mask)` followed by the output projection
    as `MatMul` + `Add`, with the weights taken from the Keras layers; the nodes left unused are
    removed. A block whose queries are not its keys (the last layer, computed at `[CLS]` alone:
    `kerasft.model.encoder`) becomes the query, key and value projections as `MatMul`s and
    `com.microsoft.MultiHeadAttention(q, k, v, b_qkv, padding_mask)`. The blocks are found by
    tf2onnx's node names, else by the weights they read. `Attention` is what onnxruntime's
    dynamic quantizer turns into `QAttention`. Export verification compares the result with the
    Keras model.

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
        x, kv, output = blocks[i]
        if x == kv:
            attention = [helper.make_node(
                "Attention", [x, f"{p}_qkv_weight", f"{p}_qkv_bias", mask_input], [f"{p}_context"],
                name=f"{p}", domain="com.microsoft", num_heads=backbone.num_heads,
            )]  # fmt: skip
        else:
            graph.initializer.extend(
                numpy_helper.from_array(np.ascontiguousarray(w), f"{p}_{n}_weight")
                for w, n in zip(np.split(w_qkv, 3, axis=1), "qkv", strict=True)
            )
            attention = [
                helper.make_node("MatMul", [source, f"{p}_{n}_weight"], [f"{p}_{n}"],
                                 name=f"{p}_{n}_MatMul")
                for source, n in ((x, "q"), (kv, "k"), (kv, "v"))
            ] + [helper.make_node(
                "MultiHeadAttention",
                [f"{p}_q", f"{p}_k", f"{p}_v", f"{p}_qkv_bias", mask_input], [f"{p}_context"],
                name=f"{p}", domain="com.microsoft", num_heads=backbone.num_heads,
            )]  # fmt: skip
        new_nodes[output.name] = attention + [
            helper.make_node("MatMul", [f"{p}_context", f"{p}_out_weight"], [f"{p}_projected"],
                             name=f"{p}_out_MatMul"),
            helper.make_node("Add", [f"{p}_projected", f"{p}_out_bias"], list(output.output),
                             name=f"{p}_out_Add"),
        ]  # fmt: skip
    nodes = []
    for node in graph.node:
        nodes += new_nodes.get(node.name, [node])
    replace_nodes(graph, nodes)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(new_nodes)
