"""Data-parallel training on Keras' engines: 2 virtual CPU devices against 1, the CLI's
`--devices`, the refusal on torch, and a two-process JAX run on localhost.

Each backend runs in its own process with its CPU split into two devices
(`KERASFT_CPU_DEVICES=2`: JAX's `jax_num_cpu_devices`, TensorFlow's logical CPUs), as Keras
tests its own distribution code.
"""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import CLI_ENV, ROOT, TOY_BUCKETS, run_backend
from kerasft.distribute import DataParallelPlan

TWO_CPUS = {"KERASFT_CPU_DEVICES": "2"}

# 118 training rows: the remainder batch (6 rows) splits evenly, so the 1- and 2-device runs see
# the same batches. 51 validation rows and 37 predicted texts leave an odd last batch: the
# 2-device passes pad it with a zero-weight row, which must change nothing.
COMPARE = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft import recipe
from kerasft.tuner import TwoStageFineTuner

load = recipe.load_pretrained_classifier
def no_dropout(*args, **kwargs):  # the head's dropout too: runs must match step for step
    classifier = load(*args, **kwargs)
    classifier.output_dropout.rate = 0.0
    return classifier
recipe.load_pretrained_classifier = no_dropout

texts, labels = toy_texts(206, seed=3)
train, val, test = slice(0, 118), slice(118, 169), slice(169, 206)
runs = []
for devices in (None, 2):
    tuner = TwoStageFineTuner(
        {preset!r}, sequence_length=32, warmup_epochs=1, finetune_epochs=1, batch_size=16,
        warmup_learning_rate=1e-2, finetune_learning_rate=3e-3, distribution=devices, verbose=0,
        mixed_precision=None,  # float32: these compare reductions, not precision (see _fit_args)
    )
    history = tuner.fit(texts[train], labels[train], validation_data=(texts[val], labels[val]))
    runs.append(dict(
        weights=[np.asarray(w, dtype="float64") for w in tuner.model.weights],
        history=history.history,
        proba=tuner.predict_proba(texts[test]),
        evaluate=tuner.evaluate(texts[test], labels[test]),
        plan=None if tuner._plan is None else tuner._plan.describe(),
    ))
one, two = runs
# the weights training started from (built after the runs: JAX sets its devices up first)
start = recipe.load_pretrained_classifier({preset!r}, 2, 32)
recipe.initialize_head(start, 30)  # the tuner's seed
start = [np.asarray(w, dtype="float64") for w in start.weights]
print(json.dumps({{
    "plan": two["plan"],
    "weights": max(float(np.abs(a - b).max()) for a, b in zip(one["weights"], two["weights"])),
    "history": {{k: max(abs(a - b) for a, b in zip(one["history"][k], two["history"][k]))
                for k in one["history"]}},
    "proba": float(np.abs(one["proba"] - two["proba"]).max()),
    "rows": len(two["proba"]),
    "evaluate": {{k: abs(one["evaluate"][k] - two["evaluate"][k]) for k in one["evaluate"]}},
    "changed": max(float(np.abs(a - b).max()) for a, b in zip(one["weights"], start)),
    "start": len(start) == len(one["weights"]),
}}))
"""


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
@pytest.mark.slow
def test_two_devices_give_the_weights_of_one(backend, tiny_preset_no_dropout):
    code = COMPARE.format(tests=str(ROOT / "tests"), preset=str(tiny_preset_no_dropout))
    out = run_backend(backend, code, env=TWO_CPUS)
    assert "2 devices" in out["plan"], out
    assert out["weights"] <= 1e-4, out
    # validation loss, accuracy and F1 per epoch: the padding row counts for nothing
    assert max(out["history"].values()) <= 1e-4, out
    assert out["rows"] == 37 and out["proba"] <= 1e-4, out
    assert max(out["evaluate"].values()) <= 1e-4, out
    # ... and they did train: the weights moved from where both runs started
    assert out["start"] and out["changed"] > 1e-3, out


def _fit_args(backend, preset, data, out, *extra):
    """`kerasft fit` in float32 whatever the CPU: the runs compared here sum gradients over other
    splits of a batch, which bfloat16 (the `auto` default on a CPU with AVX512_BF16 or AMX) would
    round differently, beyond these tests' 1e-4."""
    args = [sys.executable, "-m", "kerasft.cli", "--backend", backend, "fit", "--data", str(data)]
    args += ["--out", str(out), "--preset", str(preset), "--sequence-length", "32", "--quiet"]
    args += ["--mixed-precision", "none", *TOY_BUCKETS]
    return args + ["--batch-size", "16", "--warmup-epochs", "1", "--finetune-epochs", "1", *extra]


