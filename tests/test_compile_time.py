"""Compilation counted and paid once: every stage reports the seconds it spent compiling, and a
JAX run keeps its compiled steps under `$KERASFT_CACHE` so that the next run of the same shapes
loads them instead of compiling."""

import pytest

from conftest import ROOT, run_backend
from kerasft.training.stages import _CompileTime


def test_compile_seconds_are_each_shapes_first_step_beyond_its_usual_step():
    timer = _CompileTime(None, None)
    timer.steps = {
        "train": {(32, 16): [1.0, 0.1, 0.1, 0.3], (32, 24): [0.5]},  # once: every other step's
        "test": {None: [0.3, 0.05], (8, 16): [0.01, 0.02]},  # faster than usual: nothing
    }
    # 1.0 - 0.1 (its own median), 0.5 - 0.1 (the median of the other later steps), 0.3 - 0.05
    assert timer.seconds() == pytest.approx(0.9 + 0.4 + 0.25)


FIT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import jax
from conftest import toy_texts
from kerasft import TwoStageFineTuner

events = {{}}
jax.monitoring.register_event_listener(
    lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1))
texts, labels = toy_texts(96, seed=2)
tuner = TwoStageFineTuner({preset!r}, sequence_length=32, warmup_epochs=1, finetune_epochs=1,
                          batch_size=16, seed=3, verbose=0)
tuner.fit(texts[:64], labels[:64], validation_data=(texts[64:], labels[64:]))
cache = jax.config.jax_compilation_cache_dir
print(json.dumps({{
    "compile_seconds": tuner.compile_seconds,
    "cache": cache,
    "entries": len(os.listdir(cache)),
    "hits": events.get("/jax/compilation_cache/cache_hits", 0),
    "misses": events.get("/jax/compilation_cache/cache_misses", 0),
}}))
"""


@pytest.mark.slow
def test_a_second_jax_run_loads_its_compiled_steps(tiny_preset, tmp_path):
    code = FIT.format(tests=str(ROOT / "tests"), preset=str(tiny_preset))
    env = {"KERASFT_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": ""}
    first = run_backend("jax", code, env=env)
    assert first["cache"] == str(tmp_path / "xla" / "jax"), first
    assert set(first["compile_seconds"]) == {"warmup", "finetune"}, first
    assert first["compile_seconds"]["finetune"] > 0 and first["entries"] > 0, first
    assert first["misses"] > 0, first
    second = run_backend("jax", code, env=env)
    assert second["misses"] == 0 and second["hits"] >= first["misses"], (first, second)
    assert second["entries"] == first["entries"], (first, second)


def test_jax_compiles_at_o1_unless_the_user_chose_a_level(monkeypatch):
    from kerasft.devices.compile_cache import XLA_OPTIMIZATION, quicker_compiles

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert quicker_compiles("jax")
    import os

    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {XLA_OPTIMIZATION}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert not quicker_compiles("jax") and not quicker_compiles("torch")
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=3"
