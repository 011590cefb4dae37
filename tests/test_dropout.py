"""kerasft.training.dropout: on PyTorch, unseeded Dropout layers draw their masks with torch.rand
inside `rand_masks`, with Keras' semantics; outside it, and on other backends, Keras' own."""

import pytest

from conftest import run_backend

MASKS = """
import json, keras, numpy as np
from kerasft.training import dropout
inputs = keras.Input((64,))
hidden = keras.layers.Dropout(0.25)(inputs)
hidden = keras.layers.Dropout(0.25, seed=3)(hidden)              # seeded: Keras' own
hidden = keras.layers.Dropout(0.25, noise_shape=(None, 1))(hidden)  # noise_shape: Keras' own
model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dropout(0.5)(hidden)))
first = model.layers[1]
x = np.ones((256, 64), "float32")
config = model.get_config()

def run(seed):
    keras.utils.set_random_seed(seed)
    return keras.ops.convert_to_numpy(first(x, training=True))

with dropout.rand_masks(model) as layers:
    inside = "call" in first.__dict__
    a, b, c = run(1), run(1), run(2)
    inference = keras.ops.convert_to_numpy(first(x, training=False))
print(json.dumps({{
    "layers": layers,
    "inside": inside,
    "restored": "call" not in first.__dict__,
    "values": sorted({{round(float(v), 5) for v in np.unique(a)}}),
    "kept": float((a != 0).mean()),
    "same_seed_same_mask": bool((a == b).all()),
    "other_seed_other_mask": bool((a != c).any()),
    "inference_is_identity": bool((inference == x).all()),
    "config_unchanged": model.get_config() == config,
}}))
"""


@pytest.mark.parametrize("backend, layers", [
    ("torch", 2),  # the two unseeded layers without a noise shape
    ("jax", 0),
])  # fmt: skip
def test_unseeded_dropout_draws_rand_masks_only_on_pytorch(backend, layers):
    out = run_backend(backend, MASKS.format(), timeout=300)
    assert out["layers"] == layers
    assert out["inside"] is (layers > 0) and out["restored"] and out["config_unchanged"]
    # Keras' dropout semantics either way: zeros and 1 / (1 - rate), about 3/4 kept.
    assert out["values"] == [0.0, round(1 / 0.75, 5)]
    assert 0.72 < out["kept"] < 0.78
    assert out["other_seed_other_mask"]
    if backend == "torch":  # torch's global generator, which `set_random_seed` seeds
        assert out["same_seed_same_mask"]
    assert out["inference_is_identity"]


FIT = """
import json, keras, numpy as np
from kerasft.training import dropout
from kerasft.training.recipe import train_stage, encode, initialize_head
from kerasft.model.presets import load_classifier
seen = []
real = dropout.rand_masks

def spy(model):
    seen.append(len([l for l in model._flatten_layers() if type(l) is keras.layers.Dropout]))
    return real(model)

from kerasft.training import recipe as recipe
recipe.rand_masks = spy
clf = load_classifier({preset!r}, 2, 16, None)
initialize_head(clf, 0)
train = encode(clf, ["good day", "bad day"] * 16, np.array([1, 0] * 16), batch_size=8,
               shuffle=True, seed=0)
train_stage(clf, train, epochs=1, learning_rate=1e-3, train_base=True, verbose=0)
print(json.dumps({{"fits": len(seen), "dropout_layers": seen[0] if seen else 0,
                  "left_over": sum("call" in l.__dict__ for l in clf._flatten_layers())}}))
"""


def test_the_recipe_trains_inside_rand_masks_and_leaves_no_trace(tiny_preset):
    out = run_backend("torch", FIT.format(preset=str(tiny_preset)), timeout=300)
    assert out["fits"] == 1 and out["dropout_layers"] > 0 and out["left_over"] == 0


def test_the_mask_threshold_rounds_the_rate_to_16_bits_or_declines():
    from kerasft.training.dropout import mask_threshold

    assert mask_threshold(0.1) == 6554  # 0.100006: dropped below 6554 of 65536 values
    assert mask_threshold(0.25) == 16384 and mask_threshold(0.5) == 32768
    # more than 1% off after rounding (or nothing to drop): torch.rand's 24 bits instead
    assert mask_threshold(1e-5) is None and mask_threshold(0.0001) is None
    assert mask_threshold(0.001) == 66
