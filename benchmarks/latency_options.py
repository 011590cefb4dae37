"""The latency benchmark's options and the settings they make (`kerasft bench`'s flags)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DESCRIPTION = (
    "Latency of every way kerasft can serve a fine-tuned classifier, beside Hugging Face's peers."
)


def _parse_ints(text: str, name: str, low: int, high: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not low <= v <= high for v in values):
        raise ValueError(
            f"{name} must be comma-separated integers in [{low}, {high}]. Received: {name}={text!r}"
        )
    return sorted(set(values))


def build_parser(prog: str = "python -m kerasft.benchmarks.latency") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--run", required=True, type=Path, help="a `kerasft fit` run directory")
    parser.add_argument("--out", required=True, type=Path, help="report directory to create")
    parser.add_argument(
        "--device", choices=("cpu", "gpu", "auto"), default="auto",
        help="auto: the GPU paths too when a CUDA GPU is there",
    )  # fmt: skip
    parser.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to time")
    parser.add_argument("--seq-lens", default="32,128", help="sequence lengths (tokens) to time")
    parser.add_argument(
        "--latency-model", choices=("base", "run"), default=None,
        help="base: DistilBERT-base-shaped widening of the run's model (default); run: the run's "
        "own model (default with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--widen", type=int, default=2, help="width factor for --latency-model base"
    )
    parser.add_argument(
        "--threads", type=int, help="intra-op threads per variant (default: the CPU's cores)"
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved timing rounds (default 12; quick 3)"
    )
    parser.add_argument(
        "--round-seconds", type=float, help="time per variant per cell per round (default 0.5)"
    )
    parser.add_argument(
        "--settle-seconds", type=float,
        help="untimed pause before each variant's block, so the previous runtime's spinning "
        "threads leave the cores (default 0.2; quick 0.05)",
    )  # fmt: skip
    parser.add_argument(
        "--test-rows", type=int, help="test rows for accuracy (default: the whole test split)"
    )
    parser.add_argument("--artifacts", type=Path, help="where exports are built and reused")
    parser.add_argument("--no-peers", action="store_true", help="skip transformers and Optimum")
    parser.add_argument(
        "--quick", action="store_true",
        help="a few minutes' check: the run's own model, the variants `--int8 auto` chooses "
        "among, the peers that can be fastest (timed, not classified) and the accuracy "
        "reference, batch 1,32 x 32,128 tokens, 3 rounds, the whole test split",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def settings_of(args: argparse.Namespace) -> dict:
    """The measurement settings: `--quick`'s defaults or the full run's, explicit options
    winning; a ValueError names a bad value and what is allowed."""
    if args.quick:
        # the targets table's 4 cells and the whole test split (accuracy decides eligibility:
        # on 256 rows one label was 0.39 points, over the 0.15 allowed)
        defaults = {"batch_sizes": "1,32", "seq_lens": "32,128", "rounds": 3,
                    "round_seconds": 0.3, "settle_seconds": 0.05, "test_rows": None,
                    "latency_model": "run"}  # fmt: skip
        # explicit options still win over the quick defaults
        if args.batch_sizes != "1,8,32":
            defaults["batch_sizes"] = args.batch_sizes
        if args.seq_lens != "32,128":
            defaults["seq_lens"] = args.seq_lens
    else:
        defaults = {"batch_sizes": args.batch_sizes, "seq_lens": args.seq_lens, "rounds": 12,
                    "round_seconds": 0.5, "settle_seconds": 0.2, "test_rows": None,
                    "latency_model": "base"}  # fmt: skip
    s = {
        "batch_sizes": _parse_ints(defaults["batch_sizes"], "batch_sizes", 1, 1024),
        "seq_lens": _parse_ints(defaults["seq_lens"], "seq_lens", 2, 512),
        "rounds": args.rounds if args.rounds is not None else defaults["rounds"],
        "round_seconds": args.round_seconds or defaults["round_seconds"],
        "settle_seconds": (
            args.settle_seconds if args.settle_seconds is not None else defaults["settle_seconds"]
        ),
        "test_rows": args.test_rows if args.test_rows is not None else defaults["test_rows"],
        "latency_model": args.latency_model or defaults["latency_model"],
        "threads": args.threads if args.threads is not None else os.cpu_count(),
    }
    for key in ("rounds", "threads"):
        if s[key] < 1:
            raise ValueError(f"{key} must be >= 1. Received: {key}={s[key]}")
    if s["round_seconds"] <= 0:
        raise ValueError(f"round_seconds must be > 0. Received: {s['round_seconds']}")
    if s["settle_seconds"] < 0:
        raise ValueError(f"settle_seconds must be >= 0. Received: {s['settle_seconds']}")
    return s
