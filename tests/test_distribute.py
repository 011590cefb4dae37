"""Data-parallel training on Keras' engines: 2 virtual CPU devices against 1, the CLI's
`--devices`, the refusal on torch, and a two-process JAX run on localhost.

Each backend runs in its own process with its CPU split into two devices
(`KERASFT_CPU_DEVICES=2`: JAX's `jax_num_cpu_devices`, TensorFlow's logical CPUs), as Keras
tests its own distribution code.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CLI_ENV, ROOT, TOY_BUCKETS, run_backend, run_process
from kerasft.devices.distribute import DataParallelPlan

TWO_CPUS = {"KERASFT_CPU_DEVICES": "2"}

# 118 training rows: the remainder batch (6 rows) splits evenly, so the 1- and 2-device runs see
# the same batches. 51 validation rows and 37 predicted texts leave an odd last batch: the
# 2-device passes pad it with a zero-weight row, which must change nothing.
COMPARE = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft.training import recipe
from kerasft.training.tuner import TwoStageFineTuner

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
    args = [sys.executable, "-m", "kerasft", "--backend", backend, "fit", "--data", str(data)]
    args += ["--out", str(out), "--preset", str(preset), "--sequence-length", "32", "--quiet"]
    args += ["--mixed-precision", "none", *TOY_BUCKETS]
    return args + ["--batch-size", "16", "--warmup-epochs", "1", "--finetune-epochs", "1", *extra]


def _fit_cli(backend, preset, data, out, *extra, env=None):
    return run_process(
        _fit_args(backend, preset, data, out, *extra), env={**CLI_ENV, **(env or {})}, timeout=600
    )  # a heap-corruption abort runs once more: see `run_process`


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


# Runs over different process counts draw different dropout masks: with the no-dropout tiny
# preset and this on PYTHONPATH (no head dropout, in every process a launcher starts) they train
# step for step alike.
# (`sitecustomize` imports Keras at start-up: the backend must be in the environment already.)
NO_HEAD_DROPOUT = {
    "KERAS_BACKEND": "torch",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "no_head_dropout"), str(ROOT)]),
}


def _torchrun(launcher: list[str], fit: list[str]) -> list[str]:
    """`torchrun LAUNCHER -m kerasft ...` for the `kerasft fit` command line `fit`."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "kerasft", *fit[3:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_of(launcher: int) -> dict[int, int]:
    """`{rank: pid}` of the torch.distributed workers `launcher` started (torch's launcher runs
    each in a session of its own: they are found by parent and environment)."""
    ranks = {}
    for child in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (child / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # gone, or not ours to read
            continue
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if parent == launcher and rank:
            ranks[int(rank[0][5:])] = int(child.name)
    return ranks


def _same_run(a, b, atol=1e-4) -> None:
    import keras

    histories = [json.loads((r / "history.json").read_text()) for r in (a, b)]
    for key, values in histories[1].items():
        assert np.allclose(histories[0][key], values, atol=atol), (key, histories)
    weights = [keras.saving.load_model(r / "model.keras").weights for r in (a, b)]
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(*weights, strict=True))  # fmt: skip
    assert diff <= atol, diff


