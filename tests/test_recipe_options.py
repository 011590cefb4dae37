"""Trainer-style recipe options: validated at construction, wired to Keras, off by default."""

import keras
import numpy as np
import pytest

from conftest import BACKENDS, ROOT, run_backend
from kerasft.training import recipe
from kerasft.training.config import RecipeConfig
from kerasft.training.tuner import TwoStageFineTuner


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("weight_decay", -0.1, "a float in [0, 1), or [warmup, finetune]"),
        ("weight_decay", [0.1], "a float in [0, 1), or [warmup, finetune]"),
        ("warmup_ratio", 1.0, "a float in [0, 1)"),
        ("max_grad_norm", 0, "a float > 0 or None"),
        ("gradient_accumulation_steps", 0, "an int >= 1"),
        ("mixed_precision", "fp16", "one of ['auto', 'bfloat16', 'float16'] or None"),
        ("class_weight", "equal", "'balanced', a non-empty {label: weight > 0} mapping"),
        ("class_weight", {"1": -2.0}, "'balanced', a non-empty {label: weight > 0} mapping"),
        ("bucket_width", 0, "an int in [1, 512]"),
    ],
)
def test_bad_option_values_are_named(name, value, allowed):
    with pytest.raises(ValueError) as e:
        RecipeConfig(**{name: value})
    assert f"{name} must be {allowed}" in str(e.value)
    assert f"Received: {name}={value!r}" in str(e.value)


def test_defaults_keep_the_reference_recipe():
    config = RecipeConfig()
    assert config.weight_decay == 0.0 and config.warmup_ratio == 0.0
    assert config.max_grad_norm is None and config.gradient_accumulation_steps == 1
    assert config.mixed_precision == "auto" and config.class_weight is None  # bf16 where native
    # the default stage-2 schedule is still Keras' PolynomialDecay to 0, no warm-up
    schedule = recipe.stage_schedule(1e-4, 100, linear_decay=True)
    assert isinstance(schedule, keras.optimizers.schedules.PolynomialDecay)
    assert recipe.stage_schedule(1e-3, 100, linear_decay=False) == 1e-3


def test_bf16_is_the_default_only_where_the_cpu_computes_it(monkeypatch, tiny_preset):
    """`mixed_precision="auto"` (#32): a CPU without AVX512_BF16 / AMX-BF16 (the machine probe
    mocked) trains in float32, one with it in bfloat16; `fit` records the resolved value (what
    config.json holds), and an explicit choice is never overridden."""
    from conftest import toy_texts
    from kerasft.training.precision import resolve_mixed_precision
    from kerasft.util import machine

    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_vnni"})
    assert resolve_mixed_precision("auto") is None
    assert resolve_mixed_precision("bfloat16") == "bfloat16"
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert resolve_mixed_precision("auto", keras.backend.backend()) == "bfloat16"
    assert resolve_mixed_precision(None) is None and resolve_mixed_precision("float16") == "float16"
    texts, labels = toy_texts(64, seed=1)
    for flags, expected in (({"avx2", "fma"}, None), ({"avx2", "avx512_bf16"}, "bfloat16")):
        monkeypatch.setattr(machine, "cpu_flags", lambda flags=flags: flags)
        tuner = TwoStageFineTuner(str(tiny_preset), sequence_length=16, warmup_epochs=0,
                                  finetune_epochs=1, batch_size=32, verbose=0)  # fmt: skip
        tuner.fit(texts, labels)
        assert tuner.recipe.mixed_precision == expected
        assert tuner.get_config()["mixed_precision"] == expected  # config.json's recipe
        assert tuner.model.dtype_policy.name == "float32"  # returned and saved in float32


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "fma"}, {"torch": None, "tensorflow": None, "jax": None}),
        ({"avx2", "avx512f", "avx512_vnni"}, {"torch": None, "tensorflow": None, "jax": None}),
        # Zen 4 / Zen 5: XLA's CPU backend trained slower in bfloat16, so JAX keeps float32
        ({"avx512f", "avx512_bf16"}, {"torch": "bfloat16", "tensorflow": "bfloat16", "jax": None}),
        # Sapphire Rapids and newer (AMX-BF16, which also has AVX512_BF16)
        (
            {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"},
            {"torch": "bfloat16", "tensorflow": "bfloat16", "jax": None},
        ),
    ],
)
def test_auto_precision_resolves_per_backend_as_measured(monkeypatch, flags, expected):
    """`auto` is chosen per backend and CPU class from the committed table (`AUTO_BF16`), with
    the CPU probe mocked: a backend never gets bfloat16 where it measured slower in it."""
    from kerasft.training.precision import AUTO_BF16, resolve_mixed_precision
    from kerasft.util import machine

    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    assert set(AUTO_BF16) == {"torch", "tensorflow", "jax"}
    for backend, precision in expected.items():
        assert resolve_mixed_precision("auto", backend) == precision, backend
        assert resolve_mixed_precision("bfloat16", backend) == "bfloat16"  # explicit: kept
        assert resolve_mixed_precision(None, backend) is None


