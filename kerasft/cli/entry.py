"""The `kerasft` command's entry point: parse, choose the backend before Keras loads, run the
command and turn bad input into one line and exit code 2."""

from __future__ import annotations

import logging
import os
import sys

from kerasft import BACKENDS
from kerasft.cli.commands import cmd_evaluate, cmd_export, cmd_predict
from kerasft.cli.parser import DEFAULT_BACKEND, build_parser
from kerasft.data import DATA_ENV, DataError
from kerasft.devices.backends import keep_to_backend
from kerasft.devices.launcher import INPUT_ERROR, relay_error
from kerasft.exporters.exportdir import is_export, manifest_format
from kerasft.exporters.formats import FORMATS
from kerasft.exporters.runtime import TENSORFLOW_FORMATS
from kerasft.runs.rundir import saved_fit_args
from kerasft.util.wording import command_line


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kerasft` console script. Returns the exit code.

    Args:
        argv: the arguments; None reads `sys.argv` and makes this process the command's own
            (`kerasft`, `python -m kerasft`), which also keeps TensorFlow out of a PyTorch or
            JAX run (`kerasft.devices.backends.keep_to_backend`).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what another process re-runs
    if args.command == "bench":  # its own parser: `kerasft bench --help` lists its options
        # lazily: the harness is the only command that needs it
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
        os.environ["KERAS_BACKEND"] = FORMATS[args.format].default_source
    elif args.command == "fit" and args.resume and (saved := saved_fit_args(args.resume)):
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
            return INPUT_ERROR
    if argv is None and not _runs_on_tensorflow(args):
        # No TensorFlow behind a PyTorch or JAX run, in the command's own process only: a
        # caller's (argv given) is left as it is.
        keep_to_backend(os.environ["KERAS_BACKEND"])
    # kerasft's own progress at INFO; other libraries' INFO lines (onnxruntime's quantizer logs
    # through the root logger) stay hidden.
    logging.basicConfig(level=logging.WARNING, format="[kerasft] %(message)s")
    logging.getLogger("kerasft").setLevel(logging.INFO)
    if args.command == "fit" and args.data is None:
        args.data = os.environ.get(DATA_ENV)
    try:
        with command_line():  # messages name --flags, not keywords
            return _command(args.command)(args)
    except (DataError, OSError, ValueError, RuntimeError) as e:
        # One line, no traceback: bad input, a lock held by another writer, a full disk or a
        # read-only target (OSError covers FileNotFoundError and FileExistsError).
        line = f"kerasft {args.command}: error: {e}"
        if not relay_error(line):  # a process of `kerasft fit --devices N`: the launcher prints
            print(line, file=sys.stderr)
        return INPUT_ERROR


def _has_flag(words: list[str]) -> bool:
    return any(w.startswith("-") and len(w) > 1 for w in words)


def _command(name: str):
    """The function that runs command `name`."""
    if name == "fit":
        # lazily: it imports Keras, which reads KERAS_BACKEND once, as `main` has just set it
        from kerasft.cli.fit import cmd_fit

        return cmd_fit
    return {"export": cmd_export, "predict": cmd_predict, "evaluate": cmd_evaluate}[name]


def _runs_on_tensorflow(args) -> bool:
    """Whether the command serves an export whose runtime is TensorFlow's (SavedModel, LiteRT)."""
    if args.command != "predict" or not is_export(args.run_dir):
        return False
    try:
        return manifest_format(args.run_dir) in TENSORFLOW_FORMATS
    except ValueError:  # an unreadable manifest: `predict` says so, in one line
        return False
