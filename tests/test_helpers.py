"""The shared helpers' own behaviour: `run_process` (under `run_backend`) runs a process glibc
aborted for a corrupted heap once more, and only that."""

import pytest

from conftest import run_backend

# Aborts the way glibc does on a corrupted heap while `marker` has fewer than `aborts` lines.
ABORTING = """
import json, os, sys
marker = {marker!r}
runs = open(marker).read().count("\\n") if os.path.exists(marker) else 0
open(marker, "a").write("run\\n")
if runs < {aborts}:
    sys.stderr.write({message!r} + "\\n")
    sys.stderr.flush()
    os.abort()
print(json.dumps({{"runs": runs + 1}}))
"""


def _code(tmp_path, aborts, message="malloc(): unaligned tcache chunk detected"):
    return ABORTING.format(marker=str(tmp_path / "runs"), aborts=aborts, message=message)


def test_a_heap_corruption_abort_runs_once_more_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="corrupted heap; ran again"):
        assert run_backend("torch", _code(tmp_path, aborts=1)) == {"runs": 2}


def test_two_heap_corruption_aborts_fail(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(AssertionError, match="unaligned tcache"):
        run_backend("torch", _code(tmp_path, aborts=2))
    assert (tmp_path / "runs").read_text().count("\n") == 2


def test_any_other_abort_fails_at_once(tmp_path):
    with pytest.raises(AssertionError, match="Assertion failed"):
        run_backend("torch", _code(tmp_path, aborts=1, message="Assertion failed: x > 0"))
    assert (tmp_path / "runs").read_text().count("\n") == 1
