"""kerasft's ONNX graph passes keep the function: each rewritten graph gives onnxruntime's
outputs of the original, and a graph outside a pass's pattern is left alone."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kerasft.exporters.onnx_calibration import smooth_input_channels
from kerasft.exporters.onnx_graph import (
    drop_index_wrap,
    drop_redundant_expand,
    fold_head_bias,
)

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, output, inits):
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(output, F, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _head_split(bias_shape, cast=True):
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.normal(size=(8, 6)).astype("float32"),
        "shape": np.array([0, 0, 2, 3], dtype="int64"),
        "b": rng.normal(size=bias_shape).astype("float32"),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Reshape", ["mm", "shape"], ["split"]),
        *([helper.make_node("Cast", ["split"], ["cast"], to=F)] if cast else []),
        helper.make_node("Add", ["cast" if cast else "split", "b"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", F, [None, None, 8])
    return _model(nodes, [x], "y", inits)


@pytest.mark.parametrize("bias_shape, cast", [((2, 3), True), ((1, 1, 2, 3), False)])
def test_fold_head_bias_adds_before_the_split(bias_shape, cast):
    model = _head_split(bias_shape, cast)
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype("float32")
    before = _run(model, {"x": x})
    assert fold_head_bias(model) == 1
    assert _ops(model) == ["MatMul", "Add", "Reshape"]
    np.testing.assert_allclose(_run(model, {"x": x}), before, rtol=1e-6, atol=1e-6)


def test_fold_head_bias_leaves_a_bias_of_another_shape():
    model = _head_split((3,))  # broadcasts over the head axis only: not a (heads, size) bias
    assert fold_head_bias(model) == 0 and "Cast" in _ops(model)


def _lookup(n_rows: int, axis: int = 0):
    inits = {
        "table": np.arange(n_rows * 4, dtype="float32").reshape(n_rows, 4),
        "zero": np.array(0, dtype="int64"),
        "n": np.array(n_rows, dtype="int64"),
    }
    nodes = [
        helper.make_node("Less", ["ids", "zero"], ["negative"]),
        helper.make_node("Add", ["ids", "n"], ["wrapped"]),
        helper.make_node("Where", ["negative", "wrapped", "ids"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["y"], axis=axis),
    ]
    ids = helper.make_tensor_value_info("ids", I64, [None, None])
    return _model(nodes, [ids], "y", inits)


def test_drop_index_wrap_keeps_negative_ids_meaning():
    model = _lookup(10)
    ids = np.array([[0, 3, 9, -1, -10]], dtype="int64")
    before = _run(model, {"ids": ids})
    assert drop_index_wrap(model) == 1
    assert _ops(model) == ["Gather"]  # ONNX Gather counts a negative index from the back
    np.testing.assert_array_equal(_run(model, {"ids": ids}), before)


def test_drop_index_wrap_needs_the_table_length():
    model = _lookup(10)
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array(7, dtype="int64"), "n"))
    assert drop_index_wrap(model) == 0 and "Where" in _ops(model)


def _positions(consumer: str = "Add"):
    rng = np.random.default_rng(0)
    inits = {"table": rng.normal(size=(16, 4)).astype("float32"),
             "starts": np.array([0], dtype="int64"), "axes": np.array([0], dtype="int64"),
             "one": np.array([1], dtype="int64")}  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["tokens"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
        helper.make_node("Slice", ["table", "starts", "length", "axes"], ["positions"]),
        helper.make_node("Expand", ["positions", "shape"], ["expanded"]),
        helper.make_node(consumer, ["tokens", "expanded"], ["y"]),
    ]
    tokens = helper.make_tensor_value_info("tokens", F, ["batch", "sequence", 4])
    return _model(nodes, [tokens], "y", inits)


def test_drop_redundant_expand_where_the_other_operand_has_its_shape():
    model = _positions()
    tokens = np.random.default_rng(2).normal(size=(3, 7, 4)).astype("float32")
    before = _run(model, {"tokens": tokens})
    assert drop_redundant_expand(model) == 1
    assert "Expand" not in _ops(model)
    np.testing.assert_allclose(_run(model, {"tokens": tokens}), before, rtol=0, atol=0)


def test_drop_redundant_expand_keeps_an_expand_that_sets_the_shape():
    model = _positions(consumer="Concat")  # not elementwise: the Expand's shape is the output's
    for node in model.graph.node:
        if node.op_type == "Concat":
            node.attribute.append(helper.make_attribute("axis", 0))
    assert drop_redundant_expand(model) == 0 and "Expand" in _ops(model)


def _two_products():
    rng = np.random.default_rng(2)
    inits = {"w1": rng.normal(size=(4, 3)).astype("float32"),
             "w2": rng.normal(size=(4, 3)).astype("float32")}  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="m1"),
        helper.make_node("MatMul", ["x", "w2"], ["m2"], name="m2"),
        helper.make_node("Add", ["m1", "m2"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [None, None, 4])], "y", inits)


def test_smooth_input_channels_keeps_the_product():
    model = _two_products()
    x = np.random.default_rng(3).normal(size=(2, 5, 4)).astype("float32")
    x[..., 1] *= 30  # an outlier channel
    before = _run(model, {"x": x})
    s = np.array([1, 30, 1, 1], dtype="float32")
    assert smooth_input_channels(model, {"m1": s, "m2": s}) == 2
    assert _ops(model) == ["Mul", "MatMul", "MatMul", "Add"]  # one division for both readers
    np.testing.assert_allclose(_run(model, {"x": x}), before, rtol=1e-5, atol=1e-4)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(inits[model.graph.node[0].input[1]], 1 / s)
    with pytest.raises(ValueError, match=r"m1: weight \(4, 3\) does not match 5 input channels"):
        smooth_input_channels(_two_products(), {"m1": np.ones(5)})


def test_outlier_scales_pick_the_outlier_channels(tmp_path):
    import onnx

    from kerasft.exporters.onnx_calibration import outlier_scales

    channels = np.array([1.0, -1.2, 40.0, 0.8, 1.1, 0.9], dtype="float32")  # channel 2 outlies
    nodes = [
        helper.make_node("Cast", ["token_ids"], ["ids"], to=F),
        helper.make_node("Unsqueeze", ["ids", "axis"], ["column"]),
        helper.make_node("Mul", ["column", "channels"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="product"),
    ]
    inputs = [
        helper.make_tensor_value_info("token_ids", I64, [None, None]),
        helper.make_tensor_value_info("padding_mask", TensorProto.INT32, [None, None]),
    ]
    w = np.ones((6, 2), dtype="float32")
    model = _model(nodes, inputs, "y", {"axis": np.array([-1]), "channels": channels, "w": w})
    onnx.save(model, str(tmp_path / "m.onnx"))
    ids = np.array([[2, 3, 0], [1, 0, 0]])
    feeds = [{"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}]
    s = outlier_scales(tmp_path / "m.onnx", feeds)["product"]
    # 40 x 3 brought to the largest other channel's peak, 1.2 x 3
    np.testing.assert_allclose(s, [1, 1, 40 / 1.2, 1, 1, 1], rtol=1e-6)
