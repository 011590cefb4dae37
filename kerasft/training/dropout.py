"""Cheaper dropout masks for PyTorch training: 16 random bits per element, from `random_`.

Keras' PyTorch backend drops activations with `torch.nn.functional.dropout` (an unseeded
`Dropout` layer, as in every KerasHub backbone), whose keep mask comes from `bernoulli_`. On a
CPU that PyTorch does not see as Intel's, `bernoulli_` draws one double-precision sample per
element in a single serial loop; MKL's parallel generator is used on Intel CPUs only
(pytorch/pytorch#138199), and on the 2-core AMX Xeon it was slower still than what replaced it
(a stage-2 step of the reference model 149.8-151.1 ms against 143.0-143.6 ms, median of 60 steps
each way, interleaved, two runs). Uniform floats from `torch.rand` compared with the rate were
the next step (0.6x `bernoulli_`'s cost on the 2-core AMD EPYC), but they still spend one
generator call on each element: 6% of a bf16 step on the AMX Xeon (`torch.profiler`).

A mask needs far fewer random bits than that. Here each 64-bit word from `random_` (PyTorch's
global CPU generator, seeded by `keras.utils.set_random_seed` and saved in checkpoints) gives
four elements 16 bits each; an element is dropped when its bits fall below the rate rounded to
a multiple of 1/65,536 (0.1 -> 0.100006), and the kept ones are scaled by 1 / (1 - that rate),
so the layer's output keeps its expected value. On the AMX Xeon a mask for 463 x 384 elements,
applied, cost 382 us against 617 us with `torch.rand` (the generator alone 139 us against 504).
A rate further than 1% from its rounding (below about 0.0008) keeps `torch.rand`'s 24 bits.

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


LANE_BITS = 16  # random bits per element
_LANES = 1 << LANE_BITS
_INT64_MIN = -(1 << 63)  # `random_(from, None)`: every 64-bit value


def mask_threshold(rate: float) -> int | None:
    """How many of the 65,536 values of an element's 16 bits drop it, or None where that
    would be more than 1% off `rate` (the layer then draws 24-bit uniforms instead)."""
    dropped = round(rate * _LANES)
    return dropped if 0 < dropped < _LANES and abs(dropped / _LANES - rate) <= 0.01 * rate else None


def _keep_mask(shape, dropped: int):
    """A boolean keep mask of `shape`: 16 random bits per element (four per `random_` word)."""
    import torch

    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(_INT64_MIN, None)
    bits = words.view(torch.int16)[:count].view(shape)  # signed: -32768 ... 32767
    return bits.ge(dropped - _LANES // 2)


def _rand_call(layer):
    """`layer.call` drawing its keep mask from 16-bit lanes (CPU tensors; else Keras' own)."""
    import torch

    keras_call = layer.call

    def call(inputs, training=False):
        if not (training and isinstance(inputs, torch.Tensor) and inputs.device.type == "cpu"):
            return keras_call(inputs, training=training)
        dropped = mask_threshold(layer.rate)
        if dropped is None:
            rate = layer.rate
            keep = torch.rand(inputs.shape, dtype=torch.float32).ge_(rate)
        else:
            rate = dropped / _LANES
            keep = _keep_mask(inputs.shape, dropped)
        return inputs * keep.to(inputs.dtype).mul_(1.0 / (1.0 - rate))

    return call


@contextlib.contextmanager
def rand_masks(model: keras.Model) -> Iterator[int]:
    """Within the block, `model`'s unseeded `Dropout` layers draw cheaper masks (see above).

    Only where `applies()`; layers with a seed or a `noise_shape`, and subclasses of `Dropout`,
    keep Keras' dropout. Leaving the block restores every layer, on an error too.

    Args:
        model: a Keras model about to train.

    Yields:
        How many layers draw their masks here (0 where it does not apply).

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
