"""The one TensorFlow graph every format is exported from.

Whatever backend trained the model, its `.keras` file is backend-neutral: it is loaded here under
the TensorFlow backend and traced once into a `tf.function` taking `token_ids` and
`padding_mask` (int32, dynamic batch and sequence axes) and returning `logits`. SavedModel,
ONNX (tf2onnx) and LiteRT are all written from that function, so every export of a run is the
same model, numerically.
"""

from __future__ import annotations

import contextlib
import math


def erf_gelu(x):
    """Exact GELU as `0.5 * x * (1 + erf(x / sqrt(2)))`.

    TensorFlow's exact GELU is written with `erfc`, which tf2onnx emits as an `Erfc` node that
    onnxruntime rejects. This form is the same function (equal to float rounding) and traces to
    `Erf`, which onnxruntime runs and its transformer optimizer fuses into one `Gelu` op.
    """
    from keras import ops

    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))


@contextlib.contextmanager
def onnx_friendly_gelu(classifier):
    """Temporarily swaps each encoder's feed-forward GELU for `erf_gelu` (restored on exit)."""
    dense_layers = [
        layer._feedforward_intermediate_dense for layer in classifier.backbone.transformer_layers
    ]
    saved = [dense.activation for dense in dense_layers]
    try:
        for dense in dense_layers:
            dense.activation = erf_gelu
        yield classifier
    finally:
        for dense, activation in zip(dense_layers, saved, strict=True):
            dense.activation = activation


class ServingGraph:
    """A Keras `ExportArchive` with one `serve(token_ids, padding_mask) -> {"logits"}` endpoint.

    `ExportArchive` tracks the Keras variables the way TensorFlow's savers and converters
    expect (a hand-made `tf.Module` saves fine but the LiteRT converter then reads Keras
    embedding tables as garbage with TF 2.21).

    Args:
        classifier: a KerasHub text classifier loaded under the TensorFlow backend.
        fixed_shape: `(batch, sequence)`; None keeps an axis dynamic.

    Raises:
        RuntimeError: if the Keras backend is not TensorFlow.
    """

    def __init__(self, classifier, fixed_shape: tuple[int | None, int | None] = (None, None)):
        import keras
        import tensorflow as tf

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "Exports are traced under the TensorFlow backend. "
                f"Received: backend={keras.backend.backend()!r}"
            )
        self.model = core = keras.Model(classifier.input, classifier.output)

        def serve(token_ids, padding_mask):
            logits = core({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
            return {"logits": logits}

        # add_endpoint tracks every variable the endpoint uses; an extra `track(core)` would
        # store each weight a second time in the SavedModel.
        self.archive = keras.export.ExportArchive()
        self.serve = self.archive.add_endpoint(
            "serve",
            serve,
            input_signature=[
                tf.TensorSpec(list(fixed_shape), tf.int32, name="token_ids"),
                tf.TensorSpec(list(fixed_shape), tf.int32, name="padding_mask"),
            ],
        )

    def write_saved_model(self, path) -> None:
        """Writes a SavedModel whose `serving_default` signature is `serve`."""
        self.archive.write_out(str(path), verbose=False)
