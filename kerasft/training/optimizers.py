"""The recipe's optimizer: Keras' Adam (AdamW with weight decay), fused on the PyTorch backend.

On PyTorch, Keras' Adam updates each variable with a chain of `torch._foreach_*` calls, which
on a CPU run one element-wise kernel per variable and per operation: about ten passes over
every weight, moment and gradient per step. For this model (22.7M weights, 11.7M of them the
word embeddings, whose gradient is dense) a fine-tuning step of 32 x 16 tokens took 0.49 s on a
2-core CPU, about half of it in the update (torch.profiler); fused, 0.34 s, and the update is 3%
of the step (the breakdown in `benchmarks/results/train_speed.md` at commit 1fa92fd, on an
AVX-512 CPU; 6% in the AVX2 run after it). `FusedAdam` hands the same
update to PyTorch's own fused kernel (`torch._fused_adam_`, what `torch.optim.Adam(fused=True)`
runs): one pass per tensor. Everything else is Keras' optimizer: learning-rate schedules, weight
decay (AdamW, applied by Keras before the update), gradient clipping and accumulation, loss
scaling, `save_own_variables`/`load_own_variables` (the same variables as Keras' Adam, so
checkpoints are interchangeable).

Keras' Adam adds `epsilon` to `sqrt(v)`, PyTorch's to `sqrt(v) / sqrt(1 - beta_2**t)`; the
fused call is given `epsilon / sqrt(1 - beta_2**t)`, which makes the two formulas the same.
JAX and TensorFlow compile the whole step with XLA, which fuses the update already; they get
Keras' own classes. Under Keras' `jit_compile=True` on PyTorch (`torch.compile` of the train
step) the fused update runs eagerly after the compiled forward and backward: TorchDynamo
cannot trace `_fused_adam_` updating Keras' variables in place (an internal assert in its
functionalization, torch 2.13).
"""

from __future__ import annotations

import keras


def adam(learning_rate, weight_decay: float = 0.0, **options) -> keras.optimizers.Optimizer:
    """Returns Keras' Adam, or AdamW when `weight_decay > 0`; fused on the PyTorch backend.

    Args:
        learning_rate: a float or a `keras.optimizers.schedules.LearningRateSchedule`.
        weight_decay: AdamW's decoupled weight decay; 0 gives Adam.
        **options: other Keras optimizer arguments (`global_clipnorm`,
            `gradient_accumulation_steps`, ...).

    Returns:
        A Keras optimizer.

    Example:
        >>> optimizer = adam(1e-4, global_clipnorm=1.0)
    """
    if keras.backend.backend() == "torch":
        cls = _fused_classes()[1 if weight_decay else 0]
    else:
        cls = keras.optimizers.AdamW if weight_decay else keras.optimizers.Adam
    if weight_decay:
        return cls(learning_rate, weight_decay=weight_decay, **options)
    return cls(learning_rate, **options)


_CLASSES: tuple | None = None


def _fused_classes() -> tuple[type, type]:
    """`(FusedAdam, FusedAdamW)`, built on first use: they subclass Keras' torch optimizers."""
    global _CLASSES
    if _CLASSES is None:
        import torch
        from keras.src.backend.torch.optimizers import torch_adam, torch_adamw

        def _parallel_update_step(self, grads, variables, learning_rate):
            if self.amsgrad:  # not fused here: Keras' own foreach update
                return super(type(self), self)._parallel_update_step(
                    grads, variables, learning_rate
                )
            params = [v.value for v in variables]
            index = self._get_variable_index
            momentums = [self._momentums[index(v)].value for v in variables]
            velocities = [self._velocities[index(v)].value for v in variables]
            step = float(keras.ops.convert_to_numpy(self.iterations)) + 1.0
            correction = (1.0 - self.beta_2**step) ** 0.5
            steps = torch.full((), step, dtype=torch.float32, device=params[0].device)
            torch._fused_adam_(
                params,
                [g.contiguous() for g in grads],
                momentums,
                velocities,
                [],
                [steps] * len(params),
                lr=float(learning_rate),
                beta1=float(self.beta_1),
                beta2=float(self.beta_2),
                weight_decay=0.0,  # AdamW's decay is Keras' own step, applied before this one
                eps=float(self.epsilon) / correction,
                amsgrad=False,
                maximize=False,
            )

        _parallel_update_step = torch._dynamo.disable(_parallel_update_step)  # see above
        fused_adam = type(
            "FusedAdam", (torch_adam.Adam,), {"_parallel_update_step": _parallel_update_step}
        )
        fused_adamw = type(
            "FusedAdamW", (torch_adamw.AdamW,), {"_parallel_update_step": _parallel_update_step}
        )
        _CLASSES = (fused_adam, fused_adamw)
    return _CLASSES
