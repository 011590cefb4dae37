"""Training speed side by side: kerasft's stage 2 on each backend vs Hugging Face Trainer.

    python -m kerasft.benchmarks.train_speed --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --out benchmarks/results/train_speed.md

One run, one machine, the reference training split. Every engine trains in its own process
(started one after another, so loading and compilation never share the cores), then the
parent alternates the engines over `--rounds` rounds of `--steps` steps, the order rotated each
round, while the other processes wait idle:

- `kerasft <backend>`: the recipe's stage 2 exactly as `TwoStageFineTuner` runs it
  (`kerasft.training.recipe.prepare_stage` with the recipe's stage-2 options: the preprocessor-free
  classifier, Adam at 1e-4 with linear decay, length-bucketed batches of 32) inside one
  `model.fit`. Compilation is excluded: a
  warm-up `fit` first runs one batch of every batch shape the timed steps use (the timed steps
  are full batches: the one short batch per epoch is left out).
- `trainer`: Hugging Face `Trainer` (transformers + torch) with its defaults for the same job:
  batch 32, learning rate 1e-4, linear schedule, `DataCollatorWithPadding` (random batches
  padded to their longest text), the same initial weights converted to a transformers
  DistilBERT (`kerasft.benchmarks.models.to_transformers`). Its first steps are warm-up too.
  `trainer:bf16` is the same with `bf16=True` (torch autocast to bfloat16), the best a Trainer
  user gets on a CPU that computes bfloat16.

A kerasft engine trains as the recipe's defaults say (`RecipeConfig().stage_options`: the
precision, `mixed_precision="auto"`, is bfloat16 where `kerasft.training.precision.AUTO_BF16` says
the backend trains faster in it on this CPU class, else float32; the bucket width; whether the word
embeddings train) but for what its name overrides:
`torch@1` a bucket width, `torch:fp32` / `torch:bf16` the precision, `torch+frozen` /
`torch-frozen` the word embeddings; `torch+padded` computes each batch with its padding,
as kerasft did before it packed a batch's real tokens (`kerasft.model.encoder`); `torch+jit`
compiles the step with `torch.compile` (Keras' `jit_compile=True`; JAX and TensorFlow compile theirs
with XLA already), whose cost shows in the "compile s" column. Trainer trains in
float32 (its default) unless `trainer:bf16`. Ratios are to `trainer` (its defaults) and,
where it ran, to `trainer:bf16`.

A step is timed from the end of the previous step to the end of this one (the loss is read
back, which synchronises), so it includes the host-side batching of the step. Reported per
engine: median ms/step and its spread (p10-p90), samples/s (median over rounds), the ratio to
Trainer, the tokens per row (padded, and those the dense layers compute: kerasft on PyTorch
packs the real ones), the FLOP/s that makes, as a share of
the CPU's nominal peak (`kerasft.util.machine.peak_fp32_gflops`), and, for kerasft, stage 1's
cached feature pass (frozen backbone, inference) in rows/s. `--quick` (about 2 minutes of
timing) is for choosing a backend on another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kerasft.benchmarks.pipe import Child
from kerasft.benchmarks.report import measure_and_write, require_data
from kerasft.benchmarks.train_report import render
from kerasft.data import DATA_ENV, load_dataset, reference_split, stratified_limit
from kerasft.model.presets import OFFLINE_PRESET
from kerasft.util.machine import computes_bf16, describe, peak_fp32_gflops
from kerasft.util.versions import package_versions, source_commit

ENGINES = ("torch", "jax", "tensorflow", "trainer")
PRECISIONS = {"fp32": None, "bf16": "bfloat16"}  # an engine's `:PRECISION` -> mixed_precision
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
SEED = 30
WARMUP_STEPS = 3  # untimed steps after compilation (allocator and thread-pool warm-up)
FEATURE_ROWS = 4096  # rows of the timed stage-1 feature pass (--quick: 1,024)
DEFAULT_OUT = Path("benchmarks/results/train_speed.md")


def default_engines() -> list[str]:
    """kerasft on every backend and Trainer at its defaults; Trainer with `bf16=True` too where
    the CPU computes bfloat16 (`kerasft.util.machine.computes_bf16`): elsewhere bfloat16 is
    emulated, far slower than float32, and not what a Trainer user would pick."""
    return [*ENGINES, *(["trainer:bf16"] if computes_bf16() else [])]


def parse_engine(name: str) -> tuple[str, dict]:
    """`NAME[@WIDTH][:PRECISION][+frozen|-frozen][+padded][+jit]` -> `(name, overrides)`.

    The overrides are the recipe's (`RecipeConfig` fields) but for `"padded": True`, which runs
    kerasft's view without packing a batch's real tokens (`kerasft.model.encoder`; it computes the
    padding, as before packing): for measuring what packing saves; and `"jit": True` (PyTorch
    only), the step compiled with `torch.compile`: for measuring what it saves per step and
    costs to compile. `"torch"` -> `("torch", {})`
    (the recipe's defaults); `"torch@1:fp32"` -> `("torch", {"bucket_width": 1,
    "mixed_precision": None})`; `"torch+frozen"` -> `("torch", {"freeze_word_embeddings":
    True})`; `"trainer:bf16"` -> `("trainer", {"mixed_precision": "bfloat16"})`.

    Raises:
        ValueError: an unknown engine, precision or suffix, a bad width, a repeated suffix, a
            width or a suffix for Trainer, or `+jit` for another engine than torch.
    """
    match = re.fullmatch(r"([a-z]+)(?:@(\d+))?(?::(\w+))?((?:[+-][a-z]+)*)", name)
    if match is None:
        raise ValueError(name)
    backend, width, precision, tail = match.groups()
    suffixes = re.findall(r"[+-][a-z]+", tail)
    if backend not in ENGINES or (width and int(width) < 1):
        raise ValueError(name)
    if (precision and precision not in PRECISIONS) or len(set(suffixes)) != len(suffixes):
        raise ValueError(name)
    if any(x not in ("+frozen", "-frozen", "+padded", "+jit") for x in suffixes) or (
        "+frozen" in suffixes and "-frozen" in suffixes
    ):
        raise ValueError(name)
    if backend == "trainer" and (width or suffixes):
        raise ValueError(name)
    if "+jit" in suffixes and backend != "torch":
        raise ValueError(name)
    overrides = {}
    if width:
        overrides["bucket_width"] = int(width)
    if precision:
        overrides["mixed_precision"] = PRECISIONS[precision]
    for suffix in suffixes:
        if suffix.endswith("frozen"):
            overrides["freeze_word_embeddings"] = suffix == "+frozen"
        else:
            overrides[suffix[1:]] = True  # padded, jit
    return backend, overrides


# --- the parent ----------------------------------------------------------------------------------


def _start_engine(engine: str, spec: dict, log_dir: Path) -> Child:
    """The process of one engine (`kerasft.benchmarks.train_workers`), under its backend."""
    env = dict(os.environ)
    backend = parse_engine(engine)[0]
    env["KERAS_BACKEND"] = "torch" if backend == "trainer" else backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "trainer":  # transformers' TensorFlow side needs tf-keras, not Keras 3
        env["USE_TF"] = "0"
    argv = ["kerasft.benchmarks.train_workers", engine, json.dumps(spec)]
    return Child(engine, argv, log_dir / f"{engine}.log", env)


def _training_rows(path: str, limit: int | None) -> dict:
    data = load_dataset(path)
    train, _, _ = reference_split(data.labels)
    if limit is not None and limit < len(train):
        train = train[stratified_limit(data.labels[train], limit)]
    return {
        "texts": [data.texts[i] for i in train],
        "labels": [int(data.labels[i]) for i in train],
        "label_names": list(data.label_names),
    }


def measure(args, progress=print) -> dict:
    """Runs every engine and returns the results (see the module docstring)."""
    started = time.perf_counter()
    source = source_commit()  # the code measured (later edits to the tree do not count)
    with tempfile.TemporaryDirectory(prefix="kerasft-train-speed-") as tmp:
        work = Path(tmp)
        data_file = work / "train.json"
        rows = _training_rows(args.data, args.limit)
        data_file.write_text(json.dumps(rows))
        spec = {
            "data": str(data_file), "preset": args.preset, "threads": args.threads,
            "rounds": args.rounds, "steps": args.steps, "work": str(work),
            "feature_rows": args.feature_rows, "sequence_length": args.sequence_length,
        }  # fmt: skip
        names, setup, steps, shapes, stats = _run_engines(args, spec, work, progress)
    peak, peak_formula = peak_fp32_gflops(args.threads)
    results = {
        name: _engine_result(setup[name], steps[name], shapes[name], stats[name], peak)
        for name in names
    }
    for key, base_name in (("vs_trainer", "trainer"), ("vs_trainer_bf16", "trainer:bf16")):
        if base_name in results:
            base = results[base_name]["samples_per_second"]
            for result in results.values():
                result[key] = result["samples_per_second"] / base
    return {
        "command": args.command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": source,
        "machine": {
            **describe(),
            "threads": args.threads,
            "peak_gflops": peak,
            "peak_formula": peak_formula,
        },  # fmt: skip
        "versions": package_versions(
            (
                "keras",
                "keras-hub",
                "jax",
                "tensorflow",
                "torch",
                "transformers",
                "accelerate",
                "numpy",
            )
        ),  # fmt: skip
        "settings": {
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup_steps": WARMUP_STEPS,
            "training_rows": len(rows["texts"]),
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "preset": args.preset,
        },  # fmt: skip
        "results": results,
        "seconds": time.perf_counter() - started,
    }


def _run_engines(args, spec: dict, work: Path, progress):
    """Starts the engines one at a time, then runs the rounds, the order rotated each round."""
    engines, setup = {}, {}
    try:
        for name in args.engines:  # one at a time: setup and compilation do not overlap
            progress(f"starting {name} ...")
            engines[name] = _start_engine(name, spec, work)
            setup[name] = engines[name].read()
            progress(f"  {name}: ready ({setup[name]['load_seconds']:.0f} s loading, "
                     f"{setup[name]['compile_seconds']:.0f} s compiling)")  # fmt: skip
        steps = {name: [] for name in engines}
        shapes = {name: [] for name in engines}
        faults = dict.fromkeys(engines, 0)
        names = list(engines)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                reply = engines[name].call(op="round")
                steps[name].append(reply["seconds"])
                faults[name] += reply["minor_faults"]
                shapes[name] += [tuple(s) for s in reply["shapes"]]
            progress(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {np.median(steps[n][-1]) * 1e3:.0f} ms/step" for n in order
            ))  # fmt: skip
        stats = {}
        for name in names:
            engine = engines.pop(name)
            stats[name] = {**engine.call(op="quit"), "minor_faults": faults[name]}
            engine.close(timeout=120)
    finally:
        for engine in engines.values():
            engine.process.kill()
            engine.close()
    return names, setup, steps, shapes, stats


def _engine_result(info: dict, per_round: list, shapes: list, stats: dict, peak) -> dict:
    """One engine's figures from its per-round step seconds and batch shapes."""
    flat = np.concatenate(per_round)
    rows_per_step = np.array([s[0] for s in shapes], dtype=float)
    lengths = np.array([s[1] for s in shapes], dtype=float)
    # tokens per row through the dense layers: packed (real) ones, else the padded length
    tokens = np.array([s[2] if len(s) > 2 else s[1] for s in shapes], dtype=float)
    # Matrix FLOPs of a training step (forward + backward = 3x forward): 2 per parameter
    # and token in the encoder layers, plus attention's two products (4 L d per token, over
    # the padded length).
    layers, hidden = info["layers"], info["hidden"]
    per_layer = info["encoder_parameters"] / layers
    if info.get("last_layer_at_cls"):  # every token's keys and values, the rest at [CLS] only
        layers -= 1
        kv = 2 * hidden**2
        last = tokens * 2 * kv + 2 * (per_layer - kv) + 4 * lengths * hidden
    else:
        last = 0.0
    flops = (
        3
        * rows_per_step
        * (tokens * 2 * per_layer * layers + 4 * layers * lengths**2 * hidden + last)
    )
    round_rates = [BATCH_SIZE * len(s) / float(np.sum(s)) for s in per_round]
    gflops = float(np.sum(flops) / np.sum(flat) / 1e9)
    return {
        **info,
        "ms_per_step_p50": float(np.median(flat) * 1e3),
        "ms_per_step_p10": float(np.percentile(flat, 10) * 1e3),
        "ms_per_step_p90": float(np.percentile(flat, 90) * 1e3),
        "samples_per_second": float(np.median(round_rates)),
        "samples_per_second_rounds": round_rates,
        "timed_steps": len(flat),
        "padded_tokens_per_row": float(np.mean(lengths)),
        "computed_tokens_per_row": float(np.mean(tokens)),
        "gflops": gflops,
        "share_of_peak": None if peak is None else gflops / peak,
        "peak_rss_mb": stats["peak_rss_mb"],
        "page_faults_per_step": stats["minor_faults"] / len(flat),
    }


def build_parser(prog: str = "python -m kerasft.benchmarks.train_speed") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=os.environ.get(DATA_ENV), help=f"the reference data file (or ${DATA_ENV})"
    )
    parser.add_argument("--preset", default=OFFLINE_PRESET, help=f"default {OFFLINE_PRESET}")
    parser.add_argument(
        "--sequence-length", type=int, default=128, help="maximum tokens per text (default 128)"
    )
    parser.add_argument(
        "--engines",
        help=f"comma-separated, from {','.join(ENGINES)}, each "
        "NAME[@W][:fp32|bf16][+frozen|-frozen][+padded][+jit] (default: torch,jax,tensorflow,"
        "trainer, and trainer:bf16 on CPUs with AVX512_BF16 or AMX-BF16); a kerasft engine is "
        "the recipe's stage 2 with its defaults but for: @W, the bucket width (e.g. torch@1); "
        "+frozen / -frozen, word embeddings frozen or trained; :fp32 or :bf16, the precision "
        "(Trainer: fp32 unless :bf16); +padded, batches computed with their padding (PyTorch "
        "packs the real tokens otherwise); +jit (torch), the step compiled by torch.compile",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per round (default 25)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads per engine (default: cores)"
    )
    parser.add_argument("--limit", type=int, help="train on a stratified subset of N training rows")
    parser.add_argument(
        "--quick", action="store_true",
        help="3 rounds of 6 steps on 3,200 rows: about 2 minutes of timing, to choose a backend",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"markdown report (default {DEFAULT_OUT}); the JSON goes beside it",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.limit = 3, 6, args.limit or 3200
    args.feature_rows = 1024 if args.quick else FEATURE_ROWS
    engines = args.engines if args.engines is not None else ",".join(default_engines())
    args.engines = [e.strip() for e in engines.split(",") if e.strip()]
    bad = []
    for engine in args.engines:
        try:
            parse_engine(engine)
        except ValueError:
            bad.append(engine)
    if bad or not args.engines:
        parser.error(
            f"unknown engines {bad}. Choose from {list(ENGINES)}; a kerasft backend may name a "
            "bucket width and +frozen/-frozen word embeddings, e.g. torch@1+frozen, and any "
            "engine a precision, e.g. trainer:bf16."
        )
    for name, value, low in (("rounds", args.rounds, 1), ("steps", args.steps, 2),
                             ("threads", args.threads, 1)):  # fmt: skip
        if value < low:
            parser.error(f"--{name} must be >= {low}. Received: {value}")
    require_data(parser, args.data)
    return measure_and_write("train_speed", argv, args, measure, render)


if __name__ == "__main__":
    sys.exit(main())
