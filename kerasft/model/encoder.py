"""The encoder as training and scoring run it: `[CLS]` features for less work, same weights.

The classifier reads one position of the backbone's output, `[CLS]`, so `ClsEncoder` computes
what that position needs and nothing else, with the backbone's own layers and variables:

- **The last layer at `[CLS]` alone.** Its keys and values need every token, but its query,
  attention output, feed-forward block and layer norms only the `[CLS]` row: about 5/6 of its
  matrix products (a seventh of the encoder's, forward and backward) are skipped.
- **No padding on PyTorch.** A batch is padded to its bucket's length, but the encoder's dense
  layers, layer norms and dropout act on each token alone, and no real token attends to a
  padding one. On PyTorch (eager: a batch's own shapes cost nothing to compile) the real tokens
  of a batch are packed into one row, `(1, tokens, hidden)`, for all of that, and laid out
  `(batch, length, ...)` again only for the attention scores, the row count filled up to a
  multiple of 32 so that matrix-product kernels are reused (`PACKED_ROWS_MULTIPLE`). At the
  recipe's bucket width 4 that is 16.0 -> 14.5 tokens per row on the reference data (14.9
  with the filling). JAX and TensorFlow compile every shape, so there the padded batch runs as
  it is (its bucket bounds the shapes they see).
- **The word embeddings' gradient in one kept buffer on PyTorch.** The table's gradient is dense
  (30,522 x 384 floats for the offline preset), but a batch touches a few hundred of its rows.
  PyTorch's embedding backward zero-fills a new 47 MB tensor every step; the packed path looks
  its rows up through `_RowsKeepingGradient` instead, whose backward zeroes only the rows the
  previous step wrote in a buffer it keeps, and adds the new ones. Autograd hands that buffer
  to the variable as its gradient without a copy. It is the same gradient, and valid until the
  next backward through the same encoder (Keras' `fit` applies it before).
- **Fewer, larger operations on PyTorch.** Keras' layers cost a PyTorch step more than their
  arithmetic: a layer norm in bfloat16 copies its input to float32 and back (four casts a norm,
  forward and backward), attention masks its scores twice around a bfloat16 softmax, and every
  projection is a matrix product, then a bias add. The packed path calls the same layers' math
  directly where a layer is the plain kind (no LoRA, not quantized, the encoder's precision):
  query, key and value as one `addmm` of their kernels side by side, every dense layer's bias
  inside its `addmm` (`_project`); one `layer_norm` in the activations' dtype, which PyTorch
  accumulates in float32 (`_normalize`); a float32 softmax with the padding as an added -1e9
  (`_attend`). Any other layer is called as it is. On the AMX Xeon a stage-2 step of the
  reference model took 161 ms against 185 ms (interleaved, median of 6 rounds of 30 steps).

Both give the backbone's `[CLS]` output and gradients to float rounding
(`tests/test_recipe.py`); only the dropout masks are drawn for fewer elements. Backbones of
another layout run whole.

Example:
    >>> features = ClsEncoder(classifier.backbone)(classifier.backbone.input)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import keras


def last_layer_at_cls(backbone) -> bool:
    """Whether `ClsEncoder` runs the backbone's last layer at `[CLS]` alone: a DistilBERT
    backbone of post-norm KerasHub `TransformerEncoder` layers."""
    import keras_hub

    layers = getattr(backbone, "transformer_layers", None)
    return (
        isinstance(backbone, keras_hub.models.DistilBertBackbone)
        and bool(layers)
        and all(isinstance(x, keras_hub.layers.TransformerEncoder) for x in layers)
        and not layers[-1].normalize_first
    )


def cls_features(backbone, inputs: dict, skip_padding: bool = True):
    """The backbone's `[CLS]` output (see the module docstring for what is skipped).

    Args:
        backbone: the classifier's KerasHub backbone.
        inputs: `{"token_ids", "padding_mask"}` symbolic inputs.
        skip_padding: pack a batch's real tokens on PyTorch (`ClsEncoder`); False for a graph
            that is traced, where the packing's data-dependent shapes would be frozen.

    Returns:
        The `[CLS]` features, shape `(batch, hidden_dim)`.
    """
    if not last_layer_at_cls(backbone):
        return backbone(inputs)[:, backbone.cls_token_index, :]
    return ClsEncoder(backbone, skip_padding=skip_padding)(inputs)


class ClsEncoder(keras.layers.Layer):
    """A DistilBERT backbone's `[CLS]` features, computed by its own layers (shared variables).

    Not saved: it is built on a loaded classifier whenever training or scoring needs it, and the
    classifier, with its own graph, is what is saved and exported.

    Args:
        backbone: a KerasHub `DistilBertBackbone` (`last_layer_at_cls(backbone)` must hold).
        skip_padding: pack the real tokens on PyTorch (see the module docstring); False runs
            the padded batch on every backend.

    Raises:
        ValueError: for a backbone of another layout.

    Example:
        >>> backbone = classifier.backbone
        >>> core = keras.Model(backbone.input, ClsEncoder(backbone)(backbone.input))
    """

    def __init__(self, backbone, skip_padding: bool = True, **kwargs):
        if not last_layer_at_cls(backbone):
            raise ValueError(
                f"ClsEncoder needs a DistilBERT backbone of post-norm TransformerEncoder layers. "
                f"Received: {type(backbone).__name__}"
            )
        kwargs.setdefault("name", "cls_encoder")
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        self.skip_padding = skip_padding
        self.cls_index, self.hidden_dim = backbone.cls_token_index, backbone.hidden_dim
        # Tracked in the order the layers are called: the classifier's variables keep the order
        # (and paths) that checkpoints and optimizer states record.
        self.embeddings = backbone.embeddings
        self.embeddings_layer_norm = backbone.embeddings_layer_norm
        self.embeddings_dropout = backbone.embeddings_dropout
        self.encoder_layers = list(backbone.transformer_layers[:-1])
        last = backbone.transformer_layers[-1]
        self.last_attention = last._self_attention_layer
        self.last_attention_layer_norm = last._self_attention_layer_norm
        self.last_attention_dropout = last._self_attention_dropout
        self.last_intermediate_dense = last._feedforward_intermediate_dense
        self.last_output_dense = last._feedforward_output_dense
        self.last_feedforward_dropout = last._feedforward_dropout
        self.last_feedforward_layer_norm = last._feedforward_layer_norm
        self._table_gradient = _GradientBuffer()  # for `_RowsKeepingGradient` (PyTorch)
        self.built = True  # every layer above is the backbone's, built

    def packs(self) -> bool:
        """Whether padded batches run with their real tokens packed (PyTorch)."""
        return self.skip_padding and keras.backend.backend() == "torch"

    def compute_output_spec(self, inputs, training=None):
        batch = inputs["token_ids"].shape[0]
        return keras.KerasTensor((batch, self.hidden_dim), dtype=self.compute_dtype)

    def call(self, inputs, training=None):
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        if self.packs():
            packing = _torch_packing(padding_mask, self.cls_index)
            if packing is not None:
                return self._packed(token_ids, packing, training)
        x = self.embeddings(token_ids)
        x = self.embeddings_dropout(self.embeddings_layer_norm(x), training=training)
        for layer in self.encoder_layers:
            x = layer(x, padding_mask=padding_mask, training=training)
        # KerasHub's padding mask for attention: (batch, 1 query, keys)
        mask = keras.ops.expand_dims(keras.ops.cast(padding_mask, "int32"), axis=1)
        residual = x[:, self.cls_index : self.cls_index + 1, :]
        y = self.last_attention(query=residual, value=x, attention_mask=mask, training=training)
        return self._last_block(y, residual, training)

    def _last_block(self, attention, residual, training):
        """The last layer past its attention, at `[CLS]` (KerasHub's post-norm order)."""
        y = self.last_attention_dropout(attention, training=training)
        y = self.last_attention_layer_norm(y + residual)
        residual = y
        y = self.last_output_dense(self.last_intermediate_dense(y))
        y = self.last_feedforward_dropout(y, training=training)
        return self.last_feedforward_layer_norm(y + residual)[:, 0, :]

    def _packed(self, token_ids, packing, training):
        """`call` with the real tokens packed: `(1, tokens, ...)` outside the attention scores.

        The backbone's layers in KerasHub's post-norm order, their projections and layer norms
        through `_project` and `_normalize`, the attention through `_attend`."""
        pack, unpack, cls_rows = packing.pack, packing.unpack, packing.cls_rows
        x = self._packed_embeddings(token_ids, packing)
        x = self.embeddings_dropout(_normalize(self.embeddings_layer_norm, x), training=training)
        for layer in self.encoder_layers:  # KerasHub's `TransformerEncoder.call`
            attention = layer._self_attention_layer
            projections = (attention._query_dense, attention._key_dense, attention._value_dense)
            q, k, v = (unpack(y) for y in _project(projections, x))
            (y,) = _project([attention._output_dense], pack(_attend(attention, q, k, v, packing,
                                                                    training)))  # fmt: skip
            y = layer._self_attention_dropout(y, training=training)
            x = _normalize(layer._self_attention_layer_norm, y + x)
            (y,) = _project([layer._feedforward_intermediate_dense], x)
            (y,) = _project([layer._feedforward_output_dense], y)
            y = layer._feedforward_dropout(y, training=training)
            x = _normalize(layer._feedforward_layer_norm, y + x)
        attention = self.last_attention
        residual = keras.ops.expand_dims(keras.ops.take(x[0], cls_rows, axis=0), axis=1)
        (q,) = _project([attention._query_dense], residual)
        k, v = (unpack(y) for y in _project([attention._key_dense, attention._value_dense], x))
        (y,) = _project([attention._output_dense], _attend(attention, q, k, v, packing, training))
        return self._last_block(y, residual, training)

    def _packed_embeddings(self, token_ids, packing):
        """`TokenAndPositionEmbedding` of the packed tokens: their word rows through
        `_RowsKeepingGradient`, in the layers' precision (word rows cast after the lookup,
        as Keras' `Embedding` does; positions cast with their table, as under autocast)."""
        layer = self.embeddings
        words = layer.token_embedding
        plain = (
            type(words).call in (keras.layers.Embedding.call, keras.layers.ReversibleEmbedding.call)
            and not words.lora_enabled
            and words.quantization_mode is None
            and type(layer.position_embedding).call is _position_call()
        )
        if not plain:  # LoRA, quantized or another layer: the backbone's own call
            return packing.pack(layer(token_ids))
        import torch
        from keras.src.backend import AutocastScope  # what `Layer.__call__` enters for a layer
        # with `autocast=False`, as `Embedding` is: its table is read in float32, not cast whole

        ids = packing.pack(keras.ops.cast(token_ids, "int64"))[0]  # (tokens,)
        with AutocastScope(None):
            table = words.embeddings.value
        rows = _rows_keeping_gradient(table, ids, self._table_gradient)
        table = layer.position_embedding.position_embeddings.value
        positions = torch.nn.functional.embedding(
            packing.positions, keras.ops.cast(table, layer.position_embedding.compute_dtype)
        )
        return (keras.ops.cast(rows, words.compute_dtype) + positions).unsqueeze(0)


def _same_policy(layer, x) -> bool:
    """Whether `layer` computes in `x`'s dtype (then reading its variables inside the encoder's
    call gives them cast as the layer's own call would)."""
    return keras.backend.standardize_dtype(x.dtype) == layer.compute_dtype


def _contracted_dims(layer) -> int | None:
    """How many trailing input dims a plain `Dense` or `EinsumDense` contracts with its kernel's
    leading ones (`"abc,cde->abde"`: 1), or None for any other layer or equation."""
    if getattr(layer, "lora_enabled", True) or layer.quantization_mode is not None:
        return None
    if type(layer) is keras.layers.Dense:
        return 1
    if type(layer) is not keras.layers.EinsumDense:
        return None
    inputs, rest = layer.equation.split(",")
    kernel, outputs = rest.split("->")
    contracted = inputs[2:]
    if inputs[:2] != outputs[:2] or not kernel.startswith(contracted) or not contracted:
        return None
    free = kernel[len(contracted) :]
    if outputs[2:] != free or (layer.bias is not None and layer.bias_axes != free):
        return None
    return len(contracted)


def _project(layers: list, x) -> list:
    """`[layer(x) for layer in layers]`, as one matrix product (`torch.addmm`) for plain dense
    layers on a PyTorch tensor: their kernels side by side, their biases added in the product,
    without Keras' per-call work. Any other layer is called as it is."""
    import torch

    dims = {_contracted_dims(layer) for layer in layers}
    if len(dims) != 1 or None in dims or not all(_same_policy(la, x) for la in layers):
        return [layer(x) for layer in layers]
    (dims,) = dims
    lead, width = x.shape[: x.ndim - dims], math.prod(x.shape[x.ndim - dims :])
    kernels, biases, shapes = [], [], []
    for layer in layers:
        kernel = layer.kernel.value
        shapes.append(kernel.shape[dims:])
        kernels.append(kernel.reshape(width, -1))
        bias = layer.bias.value if layer.bias is not None else kernel.new_zeros(shapes[-1])
        biases.append(bias.reshape(-1))
    if len(layers) == 1:
        y = torch.addmm(biases[0], x.reshape(-1, width), kernels[0])
        outputs = [y]
    else:
        y = torch.addmm(torch.cat(biases), x.reshape(-1, width), torch.cat(kernels, dim=1))
        outputs = y.split([k.shape[1] for k in kernels], dim=1)
    return [
        layer.activation(out.reshape(*lead, *shape)) if layer.activation is not None else
        out.reshape(*lead, *shape)
        for layer, out, shape in zip(layers, outputs, shapes, strict=True)
    ]  # fmt: skip


def _normalize(layer, x):
    """`layer(x)` for a plain last-axis `LayerNormalization` as one `layer_norm` call in `x`'s
    dtype (PyTorch's kernel accumulates in float32, as Keras' float32 upcast does), without
    the float32 copies in and out; any other layer is called as it is."""
    import torch

    plain = (
        type(layer) is keras.layers.LayerNormalization
        and list(layer.axis) in ([-1], [x.ndim - 1])
        and layer.center
        and layer.scale
        and not layer.rms_scaling
        and _same_policy(layer, x)
    )
    if not plain:
        return layer(x)
    gamma, beta = layer.gamma.value, layer.beta.value
    return torch.nn.functional.layer_norm(x, x.shape[-1:], gamma, beta, layer.epsilon)


def _attend(attention, q, k, v, packing, training):
    """Keras' `MultiHeadAttention._compute_attention` of `(batch, length, heads, dim)`
    projections, as two batched matrix products around a float32 softmax with the padding
    masked by an added -1e9 (Keras: where(), softmax in the compute dtype, where() again), and
    the layer's own attention dropout. A subclass computing attention its own way, or other
    attention axes, gets its own method."""
    import torch

    own = (
        type(attention)._compute_attention is not keras.layers.MultiHeadAttention._compute_attention
    )
    if own or tuple(attention._attention_axes) != (1,):
        y, _ = attention._compute_attention(q, k, v, attention_mask=packing.mask, training=training)
        return y
    q = q.transpose(1, 2) * attention._inverse_sqrt_key_dim  # (batch, heads, queries, dim)
    scores = torch.matmul(q, k.permute(0, 2, 3, 1))  # (batch, heads, queries, keys)
    weights = (scores.float() + packing.score_bias).softmax(-1).to(q.dtype)
    if attention._dropout > 0:
        weights = attention._dropout_layer(weights, training=training)
    return torch.matmul(weights, v.transpose(1, 2)).transpose(1, 2)


def _position_call():
    """KerasHub's `PositionEmbedding.call` (the one `_packed_embeddings` reproduces)."""
    import keras_hub

    return keras_hub.layers.PositionEmbedding.call


class _GradientBuffer:
    """The word-embedding gradient `_RowsKeepingGradient` keeps between steps, and the rows
    the last backward wrote in it (the rest are zeros)."""

    def __init__(self):
        self.buffer = None
        self.rows = None


_LOOKUP = None


def _rows_keeping_gradient(table, ids, state: _GradientBuffer):
    """`table[ids]`, whose backward gives the table's dense gradient in `state.buffer`."""
    global _LOOKUP
    if _LOOKUP is None:
        import torch

        class _RowsKeepingGradient(torch.autograd.Function):
            """An embedding lookup whose dense gradient reuses one buffer (module docstring)."""

            @staticmethod
            def forward(ctx, table, ids, state):
                ctx.save_for_backward(ids)
                ctx.state, ctx.shape = state, table.shape
                return torch.nn.functional.embedding(ids, table)

            @staticmethod
            def backward(ctx, grad):
                if not ctx.needs_input_grad[0]:  # a frozen table: nothing to write
                    return None, None, None
                (ids,) = ctx.saved_tensors
                state = ctx.state
                buffer = state.buffer
                if buffer is None or buffer.shape != ctx.shape or buffer.dtype != grad.dtype:
                    buffer = state.buffer = grad.new_zeros(ctx.shape)
                elif state.rows is not None:
                    buffer.index_fill_(0, state.rows, 0)
                buffer.index_add_(0, ids, grad)
                state.rows = ids
                # a tensor of its own over the buffer: autograd may take it as the gradient
                return buffer.detach(), None, None

        _LOOKUP = _RowsKeepingGradient
    return _LOOKUP.apply(table, ids, state)


class _Packing(NamedTuple):
    """How a PyTorch batch's real tokens are packed (`_torch_packing`)."""

    pack: Callable  # (batch, length, ...) -> (1, rows, ...): real tokens, then filler rows
    unpack: Callable  # the reverse, zeros at padding
    cls_rows: object  # each row's [CLS] token among the packed ones
    mask: object  # (batch, 1, keys) attention mask, as KerasHub's
    positions: object  # each packed token's position in its row
    score_bias: object  # (batch, 1, 1, keys) float32: -1e9 at padding, added to the scores


# The packed rows are filled up to a multiple of this. oneDNN builds (JIT-compiles) a matrix
# product's kernel for each new shape: about 5 ms for a bfloat16 product on the AMX Xeon,
# against 0.4 ms to run it, and a step runs about 12 shapes of the packed row count. Exact
# token counts are new in most steps (and overflow oneDNN's cache of 1,024 kernels);
# multiples of 32 give a few dozen shapes, for at most 31 rows more work. The reference run's
# stage 2 took 168 s against 235 s without it (same seed, one run each, AMX Xeon).
PACKED_ROWS_MULTIPLE = 32


def _torch_packing(padding_mask, cls_index: int) -> _Packing | None:
    """How to pack the real tokens of a PyTorch batch with padding, else None.

    `pack`: `(batch, length, ...)` -> `(1, rows, ...)`, the real tokens in order, then copies
    of one padding position up to a multiple of `PACKED_ROWS_MULTIPLE` rows; `unpack` the
    reverse for the real tokens, zeros at padding (masked out of every attention). Both are
    index gathers, so their gradients are index sums (zero for the filler rows, which nothing
    reads). None: no padding (nothing to skip), a symbolic batch, or a row whose `[CLS]`
    position is padding.
    """
    import torch

    if not isinstance(padding_mask, torch.Tensor) or padding_mask.device.type == "meta":
        return None
    mask = padding_mask.bool()
    if bool(mask.all()) or not bool(mask[:, cls_index].all()):
        return None
    batch, length = mask.shape
    flat = mask.reshape(-1)
    real = torch.nonzero(flat).squeeze(1)  # positions of the real tokens in batch * length
    tokens = real.numel()
    rows = real
    spare = -tokens % PACKED_ROWS_MULTIPLE
    if spare:  # copies of one padding position: never unpacked, so never read by a real token
        filler = torch.nonzero(~flat)[0]
        rows = torch.cat([real, filler.expand(spare)])
    # each position's row in the packed tokens; padding reads an appended zero row
    where = torch.full((batch * length,), rows.numel(), dtype=torch.long, device=mask.device)
    where[real] = torch.arange(tokens, device=mask.device)

    def pack(x):
        return x.reshape(batch * length, *x.shape[2:]).index_select(0, rows).unsqueeze(0)

    def unpack(x):
        x = x.squeeze(0)
        x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))]).index_select(0, where)
        return x.reshape(batch, length, *x.shape[1:])

    cls_rows = where.reshape(batch, length)[:, cls_index]
    attention_mask = mask.to(torch.int32).unsqueeze(1)  # (batch, 1, keys), as KerasHub's
    score_bias = (~mask).to(torch.float32).mul_(-1e9)[:, None, None, :]
    return _Packing(pack, unpack, cls_rows, attention_mask, rows % length, score_bias)
