"""Shared test helpers: per-backend subprocesses, a tiny DistilBERT preset, toy data, paths."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

# In-process tests are backend-independent; pin one so they behave the same everywhere (torch
# in the TensorFlow-free environment, where only the `tf_free` tests run).
try:
    HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
except ImportError:  # test_tf_free's subprocesses refuse it
    HAS_TENSORFLOW = False
os.environ.setdefault("KERAS_BACKEND", "tensorflow" if HAS_TENSORFLOW else "torch")

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")
SARCASM = Path(
    os.environ.get("KERASFT_DATA", ROOT.parent / "shared" / "data" / "sarcasm_headlines_v1.jsonl")
)

POSITIVE = ["good", "great", "fine", "nice", "happy", "sunny"]
NEGATIVE = ["bad", "awful", "sad", "grim", "ugly", "rainy"]
FILLER = ["the", "day", "was", "very", "a", "movie", "and", "so", "really", "today"]


def toy_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Sentences labelled by their two sentiment words; 4 to 14 words long."""
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(2, 12))
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


# glibc's messages when it finds its heap corrupted, before it aborts the process.
HEAP_CORRUPTION = re.compile(
    r"malloc\(\): |free\(\): |malloc_consolidate\(\)|corrupted |double free"
)


def run_process(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(args, capture_output=True, text=True, **kwargs)`, run once more, with a
    warning, when glibc aborted it for a corrupted heap (native code, not Python).

    CI saw that once in `test_two_devices_give_the_weights_of_one[tensorflow]` (TensorFlow,
    which imports jaxlib into the same process, MirroredStrategy on 2 virtual CPUs); it did not
    come back in 7 runs of that test here (one under glibc's heap checks) nor in 5 of the CLI's
    `--devices 2` on TensorFlow. Twice in a row, or any other failure, is the caller's to judge.
    """
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if proc.returncode == -signal.SIGABRT and HEAP_CORRUPTION.search(proc.stderr):
        message = f"glibc aborted on a corrupted heap; ran again:\n{proc.stderr[-500:]}"
        warnings.warn(message, stacklevel=2)
        proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    return proc


def run_backend(backend: str, code: str, timeout: int = 600, env: dict | None = None) -> dict:
    """Runs `code` in a fresh Python with KERAS_BACKEND=backend; returns the JSON it prints last.

    The code must print one JSON object on its last stdout line. A heap-corruption abort runs
    it once more (`run_process`).
    """
    full_env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = run_process(
        [sys.executable, "-c", textwrap.dedent(code)], timeout=timeout, env=full_env, cwd=ROOT
    )
    assert proc.returncode == 0, f"{backend} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ir_ops(model_xml) -> dict:
    """Operator counts of an OpenVINO IR (`model.xml`)."""
    import collections

    import openvino as ov

    model = ov.Core().read_model(str(model_xml))
    return collections.Counter(op.get_type_name() for op in model.get_ordered_ops())


TINY_PRESET_CODE = """
import sys, keras, keras_hub
sys.path.insert(0, {tests!r})
keras.utils.set_random_seed(0)
from conftest import FILLER, NEGATIVE, POSITIVE
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + POSITIVE + NEGATIVE
tokenizer = keras_hub.models.DistilBertTokenizer(vocabulary=vocab, lowercase=True)
backbone = keras_hub.models.DistilBertBackbone(
    vocabulary_size=len(vocab), num_layers=2, num_heads=2, hidden_dim=32,
    intermediate_dim=64, max_sequence_length=64, dropout={dropout},
)
backbone.save_to_preset({out!r})
tokenizer.save_to_preset({out!r})
print("{{}}")
"""


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A directory that `build(directory)` fills once per test run, shared by every worker.

    Under pytest-xdist (README's test command runs two workers) each worker has its own
    session, so a session fixture would build its data once per worker: the first worker to ask
    builds it here, under a file lock, and the others wait for it and reuse it. Alone, pytest
    builds it in the session's own temporary directory.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    from filelock import FileLock

    directory = tmp_path_factory.getbasetemp().parent / name  # the run's, not the worker's
    with FileLock(f"{directory}.lock"):
        if not (directory / ".built").is_file():
            shutil.rmtree(directory, ignore_errors=True)  # a failed attempt's leftovers
            directory.mkdir()
            build(directory)
            (directory / ".built").write_text("")
    return directory


def _build_tiny_preset(backend: str, dropout: float):
    def build(directory: Path) -> None:
        code = TINY_PRESET_CODE.format(
            tests=str(ROOT / "tests"), out=str(directory / "preset"), dropout=dropout
        )
        run_backend(backend, code)

    return build


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory) -> Path:
    """A KerasHub preset directory of a seeded 2-layer, hidden-32 DistilBERT, 27-word vocabulary."""
    build = _build_tiny_preset("tensorflow" if HAS_TENSORFLOW else "jax", 0.1)
    return shared_dir(tmp_path_factory, "tiny", build) / "preset"


@pytest.fixture(scope="session")
def tiny_preset_no_dropout(tmp_path_factory) -> Path:
    """`tiny_preset` with the backbone's dropout off (runs that must match step for step)."""
    return shared_dir(tmp_path_factory, "tiny0", _build_tiny_preset("tensorflow", 0.0)) / "preset"


@pytest.fixture(scope="session")
def sarcasm_file() -> Path:
    if not SARCASM.is_file():
        pytest.skip(
            f"needs the sarcasm dataset at {SARCASM} (../shared/data/ beside the clone, or "
            "$KERASFT_DATA; see README's Data section)"
        )
    return SARCASM


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    def build(directory: Path) -> None:
        texts, labels = toy_texts(400, seed=5)
        (directory / "toy.jsonl").write_text(
            "".join(
                json.dumps({"text": t, "label": ["neg", "pos"][y]}) + "\n"
                for t, y in zip(texts, labels, strict=True)
            )
        )

    return shared_dir(tmp_path_factory, "toy", build) / "toy.jsonl"


CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# Toy texts are 6 to 16 tokens: one batch shape (and a remainder), so JAX and TensorFlow
# compile each step once instead of once per bucket (a JAX fit of the toy data: 24 s, not 35).
TOY_BUCKETS = ["--bucket-width", "16"]


def fit_args(backend, preset, data, out, warmup_epochs=2, finetune_epochs=8) -> list[str]:
    """`kerasft fit` on the tiny preset and toy data: the recipe of the shared `toy_runs`."""
    args = [sys.executable, "-m", "kerasft", "--backend", backend, "fit", "--data", str(data)]
    args += ["--out", str(out), "--preset", str(preset), "--sequence-length", "32", "--quiet"]
    args += TOY_BUCKETS
    args += ["--batch-size", "16", "--warmup-epochs", str(warmup_epochs), "--warmup-lr", "1e-2"]
    args += ["--finetune-epochs", str(finetune_epochs), "--finetune-lr", "3e-3"]
    return args


def fit_run(backend, preset, data, out, **kwargs):
    args = fit_args(backend, preset, data, out, **kwargs)
    proc = subprocess.run(args, capture_output=True, text=True, env=CLI_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def toy_runs(tiny_preset, toy_data, tmp_path_factory):
    """A finished toy run per backend, shared by the whole test run (read them, never change
    them)."""

    def build(directory: Path) -> None:
        for backend in BACKENDS:
            fit_run(backend, tiny_preset, toy_data, directory / backend)

    root = shared_dir(tmp_path_factory, "runs", build)
    return {b: root / b for b in BACKENDS}


@pytest.fixture(scope="session")
def toy_export(toy_runs, tmp_path_factory):
    """`toy_export(format, quantize=None)`: an export of the TensorFlow toy run, built once per
    session and shared (read it, never change it)."""
    built = {}

    def get(format: str, quantize: str | None = None) -> Path:
        from kerasft.exporters.dispatch import export

        if (format, quantize) not in built:
            out = tmp_path_factory.mktemp("export") / f"{format}-{quantize or 'fp32'}"
            built[format, quantize] = export(
                toy_runs["tensorflow"], out, format=format, quantize=quantize
            )
        return built[format, quantize]

    return get
