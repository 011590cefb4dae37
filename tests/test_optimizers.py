"""The recipe's optimizer: torch's fused Adam makes Keras' Adam updates; other backends: Keras'."""

import pytest

from conftest import run_backend

SAME_UPDATES = """
import json, keras, numpy as np
from kerasft.training.optimizers import adam

x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
y = np.random.default_rng(1).normal(size=(64, 2)).astype("float32")

def train(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.LayerNormalization(), keras.layers.Dense(2)])
    model.compile(optimizer, loss="mse")
    start = [keras.ops.convert_to_numpy(w) for w in model.weights]
    for _ in range(20):
        model.train_on_batch(x, y)
    end = [keras.ops.convert_to_numpy(w) for w in model.weights]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(start, end))
    return end, moved, model.optimizer

out = {}
for name, options in [("plain", {}), ("weight_decay", {"weight_decay": 0.01}),
                      ("clipped", {"global_clipnorm": 0.1}),
                      ("accumulated", {"gradient_accumulation_steps": 2})]:
    schedule = lambda: keras.optimizers.schedules.PolynomialDecay(1e-2, 20, 0.0)
    ours, moved, optimizer = train(adam(schedule(), **options))
    decay = options.pop("weight_decay", 0)
    reference = (keras.optimizers.AdamW(schedule(), weight_decay=decay, **options) if decay
                 else keras.optimizers.Adam(schedule(), **options))
    theirs, _, _ = train(reference)
    out[name] = {
        "diff": max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs)),
        "moved": moved,
        "class": type(optimizer).__name__,
        "is_keras_adam": isinstance(optimizer, keras.optimizers.Adam),
        "variables": len(optimizer.variables),
        "reference_variables": len(reference.variables),
    }
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.slow
def test_adam_updates_equal_keras_adam(backend):
    out = run_backend(backend, SAME_UPDATES)
    fused = backend == "torch"
    for name, r in out.items():
        assert r["moved"] > 1e-2, (name, r)  # the weights trained
        assert r["diff"] < 1e-5, (name, r)  # ...to Keras' own Adam's values
        assert r["is_keras_adam"], (name, r)
        assert r["variables"] == r["reference_variables"], (name, r)  # checkpoints interchange
        expected = ("FusedAdamW" if name == "weight_decay" else "FusedAdam") if fused else None
        if fused:
            assert r["class"] == expected, (name, r)
        else:
            assert not r["class"].startswith("Fused"), (name, r)


COMPILED = """
import json, keras, numpy as np
from kerasft.training.optimizers import adam

x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
y = np.random.default_rng(1).normal(size=(64, 2)).astype("float32")
weights = []
for jit_compile in (False, True):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(adam(1e-2), loss="mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    weights.append([keras.ops.convert_to_numpy(w) for w in model.weights])
print(json.dumps({
    "diff": max(float(np.abs(a - b).max()) for a, b in zip(*weights)),
    "class": type(model.optimizer).__name__,
    "compiled": model.jit_compile,
}))
"""


@pytest.mark.slow
def test_fused_adam_trains_under_torch_compile():
    """Keras' `jit_compile=True` on PyTorch compiles the step; the fused update stays eager."""
    out = run_backend("torch", COMPILED)
    assert out["class"] == "FusedAdam" and out["compiled"] is True, out
    assert out["diff"] < 1e-5, out
