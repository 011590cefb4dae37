"""The `kerasft` command line: `fit`, `export`, `predict`, `evaluate`, `bench`.

Heavy libraries load inside the subcommands; `--backend` (or `KERAS_BACKEND`) is applied before
Keras is imported. The default backend is PyTorch: on the machines these were measured on (2-core
AMD EPYCs) it runs a whole short `kerasft fit` fastest (benchmarks/results/backends_limit4000.md:
62 s against 88-127 s, with AVX512_BF16) and its stage-2 steps are the fastest of the three, ahead
of Hugging Face Trainer's (benchmarks/results/train_speed.md, with AVX512_BF16 and with AVX2
only). `python -m kerasft.benchmarks.train_speed --quick` measures another machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from kerasft import BACKENDS

DEFAULT_BACKEND = "torch"

log = logging.getLogger("kerasft")


def _devices(text: str) -> int | str:
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a device count >= 1 or 'all', got {text!r}")
    return int(text)


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `RecipeConfig` field: its flag, default, help and choices come from it."""
    from kerasft.config import RecipeConfig, flag_name

    for field in dataclasses.fields(RecipeConfig):
        meta, flag = field.metadata, flag_name(field)
        if isinstance(field.default, bool):  # `--no-X` turns off, any other flag turns on
            action = "store_false" if field.default else "store_true"
            parser.add_argument(
                flag, dest=field.name, action=action, default=field.default, help=meta["help"]
            )
            continue
        parse = meta["parse"]
        metavar = meta["metavar"]
        if metavar is None and not meta["choices"]:
            metavar = flag[2:].replace("-", "_").upper()  # `--warmup-lr WARMUP_LR`
        parser.add_argument(
            flag, dest=field.name, default=field.default, help=meta["help"],
            type=parse if parse in (None, int, float) else _arg_type(parse),
            choices=meta["choices"], metavar=metavar, nargs=meta["nargs"],
        )  # fmt: skip


