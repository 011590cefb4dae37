"""The `kerasft` command line: `fit`, `export`, `predict`, `evaluate`, `bench`.

Heavy libraries load inside the subcommands; `--backend` (or `KERAS_BACKEND`) is applied before
Keras is imported. The default backend is PyTorch: it trains fastest of the three on the 2-core
CPU machines this project is measured on (benchmarks/results/train_speed.md; `python -m
kerasft.benchmarks.train_speed --quick` measures another machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_BACKEND = "torch"

log = logging.getLogger("kerasft")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _devices(text: str) -> int | str:
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a device count >= 1 or 'all', got {text!r}")
    return int(text)


def _class_weight(text: str) -> str | dict[str, float]:
    """`balanced`, or `LABEL=WEIGHT,LABEL=WEIGHT` (label names as in the data file)."""
    if text == "balanced":
        return text
    weights = {}
    for item in text.split(","):
        name, sep, weight = item.rpartition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"expected 'balanced' or LABEL=WEIGHT[,LABEL=WEIGHT...], got {text!r}"
            )
    return weights


def build_parser() -> argparse.ArgumentParser:
    from kerasft.config import FINETUNE_METHODS, MIXED_PRECISION, SELECT_BEST, RecipeConfig
    from kerasft.data import DATA_ENV, REFERENCE_SEED
    from kerasft.exporters.verify import INT8_MAX_ACCURACY_DROP, INT8_MIN_AGREEMENT
    from kerasft.presets import DEFAULT_PRESET

    parser = argparse.ArgumentParser(prog="kerasft", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help=f"Keras backend (default: $KERAS_BACKEND, else {DEFAULT_BACKEND})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="two-stage fine-tuning on the reference 60/20/20 split")
    fit.add_argument("--data", default=os.environ.get(DATA_ENV), help=f"data file (or ${DATA_ENV})")
    fit.add_argument("--out", help="run directory to create")
    fit.add_argument(
        "--resume", metavar="RUN",
        help="continue the interrupted run RUN from its last completed epoch, with the options "
        "it was started with (running the same command again does the same)",
    )  # fmt: skip
    fit.add_argument(
        "--preset", default=DEFAULT_PRESET,
        help=f"preset name or directory (default {DEFAULT_PRESET}: offline; KerasHub presets "
        "such as distil_bert_base_en_uncased download from Kaggle)",
    )  # fmt: skip
    fit.add_argument("--text-column")
    fit.add_argument("--label-column")
    fit.add_argument("--skip-invalid", action="store_true", help="drop rows without text/label")
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
    fit.add_argument("--sequence-length", type=int, default=RecipeConfig.sequence_length)
    fit.add_argument("--warmup-epochs", type=_positive_int, default=RecipeConfig.warmup_epochs)
    fit.add_argument("--warmup-lr", type=float, default=RecipeConfig.warmup_learning_rate)
    fit.add_argument("--finetune-epochs", type=_positive_int, default=RecipeConfig.finetune_epochs)
    fit.add_argument("--finetune-lr", type=float, default=RecipeConfig.finetune_learning_rate)
    fit.add_argument(
        "--finetune-schedule",
        choices=("constant", "linear"),
        default=RecipeConfig.finetune_schedule,
        help="stage-2 learning rate: constant, or linear decay to 0",
    )
    fit.add_argument(
        "--select-best", choices=SELECT_BEST,
        help="after stage 2, keep the epoch with the best validation score (default: the last)",
    )  # fmt: skip
    fit.add_argument(
        "--early-stopping-patience", type=int, metavar="N",
        help="stop stage 2 after N epochs without a better validation score",
    )  # fmt: skip
    fit.add_argument(
        "--weight-decay", type=float, nargs="+", metavar="X",
        help="AdamW weight decay: one value for both stages, or two (warm-up, fine-tune); "
        "default 0 (Adam)",
    )  # fmt: skip
    fit.add_argument(
        "--warmup-ratio", type=float, default=RecipeConfig.warmup_ratio,
        help="fraction of stage 2's steps with a linear learning-rate warm-up (default 0)",
    )  # fmt: skip
    fit.add_argument(
        "--max-grad-norm", type=float, help="clip gradients to this global norm (default: none)"
    )
    fit.add_argument(
        "--gradient-accumulation-steps", type=int, metavar="N",
        default=RecipeConfig.gradient_accumulation_steps,
        help="one optimizer step per N batches (default 1)",
    )  # fmt: skip
    fit.add_argument(
        "--mixed-precision", choices=MIXED_PRECISION,
        help="train under Keras' mixed_bfloat16 / mixed_float16 policy (saved in float32)",
    )  # fmt: skip
    fit.add_argument(
        "--class-weight", type=_class_weight, metavar="balanced|LABEL=W,...",
        help="weigh the training loss per class: 'balanced' or e.g. '1=2.5' (default: none)",
    )  # fmt: skip
    fit.add_argument(
        "--finetune-method", choices=FINETUNE_METHODS, default=RecipeConfig.finetune_method,
        help="stage 2: full (every weight) or lora (low-rank adapters + head; base frozen)",
    )  # fmt: skip
    fit.add_argument(
        "--lora-rank", type=int, default=RecipeConfig.lora_rank,
        help=f"LoRA adapters' rank (default {RecipeConfig.lora_rank})",
    )  # fmt: skip
    fit.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default: the rank)")
    fit.add_argument(
        "--lora-targets", type=lambda t: [n.strip() for n in t.split(",")], metavar="A,B",
        help="backbone layers to adapt (default: KerasHub's, attention query,value)",
    )  # fmt: skip
    fit.add_argument(
        "--no-feature-cache", dest="cache_features", action="store_false",
        help="stage 1 runs the frozen backbone on every step instead of once (slower; the "
        "batch order of a multi-process run)",
    )  # fmt: skip
    fit.add_argument(
        "--devices", type=_devices, metavar="N|all",
        help="data-parallel training over N devices, or all (jax: keras.distribution, "
        "tensorflow: tf.distribute; default: one device). --batch-size stays the global batch",
    )  # fmt: skip
    fit.add_argument("--batch-size", type=int, default=RecipeConfig.batch_size)
    fit.add_argument("--seed", type=int, default=RecipeConfig.seed)
    fit.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    fit.add_argument("--quiet", action="store_true", help="no per-step progress bars")

    export = sub.add_parser(
        "export", help="export a run to ONNX, OpenVINO, SavedModel or LiteRT, verified"
    )
    export.add_argument("run_dir")
    export.add_argument(
        "--format", required=True, choices=("onnx", "openvino", "saved_model", "litert")
    )
    export.add_argument(
        "--int8",
        choices=("dynamic", "static", "nncf", "keras"),
        help="dynamic: onnxruntime dynamic INT8 (onnx) or dynamic-range (litert); static: "
        "calibrated QDQ INT8 (onnx); nncf: NNCF post-training INT8 (openvino); keras: Keras "
        "quantize('int8') (saved_model)",
    )
    export.add_argument(
        "--min-agreement", type=float, default=INT8_MIN_AGREEMENT,
        help=f"INT8 gate: least label agreement with fp32 (default {INT8_MIN_AGREEMENT})",
    )  # fmt: skip
    export.add_argument(
        "--max-accuracy-drop", type=float, default=INT8_MAX_ACCURACY_DROP,
        help="INT8 gate: largest accuracy drop on held-out labelled texts, as a fraction "
        f"(default {INT8_MAX_ACCURACY_DROP} = one point)",
    )  # fmt: skip
    export.add_argument(
        "--keep-fp32", type=int, metavar="N",
        help="onnx --int8 dynamic: keep the N most sensitive nodes in fp32 (measured); default: "
        "all quantized, more kept only when the gate needs it",
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

    predict = sub.add_parser("predict", help="label texts with a run or export directory")
    predict.add_argument("run_dir", help="a `kerasft fit` run or a `kerasft export` directory")
    predict.add_argument("texts", nargs="+")
    predict.add_argument("--json", action="store_true")
    predict.add_argument(
        "--manifest-sha256", help="export only: refuse a manifest whose sha256 differs"
    )

    evaluate = sub.add_parser("evaluate", help="score every row of a labelled file")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--text-column")
    evaluate.add_argument("--label-column")
    evaluate.add_argument("--json", action="store_true")

    sub.add_parser(
        "bench",
        add_help=False,
        help="latency of every variant vs Hugging Face peers "
        "(python -m kerasft.benchmarks.latency)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kerasft` console script. Returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # its own parser: `kerasft bench --help` lists its options
        from kerasft.benchmarks.latency import main as bench_main

        return bench_main(extra, prog="kerasft bench")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "export":
        # Exports are traced under TensorFlow from the backend-neutral .keras file, whatever
        # backend trained the model (the manifest records that one).
        os.environ["KERAS_BACKEND"] = "tensorflow"
    elif args.command == "fit" and args.resume and (saved := _saved_fit_args(args.resume)):
        os.environ["KERAS_BACKEND"] = saved["backend"]  # the interrupted run's backend
    elif args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    else:
        os.environ.setdefault("KERAS_BACKEND", DEFAULT_BACKEND)
    # kerasft's own progress at INFO; other libraries' INFO lines (onnxruntime's quantizer logs
    # through the root logger) stay hidden.
    logging.basicConfig(level=logging.WARNING, format="[kerasft] %(message)s")
    logging.getLogger("kerasft").setLevel(logging.INFO)
    from kerasft.data import DataError

    try:
        commands = {
            "fit": cmd_fit,
            "export": cmd_export,
            "predict": cmd_predict,
            "evaluate": cmd_evaluate,
        }
        return commands[args.command](args)
    except (DataError, OSError, ValueError, RuntimeError) as e:
        # One line, no traceback: bad input, a lock held by another writer, a full disk or a
        # read-only target (OSError covers FileNotFoundError and FileExistsError).
        print(f"kerasft {args.command}: error: {e}", file=sys.stderr)
        return 2


# `kerasft fit` options that define a run: the same values continue an interrupted run.
RUN_OPTIONS = (
    "backend", "data", "preset", "text_column", "label_column", "skip_invalid", "limit",
    "sequence_length", "warmup_epochs", "warmup_lr", "finetune_epochs", "finetune_lr",
    "finetune_schedule", "batch_size", "seed", "select_best", "early_stopping_patience",
    "split_seed", "weight_decay", "warmup_ratio", "max_grad_norm", "gradient_accumulation_steps",
    "mixed_precision", "class_weight", "validation_data", "test_data", "finetune_method",
    "lora_rank", "lora_alpha", "lora_targets", "cache_features",
)  # fmt: skip


class TrainedModelKept(RuntimeError):
    """A failure after training; the message says where the trained model is."""


def _fit_target(args) -> Path:
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise ValueError(f"--resume {args.resume!r} and --out {args.out!r} name different runs.")
    if not (args.resume or args.out):
        raise ValueError("Name the run directory: --out RUN (or --resume RUN).")
    return Path(args.resume or args.out)


def _saved_fit_args(out: Path) -> dict | None:
    from kerasft.rundir import FIT_ARGS_FILE, partial_dir

    path = partial_dir(out) / FIT_ARGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def cmd_fit(args) -> int:
    from kerasft import distribute
    from kerasft.checkpoint import STATE_FILE
    from kerasft.data import DataError
    from kerasft.fileio import (
        atomic_write_text,
        check_target_dir,
        remove_stale_temp_dirs,
        target_lock,
    )
    from kerasft.rundir import CHECKPOINT_DIR, FIT_ARGS_FILE, partial_dir

    out = _fit_target(args)
    args.backend = os.environ["KERAS_BACKEND"]  # the one `main` chose, recorded for --resume
    distribute.check_devices(args.devices, args.backend)  # torch: refused before any work
    if distribute.initialize():  # one process of a multi-process run (Keras' variables)
        return _fit_multi_process(args, out)
    for name in ("data", "validation_data", "test_data"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    with target_lock(out, "Run directory"):
        remove_stale_temp_dirs(out)
        work, saved = partial_dir(out), _saved_fit_args(out)
        if args.resume:
            if saved is None:
                raise FileNotFoundError(
                    f"Nothing to resume for {str(out)!r}: no interrupted run in {str(work)!r}."
                )
            for name in RUN_OPTIONS:  # the interrupted run's options, whatever was typed now
                setattr(args, name, saved.get(name, getattr(args, name)))
        elif saved is not None and not args.overwrite:
            # (an option the interrupted run's kerasft did not know yet keeps its default)
            typed = {k: getattr(args, k) for k in RUN_OPTIONS}
            differ = [f"--{k.replace('_', '-')} {saved[k]!r} -> {v!r}"
                      for k, v in typed.items() if saved.get(k, v) != v]  # fmt: skip
            if differ:
                raise FileExistsError(
                    f"An interrupted run of {str(out)!r} with other options is in "
                    f"{str(work)!r} ({'; '.join(differ)}). `kerasft fit --resume {out}` "
                    "continues it; --overwrite discards it."
                )
        check_target_dir(out, args.overwrite, "Run directory")
        if not args.data:
            raise DataError("No data file: pass --data FILE or set $KERASFT_DATA.")
        if work.exists() and (args.overwrite or saved is None):
            shutil.rmtree(work)
        if work.exists():
            log.info("resuming the interrupted run in %s", work)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            work / FIT_ARGS_FILE, json.dumps({k: getattr(args, k) for k in RUN_OPTIONS})
        )
        try:
            return _fit_into(args, out, work)
        except BaseException:
            # Failed before the first checkpoint (bad data, bad preset, Ctrl-C while loading):
            # nothing to resume, so leave nothing behind.
            if not (work / CHECKPOINT_DIR / STATE_FILE).exists() and work.exists():
                shutil.rmtree(work, ignore_errors=True)
            raise


def _fit_multi_process(args, out: Path) -> int:
    """One process of a multi-process run: every process trains, process 0 writes the run.

    Checkpoints (and so resuming) are not supported across processes: each would need the same
    checkpoint. Process 0 builds the run in `.RUN.partial` and renames it into place, as a
    single-process fit does.
    """
    import jax

    from kerasft.fileio import check_target_dir, target_lock
    from kerasft.rundir import partial_dir

    if args.resume:
        raise ValueError("--resume is not supported in a multi-process run (no checkpoints).")
    if args.devices != "all":
        raise ValueError(
            f"A multi-process run trains on every device of every process: pass --devices all. "
            f"Received: --devices {args.devices}"
        )
    if not args.data:
        raise ValueError("No data file: pass --data FILE or set $KERASFT_DATA.")
    for name in ("data", "validation_data", "test_data"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    if jax.process_index() != 0:
        log.info("process %d of %d: training; process 0 writes %s",
                 jax.process_index(), jax.process_count(), out)  # fmt: skip
        return _fit_into(args, out, None)
    with target_lock(out, "Run directory"):
        check_target_dir(out, args.overwrite, "Run directory")
        work = partial_dir(out)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        return _fit_into(args, out, work, checkpoint=False)


def _weight_decay(values: list[float] | None) -> float | list[float]:
    if not values:
        return 0.0
    if len(values) > 2:
        raise ValueError(
            f"--weight-decay takes one value (both stages) or two (warm-up, fine-tune). "
            f"Received: {values}"
        )
    return values[0] if len(values) == 1 else list(values)


def _fit_into(args, out: Path, work: Path | None, checkpoint: bool = True) -> int:
    """Loads the data, fits, and writes the run into `work` (None: train only, write nothing)."""
    import keras

    from kerasft import rundir
    from kerasft.config import RecipeConfig
    from kerasft.data import load_dataset
    from kerasft.tuner import TwoStageFineTuner

    recipe = RecipeConfig(
        preset=args.preset,
        sequence_length=args.sequence_length,
        warmup_epochs=args.warmup_epochs,
        warmup_learning_rate=args.warmup_lr,
        finetune_epochs=args.finetune_epochs,
        finetune_learning_rate=args.finetune_lr,
        finetune_schedule=args.finetune_schedule,
        batch_size=args.batch_size,
        seed=args.seed,
        cache_features=args.cache_features,
        select_best=args.select_best,
        early_stopping_patience=args.early_stopping_patience,
        weight_decay=_weight_decay(args.weight_decay),
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        class_weight=args.class_weight,
        finetune_method=args.finetune_method,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets,
    )
    start = time.perf_counter()
    source = rundir.DataSource.from_file(
        args.data, validation=args.validation_data, test=args.test_data,
        skip_invalid=args.skip_invalid, limit=args.limit, limit_seed=args.seed,
        split_seed=args.split_seed,
    )  # fmt: skip
    log.info("reading %s (%.1f MB)", source.path, source.size / 1e6)
    data = load_dataset(source.path, args.text_column, args.label_column, args.skip_invalid)
    # The columns found, so that the splits are rebuilt from the same ones.
    source.text_column, source.label_column = data.columns["text"], data.columns["label"]
    used = source.select(data)
    train, val, test = source.split(used)
    log.info(
        "%s: %d rows (%d skipped) -> train %d / validation %d / test %d; backend %s",
        args.data, len(used), data.skipped, len(train), len(val), len(test),
        keras.backend.backend(),
    )  # fmt: skip
    # Progress bars only on a terminal: redirected to a file, one line per epoch (Keras'
    # verbose=2) instead of carriage returns and escape codes.
    verbose = "auto" if sys.stdout.isatty() and not args.quiet else 2
    tuner = TwoStageFineTuner(**recipe.to_dict(), distribution=args.devices, verbose=verbose)
    stage2 = "LoRA adapters + head" if args.finetune_method == "lora" else "all layers"
    log.info("stage 1: warm-up (backbone frozen), stage 2: fine-tune (%s)", stage2)
    rows = {"file": len(data) + data.skipped, "used": len(used), "skipped": data.skipped,
            "train": len(train), "validation": len(val), "test": len(test)}  # fmt: skip
    del data, used  # the splits hold what training needs
    if work is None:
        tuner.fit(train, validation_data=val)
        return 0
    checkpoints = work / rundir.CHECKPOINT_DIR
    tuner.fit(train, validation_data=val, checkpoint_dir=checkpoints if checkpoint else None)
    try:
        metrics = rundir.write_run(
            work, tuner, train=train, validation=val, test=test, source=source, rows=rows,
            total_seconds_since=start,
        )  # fmt: skip
        rundir.finish(work, out)
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
    test_m, seconds = metrics["test"], metrics["seconds"]
    print(
        f"test accuracy {test_m['accuracy']:.4f}  f1 {test_m['f1']:.4f}  precision "
        f"{test_m['precision']:.4f}  recall {test_m['recall']:.4f}  "
        f"({seconds['total']:.0f} s; warm-up {seconds.get('warmup', 0):.0f} s, "
        f"fine-tune {seconds.get('finetune', 0):.0f} s) -> {out}"
    )
    return 0


def _load_run(run_dir: str):
    from kerasft.rundir import load_tuner

    tuner = load_tuner(run_dir)
    tuner.verbose = 0
    return tuner


def cmd_export(args) -> int:
    from kerasft.exporters import export
    from kerasft.exporters.runtime import sha256_file

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
    manifest = json.loads((out / "manifest.json").read_text())
    check, variant = manifest["verification"], manifest["quantization"] or "fp32"
    acc = check.get("accuracy")
    drop = (
        f", accuracy drop {acc['drop'] * 100:+.2f} points on {acc['texts']} held-out texts "
        f"(95% CI {acc['drop_ci95'][0] * 100:+.2f} to {acc['drop_ci95'][1] * 100:+.2f})"
        if acc
        else ""
    )
    print(
        f"{args.format} {variant}: {manifest['size_bytes'] / 1e6:.1f} MB, "
        f"verified on {check['texts']} texts (max |logit diff| {check['max_abs_logit_diff']:.2g}, "
        f"label agreement {check['label_agreement']:.2%}{drop}) -> {out}\n"
        f"manifest sha256 {sha256_file(out / 'manifest.json')} "
        "(pin it: runtime.load(dir, manifest_sha256=...))"
    )
    return 0


def cmd_predict(args) -> int:
    if (Path(args.run_dir) / "manifest.json").is_file():  # an export: its own runtime, no Keras
        from kerasft.exporters.runtime import load

        result = load(args.run_dir, manifest_sha256=args.manifest_sha256).predict(args.texts)
        labels, proba = result.labels, result.probabilities.max(axis=1)
    else:
        tuner = _load_run(args.run_dir)
        all_proba = tuner.predict_proba(args.texts)
        labels = [tuner.label_names[k] for k in all_proba.argmax(axis=1)]
        proba = all_proba.max(axis=1)
    rows = [
        {"text": text, "label": label, "probability": float(p)}
        for text, label, p in zip(args.texts, labels, proba, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")
    return 0


def cmd_evaluate(args) -> int:
    from kerasft.data import load_dataset

    tuner = _load_run(args.run_dir)
    metrics = tuner.score(load_dataset(args.data, args.text_column, args.label_column))
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
