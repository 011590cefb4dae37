"""TF SavedModel export (`saved_model/` with a `serving_default` signature)."""

from __future__ import annotations

from pathlib import Path

from kerasft.exporters.contract import FormatContract, int8

CONTRACT = FormatContract(
    "saved_model",
    "TF SavedModel with a serving_default signature (TensorFlow serving)",
    int8={"keras": int8("keras", "Keras quantize('int8')")},
)


def write(graph, out_dir: Path, **_) -> dict:
    """Saves the serving graph as a SavedModel under `out_dir / "saved_model"`.

    Args:
        graph: the `kerasft.exporters.keras_graph.ServingGraph`.
        out_dir: the (temporary) export directory.

    Returns:
        `{"model_file": "saved_model"}`.
    """
    graph.write_saved_model(out_dir / "saved_model")
    return {"model_file": "saved_model"}
