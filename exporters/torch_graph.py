"""The PyTorch graph ONNX and OpenVINO are exported from: no TensorFlow needed.

A run's `.keras` file is backend-neutral: whatever backend trained it, it is loaded here under
the PyTorch backend, wrapped in a `torch.nn.Module` taking `token_ids` and `padding_mask`
(int32, dynamic batch and sequence axes) and returning the logits, and written to ONNX by
`torch.onnx.export` (its TorchScript exporter, the one Keras' own `model.export(format="onnx")`
uses on PyTorch for dynamic axes). `kerasft.exporters.onnx` then fuses that graph as it fuses
tf2onnx's, and OpenVINO reads the fused ONNX.

Why PyTorch and not TensorFlow for these formats: `benchmarks/results/graph_source.md` (both
sources, same run, same machine): the fused graphs hold the same operators, give the same logits
and run at the same speed, fp32 and INT8, so the source that needs no TensorFlow is the default.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

INPUTS = ("token_ids", "padding_mask")


class TorchServingGraph:
    """`serve(token_ids, padding_mask) -> {"logits"}` of a classifier on the PyTorch backend.

    Args:
        classifier: a KerasHub text classifier loaded under the PyTorch backend.
        fixed_shape: `(batch, sequence)`; None keeps an axis dynamic.

    Raises:
        RuntimeError: if the Keras backend is not PyTorch.

    Example:
        >>> graph = TorchServingGraph(classifier)
        >>> graph.write_onnx("raw.onnx", opset=17)
    """

    source = "torch"

    def __init__(self, classifier, fixed_shape: tuple[int | None, int | None] = (None, None)):
        import keras
        import torch

        # lazy: loads Keras; importing the format registry must not
        from kerasft.training.recipe import core_model

        if keras.backend.backend() != "torch":
            raise RuntimeError(
                "ONNX and OpenVINO exports are traced under the PyTorch backend. "
                f"Received: backend={keras.backend.backend()!r}"
            )
        # The last layer at [CLS] alone, as training and `predict` run it (`kerasft.model.encoder`).
        self.model = core = core_model(classifier, skip_padding=False)
        self.fixed_shape = tuple(fixed_shape)

        class Serve(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.core = core

            def forward(self, token_ids, padding_mask):
                return self.core(
                    {"token_ids": token_ids, "padding_mask": padding_mask}, training=False
                )

        self.module = Serve().eval()

    def serve(self, token_ids, padding_mask) -> dict:
        """The logits (`{"logits": numpy array}`) of one feed."""
        import torch

        with torch.no_grad():
            logits = self.module(torch.as_tensor(token_ids), torch.as_tensor(padding_mask))
        return {"logits": logits.detach().cpu().numpy()}

    def write_onnx(self, path: str | Path, opset: int) -> None:
        """Writes the graph to `path` with `torch.onnx.export` (TorchScript exporter)."""
        import torch

        batch, sequence = self.fixed_shape
        example = np.ones((batch or 2, sequence or 16), dtype="int32")
        axes = {i: name for i, name in ((0, "batch"), (1, "sequence")) if not self.fixed_shape[i]}
        dynamic_axes = {name: axes for name in INPUTS if axes}
        if 0 in axes:
            dynamic_axes["logits"] = {0: "batch"}
        with warnings.catch_warnings(), torch.no_grad():
            # TorchScript tracing warns about every Python int taken from a shape: expected.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self.module,
                (torch.as_tensor(example), torch.as_tensor(example)),
                str(path),
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
