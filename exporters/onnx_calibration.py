"""Calibration for the ONNX export's static INT8 (`--int8 calibrated`): activation ranges read
on real texts, and the outlier channels scaled into their weights first (SmoothQuant's transform
on those channels only) so that one range per input resolves every channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kerasft.exporters.onnx_graph import matmul_integer_to_float, replace_nodes


def _per_text(fp32: Path, tensors: list[str], feeds: list[dict]):
    """Yields the values of `tensors` (a list, in order) of the fp32 model for each feed row,
    run alone and unpadded (as a text is served at batch 1), so padding never counts."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(fp32))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in known
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds:
        for row, width in enumerate(feed["padding_mask"].sum(axis=1)):
            yield session.run(tensors, {k: v[row : row + 1, : int(width)] for k, v in feed.items()})


def activation_ranges(fp32: Path, tensors: list[str], feeds: list[dict]) -> dict:
    """The (min, max) of each of `tensors` of the fp32 model over `feeds`, texts one at a time.

    Returns:
        `{tensor: (min, max)}`.
    """
    low, high = dict.fromkeys(tensors, np.inf), dict.fromkeys(tensors, -np.inf)
    for values in _per_text(fp32, tensors, feeds):
        for name, value in zip(tensors, values, strict=True):
            low[name] = min(low[name], float(value.min()))
            high[name] = max(high[name], float(value.max()))
    return {t: (low[t], high[t]) for t in tensors}


# Calibrated INT8 smooths an input's outlier channels: those whose largest |value| on the
# calibration texts is over OUTLIER_RATIO times the median channel's, at most OUTLIER_CHANNELS
# of them per input (on the reference model, 20 of its 28 weight nodes have such inputs).
OUTLIER_RATIO = 4.0


OUTLIER_CHANNELS = 8


def outlier_scales(fp32: Path, feeds: list[dict]) -> dict:
    """Per-channel scales that bring each weight input's outlier channels into the range of
    its other channels, for `smooth_input_channels`.

    The inputs of `MatMul` nodes with a constant 2-D weight and of onnxruntime's fused
    `Attention` are run on `feeds`, texts one at a time; an input channel whose largest
    |value| is over `OUTLIER_RATIO` x the median channel's (the `OUTLIER_CHANNELS` largest at
    most) gets the scale (its largest |value|) / (the largest of the other channels'), every
    other channel 1.

    Returns:
        `{node name: scales}` for the nodes whose input has outlier channels.
    """
    import onnx

    model = onnx.load(str(fp32))
    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    nodes = [n for n in model.graph.node
             if n.op_type in ("MatMul", "Attention") and n.input[1] in weights]  # fmt: skip
    inputs = sorted({n.input[0] for n in nodes})
    peak = dict.fromkeys(inputs, 0.0)
    for values in _per_text(fp32, inputs, feeds):
        for name, value in zip(inputs, values, strict=True):
            peak[name] = np.maximum(peak[name], np.abs(value).reshape(-1, value.shape[-1]).max(0))
    scales = {}
    for node in nodes:
        a = peak[node.input[0]]
        top = np.argsort(-a, kind="stable")[:OUTLIER_CHANNELS]
        top = top[a[top] > OUTLIER_RATIO * np.median(a)]
        rest = np.delete(a, top).max() if len(top) < len(a) else 0.0
        if len(top) and rest > 0:
            s = np.ones(len(a), dtype=np.float32)
            s[top] = a[top] / rest
            scales[node.name] = s
    return scales


def smooth_outliers(fp32: Path, feeds: list[dict]) -> int:
    """Rewrites `fp32` with its weight inputs' outlier channels moved into the weights
    (`outlier_scales`, `smooth_input_channels`); returns the nodes rewritten."""
    import onnx

    scales = outlier_scales(fp32, feeds)
    model = onnx.load(str(fp32))
    rewritten = smooth_input_channels(model, scales)
    onnx.save(model, str(fp32))
    return rewritten


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
    if not dynamic:  # e.g. only the embedding Gather quantized: no activation to calibrate
        return 0
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


def smooth_input_channels(model, scales: dict) -> int:
    """Moves each listed node's per-channel input scale into its weight: `x @ W` becomes
    `(x * (1 / s)) @ (s[:, None] * W)`, the same product (SmoothQuant's transform).

    Used before INT8 quantization on the inputs that have a few outlier channels (BERT's
    feed-forward inputs have one or two channels 5-15x larger than the rest): divided by `s`,
    those channels fall in the range of the others, so the input's one quantization range
    resolves every channel finely; `W`'s rows grow by `s`, which its per-column ranges absorb.
    The division is a `Mul` by the constant `1 / s` before the node (it cannot fold into the
    producer: a `LayerNormalization` whose output the residual also reads, or a GELU).

    Args:
        model: an `onnx.ModelProto`, rewritten in place.
        scales: `{node name: s}` for `MatMul` nodes with a constant 2-D weight `(channels, n)`
            and onnxruntime's fused `Attention` (weight `(channels, 3 x hidden)`), `s` a float
            vector of one entry per input channel.

    Returns:
        The number of nodes whose input was scaled.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes, divided, rewritten = [], {}, 0
    for node in graph.node:
        s = scales.get(node.name)
        if s is None:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        s = np.asarray(s, dtype=np.float32)
        if weight.ndim != 2 or weight.shape[0] != s.shape[0]:
            raise ValueError(f"{node.name}: weight {weight.shape} does not match {s.shape[0]} "
                             "input channels")  # fmt: skip
        p = f"{node.name}_smooth"
        scaled = (weight * s[:, None]).astype(weight.dtype)
        if readers[node.input[1]] == 1:
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
        else:  # a weight other nodes read too: a scaled copy of its own
            graph.initializer.append(numpy_helper.from_array(scaled, f"{p}_weight"))
            node.input[1] = f"{p}_weight"
        key = (node.input[0], s.tobytes())  # one division for the nodes reading one input
        if key not in divided:
            graph.initializer.append(numpy_helper.from_array(1.0 / s, f"{p}_inverse"))
            nodes.append(helper.make_node("Mul", [node.input[0], f"{p}_inverse"],
                                          [f"{p}_input"], name=p))  # fmt: skip
            divided[key] = f"{p}_input"
        node.input[0] = divided[key]
        nodes.append(node)
        rewritten += 1
    replace_nodes(graph, nodes)
    return rewritten