def test_bucket_width_reaches_the_training_and_validation_batches(monkeypatch, tiny_preset):
    from conftest import toy_texts

    seen = []

    def encode(*args, **kwargs):
        seen.append(kwargs.get("bucket_width"))
        return real_encode(*args, **kwargs)

    real_encode = recipe.encode
    monkeypatch.setattr(recipe, "encode", encode)
    texts, labels = toy_texts(64, seed=1)
    tuner = TwoStageFineTuner(str(tiny_preset), sequence_length=16, warmup_epochs=0,
                              finetune_epochs=1, bucket_width=1, verbose=0)  # fmt: skip
    tuner.fit(texts[:48], labels[:48], validation_data=(texts[48:], labels[48:]))
    assert seen == [1, 1]
    assert TwoStageFineTuner.from_config(tuner.get_config()).recipe.bucket_width == 1
    # The default (None) resolves to the backend's width when `fit` starts; config.json has it.
    from kerasft.training.config import default_bucket_width

    seen.clear()
    tuner = TwoStageFineTuner(str(tiny_preset), sequence_length=16, warmup_epochs=0,
                              finetune_epochs=1, verbose=0)  # fmt: skip
    assert tuner.recipe.bucket_width is None
    tuner.fit(texts[:48], labels[:48], validation_data=(texts[48:], labels[48:]))
    width = default_bucket_width(keras.backend.backend())
    assert seen == [width, width] and tuner.get_config()["bucket_width"] == width


FROZEN_CODE = """
import json, sys
import numpy as np, keras
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft.model.presets import load_classifier
from kerasft.training.tuner import TwoStageFineTuner

texts, labels = toy_texts(64, seed=1)
options = {{"sequence_length": 16, "warmup_epochs": 0, "finetune_epochs": 1, "verbose": 0}}
frozen = TwoStageFineTuner({preset!r}, freeze_word_embeddings=True, **options)
frozen.fit(texts, labels)
start, trained = load_classifier({preset!r}).backbone, frozen.model.backbone
def changed(get):
    return float(np.abs(keras.ops.convert_to_numpy(get(trained))
                        - keras.ops.convert_to_numpy(get(start))).max())
print(json.dumps({{
    "words": changed(lambda b: b.token_embedding.embeddings),
    "positions": changed(lambda b: b.embeddings.position_embedding.position_embeddings),
    "trainable_after": trained.token_embedding.trainable,
    "parameters": frozen.parameters,
    "table": int(np.prod(trained.token_embedding.embeddings.shape)),
    "config": frozen.get_config()["freeze_word_embeddings"],
}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_word_embeddings_stay_pretrained_in_stage_2(backend, tiny_preset):
    """On every backend (PyTorch once trained them anyway: the stage re-set the flags)."""
    code = FROZEN_CODE.format(tests=str(ROOT / "tests"), preset=str(tiny_preset))
    r = run_backend(backend, code)
    assert r["words"] == 0.0 and r["positions"] > 0  # the table stays, the rest trains
    assert r["trainable_after"] and r["config"] is True  # trainable again, as it is saved
    counts = r["parameters"]  # as stage 2 trained them (metrics.json's "parameters")
    assert counts["trainable"] == counts["total"] - r["table"]


def test_per_stage_weight_decay_and_round_trip():
    config = RecipeConfig(weight_decay=(0.0, 0.01), class_weight={1: 2.0})
    assert config.stage_weight_decay("warmup") == 0.0
    assert config.stage_weight_decay("finetune") == 0.01
    assert RecipeConfig(weight_decay=0.05).stage_weight_decay("warmup") == 0.05
    assert config.class_weight == {"1": 2.0}  # by label name, as label_names holds them
    assert RecipeConfig.from_dict(config.to_dict()) == config
    tuner = TwoStageFineTuner(weight_decay=[0.0, 0.01], warmup_ratio=0.1)
    assert TwoStageFineTuner.from_config(tuner.get_config()).get_config() == tuner.get_config()


def test_linear_warmup_schedule():
    schedule = recipe.stage_schedule(1e-3, 100, linear_decay=True, warmup_ratio=0.1)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100, 120)]
    np.testing.assert_allclose(rates, [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], atol=1e-9)
    constant = recipe.stage_schedule(1e-3, 100, linear_decay=False, warmup_ratio=0.25)
    assert float(constant(10)) == pytest.approx(4e-4) and float(constant(90)) == pytest.approx(1e-3)
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert float(again(55)) == pytest.approx(5e-4)


def test_compile_classifier_builds_the_keras_optimizer_options():
    inputs = keras.Input((4,))
    x = keras.layers.LayerNormalization()(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    recipe.compile_classifier(model, 1e-3)
    assert type(model.optimizer) is keras.optimizers.Adam  # the reference: plain Adam
    assert model.optimizer.global_clipnorm is None
    recipe.compile_classifier(
        model, 1e-3, weight_decay=0.01, max_grad_norm=1.0, gradient_accumulation_steps=4
    )
    opt = model.optimizer
    assert isinstance(opt, keras.optimizers.AdamW) and opt.weight_decay == 0.01
    assert opt.global_clipnorm == 1.0 and opt.gradient_accumulation_steps == 4
    decayed = {v.path for v in model.trainable_variables if opt._use_weight_decay(v)}
    assert decayed and all(v.endswith("kernel") for v in decayed), decayed
    recipe.compile_classifier(model, 1e-3, loss_scale=True)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


OPTIONS_CODE = """
import json, sys
import keras
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft import TwoStageFineTuner

