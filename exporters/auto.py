"""`--int8 auto`: each candidate recipe written, timed on this machine, and tried fastest first;
and the batch-1 latency every manifest records.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kerasft.exporters import runtime
from kerasft.exporters.contract import FormatContract
from kerasft.exporters.verify import SERVING_BATCHES
from kerasft.util.machine import computes_bf16, cpu_model, isa
from kerasft.util.timing import median_ms


def rank_auto(contract: FormatContract, write_attempt, vset, scratch: Path):
    """`--int8 auto`: writes every recipe of each candidate mode (the fallbacks too: fp32
    nodes cost time), times each on this machine at every serving batch size, and orders them
    fastest first; the modes' `untimed` recipes follow, in their modes' order.

    Returns:
        `(plan, written, report)`: the recipes as `(mode, attempt, settings)`, fastest first;
        those already written (`{(mode, label): (dir, manifest)}`); and what was measured, for
        the manifest.
    """
    timed, untimed, written = [], [], {}
    for mode, overrides in auto_candidates(contract):
        for attempt, settings in contract.attempts(mode):
            step = (mode, attempt, {**settings, **overrides})
            if mode and attempt in contract.int8[mode].untimed:
                untimed.append(step)
                continue
            label = recipe_label(attempt, step[2])
            out = scratch / str(len(written))
            out.mkdir()
            written[mode, label] = (out, write_attempt(mode, attempt, step[2], out))
            served = runtime.load(out)
            p50 = {size: p50_ms(served, vset.texts, size) for size in SERVING_BATCHES}
            timed.append((p50, step, {"mode": mode or "fp32", "recipe": label, "p50_ms": p50}))
    # fastest first: the product of the p50s at the serving batch sizes (each size counts alike)
    timed.sort(key=lambda item: float(np.prod(list(item[0].values()))))
    report = {
        "candidates": [entry for _, _, entry in timed],
        "order": "fastest first on this machine: product of p50 at batch sizes "
        + ", ".join(map(str, SERVING_BATCHES)),
        "cpu": cpu_model(),
        "isa": isa(),
    }
    return [step for _, step, _ in timed] + untimed, written, report


def auto_candidates(contract: FormatContract) -> list[tuple[str, dict]]:
    """The format's `auto` candidates this CPU can run as meant (bf16 ones need bf16 hardware)."""
    return [(mode, over) for mode, over in contract.auto
            if over.get("precision") != "bf16" or computes_bf16()]  # fmt: skip


def p50_ms(served, texts: list[str], batch: int, seconds: float = 1.0) -> float:
    """Median latency (ms) of `served.logits` on `batch` verification texts of median length."""
    feed = served.encode(texts[: max(batch, 64)])
    lengths = feed["padding_mask"].sum(axis=1)
    rows = np.argsort(np.abs(lengths - np.median(lengths)), kind="stable")[:batch]
    width = int(lengths[rows].max())
    feed = {k: np.ascontiguousarray(v[rows, :width]) for k, v in feed.items()}
    return round(median_ms(lambda: served.logits(feed), warmup=3, seconds=seconds), 3)


def latency_b1(served, texts: list[str], keras_ids: np.ndarray, calls: int = 50) -> dict:
    """Batch-1 latency of `served.predict([text])` (tokenization included) on this machine, for
    a verification text of the median token length."""

    lengths = (keras_ids != 0).sum(axis=1)
    median = int(np.median(lengths))
    text = texts[int(np.argmin(np.abs(lengths - median)))]
    p50 = median_ms(lambda: served.predict([text]), warmup=5, calls=calls)
    return {
        "batch": 1,
        "tokens": median,
        "p50_ms": round(p50, 3),
        "calls": calls,
        "threads": "runtime default",
        "cpu": cpu_model(),
        "isa": isa(),
        "cores": os.cpu_count(),
    }


def recipe_label(attempt, settings: dict) -> str:
    return " ".join([attempt or "fp32", *(f"{k}={v}" for k, v in settings.items())])
