"""A multi-process PyTorch fit refuses bad input as a single-process fit does: checked once,
before any process starts, one `error:` line, exit code 2, nothing written, the data file read at
most once. An input error only a worker can see is printed once, by the launcher."""

import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import CLI_ENV, shared_dir

ENV = {**CLI_ENV, "KERAS_BACKEND": "torch"}


def _fit(preset, data, out, *extra, timeout=300):
    args = [sys.executable, "-m", "kerasft", "--backend", "torch", "fit", "--data", str(data)]
    args += ["--out", str(out), "--preset", str(preset), "--sequence-length", "32", "--quiet"]
    args += ["--warmup-epochs", "1", "--finetune-epochs", "1", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout)


def _refused(proc, entries_before: set, folder: Path) -> str:
    """The one error line of a refused fit; checks exit 2, no new directory, no process started
    and at most one read of the data."""
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert set(folder.iterdir()) == entries_before, sorted(folder.iterdir())
    assert "starting" not in proc.stderr and "joined a" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("[kerasft] reading ") <= 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="session")
def finished_run(tiny_preset, toy_data, tmp_path_factory):
    """A finished 2-process PyTorch run, shared (read it, never change it)."""

    def build(directory: Path) -> None:
        proc = _fit(tiny_preset, toy_data, directory / "two", "--devices", "2", timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    return shared_dir(tmp_path_factory, "launch", build) / "two"


def test_a_batch_that_does_not_split_is_refused_before_any_process(tiny_preset, toy_data, tmp_path):
    before = set(tmp_path.iterdir())
    line = _refused(_fit(tiny_preset, toy_data, tmp_path / "run", "--devices", "3"), before,
                    tmp_path)  # fmt: skip
    assert line == (
        "kerasft fit: error: --batch-size 32 does not split evenly across 3 processes (one "
        "device each): use a multiple of 3, or a --devices count that divides 32."
    )


@pytest.mark.parametrize("devices", ["2", "4"])
def test_resume_of_a_finished_run_says_it_is_complete(finished_run, tiny_preset, toy_data, devices):
    folder = finished_run.parent
    before = set(folder.iterdir())
    proc = _fit(tiny_preset, toy_data, finished_run, "--resume", str(finished_run), "--devices",
                devices)  # fmt: skip
    line = _refused(proc, before, folder)
    assert "Nothing to resume: the run" in line and "is complete" in line, line
    assert str(finished_run / "metrics.json") in line, line


def test_resume_of_a_finished_single_process_run_says_it_is_complete(toy_runs):
    run = toy_runs["torch"]
    before = set(run.parent.iterdir())
    args = [sys.executable, "-m", "kerasft", "fit", "--resume", str(run)]
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    line = _refused(proc, before, run.parent)
    assert f"the run {str(run)!r} is complete" in line, line


def test_a_target_another_writer_holds_is_refused_before_any_process(
    tiny_preset, toy_data, tmp_path
):
    from kerasft.util.fileio import target_lock

    out = tmp_path / "held"
    with target_lock(out, "Run directory"):
        before = set(tmp_path.iterdir())
        line = _refused(_fit(tiny_preset, toy_data, out, "--devices", "2"), before, tmp_path)
    assert "is being written by another kerasft process" in line, line


def test_a_missing_data_file_is_refused_before_any_process(tiny_preset, tmp_path):
    before = set(tmp_path.iterdir())
    proc = _fit(tiny_preset, tmp_path / "nope.jsonl", tmp_path / "run", "--devices", "2")
    assert _refused(proc, before, tmp_path) == (
        f"kerasft fit: error: Data file not found: {str(tmp_path / 'nope.jsonl')!r}"
    )


@pytest.mark.slow
def test_an_error_the_workers_find_is_printed_once(tiny_preset, toy_data, tmp_path):
    """A malformed row passes the launcher's checks (they read no rows); both workers find it,
    the launcher prints the first one's line, and no peer's broken-connection line."""
    lines = Path(toy_data).read_text().splitlines()
    lines[50] = '{"text": "cut short'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    alone = _fit(tiny_preset, bad, tmp_path / "alone")  # what a single process says
    assert alone.returncode == 2, alone.stderr[-3000:]
    expected = [line for line in alone.stderr.splitlines() if "error:" in line]
    assert len(expected) == 1 and "malformed JSON" in expected[0], alone.stderr[-3000:]
    before = set(tmp_path.iterdir())
    proc = _fit(tiny_preset, bad, tmp_path / "run", "--devices", "2")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and errors == expected, proc.stderr[-3000:]
    assert "peer" not in proc.stderr and "failed" not in proc.stderr, proc.stderr[-3000:]
    assert "starting 2 PyTorch processes" in proc.stderr  # the workers found it, not the launcher
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "codes, input_error",
    [
        ([2, 2], True),
        ([-signal.SIGTERM, 2], True),  # the slower process stopped by torch's agent (a CI run)
        ([-signal.SIGTERM], False),  # no process met bad input
        ([-signal.SIGKILL, 2], False),  # killed (out of memory): a crash, named as one
        ([1, 2], False),
    ],
)
def test_a_run_stopped_on_input_only_when_no_process_crashed(codes, input_error):
    from kerasft.devices.launcher import _stopped_on_input

    failures = [SimpleNamespace(exitcode=c) for c in codes]
    assert _stopped_on_input(failures) is input_error
