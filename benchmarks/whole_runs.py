"""Whole `kerasft fit` runs a user times, per backend, against whole Hugging Face Trainer runs.

    python -m kerasft.benchmarks.whole_runs --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --limit 8000 --repeat 2 --out benchmarks/results/whole_runs.md

Each backend's `kerasft fit --limit N --warmup-epochs 0 --finetune-epochs 1` in its own process,
`--repeat` times in a row: the first run finds nothing compiled (a fresh JAX compilation cache
for this benchmark), the later ones find what the first kept. Its fine-tune samples/s and the
seconds its steps spent compiling come from the run's `metrics.json` (the fine-tune stage's
seconds include its validation and checkpoint). The peers: Trainer on the same rows and initial
weights, at its defaults and with `bf16=True` (`kerasft.benchmarks.trainer_run`), one epoch with
evaluation, no checkpoint. `--source DIR` runs the `kerasft` of another checkout (for a before
and after on one machine; nothing is cached for it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from kerasft.benchmarks.report import (
    cpu_line,
    header,
    measure_and_write,
    provenance,
    require_data,
)
from kerasft.benchmarks.training_runs import BACKENDS, run_fit
from kerasft.data import DATA_ENV
from kerasft.model.presets import OFFLINE_PRESET
from kerasft.util.versions import TRAINING, source_commit

TRAINER = {"fp32": [], "bf16": ["--bf16"]}


def _fit(args, backend: str, out: Path) -> list[str]:
    command = ["kerasft", "--backend", backend, "fit", "--data", args.data, "--out", str(out),
               "--preset", args.preset, "--sequence-length", str(args.sequence_length),
               "--warmup-epochs", "0", "--finetune-epochs", "1", "--quiet"]  # fmt: skip
    return command + (["--limit", str(args.limit)] if args.limit else [])


def measure(args, progress=print) -> dict:
    """Runs every backend `--repeat` times and each Trainer variant once; the report."""
    source = source_commit() if args.source is None else _commit_of(args.source)
    runs, peers = [], {}
    with tempfile.TemporaryDirectory(prefix="kerasft-whole-runs-") as tmp:
        root = Path(tmp)
        env = {**os.environ}
        env.pop("KERAS_BACKEND", None)  # the command line decides, as for a user
        if args.source is None:
            env["JAX_COMPILATION_CACHE_DIR"] = str(root / "xla-jax")  # nothing compiled yet
        else:
            tree = _importable(args.source, root / "source")
            env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
        for backend in args.backends:
            for attempt in range(1, args.repeat + 1):
                out = root / f"{backend}-{attempt}"
                command = _fit(args, backend, out)
                progress(f"running {shlex.join(command)} (run {attempt})")
                # (in `root`: `python -m` would import the kerasft of the current directory)
                result = run_fit(
                    [sys.executable, "-m", "kerasft", *command[1:]],
                    root / f"{backend}-{attempt}.log",
                    env,
                    cwd=root,
                )
                if result["returncode"] != 0:
                    tail = (root / f"{backend}-{attempt}.log").read_text()[-3000:]
                    raise RuntimeError(f"{shlex.join(command)} failed:\n{tail}")
                metrics = json.loads((out / "metrics.json").read_text())
                recipe = json.loads((out / "config.json").read_text())["recipe"]
                runs.append(
                    {
                        "backend": backend,
                        "run": attempt,
                        **result,
                        "metrics": metrics,
                        "precision": recipe.get("mixed_precision") or "float32",
                        "command": shlex.join(command).replace(str(root), "RUNS"),
                    }
                )
                speed = metrics["samples_per_second"]["finetune"]
                progress(
                    f"  {backend} run {attempt}: fine-tune {speed:.1f} samples/s, compiling "
                    f"{metrics.get('compile_seconds', {}).get('finetune', 0):.0f} s"
                )
        for name in args.trainer:
            out = root / f"trainer-{name}.json"
            command = [
                sys.executable,
                "-m",
                "kerasft.benchmarks.trainer_run",
                "--data",
                args.data,
                "--epochs",
                "1",
                "--out",
                str(out),
                *TRAINER[name],
            ]
            command += ["--limit", str(args.limit)] if args.limit else []
            command += ["--preset", args.preset, "--sequence-length", str(args.sequence_length)]
            progress(f"running Trainer ({name})")
            subprocess.run(
                command,
                check=True,
                env={**os.environ, "USE_TF": "0"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            peers[name] = json.loads(out.read_text())
            progress(f"  Trainer {name}: {peers[name]['samples_per_second']:.1f} samples/s")
    return {
        **provenance(args.command, source, TRAINING),
        "runs": runs,
        "trainer": peers,
        "source": None if args.source is None else str(args.source),
    }


def _importable(checkout: Path, tree: Path) -> Path:
    """A directory on whose path `checkout`'s kerasft imports as installed: `kerasft/` with its
    `exporters/` and `benchmarks/` inside (links, nothing copied)."""
    package = tree / "kerasft"
    package.mkdir(parents=True)
    for item in (checkout / "kerasft").iterdir():
        (package / item.name).symlink_to(item.resolve())
    for name in ("exporters", "benchmarks"):
        (package / name).symlink_to((checkout / name).resolve())
    return tree


def _commit_of(checkout: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


def render(report: dict) -> str:
    peers = report["trainer"]
    base = {name: peer["samples_per_second"] for name, peer in peers.items()}
    lines = [
        *header(
            "Whole fit runs against Hugging Face Trainer",
            report,
            cpu_line(report["machine"]),
            report["versions"],
        ),
        "",
        "Each run alone, one after another, in its own process: `kerasft fit --limit N "
        "--warmup-epochs 0 --finetune-epochs 1` per backend, run 1 with nothing compiled, later "
        "runs finding what run 1 kept (JAX's persistent compilation cache). Fine-tune samples/s: "
        "training rows over the fine-tune stage's seconds (`metrics.json`: its steps, its "
        "validation and its checkpoint); compile s: the part its steps spent compiling or "
        "building kernels. Trainer: one epoch on the same rows and initial weights, with "
        "evaluation, at its defaults and with bf16=True (samples/s over `trainer.train()`).",
        *(["", f"Measured: the kerasft of `{report['source']}`."] if report.get("source") else []),
        "",
        "| engine | run | precision | fine-tune samples/s | compile s | fine-tune s | wall s | "
        "test accuracy | vs Trainer defaults | vs Trainer bf16 |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in report["runs"]:
        m = run["metrics"]
        speed = m["samples_per_second"]["finetune"]
        compiled = m.get("compile_seconds", {}).get("finetune")
        ratios = [f"{speed / base[n]:.2f}x" if n in base else "-" for n in ("fp32", "bf16")]
        lines.append(
            f"| kerasft {m['backend']} | {run['run']} | {run['precision']} | {speed:.1f} | "
            f"{'-' if compiled is None else f'{compiled:.1f}'} | {m['seconds']['finetune']:.1f} | "
            f"{run['wall_seconds']:.0f} | {m['test']['accuracy']:.4f} | {' | '.join(ratios)} |"
        )
    for peer in peers.values():
        speed = peer["samples_per_second"]
        ratios = [f"{speed / base[n]:.2f}x" if n in base else "-" for n in ("fp32", "bf16")]
        lines.append(
            f"| {peer['engine']} | 1 | {peer['precision']} | {speed:.1f} | 0 | "
            f"{peer['train_seconds']:.1f} | - | {peer['test_accuracy']:.4f} | "
            f"{' | '.join(ratios)} |"
        )
    lines += ["", "Commands:", "", *(f"- `{run['command']}`" for run in report["runs"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m kerasft.benchmarks.whole_runs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", default=os.environ.get(DATA_ENV), help=f"or ${DATA_ENV}")
    parser.add_argument("--limit", type=int, default=8000, help="rows before the split (8000)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=2, help="runs per backend (default 2)")
    parser.add_argument("--trainer", default="fp32,bf16", help="Trainer peers: fp32,bf16 or ''")
    parser.add_argument("--source", type=Path, help="another checkout's kerasft to measure")
    parser.add_argument("--preset", default=OFFLINE_PRESET, help=f"default {OFFLINE_PRESET}")
    parser.add_argument("--sequence-length", type=int, default=128, help="default 128")
    parser.add_argument("--out", type=Path, required=True, help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.trainer = [t.strip() for t in args.trainer.split(",") if t.strip()]
    bad = [b for b in args.backends if b not in BACKENDS] + [
        t for t in args.trainer if t not in TRAINER
    ]
    if bad or not args.backends or args.repeat < 1:
        parser.error(
            f"unknown backends or Trainer variants {bad}, or --repeat {args.repeat}; "
            f"backends: {list(BACKENDS)}, Trainer: {list(TRAINER)}, --repeat >= 1"
        )
    require_data(parser, args.data)
    args.data = str(Path(args.data).resolve())  # the runs start in a directory of their own
    args.source = args.source.resolve() if args.source else None
    return measure_and_write("whole_runs", argv, args, measure, render)


if __name__ == "__main__":
    sys.exit(main())
