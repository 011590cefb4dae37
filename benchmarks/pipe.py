"""The benchmarks' child processes: one JSON object a line, commands in, replies out.

A harness runs each engine or variant in its own process (`Child`), so that loading,
compilation and memory never mix. The child reads commands from its stdin and writes replies
to the stdout it had when it started (`child_pipe`); whatever its libraries print goes to
stderr, which the parent keeps in a log file and quotes when the child dies.

Example:
    >>> child = Child("onnx fp32", ["kerasft.benchmarks.worker", spec_json], log, env)
    >>> child.call(op="time", batch=1, seq=32, seconds=1.0)["seconds"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TextIO

LOG_TAIL = 3000  # characters of a dead child's log quoted in the error


class Child:
    """A running `python -m MODULE ...` that answers JSON-line commands.

    Args:
        name: what errors call it.
        argv: the module and its arguments (after `python -m`).
        log: the file its stderr goes to.
        env: its environment.
    """

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]):
        self.name = name
        self.log = open(log, "w")  # noqa: SIM115  (closed by `close`)
        self.process = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip

    def read(self) -> dict:
        """The next reply.

        Raises:
            RuntimeError: the child exited (its exit code and the end of its log are quoted),
                or replied `{"error": ...}`.
        """
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.flush()
            tail = Path(self.log.name).read_text()[-LOG_TAIL:]
            raise RuntimeError(
                f"{self.name}: worker exited ({self.process.returncode}); {self.log.name}:\n{tail}"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']} (see {self.log.name})")
        return reply

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def call(self, **command) -> dict:
        """Sends `command` and returns its reply (see `read`)."""
        self.send(**command)
        return self.read()

    def close(self, timeout: float = 60) -> None:
        """Asks a running child to quit, kills it after `timeout` seconds, closes the log."""
        if self.process.poll() is None:
            try:
                self.send(op="quit")
                self.process.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def child_pipe() -> TextIO:
    """In the child: the pipe to the parent (the stdout it started with). From here on,
    anything printed, by Python or by a library's C code, goes to stderr, the parent's log."""
    pipe = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return pipe


def reply(pipe: TextIO, message: dict) -> None:
    """In the child: sends one reply."""
    pipe.write(json.dumps(message) + "\n")
    pipe.flush()


def next_command() -> dict:
    """In the child: the next command (`{"op": "quit"}` once the parent has closed the pipe)."""
    line = sys.stdin.readline()
    return json.loads(line) if line else {"op": "quit"}