texts, labels = toy_texts(96, seed=4)
labels = np.array(labels)[:96]
labels[:24] = 0  # unbalanced: 60 of class 0, 36 of class 1
kwargs = dict(sequence_length=32, warmup_epochs=1, finetune_epochs=2, batch_size=16, seed=3,
              verbose=0)
plain = TwoStageFineTuner({preset!r}, **kwargs)
plain.fit(texts, labels)
tuner = TwoStageFineTuner(
    {preset!r}, weight_decay=[0.0, 0.01], warmup_ratio=0.2, max_grad_norm=1.0,
    gradient_accumulation_steps=2, mixed_precision="bfloat16", class_weight="balanced",
    **kwargs,
)
history = tuner.fit(texts, labels)
print(json.dumps({{
    "loss": history.history["loss"],
    "class_weights": {{str(k): v for k, v in tuner._class_weights.items()}},
    "policy": tuner.model.dtype_policy.name,
    "backbone_policy": tuner.model.backbone.dtype_policy.name,
    "differs": float(np.abs(tuner.predict_proba(texts[:8]) - plain.predict_proba(texts[:8])).max()),
}}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_every_option_trains_on_each_backend(backend, tiny_preset):
    code = OPTIONS_CODE.format(tests=str(ROOT / "tests"), preset=str(tiny_preset))
    r = run_backend(backend, code)
    assert len(r["loss"]) == 3 and all(np.isfinite(r["loss"])), r
    np.testing.assert_allclose(
        [r["class_weights"]["0"], r["class_weights"]["1"]], [96 / (2 * 60), 96 / (2 * 36)]
    )
    # trained in bfloat16, returned (and saved) in float32
    assert r["policy"] == "float32" and r["backbone_policy"] == "float32"
    assert r["differs"] > 1e-4  # the options changed the training


def test_class_weight_names_must_be_labels(tiny_preset):
    from conftest import toy_texts
    from kerasft.data import DataError

    texts, labels = toy_texts(32)
    tuner = TwoStageFineTuner(tiny_preset, batch_size=16, class_weight={"2": 3.0})
    with pytest.raises(DataError, match=r"class_weight names labels \['2'\] that are not in"):
        tuner.fit(texts, labels)


class _Crash(keras.callbacks.Callback):
    """Dies at the end of one epoch, after kerasft's own checkpoint of it."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"killed after epoch {epoch + 1}")


@pytest.mark.slow
def test_resume_with_every_option_matches_uninterrupted(tiny_preset, tmp_path):
    from conftest import toy_texts

    texts, labels = toy_texts(96, seed=6)
    options = dict(
        sequence_length=32, warmup_epochs=1, finetune_epochs=3, batch_size=16, seed=5,
        verbose=0, weight_decay=0.01, warmup_ratio=0.3, max_grad_norm=0.5,
        gradient_accumulation_steps=2, mixed_precision="bfloat16", class_weight={"1": 2.0},
    )  # fmt: skip
    whole = TwoStageFineTuner(tiny_preset, **options)
    whole.fit(texts, labels)
    crashed = TwoStageFineTuner(tiny_preset, callbacks=[_Crash(2)], **options)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(texts, labels, checkpoint_dir=tmp_path / "ckpt")
    resumed = TwoStageFineTuner(tiny_preset, **options)
    resumed.fit(texts, labels, checkpoint_dir=tmp_path / "ckpt")
    diff = max(
        float(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b)).max())
        for a, b in zip(whole.model.weights, resumed.model.weights, strict=True)
    )
    assert diff <= 1e-6, diff
    np.testing.assert_allclose(resumed.history.history["loss"], whole.history.history["loss"])
