"""Whole `kerasft fit` runs, one backend at a time: accuracy, stage seconds, wall time, memory.

    # the reference run with the default command (default backend and recipe)
    python -m kerasft.benchmarks.training_runs --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --out benchmarks/results/reference_run.md
    # the same short run on every backend
    python -m kerasft.benchmarks.training_runs --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --backends torch,jax,tensorflow --limit 4000 --warmup-epochs 1 --finetune-epochs 1 \\
        --out benchmarks/results/backends_limit4000.md
    # one run per recipe option (each --variant adds its options to the command)
    python -m kerasft.benchmarks.training_runs --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --backends torch --limit 4000 --warmup-epochs 1 --finetune-epochs 1 \\
        --variant "" --variant "--weight-decay 0.01" --out benchmarks/results/recipe_options.md
    # data parallelism: one process against two (a variant's leading NAME=VALUE words are
    # that run's environment, as in a shell)
    python -m kerasft.benchmarks.training_runs --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --backends torch,jax,tensorflow --limit 8000 --warmup-epochs 1 --finetune-epochs 1 \\
        --variant "" --variant "KERASFT_CPU_DEVICES=2 --devices 2" \\
        --note "..." --out benchmarks/results/data_parallel.md

Each run is the `kerasft fit` command a user types (shown in the report), in its own process,
one after another. Wall time and peak resident memory are the process's own (`wait4`); the
stage seconds, samples/s and scores are the run's `metrics.json`. The run directories are
temporary unless `--keep DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kerasft.benchmarks.report import (
    cpu_line,
    header,
    measure_and_write,
    provenance,
    require_data,
)
from kerasft.data import DATA_ENV
from kerasft.model.presets import OFFLINE_PRESET
from kerasft.util.versions import TRAINING, source_commit

BACKENDS = ("torch", "jax", "tensorflow")


def run_fit(command: list[str], log_path: Path, env: dict | None = None, cwd=None) -> dict:
    """Runs one command (in `cwd`); returns its wall seconds, peak RSS (MB) and exit code."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "returncode": process.returncode,
    }


def variant_env(variant: str) -> tuple[dict[str, str], str]:
    """`(environment, options)` of a variant: its leading `NAME=VALUE` words, and the rest."""
    words, env = shlex.split(variant), {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, shlex.join(words)


def fit_command(args, backend: str | None, out: Path, variant: str = "") -> list[str]:
    """The `kerasft fit` command line of one run (`backend` None: the CLI's default; `variant`:
    more options, as one string)."""
    command = ["kerasft"] + ([] if backend is None else ["--backend", backend])
    command += ["fit", "--data", args.data, "--preset", args.preset, "--out", str(out), "--quiet"]
    if args.limit:
        command += ["--limit", str(args.limit)]
    if args.warmup_epochs is not None:
        command += ["--warmup-epochs", str(args.warmup_epochs)]
    if args.finetune_epochs is not None:
        command += ["--finetune-epochs", str(args.finetune_epochs)]
    return command + shlex.split(args.fit_args) + shlex.split(variant_env(variant)[1])


def measure(args, progress=print) -> dict:
    """Runs every backend's fit, one at a time, and collects the results."""
    source = source_commit()  # the code measured (later edits to the tree do not count)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kerasft-training-runs-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for index, (backend, variant) in enumerate(
            (b, v) for b in args.backends for v in args.variants
        ):
            name = f"{backend or 'default'}-{index}"
            out = root / f"run-{name}"
            command = fit_command(args, backend, out, variant)
            extra_env = variant_env(variant)[0]
            shown = [f"{k}={v}" for k, v in extra_env.items()] + command
            progress(f"running {shlex.join(shown)}")
            env = {**os.environ, **extra_env}
            env.pop("KERAS_BACKEND", None)  # the command line decides, as for a user
            result = run_fit([sys.executable, "-m", "kerasft", *command[1:]],
                             root / f"{name}.log", env)  # fmt: skip
            if result["returncode"] != 0:
                tail = (root / f"{name}.log").read_text()[-3000:]
                code = result["returncode"]
                raise RuntimeError(f"{shlex.join(command)} failed ({code}):\n{tail}")
            metrics = json.loads((out / "metrics.json").read_text())
            history = json.loads((out / "history.json").read_text())
            recipe = json.loads((out / "config.json").read_text())["recipe"]
            runs.append({"command": shlex.join(shown).replace(str(root), "RUNS"), **result,
                         "variant": variant, "metrics": metrics, "history": history,
                         "precision": recipe["mixed_precision"] or "float32"})  # fmt: skip
            test = metrics["test"]
            progress(f"  {metrics['backend']}: test accuracy {test['accuracy']:.4f}, "
                     f"{result['wall_seconds']:.0f} s wall")  # fmt: skip
    return {**provenance(args.command, source, TRAINING), "runs": runs, "note": args.note}


