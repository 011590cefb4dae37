"""Dropout masks drawn with `torch.rand` instead of PyTorch's `bernoulli_` (PyTorch only).

Keras' PyTorch backend drops activations with `torch.nn.functional.dropout` (an unseeded
`Dropout` layer, as in every KerasHub backbone), whose keep mask comes from `bernoulli_`. On a
CPU that PyTorch does not see as Intel's, `bernoulli_` draws one double-precision sample per
element in a single serial loop; MKL's parallel generator is used on Intel CPUs only
(pytorch/pytorch#138199). On the 2-core AMD EPYC that was 8% of a fine-tuning step of the
reference model (`benchmarks/results/train_speed.md` at commit 07ad20c; 4% with these masks,
in the file's current run). Float uniforms from `torch.rand`,
compared with the rate, give the same distribution from the same global generator (seeded by
`keras.utils.set_random_seed`, saved in checkpoints) at about 0.6x the cost: forward and
backward of a 32 x 16 x 384 activation, 0.99 ms against 1.64 ms there. MKL's generator is
slower than that too: on the 2-core AMX Xeon a stage-2 step of the reference model took
143.0-143.6 ms with these masks against 149.8-151.1 ms with `bernoulli_` (median of 60 steps
each way, interleaved, two runs), so every CPU gets them.

`rand_masks(model)` is a context manager for the duration of a `fit`: inside it, the model's
unseeded Keras `Dropout` layers draw their masks that way on a CPU; on exit they are Keras'
own again. The layers' class and config never change, so whatever is saved, even by a callback
during `fit`, is plain Keras. Elsewhere (JAX, TensorFlow, a GPU, a seeded layer or a
`noise_shape`) Keras' dropout runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

_NONE = object()  # a layer without a `call` of its own


def applies() -> bool:
    """Whether `rand_masks` changes anything here: the PyTorch backend (on its CPU tensors)."""
    return keras.backend.backend() == "torch"


def _rand_call(layer):
    """`layer.call` drawing its keep mask with `torch.rand` (CPU tensors; else Keras' own)."""
    import torch

    keras_call = layer.call

    def call(inputs, training=False):
        if not (training and isinstance(inputs, torch.Tensor) and inputs.device.type == "cpu"):
            return keras_call(inputs, training=training)
        keep = torch.rand(inputs.shape, dtype=torch.float32).ge_(layer.rate)
        return inputs * keep.to(inputs.dtype).mul_(1.0 / (1.0 - layer.rate))

    return call


@contextlib.contextmanager
def rand_masks(model: keras.Model) -> Iterator[int]:
    """Within the block, `model`'s unseeded `Dropout` layers draw masks with `torch.rand`.

    Only where `applies()`; layers with a seed or a `noise_shape`, and subclasses of `Dropout`,
    keep Keras' dropout. Leaving the block restores every layer, on an error too.

    Args:
        model: a Keras model about to train.

    Yields:
        How many layers draw their masks with `torch.rand` (0 where it does not apply).

    Example:
        >>> with rand_masks(model):
        ...     model.fit(batches)
    """
    layers = []
    if applies():
        layers = [
            layer
            for layer in model._flatten_layers(include_self=False)
            if type(layer) is keras.layers.Dropout
            and 0 < layer.rate < 1
            and layer.seed is None
            and layer.noise_shape is None
        ]
    saved = [(layer, layer.__dict__.get("call", _NONE)) for layer in layers]
    for layer in layers:  # an instance attribute: past Keras' and torch's attribute tracking
        layer.__dict__["call"] = _rand_call(layer)
    try:
        yield len(layers)
    finally:
        for layer, call in saved:
            if call is _NONE:
                del layer.__dict__["call"]
            else:
                layer.__dict__["call"] = call
