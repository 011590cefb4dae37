"""The TensorFlow graph SavedModel and LiteRT are exported from (ONNX and OpenVINO on request).

Whatever backend trained the model, its `.keras` file is backend-neutral: it is loaded here under
the TensorFlow backend and traced once into a `tf.function` taking `token_ids` and
`padding_mask` (int32, dynamic batch and sequence axes) and returning `logits`. SavedModel and
LiteRT are written from that function, and ONNX through tf2onnx with `graph_source="tensorflow"`
(by default ONNX and OpenVINO are traced under PyTorch: `kerasft.exporters.torch_graph`). Also
here: `onnx_friendly_ops`, the GELU and LayerNorm forms both ONNX sources trace, and
`fused_attention`, which every format's serving graph is traced under.
"""

from __future__ import annotations

import contextlib
import math


def erf_gelu(x):
    """Exact GELU as `x * (1 + erf(x / sqrt(2))) * 0.5`.

    TensorFlow's exact GELU is written with `erfc`, which tf2onnx emits as an `Erfc` node that
    onnxruntime rejects. This form is the same function (equal to float rounding), traces to
    `Erf`, and in this operand order matches onnxruntime's GELU fusion pattern.
    """
    from keras import ops

    return (x * (1.0 + ops.erf(x / math.sqrt(2.0)))) * 0.5


def _explicit_layer_norm(layer):
    """`LayerNormalization.call` as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add."""
    from keras import ops

    def call(inputs):
        mean = ops.mean(inputs, axis=-1, keepdims=True)
        centered = inputs - mean
        variance = ops.mean(ops.power(centered, 2.0), axis=-1, keepdims=True)
        return centered / ops.sqrt(variance + layer.epsilon) * layer.gamma + layer.beta

    return call


@contextlib.contextmanager
def fused_attention(classifier):
    """Temporarily traces each attention layer through `keras.ops.dot_product_attention`.

    Keras' `MultiHeadAttention._compute_attention` (keras/src/layers/attention/
    multi_head_attention.py, `use_dot_product_attention`) takes `ops.dot_product_attention`
    only when the layer's attention dropout is 0; DistilBERT's is 0.1, so even a graph traced
    with `training=False` would hold einsum + masked softmax. Dropout is the identity at
    inference, so with it set to 0 the logits are the same function, and the traced graph
    holds the backend's fused attention (on PyTorch `scaled_dot_product_attention`, which
    OpenVINO turns into one `ScaledDotProductAttention` per layer). Keras has no public setter
    (`MultiHeadAttention.dropout` is a read-only property), so the private `_dropout` is set
    here and restored on exit: the trained model and its `.keras` file are untouched.
    """
    import keras

    layers = [
        layer
        for layer in classifier.backbone._flatten_layers()
        if isinstance(layer, keras.layers.MultiHeadAttention)
    ]
    saved = [layer._dropout for layer in layers]
    try:
        for layer in layers:
            layer._dropout = 0.0
        yield classifier
    finally:
        for layer, rate in zip(layers, saved, strict=True):
            layer._dropout = rate


@contextlib.contextmanager
def onnx_friendly_ops(classifier):
    """Temporarily traces GELU and LayerNorm in the forms tf2onnx and onnxruntime handle best.

    Each encoder's feed-forward GELU becomes `erf_gelu`, and each last-axis LayerNormalization
    (with centre and scale) computes its textbook formula instead of TensorFlow's moments: the
    same functions to float rounding (export verification checks it), in the shapes onnxruntime
    fuses. For ONNX only: LiteRT has no builtin `Erf` and fuses TensorFlow's own GELU, and
    SavedModel needs no change. Restored on exit.
    """
    import keras

    dense_layers = [
        layer._feedforward_intermediate_dense for layer in classifier.backbone.transformer_layers
    ]
    saved = [dense.activation for dense in dense_layers]
    norms = [
        layer
        for layer in classifier.backbone._flatten_layers()
        if isinstance(layer, keras.layers.LayerNormalization)
        and layer.center
        and layer.scale
        and layer.axis in (-1, [-1], [2])
    ]
    try:
        for dense in dense_layers:
            dense.activation = erf_gelu
        for norm in norms:
            norm.call = _explicit_layer_norm(norm)
        yield classifier
    finally:
        for dense, activation in zip(dense_layers, saved, strict=True):
            dense.activation = activation
        for norm in norms:
            del norm.call


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

    source = "tensorflow"

    def __init__(self, classifier, fixed_shape: tuple[int | None, int | None] = (None, None)):
        import keras
        import tensorflow as tf

        # lazy: loads Keras; importing the format registry must not
        from kerasft.training.recipe import core_model

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "Exports are traced under the TensorFlow backend. "
                f"Received: backend={keras.backend.backend()!r}"
            )
        # The last layer at [CLS] alone, as training and `predict` run it (`kerasft.model.encoder`).
        self.model = core = core_model(classifier, skip_padding=False)

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
