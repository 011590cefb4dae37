"""Each recipe option acts, shown one at a time on a small Keras model (in-process, fast)."""

import keras
import numpy as np
import pytest

from kerasft.training.config import RecipeConfig
from kerasft.training.recipe import compile_classifier, stage_schedule


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def _data(n: int = 64, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[(x[:, 0] > 0).astype(int)]
    return x, y


def _trained(epochs: int = 3, fit_options=None, **options) -> keras.Model:
    model = _model()
    compile_classifier(model, 1e-2, **options)
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False, **(fit_options or {}))
    return model


def _kernel_norm(model) -> float:
    return float(sum(np.sum(np.square(w)) for w in model.get_weights() if w.ndim == 2))


def test_weight_decay_shrinks_the_weights():
    plain, decayed = _trained(), _trained(weight_decay=0.5)
    assert _kernel_norm(decayed) < 0.9 * _kernel_norm(plain)
    # biases are not decayed (as in Trainer): the option reaches AdamW's exclusions
    assert decayed.optimizer.weight_decay == 0.5


def test_max_grad_norm_bounds_the_gradient_the_optimizer_sees():
    """Keras' `global_clipnorm`: Adam's first moment after one step is (1 - beta1) times the
    clipped gradient, so its global norm is at most (1 - beta1) x max_grad_norm."""
    x, y = _data()
    norms = {}
    for clip in (None, 1e-3):
        model = _model()
        compile_classifier(model, 1e-2, max_grad_norm=clip)
        model.train_on_batch(x, y)
        moments = [v for v in model.optimizer.variables if "momentum" in v.path]
        norms[clip] = float(np.sqrt(sum(np.sum(np.square(m)) for m in moments)))
    assert norms[1e-3] <= 0.1 * 1e-3 * (1 + 1e-4) < norms[None]


def test_class_weight_moves_the_decision():
    x, _ = _data()
    plain = _trained(epochs=5)
    heavy = _trained(epochs=5, fit_options={"class_weight": {0: 1.0, 1: 50.0}})
    ones = {name: int(np.sum(np.argmax(m.predict(x, verbose=0), -1) == 1))
            for name, m in (("plain", plain), ("heavy", heavy))}  # fmt: skip
    assert ones["heavy"] > ones["plain"]


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_warmup_ratio_starts_the_rate_at_zero(ratio):
    options = RecipeConfig(warmup_ratio=ratio).stage_options("finetune")
    schedule = stage_schedule(options["learning_rate"], 100, options["linear_decay"], ratio)
    warmup = int(np.ceil(ratio * 100))
    rates = [float(schedule(step)) for step in (0, warmup // 2, warmup, 100)]
    peak = options["learning_rate"]
    assert rates[0] == 0.0 and 0 < rates[1] < peak and rates[2] == pytest.approx(peak)
    assert rates[3] == pytest.approx(0.0, abs=1e-12)  # then the linear decay to 0
    # stage 1 has no warm-up
    assert RecipeConfig(warmup_ratio=ratio).stage_options("warmup")["warmup_ratio"] == 0.0


def test_gradient_accumulation_applies_every_n_batches():
    model = _trained(epochs=1, gradient_accumulation_steps=2)
    assert int(model.optimizer.iterations) == 64 // 16 // 2
