"""Starting the processes of a PyTorch run on this host, and hearing why one failed.

`kerasft fit --devices N` on PyTorch runs N processes of one `torch.distributed` run with torch's
own launcher (`launch_local`, what `torchrun` runs); under `torchrun` itself, each process reads
the launcher's `WORLD_SIZE` (`torch_world`). A process that meets bad input hands its one-line
error to the launcher (`relay_error`) instead of printing it, so that the user reads the cause
once, not the cause and every other process's "peer closed the connection".

Imports no framework at module level: the CLI uses it before the backend is chosen.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

TORCH_WORLD_ENV = "WORLD_SIZE"  # set by torchrun (and `launch_local`) in every process
ERRORS_ENV = "KERASFT_LAUNCH_ERRORS"  # the folder `launch_local`'s processes relay errors to
INPUT_ERROR = 2  # the exit code of bad input, one line on stderr


def torch_world() -> int:
    """The process count torchrun (or `launch_local`) gave this process; 1 outside a group."""
    value = os.environ.get(TORCH_WORLD_ENV, "1")
    return int(value) if value.isdigit() else 1


def torch_rank() -> int:
    """This process's rank in a torchrun (or `launch_local`) group, before the group starts."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def local_processes(devices: int | str) -> int:
    """How many processes `kerasft fit --devices N|all` starts on one PyTorch host: N, or for
    `all` one per GPU (else one per CPU core)."""
    if devices != "all":
        return int(devices)
    import torch  # lazily: only `all` asks torch how many GPUs there are

    return torch.cuda.device_count() or os.cpu_count() or 1


def relay_error(line: str) -> bool:
    """In a process `launch_local` started: hands `line` (a one-line input error) to the
    launcher, which prints the first such line of the run once. Returns False, doing nothing,
    in any other process (the caller prints it)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    name = f"{time.time_ns():020d}-rank{torch_rank()}"  # earliest first: the cause
    (Path(folder) / f".{name}").write_text(line)
    (Path(folder) / f".{name}").rename(Path(folder) / name)
    return True


def launch_local(argv: list[str], processes: int) -> int:
    """Runs `python -m kerasft ARGV` as `processes` processes of one PyTorch run on this host,
    with torch's own launcher (`torch.distributed.launcher.api.elastic_launch`, what `torchrun`
    runs: c10d rendezvous on 127.0.0.1, no restarts). Each process gets an equal share of the
    CPU's threads. When one process fails, the launcher stops the others.

    Returns:
        0; or 2 after printing the first input error a process relayed (`relay_error`) when
        every failed process stopped on bad input; or 1 after logging which process crashed
        and how (a signal, or another exit code).
    """
    # lazily: torch's launcher loads torch, which `kerasft --help` must not
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"kerasft-{uuid.uuid4().hex}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
        monitor_interval=0.5,
    )  # fmt: skip
    log.info("starting %d PyTorch processes (torch.distributed, %s threads each)",
             processes, os.environ["OMP_NUM_THREADS"])  # fmt: skip
    # torch's agent logs each failed process too; kerasft says it once, below
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level, agent_log.level = agent_log.level, logging.CRITICAL
    with tempfile.TemporaryDirectory(prefix="kerasft-launch-") as errors:
        os.environ[ERRORS_ENV] = errors
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "kerasft", *argv)
        except ChildFailedError as e:
            relayed = sorted(Path(errors).glob("[0-9]*"))
            if relayed and _stopped_on_input(list(e.failures.values())):
                print(relayed[0].read_text(), file=sys.stderr)
                return INPUT_ERROR
            for rank, failure in sorted(e.failures.items()):
                how = (f"signal {failure.signal_name()}" if failure.exitcode < 0
                       else f"exit code {failure.exitcode}")  # fmt: skip
                log.error("process %d of %d failed (%s); the launcher stopped the others",
                          rank, processes, how)  # fmt: skip
            return 1
        finally:
            del os.environ[ERRORS_ENV]
            agent_log.setLevel(level)
    return 0


def _stopped_on_input(failures: list) -> bool:
    """Whether a run's failed processes stopped on bad input: at least one exited with
    `INPUT_ERROR`, and each other one too or by the SIGTERM with which torch's agent stops the
    rest once one has failed (a process slower to read the same bad row gets that signal)."""
    codes = [f.exitcode for f in failures]
    return INPUT_ERROR in codes and all(c in (INPUT_ERROR, -signal.SIGTERM) for c in codes)