def _fit_cli(backend, preset, data, out, *extra, env=None):
    return subprocess.run(
        _fit_args(backend, preset, data, out, *extra),
        capture_output=True, text=True, env={**CLI_ENV, **(env or {})}, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
@pytest.mark.slow
def test_fit_devices_2_completes(backend, tiny_preset, toy_data, tmp_path):
    proc = _fit_cli(
        backend, tiny_preset, toy_data, tmp_path / "run", "--devices", "2", env=TWO_CPUS
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "over 2 devices" in proc.stderr
    assert "even batches across 2 devices" in proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["rows"] == 80 and metrics["backend"] == backend
    assert "over 2 devices" in metrics["data_parallel"]


def test_torch_is_refused_with_the_backends_that_can(tiny_preset, toy_data, tmp_path):
    proc = _fit_cli("torch", tiny_preset, toy_data, tmp_path / "run", "--devices", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "jax and tensorflow backends only" in line and "not on torch" in line, line
    assert not (tmp_path / "run").exists()


def test_more_devices_than_there_are_is_refused(tiny_preset, toy_data, tmp_path):
    proc = _fit_cli("jax", tiny_preset, toy_data, tmp_path / "run", "--devices", "3", env=TWO_CPUS)
    assert proc.returncode == 2
    assert "devices=3, but jax sees 2: ['cpu:0', 'cpu:1']" in proc.stderr


def test_batch_size_must_split_evenly():
    plan = DataParallelPlan(engine=None, devices=["cpu:0", "cpu:1", "cpu:2"])
    plan.check_batch_size(33)
    with pytest.raises(ValueError, match=r"batch_size=32 does not split evenly across 3 devices"):
        plan.check_batch_size(32)


@pytest.mark.parametrize("bad", ["0", "two"])
def test_cpu_devices_variable_is_checked(bad, monkeypatch):
    from kerasft.distribute import split_host_cpu

    monkeypatch.setenv("KERASFT_CPU_DEVICES", bad)
    with pytest.raises(
        ValueError, match=f"KERASFT_CPU_DEVICES must be an int >= 1. Received: '{bad}'"
    ):
        split_host_cpu()


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_devices_flag_is_checked(bad, tmp_path):
    args = [sys.executable, "-m", "kerasft.cli", "fit", "--out", str(tmp_path), "--devices", bad]
    proc = subprocess.run(args, capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 2
    assert f"expected a device count >= 1 or 'all', got {bad!r}" in proc.stderr


@pytest.mark.slow
def test_two_jax_processes_on_localhost_match_one_process(tiny_preset, toy_data, tmp_path):
    """`keras.distribution.initialize` through Keras' variables, one CPU device per process
    (JAX's CPU collectives): process 0 writes the run, process 1 writes nothing, and the run
    equals a single-process one with the same batch order (no stage-1 feature cache)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for index in range(2):
        env = {
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
            "KERAS_DISTRIBUTION_PROCESS_ID": str(index),
        }
        args = _fit_args("jax", tiny_preset, toy_data, tmp_path / "two", "--devices", "all")
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={**CLI_ENV, **env}))  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "joined a 2-process run as process 1" in outputs[1][1]
    assert "process 0 writes" in outputs[1][1] and "test accuracy" not in outputs[1][0]
    one = _fit_cli("jax", tiny_preset, toy_data, tmp_path / "one", "--no-feature-cache")
    assert one.returncode == 0, one.stderr[-3000:]

    import keras

    runs = [tmp_path / "two", tmp_path / "one"]
    histories = [json.loads((r / "history.json").read_text()) for r in runs]
    for key, values in histories[1].items():
        assert np.allclose(histories[0][key], values, atol=1e-4), key
    weights = [keras.saving.load_model(r / "model.keras").weights for r in runs]
    diff = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(*weights, strict=True)
    )
    assert diff <= 1e-4, diff
