"""`kerasft fit`: the fit-run lifecycle.

A fit builds its run in the partial directory `.RUN.partial` and renames it into place when
complete; an interrupted run is resumed from its last checkpoint with the options it was started
with; a full disk says what is kept; `--devices N` launches one process per device (PyTorch) or
joins a multi-process run (JAX, TensorFlow).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import keras

from kerasft.cli.parser import recipe_from_args, run_options
from kerasft.cli.preflight import DATA_FLAGS, check_fit, fit_target, resolve_interrupted
from kerasft.data import DATA_ENV, DataError, load_dataset
from kerasft.devices import distribute
from kerasft.devices.allocator import keep_freed_memory
from kerasft.devices.launcher import launch_local, local_processes, torch_rank, torch_world
from kerasft.runs import rundir
from kerasft.runs.rundir import (
    CHECKPOINT_DIR,
    FIT_ARGS_FILE,
    MODEL_FILE,
    partial_dir,
    saved_fit_args,
)
from kerasft.training.checkpoint import STATE_FILE
from kerasft.training.tuner import TwoStageFineTuner
from kerasft.util.fileio import atomic_write_text, publish_target

log = logging.getLogger("kerasft")


class TrainedModelKept(RuntimeError):
    """A failure after training; the message says where the trained model is."""


def cmd_fit(args) -> int:
    out = fit_target(args)
    args.backend = os.environ["KERAS_BACKEND"]  # the one `main` chose, recorded for --resume
    distribute.check_devices(args.devices, args.backend)  # a bad count: before any work
    for name in DATA_FLAGS:
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    processes, replicas = _process_count(args)
    if _first_process():  # the others start after process 0 (or the launcher) checked it all
        check_fit(args, out, processes, replicas)
    if processes > 1 and torch_world() == 1:  # torch: one process per device, started here
        return launch_local(args.argv, processes)
    if distribute.initialize():  # one process of a multi-process run (torchrun's, or Keras')
        if args.backend == "torch":
            return _fit_torch_process(args, out)
        return _fit_multi_process(args, out)
    return _fit_here(args, out)


def _process_count(args) -> tuple[int, int | None]:
    """`(processes, replicas)` of the run `args` asks for: its processes (more than one only on
    PyTorch, one per device), and the devices each batch is split across (None: not known
    before the backend starts). Under a launcher (torchrun), no `--devices` means all of its
    processes.

    Raises:
        ValueError: a `--devices` count other than the launcher's process count.
    """
    world = torch_world() if args.backend == "torch" else 1
    if world > 1:
        if args.devices is None:
            args.devices = "all"
        elif args.devices not in ("all", world) and _first_process():
            # (the other processes wait for process 0, whose error stops the run: one line)
            raise ValueError(
                f"--devices {args.devices}, but this run has {world} processes (one device "
                f"each, from the launcher's WORLD_SIZE): pass --devices all or {world}, or "
                "leave --devices out."
            )
        return world, world
    if args.backend == "torch" and args.devices not in (None, 1):
        processes = local_processes(args.devices)
        if processes == 1:
            args.devices = None  # `all` of one device
        return processes, processes
    return 1, args.devices if isinstance(args.devices, int) else None


def _first_process() -> bool:
    """Whether this is a run's first (or only) process, by its launcher's variables."""
    return torch_rank() == 0 and os.environ.get(distribute.PROCESS_ID_ENV, "0") in ("", "0")


def _fit_here(args, out: Path, shared: bool = False) -> int:
    """The fit that builds and publishes the run directory (resuming an interrupted one).

    `shared`: process 0 of a multi-process PyTorch run, whose other processes wait until the
    directory is ready and its options written, then read them (`_fit_torch_process`).
    """
    options, work = run_options(), partial_dir(out)
    interrupted = work.is_dir() and any(work.iterdir())

    def keep(work: Path) -> bool:  # what `--resume` continues from, or an untouched other run
        done = (work / CHECKPOINT_DIR / STATE_FILE).exists() or (work / MODEL_FILE).exists()
        return done or (interrupted and not started)

    started = False
    try:
        with publish_target(out, args.overwrite, "Run directory", work=work, keep_work=keep):
            saved = saved_fit_args(out)
            resolve_interrupted(args, out, saved, options)
            recipe = recipe_from_args(args)  # bad values refused before any work
            if not args.data:
                raise DataError(f"No data file: pass --data FILE or set ${DATA_ENV}.")
            started = True
            if args.overwrite or saved is None:
                _clear(work)
            elif interrupted:
                log.info("resuming the interrupted run in %s", work)
            fit_args = json.dumps({k: getattr(args, k) for k in options})
            atomic_write_text(work / FIT_ARGS_FILE, fit_args)
            if shared:
                distribute.barrier()  # the options are written: the other processes read them
                distribute.barrier()  # and have: a failure from here on cannot hide them
            metrics = _fit_into(args, recipe, out, work)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise RuntimeError(_disk_full(e, out, work)) from None
    _print_fit(metrics, out)
    return 0


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(error: OSError, out: Path, work: Path) -> str:
    """The one line of a fit that ran out of space: where, what is kept, how to continue."""
    reason = os.strerror(error.errno).lower()
    state = work / CHECKPOINT_DIR / STATE_FILE
    if not state.is_file():
        return (
            f"{reason} while writing the run in {work} (errno {error.errno}); no epoch had "
            "finished, so nothing is kept. Free space there and run the same command again."
        )
    done = json.loads(state.read_text())
    return (
        f"{reason} while writing the run in {work} (errno {error.errno}). It is kept up to its "
        f"last complete checkpoint ({done['epochs_done']} epoch(s) done, {done['stage']} "
        f"stage): free space there, then `kerasft fit --resume {out}` continues it."
    )


def _clear(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _fit_multi_process(args, out: Path) -> int:
    """One process of a multi-process run: every process trains, process 0 writes the run.

    Checkpoints (and so resuming) are not supported across processes: each would need the same
    checkpoint. Process 0 builds the run in `.RUN.partial` and renames it into place, as a
    single-process fit does.
    """
    import jax  # this backend's own process API (fit.py serves all three)

    keep_freed_memory(args.backend)  # before jax.process_index() starts XLA (fit's is too late)

    if args.resume:
        raise ValueError("--resume is not supported in a multi-process run (no checkpoints).")
    if args.devices is None:  # under a launcher: every device of every process
        args.devices = "all"
    if args.devices != "all":
        raise ValueError(
            f"A multi-process run trains on every device of every process: pass --devices all. "
            f"Received: --devices {args.devices}"
        )
    if not args.data:
        raise ValueError(f"No data file: pass --data FILE or set ${DATA_ENV}.")
    recipe = recipe_from_args(args)
    if jax.process_index() != 0:
        log.info("process %d of %d: training; process 0 writes %s",
                 jax.process_index(), jax.process_count(), out)  # fmt: skip
        return _fit_into(args, recipe, out, None)
    with publish_target(out, args.overwrite, "Run directory", work=partial_dir(out)) as work:
        _clear(work)
        metrics = _fit_into(args, recipe, out, work, checkpoint=False)
    _print_fit(metrics, out)
    return 0


def _fit_torch_process(args, out: Path) -> int:
    """One process of a multi-process PyTorch run (torchrun, or `launch_local`): process 0
    builds, checkpoints and publishes the run as one process does; the others wait until it
    has prepared the run directory, take the run's options from it (so that `--resume` resumes
    the same run everywhere), read its checkpoint and train their share of every batch."""
    import torch.distributed as dist  # this backend's own process API

    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        return _fit_here(args, out, shared=True)
    distribute.barrier()  # process 0 has prepared the run directory
    work = partial_dir(out)
    saved = json.loads((work / FIT_ARGS_FILE).read_text())
    distribute.barrier()  # read: process 0 may go on (and fail) now
    for name in run_options():
        setattr(args, name, saved.get(name, getattr(args, name)))
    recipe = recipe_from_args(args)
    log.info("process %d of %d: training; process 0 writes %s", rank, world, out)
    _fit_into(args, recipe, out, None, checkpoint=work / CHECKPOINT_DIR)
    return 0


def _read_splits(args, seed: int):
    """The data source, the `(train, validation, test)` splits and row counts of a fit."""
    source = rundir.DataSource.from_file(
        args.data, validation=args.validation_data, test=args.test_data,
        skip_invalid=args.skip_invalid, limit=args.limit, limit_seed=seed,
        split_seed=args.split_seed, encoding=args.encoding,
    )  # fmt: skip
    log.info("reading %s (%.1f MB)", source.path, source.size / 1e6)
    data = load_dataset(source.path, args.text_column, args.label_column, args.skip_invalid,
                        args.encoding, header=False if args.no_header else None)  # fmt: skip
    # The columns found, so that the splits are rebuilt from the same ones.
    source.text_column, source.label_column = data.columns["text"], data.columns["label"]
    source.header = data.header
    used = source.select(data)
    train, val, test = source.split(used)
    log.info(
        "%s: %d rows (%d skipped) -> train %d / validation %d / test %d; backend %s",
        args.data, len(used), data.skipped, len(train), len(val), len(test),
        keras.backend.backend(),
    )  # fmt: skip
    rows = {"file": len(data) + data.skipped, "used": len(used), "skipped": data.skipped,
            "train": len(train), "validation": len(val), "test": len(test)}  # fmt: skip
    return source, (train, val, test), rows


def _fit_into(
    args, recipe, out: Path, work: Path | None, checkpoint: bool | Path = True
) -> dict | None:
    """Loads the data, fits, and writes the run into `work` (None: train only, write nothing).

    `checkpoint`: False for none; with `work` None, the checkpoint directory to resume from
    (another process writes it).

    Returns:
        The run's metrics (None when nothing is written).
    """
    start = time.perf_counter()
    source, (train, val, test), rows = _read_splits(args, recipe.seed)
    # Progress bars only on a terminal: redirected to a file, one line per epoch (Keras'
    # verbose=2) instead of carriage returns and escape codes.
    verbose = "auto" if sys.stdout.isatty() and not args.quiet else 2
    tuner = TwoStageFineTuner(recipe=recipe, distribution=args.devices, verbose=verbose)
    stage2 = "LoRA adapters + head" if recipe.finetune_method == "lora" else "all layers"
    log.info("stage 1: warm-up (backbone frozen), stage 2: fine-tune (%s)", stage2)
    if work is None:
        read = checkpoint if isinstance(checkpoint, Path) else None
        tuner.fit(train, validation_data=val, checkpoint_dir=read)
        return None
    checkpoints = work / rundir.CHECKPOINT_DIR
    tuner.fit(train, validation_data=val, checkpoint_dir=checkpoints if checkpoint else None)
    try:
        metrics = rundir.write_run(
            work, tuner, train=train, validation=val, test=test, source=source, rows=rows,
            total_seconds_since=start,
        )  # fmt: skip
        rundir.drop_resume_files(work)
    except Exception as e:
        model = work / rundir.MODEL_FILE
        where = (
            f"The trained model is saved: {model}"
            if model.is_file()
            else f"The trained weights are in the checkpoint {checkpoints}"
        )
        raise TrainedModelKept(
            f"{type(e).__name__}: {e} after training. {where}; `kerasft fit --resume {out}` "
            "finishes the run without training again."
        ) from e
    return metrics


def _print_fit(metrics: dict, out: Path) -> None:
    test_m, seconds = metrics["test"], metrics["seconds"]
    compiled = sum(metrics.get("compile_seconds", {}).values())
    compiling = f"; compiling {compiled:.0f} s of them" if compiled >= 0.5 else ""
    print(
        f"test accuracy {test_m['accuracy']:.4f}  f1 {test_m['f1']:.4f}  precision "
        f"{test_m['precision']:.4f}  recall {test_m['recall']:.4f}  "
        f"({seconds['total']:.0f} s; warm-up {seconds.get('warmup', 0):.0f} s, "
        f"fine-tune {seconds.get('finetune', 0):.0f} s{compiling}) -> {out}"
    )