def _arg_type(parse):
    """`parse` for argparse: its `ValueError` message becomes the usage error."""

    def arg_type(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    arg_type.__name__ = parse.__name__
    return arg_type


def recipe_from_args(args: argparse.Namespace):
    """The `RecipeConfig` of parsed `kerasft fit` arguments.

    Raises:
        ValueError: a value out of range (the message names the option).
    """
    from kerasft.config import RecipeConfig

    values = {}
    for field in dataclasses.fields(RecipeConfig):
        value = getattr(args, field.name)
        if field.metadata["nargs"] and isinstance(value, list) and len(value) == 1:
            value = value[0]  # `--weight-decay X`: one value for both stages
        values[field.name] = value
    return RecipeConfig(**values)


def recipe_flags(recipe) -> list[str]:
    """The `kerasft fit` flags that give `recipe` (defaults left out): the inverse of
    `recipe_from_args`.

    Example:
        >>> recipe_flags(RecipeConfig(warmup_epochs=1, weight_decay=[0.0, 0.01]))
        ['--warmup-epochs', '1', '--weight-decay', '0.0', '0.01']
    """
    from kerasft.config import flag_name

    flags = []
    for field in dataclasses.fields(recipe):
        value, flag = getattr(recipe, field.name), flag_name(field)
        if value == field.default:
            continue
        if isinstance(value, bool):  # booleans are flags without a value
            flags.append(flag)
        elif value is None:  # off, where the default is on (`--mixed-precision none`)
            flags += [flag, "none"]
        elif isinstance(value, dict):
            flags += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        elif isinstance(value, list):
            texts = [str(v) for v in value]
            flags += [flag, *texts] if field.metadata["nargs"] else [flag, ",".join(texts)]
        else:
            flags += [flag, str(value)]
    return flags


def _data_file_flags() -> argparse.ArgumentParser:
    """The data-file flags `fit`, `predict --data` and `evaluate` share, declared once (an
    argparse parent)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("data file")
    group.add_argument("--text-column", help="the text column (default: detected)")
    group.add_argument(
        "--label-column",
        help="the label column (default: detected; predict reads it only with --score)",
    )
    group.add_argument("--encoding", default="utf-8", help="the data file's text encoding")
    group.add_argument(
        "--no-header", action="store_true",
        help="CSV/TSV: the first row is data; columns are named 0, 1, ... (default: detected)",
    )  # fmt: skip
    invalid = "drop rows without a text (or without a label, where labels are read)"
    group.add_argument("--skip-invalid", action="store_true", help=invalid)
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The `kerasft` parser: one builder per command, the data-file flags declared once."""
    parser = argparse.ArgumentParser(prog="kerasft", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help=f"Keras backend (default: $KERAS_BACKEND, else {DEFAULT_BACKEND})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data_file = _data_file_flags()
    _fit_parser(sub, data_file)
    _export_parser(sub)
    _predict_parser(sub, data_file)
    _evaluate_parser(sub, data_file)
    sub.add_parser(
        "bench",
        add_help=False,
        help="latency of every variant vs Hugging Face peers "
        "(python -m kerasft.benchmarks.latency)",
    )
    return parser


def _fit_parser(sub, data_file: argparse.ArgumentParser) -> None:
    from kerasft.data import DATA_ENV, REFERENCE_SEED

    fit = sub.add_parser(
        "fit", parents=[data_file], help="two-stage fine-tuning on the reference 60/20/20 split"
    )
    fit.add_argument("--data", help=f"data file (default: ${DATA_ENV})")
    fit.add_argument("--out", help="run directory to create")
    fit.add_argument(
        "--resume", metavar="RUN",
        help="continue the interrupted run RUN from its last completed epoch, with the options "
        "it was started with (running the same command again does the same)",
    )  # fmt: skip
    fit.add_argument("--limit", type=int, help="stratified subsample of N rows before the split")
    fit.add_argument(
        "--split-seed", type=int, default=REFERENCE_SEED,
        help=f"random_state of the 60/20/20 split, apart from --seed (default {REFERENCE_SEED}, "
        "the reference split)",
    )  # fmt: skip
    fit.add_argument(
        "--validation-data", metavar="FILE",
        help="validation rows from their own file (labels matched by name); see --test-data",
    )  # fmt: skip
    fit.add_argument(
        "--test-data", metavar="FILE",
        help="test rows from their own file. With both, --data is used whole for training; "
        "with one, --data is split 75/25 (stratified, --split-seed) into training rows and the "
        "other set",
    )  # fmt: skip
    _add_recipe_flags(fit)
    fit.add_argument(
        "--devices", type=_devices, metavar="N|all",
        help="data-parallel training over N devices, or all (jax: keras.distribution, "
        "tensorflow: tf.distribute, torch: torch.distributed, one process per device; default: "
        "one device). --batch-size stays the global batch",
    )  # fmt: skip
    fit.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    fit.add_argument("--quiet", action="store_true", help="no per-step progress bars")


def _export_parser(sub) -> None:
    from kerasft.exporters.formats import FORMATS, INT8_MODES, int8_help
    from kerasft.exporters.verify import (
        AUTO_MIN_AGREEMENT,
        INT8_MAX_ACCURACY_DROP,
        INT8_MIN_AGREEMENT,
    )

    export = sub.add_parser(
        "export", help="export a run to ONNX, OpenVINO, SavedModel or LiteRT, verified"
    )
    export.add_argument("run_dir", help="a `kerasft fit` run directory")
    export.add_argument("--format", required=True, choices=list(FORMATS), help="artifact format")
    export.add_argument("--int8", choices=INT8_MODES, help=int8_help())
    export.add_argument(
        "--min-agreement", type=float,
        help="INT8 gate: least label agreement with fp32 on held-out texts, at batch 1 and 32 "
        f"(default {INT8_MIN_AGREEMENT}; {AUTO_MIN_AGREEMENT} with --int8 auto)",
    )  # fmt: skip
    export.add_argument(
        "--max-accuracy-drop", type=float, default=INT8_MAX_ACCURACY_DROP,
        help="INT8 gate: largest accuracy drop on held-out labelled texts, as a fraction "
        f"(default {INT8_MAX_ACCURACY_DROP} = half a point)",
    )  # fmt: skip
    export.add_argument(
        "--keep-fp32", type=int, metavar="N",
        help="onnx --int8 calibrated or dynamic: keep the N most sensitive nodes in fp32 "
        "(measured); default: all quantized, more kept only when the gate needs it",
    )  # fmt: skip
    export.add_argument(
        "--precision", choices=("f32", "bf16"), default="f32",
        help="openvino: inference precision to verify with and record (default f32)",
    )  # fmt: skip
    export.add_argument("--out", required=True, help="export directory to create")
    export.add_argument("--batch-size", type=int, help="fix the batch axis to N (default: dynamic)")
    export.add_argument(
        "--sequence-length",
        type=int,
        help="fix the sequence axis to N tokens; texts are cut to N (default: dynamic)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _predict_parser(sub, data_file: argparse.ArgumentParser) -> None:
    from kerasft.labelling import OUTPUT_FORMATS
    from kerasft.textstream import INPUT_FORMATS

    predict = sub.add_parser(
        "predict", parents=[data_file],
        help="label texts, or a file of texts, with a run or export directory",
    )  # fmt: skip
    predict.add_argument("run_dir", help="a `kerasft fit` run or a `kerasft export` directory")
    predict.add_argument("texts", nargs="*", help="texts to label (or --data)")
    predict.add_argument(
        "--data", metavar="FILE",
        help="label every row of FILE (JSONL/JSON/CSV/TSV/.txt, optionally gzipped; - reads "
        "standard input, one text per line unless --input-format), streamed in chunks",
    )  # fmt: skip
    file_only = predict.add_argument_group("with --data")
    file_only.add_argument(
        "--out", metavar="FILE",
        help="--data: write the predictions to FILE, complete or not at all (default: stdout)",
    )  # fmt: skip
    file_only.add_argument(
        "--output-format", choices=OUTPUT_FORMATS,
        help="--data: jsonl (default) or csv (default for a .csv --out): line, id, label and "
        "one probability per class",
    )  # fmt: skip
    input_format = "--data: the file's format (default: from its suffix; lines for stdin)"
    file_only.add_argument("--input-format", choices=INPUT_FORMATS, help=input_format)
    file_only.add_argument(
        "--id-column", help="--data: a column copied to each output row (default: `id`, if any)"
    )
    file_only.add_argument(
        "--score", action="store_true",
        help="--data: score the predictions against the file's label column (--label-column, "
        "default: detected); labels are otherwise ignored",
    )  # fmt: skip
    file_only.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    file_only.add_argument(
        "--quiet", action="store_true",
        help="--data: no progress on stderr (shown only when stderr is a terminal)",
    )  # fmt: skip
    # for the check that these (and the data-file flags) are not given with texts, not --data
    only_with_data = [*file_only._group_actions, *data_file._actions]
    predict.set_defaults(file_flags=[(a.option_strings[-1], a.dest, a.default)
                                     for a in only_with_data])  # fmt: skip
    predict.add_argument(
        "--json", action="store_true",
        help="texts: a JSON list of {text, label, probability} instead of 'label<TAB>probability"
        "<TAB>text' lines",
    )  # fmt: skip
    predict.add_argument(
        "--manifest-sha256", help="export only: refuse a manifest whose sha256 differs"
    )


def _evaluate_parser(sub, data_file: argparse.ArgumentParser) -> None:
    evaluate = sub.add_parser(
        "evaluate", parents=[data_file], help="score every row of a labelled file"
    )
    evaluate.add_argument("run_dir", help="a `kerasft fit` run directory")
    evaluate.add_argument("--data", required=True, help="labelled data file, scored whole")
    evaluate.add_argument(
        "--json",
        action="store_true",
        help="the metrics as one JSON object instead of 'name: value' lines",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kerasft` console script. Returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what another process re-runs
    if args.command == "bench":  # its own parser: `kerasft bench --help` lists its options
        from kerasft.benchmarks.latency import main as bench_main

        return bench_main(extra, prog="kerasft bench")
    if args.command == "predict" and extra and not args.texts and not _has_flag(extra):
        # `predict RUN --json TEXT ...`: argparse gives an optional `texts` nothing once an
        # option follows RUN, and leaves the texts over
        args.texts, extra = extra, []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "export":
        # Exports are traced from the backend-neutral .keras file under the format's graph
        # source (PyTorch for ONNX and OpenVINO, TensorFlow for SavedModel and LiteRT), whatever
        # backend trained the model (the manifest records that one): no second process.
        from kerasft.exporters.formats import FORMATS

        os.environ["KERAS_BACKEND"] = FORMATS[args.format].default_source
    elif args.command == "fit" and args.resume and (saved := _saved_fit_args(args.resume)):
        os.environ["KERAS_BACKEND"] = saved["backend"]  # the interrupted run's backend
    elif args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    else:
        os.environ.setdefault("KERAS_BACKEND", DEFAULT_BACKEND)
        if os.environ["KERAS_BACKEND"] not in BACKENDS:
            print(
                f"kerasft {args.command}: error: KERAS_BACKEND={os.environ['KERAS_BACKEND']!r} "
                f"is not a backend kerasft runs on. Use one of: {', '.join(BACKENDS)} "
                f"(--backend NAME, or unset KERAS_BACKEND for {DEFAULT_BACKEND}).",
                file=sys.stderr,
            )
            return 2
    # kerasft's own progress at INFO; other libraries' INFO lines (onnxruntime's quantizer logs
    # through the root logger) stay hidden.
    logging.basicConfig(level=logging.WARNING, format="[kerasft] %(message)s")
    logging.getLogger("kerasft").setLevel(logging.INFO)
    from kerasft.data import DATA_ENV, DataError
    from kerasft.wording import command_line

    if args.command == "fit" and args.data is None:
        args.data = os.environ.get(DATA_ENV)
    try:
        commands = {
            "fit": cmd_fit,
            "export": cmd_export,
            "predict": cmd_predict,
            "evaluate": cmd_evaluate,
        }
        with command_line():  # messages name --flags, not keywords
            return commands[args.command](args)
    except (DataError, OSError, ValueError, RuntimeError) as e:
        # One line, no traceback: bad input, a lock held by another writer, a full disk or a
        # read-only target (OSError covers FileNotFoundError and FileExistsError).
        print(f"kerasft {args.command}: error: {e}", file=sys.stderr)
        return 2


def _has_flag(words: list[str]) -> bool:
    return any(w.startswith("-") and len(w) > 1 for w in words)


# `kerasft fit` options that define a run, besides the recipe's: the same values continue an
# interrupted run (`run_options`).
DATA_OPTIONS = (
    "backend", "data", "text_column", "label_column", "skip_invalid", "limit", "split_seed",
    "validation_data", "test_data", "encoding", "no_header",
)  # fmt: skip


def run_options() -> dict[str, str]:
    """`{dest: flag}` of every `kerasft fit` option that defines a run (data and recipe)."""
    from kerasft.config import RecipeConfig, flag_name

    options = {name: "--" + name.replace("_", "-") for name in DATA_OPTIONS}
    options.update((f.name, flag_name(f)) for f in dataclasses.fields(RecipeConfig))
    return options


class TrainedModelKept(RuntimeError):
    """A failure after training; the message says where the trained model is."""


def _fit_target(args) -> Path:
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise ValueError(f"--resume {args.resume!r} and --out {args.out!r} name different runs.")
    if not (args.resume or args.out):
        raise ValueError("Name the run directory: --out RUN (or --resume RUN).")
    return Path(args.resume or args.out)


def _partial_dir(out: Path) -> Path:
    from kerasft.rundir import partial_dir

    return partial_dir(out)


def _saved_fit_args(out: Path) -> dict | None:
    from kerasft.rundir import FIT_ARGS_FILE

    path = _partial_dir(out) / FIT_ARGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def cmd_fit(args) -> int:
    from kerasft import distribute

    out = _fit_target(args)
    args.backend = os.environ["KERAS_BACKEND"]  # the one `main` chose, recorded for --resume
    distribute.check_devices(args.devices, args.backend)  # a bad count: before any work
    for name in ("data", "validation_data", "test_data"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    if args.backend == "torch" and args.devices not in (None, 1) and distribute.torch_world() == 1:
        processes = distribute.local_processes(args.devices)  # torch: one process per device
        if processes > 1:
            return distribute.launch_local(args.argv, processes)
        args.devices = None  # `all` of one device
    if distribute.initialize():  # one process of a multi-process run (torchrun's, or Keras')
        if args.backend == "torch":
            return _fit_torch_process(args, out)
        return _fit_multi_process(args, out)
    return _fit_here(args, out)


def _fit_here(args, out: Path, shared: bool = False) -> int:
    """The fit that builds and publishes the run directory (resuming an interrupted one).

    `shared`: process 0 of a multi-process PyTorch run, whose other processes wait until the
    directory is ready and its options written, then read them (`_fit_torch_process`).
    """
    from kerasft import distribute
    from kerasft.checkpoint import STATE_FILE
    from kerasft.data import DATA_ENV, DataError
    from kerasft.fileio import atomic_write_text, publish_target
    from kerasft.rundir import CHECKPOINT_DIR, FIT_ARGS_FILE, MODEL_FILE, partial_dir

    options, work = run_options(), partial_dir(out)
    interrupted = work.is_dir() and any(work.iterdir())

    def keep(work: Path) -> bool:  # what `--resume` continues from, or an untouched other run
        done = (work / CHECKPOINT_DIR / STATE_FILE).exists() or (work / MODEL_FILE).exists()
        return done or (interrupted and not started)

    started = False
    try:
        with publish_target(out, args.overwrite, "Run directory", work=work, keep_work=keep):
            saved = _saved_fit_args(out)
            _resolve_interrupted(args, out, saved, options)
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
                distribute.barrier()  # the other processes read the options and checkpoint
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
    from kerasft.checkpoint import STATE_FILE
    from kerasft.rundir import CHECKPOINT_DIR

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


def _resolve_interrupted(args, out: Path, saved: dict | None, options: dict[str, str]) -> None:
    """`--resume`: takes the interrupted run's options. Otherwise refuses to start over an
    interrupted run of `out` with other options (unless `--overwrite`)."""
    if args.resume:
        if saved is None:
            raise FileNotFoundError(
                f"Nothing to resume for {str(out)!r}: no interrupted run in "
                f"{str(_partial_dir(out))!r}."
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
                f"{str(_partial_dir(out))!r} ({'; '.join(differ)}). `kerasft fit --resume "
                f"{out}` continues it; --overwrite discards it."
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
    import jax

    from kerasft.allocator import keep_freed_memory

    keep_freed_memory(args.backend)  # before jax.process_index() starts XLA (fit's is too late)

    from kerasft.data import DATA_ENV
    from kerasft.fileio import publish_target

    if args.resume:
        raise ValueError("--resume is not supported in a multi-process run (no checkpoints).")
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
    with publish_target(out, args.overwrite, "Run directory", work=_partial_dir(out)) as work:
        _clear(work)
        metrics = _fit_into(args, recipe, out, work, checkpoint=False)
    _print_fit(metrics, out)
    return 0


def _fit_torch_process(args, out: Path) -> int:
    """One process of a multi-process PyTorch run (torchrun, or `launch_local`): process 0
    builds, checkpoints and publishes the run as one process does; the others wait until it
    has prepared the run directory, take the run's options from it (so that `--resume` resumes
    the same run everywhere), read its checkpoint and train their share of every batch."""
    import torch.distributed as dist

    from kerasft import distribute
    from kerasft.rundir import CHECKPOINT_DIR, FIT_ARGS_FILE

    rank, world = dist.get_rank(), dist.get_world_size()
    if args.devices not in ("all", world):
        raise ValueError(
            f"--devices {args.devices}, but this run has {world} processes (one device each): "
            f"pass --devices all or {world}."
        )
    if rank == 0:
        return _fit_here(args, out, shared=True)
    distribute.barrier()  # process 0 has prepared the run directory
    work = _partial_dir(out)
    saved = json.loads((work / FIT_ARGS_FILE).read_text())
    for name in run_options():
        setattr(args, name, saved.get(name, getattr(args, name)))
    recipe = recipe_from_args(args)
    log.info("process %d of %d: training; process 0 writes %s", rank, world, out)
    _fit_into(args, recipe, out, None, checkpoint=work / CHECKPOINT_DIR)
    return 0


def _read_splits(args, seed: int):
    """The data source, the `(train, validation, test)` splits and row counts of a fit."""
    import keras

    from kerasft import rundir
    from kerasft.data import load_dataset

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
    from kerasft import rundir
    from kerasft.tuner import TwoStageFineTuner

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
    print(
        f"test accuracy {test_m['accuracy']:.4f}  f1 {test_m['f1']:.4f}  precision "
        f"{test_m['precision']:.4f}  recall {test_m['recall']:.4f}  "
        f"({seconds['total']:.0f} s; warm-up {seconds.get('warmup', 0):.0f} s, "
        f"fine-tune {seconds.get('finetune', 0):.0f} s) -> {out}"
    )


def _load_run(run_dir: str):
    from kerasft.tuner import load_tuner

    tuner = load_tuner(run_dir)
    tuner.verbose = 0
    return tuner


def cmd_export(args) -> int:
    from kerasft.exporters import export, exportdir

    out = export(
        args.run_dir,
        args.out,
        format=args.format,
        quantize=args.int8,
        overwrite=args.overwrite,
        fixed_shape=(args.batch_size, args.sequence_length),
        min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop,
        precision=args.precision,
        keep_fp32=args.keep_fp32,
    )
    manifest = exportdir.read_manifest(out)
    check, variant = manifest["verification"], exportdir.variant(manifest)
    acc = check.get("accuracy")
    drop = (
        f", accuracy {0 - acc['drop'] * 100:+.2f} points vs Keras on {acc['texts']} held-out texts "
        f"(95% CI {0 - acc['drop_ci95'][1] * 100:+.2f} to {0 - acc['drop_ci95'][0] * 100:+.2f})"
        if acc
        else ""
    )
    partial = check.get("agreement_texts", check["texts"]) != check["texts"]
    held_out = " on held-out texts" if partial else ""
    per_batch = check.get("per_batch_size")
    if per_batch:  # reduced precision: each serving batch size, the worst decides
        drop += "; by serving batch size: " + ", ".join(
            f"{size}: {r['label_agreement']:.2%}" for size, r in per_batch.items()
        )
    print(
        f"{args.format} {variant}: {manifest['size_bytes'] / 1e6:.1f} MB, "
        f"verified on {check['texts']} texts (max |logit diff| {check['max_abs_logit_diff']:.2g}, "
        f"label agreement {check['label_agreement']:.2%}{held_out}{drop}) -> {out}\n"
        f"manifest sha256 {exportdir.manifest_sha256(out)} "
        "(pin it: runtime.load(dir, manifest_sha256=...))"
    )
    return 0


def cmd_predict(args) -> int:
    if args.data is not None:
        return _predict_file(args)
    if not args.texts:
        raise ValueError("Nothing to label: give texts, or --data FILE (- for standard input).")
    given = [flag for flag, dest, default in args.file_flags if getattr(args, dest) != default]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --data "
                         "FILE only, not to texts given as arguments.")  # fmt: skip
    names, predict_proba, _ = _predictor(args)
    proba = predict_proba(args.texts)
    rows = [
        {"text": text, "label": names[k], "probability": float(p[k])}
        for text, k, p in zip(args.texts, proba.argmax(axis=1), proba, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")
    return 0


def _predictor(args):
    """`(label_names, predict_proba, chunk_rows)` of a run directory (Keras) or an export (its
    runtime, no Keras)."""
    from kerasft.exporters.exportdir import is_export

    if is_export(args.run_dir):
        from kerasft.exporters.runtime import load

        model = load(args.run_dir, manifest_sha256=args.manifest_sha256)
        return model.label_names, lambda texts: model.predict(texts).probabilities, model.chunk_rows
    if args.manifest_sha256:
        raise ValueError(
            f"--manifest-sha256 pins an export's manifest; {args.run_dir!r} is a run directory."
        )
    from kerasft.labelling import CHUNK_ROWS

    tuner = _load_run(args.run_dir)
    return tuner.label_names, tuner.predict_proba, CHUNK_ROWS


def _predict_file(args) -> int:
    """`kerasft predict RUN --data FILE`: streams the file through the model into --out."""
    from kerasft.labelling import label_file
    from kerasft.textstream import read_texts

    if args.texts:
        raise ValueError(
            f"Give texts or --data, not both. Received: --data {args.data} and "
            f"{len(args.texts)} text(s) ({args.texts[0]!r}, ...)."
        )
    if args.label_column and not args.score:
        raise ValueError("--label-column names the labels to score: add --score.")
    stream = read_texts(
        args.data, text_column=args.text_column, label_column=args.label_column,
        id_column=args.id_column, encoding=args.encoding,
        header=False if args.no_header else None, input_format=args.input_format,
        labels=args.score, skip_invalid=args.skip_invalid,
    )  # fmt: skip
    names, predict_proba, chunk_rows = _predictor(args)
    summary = label_file(
        stream, predict_proba, names, out=args.out, output_format=args.output_format,
        chunk_rows=chunk_rows, overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),
    )  # fmt: skip
    if not args.quiet:
        skipped = f" ({summary['skipped']} skipped)" if summary["skipped"] else ""
        log.info("labelled %d rows%s in %.1f s (%.0f rows/s) -> %s", summary["rows"], skipped,
                 summary["seconds"], summary["rows_per_second"], args.out or "stdout")  # fmt: skip
    if "metrics" in summary:
        m = summary["metrics"]
        print(
            f"scored {m['rows']} rows: accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  "
            f"precision {m['precision']:.4f}  recall {m['recall']:.4f}  confusion "
            f"{m['confusion_matrix']} (rows = true, cols = predicted)",
            file=sys.stderr,
        )
    return 0


def cmd_evaluate(args) -> int:
    from kerasft.data import load_dataset

    tuner = _load_run(args.run_dir)
    data = load_dataset(args.data, args.text_column, args.label_column, args.skip_invalid,
                        args.encoding, header=False if args.no_header else None)  # fmt: skip
    metrics = tuner.score(data)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key in ("rows", "accuracy", "precision", "recall", "f1"):
            print(
                f"{key:>10}: {metrics[key]:.4f}" if key != "rows" else f"{key:>10}: {metrics[key]}"
            )
        print(f"{'confusion':>10}: {metrics['confusion_matrix']} (rows = true, cols = predicted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
