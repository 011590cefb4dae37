"""LiteRT (TFLite) export, fp32 or dynamic-range INT8, for edge devices."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kerasft.exporters.contract import FormatContract, int8

CONTRACT = FormatContract(
    "litert",
    "LiteRT (TFLite) flatbuffer for mobile and embedded devices",
    int8={"dynamic": int8("dynamic", "dynamic-range")},
    cpu_only=True,  # the LiteRT interpreter
    packages=("ai-edge-litert",),
)


def write(graph, out_dir: Path, quantize: str | None = None, **_) -> dict:
    """Converts the serving graph to a `.tflite` flatbuffer with a `serving_default` signature.

    The graph goes through a temporary SavedModel (as `keras.Model.export(format="litert")`
    does), the converter's path that keeps named signatures and dynamic shapes.

    Args:
        graph: the `kerasft.exporters.keras_graph.ServingGraph`.
        out_dir: the (temporary) export directory.
        quantize: None (fp32) or `"dynamic"` (dynamic-range INT8 weights).

    Returns:
        `{"model_file": ...}`.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        graph.write_saved_model(tmp)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        flatbuffer = converter.convert()
    name = "model.int8.tflite" if quantize else "model.tflite"
    (out_dir / name).write_bytes(flatbuffer)
    return {"model_file": name}
