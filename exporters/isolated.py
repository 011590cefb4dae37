"""`export` in a subprocess under another Keras backend, with its documented errors raised again
in the caller.

The `.keras` file is backend-neutral: a format traced under another backend than the current
one (SavedModel and LiteRT under TensorFlow, ONNX and OpenVINO under PyTorch) is exported by
`python -m kerasft.exporters.dispatch REQUEST ERROR` (`dispatch._run_request`), which writes any
documented error to ERROR for `subprocess_error` to raise here.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kerasft.data import DataError
from kerasft.exporters.verify import VerificationError
from kerasft.runs.rundir import MODEL_FILE, DataChangedError
from kerasft.util.fileio import LockError

log = logging.getLogger(__name__)
PROGRESS_PREFIX = "[kerasft] "  # how `_run_request` logs; such lines are passed on as progress


def log_progress(prefix: str = PROGRESS_PREFIX) -> None:
    """Prints kerasft's INFO log lines to stderr as `PREFIX message`: in a subprocess whose
    parent shows its progress (`exports_in_subprocess`, the bench's artifact builder)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    logging.getLogger("kerasft").addHandler(handler)
    logging.getLogger("kerasft").setLevel(logging.INFO)


def export_in_subprocess(source, out_dir, backend: str = "tensorflow", **options) -> Path:
    """Re-runs `export(source, out_dir, **options)` in a subprocess under Keras `backend`.

    Used when the current backend is not the one the format's graph is traced under (the
    `.keras` file is backend-neutral), and by the latency harness so that each export's memory
    is returned when it ends.

    Raises:
        The subprocess's own error where it is one `export` documents (`ValueError`,
        `FileExistsError`, `FileNotFoundError`, `LockError`, `DataChangedError`,
        `VerificationError` with its report), else `RuntimeError` with the subprocess's stderr.
    """
    exports_in_subprocess(source, [(out_dir, options)], backend)
    return Path(out_dir)


def exports_in_subprocess(source, jobs: list[tuple], backend: str = "tensorflow") -> None:
    """`export(source, out_dir, **options)` for each `(out_dir, options)` of `jobs`, in order,
    in one subprocess under Keras `backend`: the libraries load once for all of them. Its
    progress lines are logged here as they come (INFO, this module's logger).

    Raises:
        As `export_in_subprocess`, for the first export that fails (the later ones do not run;
        those before it are complete).
    """
    with tempfile.TemporaryDirectory() as tmp:
        if not isinstance(source, (str, os.PathLike)):
            source.save(Path(tmp) / MODEL_FILE)
            source = tmp
        requests = []
        for out_dir, options in jobs:
            request = {"out_dir": str(out_dir), **options}
            if request.get("labels") is not None:
                request["labels"] = [str(v) for v in request["labels"]]
            requests.append(request)
        (Path(tmp) / "request.json").write_text(json.dumps({"source": str(source),
                                                            "jobs": requests}))  # fmt: skip
        error_file = Path(tmp) / "error.json"
        env = {**os.environ, "KERAS_BACKEND": backend}
        tail = collections.deque(maxlen=60)  # for the error message
        with subprocess.Popen(
            [sys.executable, "-m", "kerasft.exporters.dispatch", str(Path(tmp) / "request.json"),
             str(error_file)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ) as proc:  # fmt: skip
            for line in proc.stdout:
                tail.append(line)
                if line.startswith(PROGRESS_PREFIX):
                    log.info("%s", line[len(PROGRESS_PREFIX) :].rstrip())
        if proc.returncode:
            if error_file.is_file():
                raise subprocess_error(json.loads(error_file.read_text())) from None
            output = "".join(tail)[-4000:]
            raise RuntimeError(f"Export under the {backend} backend failed:\n{output}")


def passed_on_errors() -> dict[str, type[Exception]]:
    """The errors `export` documents, by name: raised again as themselves by the parent of an
    export subprocess."""
    kinds = (ValueError, FileExistsError, FileNotFoundError, LockError, DataChangedError,
             DataError)  # fmt: skip
    return {kind.__name__: kind for kind in (*kinds, VerificationError)}


def subprocess_error(error: dict) -> Exception:
    """The exception an export subprocess wrote to its error file (`_run_request`)."""
    kind = passed_on_errors()[error["type"]]
    if kind is VerificationError:
        return VerificationError(error["message"], error["report"])
    return kind(error["message"])
