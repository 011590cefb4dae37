"""Every check `kerasft fit` makes before it trains, run once before any process starts.

A single-process fit and the launcher of a multi-process one run the same checks, in this order,
and none of them reads the data rows or starts the backend: the run directory and `--resume`'s
state (nothing to resume, a run already complete, an interrupted run with other options or another
process count), the recipe's values, the data files (there, a known format, not empty), the
batch's split over the processes, and a lock held by another writer. The first that fails is
one line and exit code 2, and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from kerasft.cli.parser import recipe_from_args, run_options
from kerasft.data import DATA_ENV, DataError, check_data_file
from kerasft.runs.rundir import CHECKPOINT_DIR, METRICS_FILE, partial_dir, saved_fit_args
from kerasft.training.checkpoint import STATE_FILE
from kerasft.training.config import RecipeConfig
from kerasft.util.fileio import check_target_dir, target_lock

DATA_FLAGS = {"data": "--data", "validation_data": "--validation-data", "test_data": "--test-data"}


def fit_target(args) -> Path:
    """The run directory a `kerasft fit` command names (`--out`, or `--resume`).

    Raises:
        ValueError: neither is given, or they name different runs.
    """
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise ValueError(f"--resume {args.resume!r} and --out {args.out!r} name different runs.")
    if not (args.resume or args.out):
        raise ValueError("Name the run directory: --out RUN (or --resume RUN).")
    return Path(args.resume or args.out)


def resolve_interrupted(args, out: Path, saved: dict | None, options: dict[str, str]) -> None:
    """`--resume`: takes the interrupted run's options. Otherwise refuses to start over an
    interrupted run of `out` with other options (unless `--overwrite`).

    Raises:
        FileExistsError: `--resume` of a run that is complete (the message says where its metrics
            are), or an interrupted run with other options without `--overwrite`.
        FileNotFoundError: `--resume` with nothing to resume.
    """
    if args.resume:
        if saved is None:
            if (out / METRICS_FILE).is_file():
                raise FileExistsError(
                    f"Nothing to resume: the run {str(out)!r} is complete (its metrics are in "
                    f"{str(out / METRICS_FILE)!r}). --out NEW starts another run; --out "
                    f"{out} --overwrite replaces it."
                )
            raise FileNotFoundError(
                f"Nothing to resume for {str(out)!r}: no interrupted run in "
                f"{str(partial_dir(out))!r}."
            )
        for name in options:  # the interrupted run's options, whatever was typed now
            setattr(args, name, saved.get(name, getattr(args, name)))
    elif saved is not None and not args.overwrite:
        # (an option the interrupted run's kerasft did not know yet keeps its default)
        typed = {k: getattr(args, k) for k in options}
        differ = [f"{options[k]} {saved[k]!r} -> {v!r}"
                  for k, v in typed.items() if saved.get(k, v) != v]  # fmt: skip
        if differ:
            raise FileExistsError(
                f"An interrupted run of {str(out)!r} with other options is in "
                f"{str(partial_dir(out))!r} ({'; '.join(differ)}). `kerasft fit --resume "
                f"{out}` continues it; --overwrite discards it."
            )


def check_fit(args, out: Path, processes: int = 1, replicas: int | None = None) -> RecipeConfig:
    """Runs every check of a fit of `out` (see the module), taking an interrupted run's options
    into `args` for `--resume`. Returns the recipe.

    Args:
        args: the parsed `kerasft fit` arguments.
        out: the run directory.
        processes: the run's processes (a checkpoint resumes over as many).
        replicas: the devices each batch is split across (None: not known yet).

    Raises:
        ValueError, DataError, OSError: the first check that fails, in one line.
    """
    saved = saved_fit_args(out)
    resolve_interrupted(args, out, saved, run_options())
    if not args.resume:
        check_target_dir(out, args.overwrite, "Run directory")
    elif saved is not None:
        _check_process_count(out, processes)
    recipe = recipe_from_args(args)
    if not args.data:
        raise DataError(f"No data file: pass --data FILE or set ${DATA_ENV}.")
    for name in DATA_FLAGS:
        if getattr(args, name):
            check_data_file(getattr(args, name))
    if replicas and recipe.batch_size % replicas:
        unit = "processes (one device each)" if processes > 1 else "devices"
        raise ValueError(
            f"--batch-size {recipe.batch_size} does not split evenly across {replicas} {unit}: "
            f"use a multiple of {replicas}, or a --devices count that divides "
            f"{recipe.batch_size}."
        )
    with target_lock(out, "Run directory"):  # another writer holds it: refused now
        pass
    return recipe


def _check_process_count(out: Path, processes: int) -> None:
    """An interrupted run resumes over as many processes as its checkpoint was written by."""
    state = partial_dir(out) / CHECKPOINT_DIR / STATE_FILE
    if not state.is_file():
        return
    theirs = json.loads(state.read_text()).get("fingerprint", {}).get("processes") or 1
    if theirs != processes:
        raise ValueError(
            f"The checkpoint in {str(state.parent)!r} was written by a different run "
            f"(processes: checkpoint {theirs} vs now {processes}). Resume with the same process "
            f"count (--devices {theirs}), or delete that directory."
        )