def render(report: dict) -> str:
    """The markdown report."""
    lines = [
        *header("kerasft fit runs", report, cpu_line(report["machine"]), report["versions"]),
        "",
        "Each run alone, one after another. Wall: the whole command (loading, tokenizing, both "
        "stages, scoring, saving) in its own process; stage seconds and samples/s from the run's "
        "`metrics.json` (stage 1 includes the frozen backbone's pass over the training and "
        "validation rows; both include per-epoch validation and checkpoints). Precision: what "
        "the run trained in, from its `config.json` (the default `auto`: bfloat16 where the "
        "backend measured faster in it on this CPU class, "
        "`kerasft.training.precision.AUTO_BF16`). Peak "
        "RSS: the run's largest process (a launcher's workers included).",
        "",
        *([report["note"], ""] if report.get("note") else []),
        "| backend | options | precision | rows train/val/test | test accuracy | test F1 | "
        "validation accuracy | warm-up s | fine-tune s | fine-tune samples/s | wall s | peak RSS "
        "GB | trainable params (stage 2) | adapter MB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for run in report["runs"]:
        metrics, seconds = run["metrics"], run["metrics"]["seconds"]
        rows = metrics["rows"]
        speed = metrics.get("samples_per_second", {}).get("finetune")
        options = f"`{run['variant']}`" if run.get("variant") else "(none)"
        trainable = metrics.get("parameters", {}).get("trainable")
        adapter = metrics.get("adapter_bytes")
        lines.append(
            f"| {metrics['backend']} | {options} | {run.get('precision', 'float32')} | "
            f"{rows.get('train')}/{rows.get('validation')}/"
            f"{rows.get('test')} | {metrics['test']['accuracy']:.4f} | {metrics['test']['f1']:.4f} "
            f"| {metrics['validation']['accuracy']:.4f} | {seconds.get('warmup', 0):.0f} | "
            f"{seconds.get('finetune', 0):.0f} | {'-' if speed is None else f'{speed:.1f}'} | "
            f"{run['wall_seconds']:.0f} | {run['peak_rss_mb'] / 1024:.2f} | "
            f"{'-' if trainable is None else f'{trainable:,}'} | "
            f"{'-' if adapter is None else f'{adapter / 1e6:.2f}'} |"
        )
    lines += _seed_summary(report["runs"])
    lines += ["", "Commands:", ""]
    lines += [f"- `{run['command']}`" for run in report["runs"]]
    lines += ["", "Validation accuracy per epoch (stage 1, then stage 2):", ""]
    for run in report["runs"]:
        values = ", ".join(f"{v:.4f}" for v in run["history"].get("val_accuracy", []))
        options = f" `{run['variant']}`" if run.get("variant") else ""
        lines.append(f"- {run['metrics']['backend']}{options}: {values}")
    lines.append("")
    return "\n".join(lines)


def _without_seed(variant: str) -> str:
    """`variant` with its `--seed N` left out: the options that runs over seeds share."""
    words, kept = shlex.split(variant), []
    while words:
        word = words.pop(0)
        if word == "--seed" and words:
            words.pop(0)
        elif not word.startswith("--seed="):
            kept.append(word)
    return shlex.join(kept)


def _seed_summary(runs: list[dict]) -> list[str]:
    """Markdown lines: per backend and options, the test accuracy over the runs' seeds (none
    when no two runs differ only in `--seed`)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        key = (run["metrics"]["backend"], _without_seed(run.get("variant", "")))
        groups.setdefault(key, []).append(run)
    if all(len(group) < 2 for group in groups.values()):
        return []
    lines = [
        "",
        "Over seeds (runs that differ only in `--seed`; the split stays `--split-seed`'s):",
        "",
        "| backend | options | runs | test accuracy mean | min | max | fine-tune samples/s mean "
        "| wall s mean |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (backend, options), group in groups.items():
        accuracy = [run["metrics"]["test"]["accuracy"] for run in group]
        speed = [run["metrics"].get("samples_per_second", {}).get("finetune", 0) for run in group]
        wall = [run["wall_seconds"] for run in group]
        lines.append(
            f"| {backend} | {f'`{options}`' if options else '(none)'} | {len(group)} | "
            f"{sum(accuracy) / len(group):.4f} | {min(accuracy):.4f} | {max(accuracy):.4f} | "
            f"{sum(speed) / len(group):.1f} | {sum(wall) / len(group):.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m kerasft.benchmarks.training_runs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", default=os.environ.get(DATA_ENV), help=f"or ${DATA_ENV}")
    parser.add_argument("--preset", default=OFFLINE_PRESET)
    parser.add_argument(
        "--backends", default="default",
        help=f"comma-separated from {','.join(BACKENDS)}, or 'default' (the CLI's default, "
        "no --backend; default)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int)
    parser.add_argument("--warmup-epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--fit-args", default="", help="more `kerasft fit` options, as one string")
    parser.add_argument(
        "--variant", action="append", dest="variants", metavar="OPTIONS",
        help="more `kerasft fit` options for one run per backend, as one string; repeat for one "
        "run each (\"\" = none)",
    )  # fmt: skip
    parser.add_argument("--keep", help="keep the run directories under this directory")
    parser.add_argument("--note", help="a paragraph the report shows under its method")
    parser.add_argument("--out", type=Path, required=True, help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in names if b not in (*BACKENDS, "default")]
    if bad or not names:
        parser.error(f"unknown backends {bad}. Choose from {[*BACKENDS, 'default']}.")
    args.backends = [None if b == "default" else b for b in names]
    args.variants = args.variants or [""]
    require_data(parser, args.data)
    return measure_and_write("training_runs", argv, args, measure, render)


if __name__ == "__main__":
    sys.exit(main())