@pytest.mark.slow
def test_torch_processes_train_to_the_weights_of_one_process(
    tiny_preset_no_dropout, toy_data, tmp_path
):
    """PyTorch data parallelism (torch.distributed, gloo): `--devices 2` (kerasft starts the
    processes with torch's launcher), `torchrun --nproc-per-node 2 -m kerasft fit` (no
    `--devices`: the launcher's processes, as Trainer and Accelerate read `WORLD_SIZE`) and two
    torchrun "nodes" on a c10d rendezvous at 127.0.0.1 each train to the weights of one process
    with the same global batch, on both stages; process 0 alone writes the run directory."""
    preset, env = tiny_preset_no_dropout, {**CLI_ENV, **NO_HEAD_DROPOUT}
    fit = {name: _fit_args("torch", preset, toy_data, tmp_path / name, *extra) for name, extra in {
        "one": ["--no-feature-cache"], "devices": ["--devices", "2"],
        "torchrun": [], "nodes": ["--devices", "all"]}.items()}  # fmt: skip
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", endpoint, "--rdzv-id", "kerasft-test"]  # fmt: skip
    commands = {
        "one": [fit["one"]], "devices": [fit["devices"]],
        "torchrun": [_torchrun(["--standalone", "--nproc-per-node", "2"], fit["torchrun"])],
        "nodes": [_torchrun(nodes, fit["nodes"])] * 2,
    }  # fmt: skip
    for name, cmds in commands.items():
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for c in cmds]  # fmt: skip
        outputs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, (name, err[-4000:])
        if name != "one":
            err = "".join(e for _, e in outputs)
            assert "joined a 2-process PyTorch run as process 1 (torch.distributed, gloo)" in err
            assert "process 1 of 2: training; process 0 writes" in err
            metrics = json.loads((tmp_path / name / "metrics.json").read_text())
            assert (
                metrics["data_parallel"] == "TorchProcessGroup over 2 devices (cpu:0, cpu:1), "
                "process 0 of 2"
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices", "nodes", "one", "torchrun"]
    for name in ("devices", "torchrun", "nodes"):
        _same_run(tmp_path / name, tmp_path / "one")


@pytest.mark.slow
def test_torch_processes_resume_and_stop_together(tiny_preset, toy_data, tmp_path):
    """A 2-process PyTorch run killed whole during stage 2 resumes (`--resume`, same process
    count) to the uninterrupted run's result; one process killed stops the other within 60 s,
    and the launcher names it; another process count is refused at `--resume`."""
    import signal
    import time

    from kerasft.runs.rundir import CHECKPOINT_DIR, partial_dir
    from kerasft.training.checkpoint import STATE_FILE

    env = {**CLI_ENV, "KERASFT_COLLECTIVE_TIMEOUT": "60"}
    args = ["--devices", "2", "--finetune-epochs", "12"]  # time to be killed in stage 2
    whole = _fit_cli("torch", tiny_preset, toy_data, tmp_path / "whole", *args, env=env)
    assert whole.returncode == 0, whole.stderr[-4000:]
    out = tmp_path / "killed"
    state = partial_dir(out) / CHECKPOINT_DIR / STATE_FILE

    def start(extra=()):
        return subprocess.Popen(_fit_args("torch", tiny_preset, toy_data, out, *args, *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)  # fmt: skip

    def wait_for_stage_2(proc):
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text()).get("stage") == "finetune":
                return
            time.sleep(0.2)
        raise AssertionError(f"no stage-2 checkpoint: {proc.communicate()[1][-3000:]}")

    proc = start()
    wait_for_stage_2(proc)
    for pid in [proc.pid, *_workers_of(proc.pid).values()]:  # the launcher and its workers
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial_dir(out).is_dir()  # killed before it was published
    refused = _fit_cli("torch", tiny_preset, toy_data, out, "--resume", str(out),
                       "--devices", "4", env=env)  # fmt: skip
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert "processes: checkpoint 2 vs now 4" in refused.stderr, refused.stderr[-3000:]
    resumed = _fit_cli("torch", tiny_preset, toy_data, out, "--resume", str(out), "--devices",
                       "2", env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming the interrupted run" in resumed.stderr
    _same_run(out, tmp_path / "whole")
    # one process killed: the launcher stops the other and says which one failed
    out = tmp_path / "rank"
    state = partial_dir(out) / CHECKPOINT_DIR / STATE_FILE
    proc = start()
    wait_for_stage_2(proc)
    ranks = _workers_of(proc.pid)
    assert set(ranks) == {0, 1}, ranks
    killed = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=90)
    assert time.time() - killed <= 60 and proc.returncode not in (0, None)
    assert "process 1 of 2 failed (signal SIGKILL); the launcher stopped the others" in err


def test_more_devices_than_there_are_is_refused(tiny_preset, toy_data, tmp_path):
    proc = _fit_cli(
        "jax",
        tiny_preset,
        toy_data,
        tmp_path / "run",
        "--devices",
        "3",
        "--batch-size",
        "24",
        env=TWO_CPUS,
    )  # (a batch 3 devices split evenly)
    assert proc.returncode == 2
    assert "devices=3, but jax sees 2: ['cpu:0', 'cpu:1']" in proc.stderr


def test_batch_size_must_split_evenly():
    plan = DataParallelPlan(engine=None, devices=["cpu:0", "cpu:1", "cpu:2"])
    plan.check_batch_size(33)
    with pytest.raises(ValueError, match=r"batch_size=32 does not split evenly across 3 devices"):
        plan.check_batch_size(32)


@pytest.mark.parametrize("bad", ["0", "two"])
def test_cpu_devices_variable_is_checked(bad, monkeypatch):
    from kerasft.devices.distribute import split_host_cpu

    monkeypatch.setenv("KERASFT_CPU_DEVICES", bad)
    with pytest.raises(
        ValueError, match=f"KERASFT_CPU_DEVICES must be an int >= 1. Received: '{bad}'"
    ):
        split_host_cpu()


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_devices_flag_is_checked(bad, tmp_path):
    args = [sys.executable, "-m", "kerasft", "fit", "--out", str(tmp_path), "--devices", bad]
    proc = subprocess.run(args, capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 2
    assert f"expected a device count >= 1 or 'all', got {bad!r}" in proc.stderr


@pytest.mark.slow
def test_two_jax_processes_on_localhost_match_one_process(tiny_preset, toy_data, tmp_path):
    """`keras.distribution.initialize` through Keras' variables, one CPU device per process
    (JAX's CPU collectives): process 0 writes the run, process 1 writes nothing, and the run
    equals a single-process one with the same batch order (no stage-1 feature cache)."""
    port = _free_port()
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

    _same_run(tmp_path / "two", tmp_path / "one")
