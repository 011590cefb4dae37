"""kerasft.devices.allocator: freed blocks are reused instead of faulted in again (on JAX from XLA's
own threads too); the user's own allocator settings win; PyTorch and JAX stages apply it."""

import platform

import pytest

from conftest import ROOT, run_backend
from kerasft.devices import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A step's pattern: the same 48 MB buffer allocated, written and freed, over and over (PyTorch
# tensors: NumPy asks for transparent huge pages, which hides most faults).
FAULTS = """
import json, os, resource, torch
from kerasft.devices import allocator
applied = allocator.keep_freed_memory("torch") if os.environ.get("KEEP") else False

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

for step in range(30):  # glibc's heap settles within about 10 (memalign's slack)
    if step == 20:
        start = faults()
    buffer = torch.ones(12_000_000)  # like a step's word-table gradient
    del buffer
print(json.dumps({"applied": applied, "faults_per_step": (faults() - start) / 10}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_every_step():
    before = run_backend("torch", FAULTS, timeout=120)
    after = run_backend("torch", FAULTS, timeout=120, env={"KEEP": "1"})
    if before["faults_per_step"] < 5_000:  # e.g. transparent huge pages for every mapping
        pytest.skip(f"this kernel maps 48 MB in {before['faults_per_step']:.0f} faults anyway")
    assert after["applied"] is True
    assert after["faults_per_step"] < 100, (before, after)


@pytest.mark.parametrize(
    "environ, chosen",
    [
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
        ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "LD_PRELOAD": "libfoo.so"}, None),
    ],
)
def test_settings_the_environment_chose_are_kept(monkeypatch, environ, chosen):
    assert allocator._chosen_elsewhere(environ) == chosen
    if chosen is not None:
        monkeypatch.setattr(allocator, "_applied", None)
        assert allocator.keep_freed_memory("torch", environ) is False


STAGE = """
import json, keras, numpy as np
from kerasft.devices import allocator
from kerasft.training import recipe
from kerasft.model.presets import load_classifier
calls = []
allocator.keep_freed_memory = lambda backend: calls.append(backend) or True
recipe.keep_freed_memory = allocator.keep_freed_memory
clf = load_classifier({preset!r}, 2, 16, None)
train = recipe.encode(clf, ["good day", "bad day"] * 16, np.array([1, 0] * 16), batch_size=8,
                      shuffle=True, seed=0)
recipe.prepare_stage(clf, train, epochs=1, learning_rate=1e-3, train_base=True, verbose=0)
print(json.dumps({{"calls": calls}}))
"""


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_stages_keep_freed_memory(backend, tiny_preset):
    out = run_backend(backend, STAGE.format(preset=str(tiny_preset)), timeout=300)
    assert out["calls"] == [backend]


def test_tensorflow_keeps_glibcs_defaults(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.keep_freed_memory("tensorflow", {}) is False
    assert allocator._applied is None  # nothing tried: a later call for PyTorch or JAX still can


# XLA's worker threads allocate a step's temporaries (100 MB here, above the 64 MiB a thread's
# own malloc arena holds): only one arena for the process lets the thresholds keep them.
JAX_FAULTS = """
import json, os, resource, sys
from kerasft.devices import allocator
applied = allocator.keep_freed_memory("jax") if os.environ.get("KEEP") else False
if os.environ.get("FIT"):  # the tuner's own call, before its first JAX computation
    sys.path.insert(0, os.environ["TESTS"])
    from conftest import toy_texts
    from kerasft.training.tuner import TwoStageFineTuner

    texts, labels = toy_texts(64, seed=1)
    TwoStageFineTuner(os.environ["FIT"], sequence_length=16, warmup_epochs=0, finetune_epochs=1,
                      verbose=0).fit(texts, labels)
    applied = allocator._applied
import jax, jax.numpy as jnp

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

@jax.jit
def step(w, x):
    h = jnp.tanh(x @ w)
    return w - 1e-3 * (x.T @ h)

w, x = jnp.zeros((256, 256)), jnp.full((98_304, 256), 0.01)
for i in range(30):
    if i == 20:
        w.block_until_ready()
        start = faults()
    w = step(w, x)
w.block_until_ready()
print(json.dumps({"applied": applied, "faults_per_step": (faults() - start) / 10}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_jax_steps_reuse_freed_blocks_from_xlas_threads(tiny_preset):
    before = run_backend("jax", JAX_FAULTS, timeout=180)
    if before["faults_per_step"] < 5_000:  # e.g. transparent huge pages for every mapping
        pytest.skip(f"this kernel maps the step's blocks in {before['faults_per_step']:.0f} faults")
    after = run_backend("jax", JAX_FAULTS, timeout=180, env={"KEEP": "1"})
    assert after["applied"] is True
    assert after["faults_per_step"] < before["faults_per_step"] / 3, (before, after)
    # `TwoStageFineTuner.fit` makes the settings before XLA starts its threads (made later,
    # after the first JAX computation, they would change nothing for those threads).
    env = {"FIT": str(tiny_preset), "TESTS": str(ROOT / "tests")}
    fitted = run_backend("jax", JAX_FAULTS, timeout=300, env=env)
    assert fitted["applied"] is True
    assert fitted["faults_per_step"] < before["faults_per_step"] / 3, (before, fitted)
