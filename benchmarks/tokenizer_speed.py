"""What the exact (per-character Python) tokenization path costs on real news text.

    python -m kerasft.benchmarks.tokenizer_speed --export EXPORT_DIR [--data FILE]

The sarcasm headlines are pure ASCII; news text usually is not: curly apostrophes and quotes, en
and em dashes. This encodes the headlines with an export's runtime tokenizer three ways and
prints texts/s: as they are (ASCII), with news typography through `tokenizer.json` alone (the
runtime's path for such text since `kerasft.tokens.wordpiece.tokenizers_matches`), and the same
typographic texts forced through the exact KerasHub port (the runtime's path for every non-ASCII
text before). It checks that both paths give identical ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from kerasft.data import DATA_ENV
from kerasft.exporters import runtime as runtime_module
from kerasft.exporters.runtime import load


def typographic(text: str) -> str:
    """News typography: curly apostrophes and quotes, en and em dashes."""
    text = text.replace(" - ", " – ").replace("--", "—")
    out, opening = [], True
    for ch in text:
        if ch == '"':
            out.append("“" if opening else "”")
            opening = not opening
        else:
            out.append("’" if ch == "'" else ch)
    return "".join(out)


def _rate(encode, texts: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(texts), 32):
            encode(texts[i : i + 32])
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, type=Path, help="a kerasft export directory")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get(DATA_ENV, "../shared/data/sarcasm_headlines_v1.jsonl")),
    )
    args = parser.parse_args(argv)

    runtime = load(args.export)
    rows = [json.loads(line)["headline"] for line in args.data.open()]
    curly = [typographic(r) for r in rows]
    changed = sum(c != r for c, r in zip(curly, rows, strict=True))
    ascii_rate = _rate(runtime.encode, rows)
    fast_rate = _rate(runtime.encode, curly)
    fast_ids = runtime.encode(curly)["token_ids"]
    fast_path = runtime_module.tokenizers_matches
    runtime_module.tokenizers_matches = lambda text, **_: text.isascii()  # the rule before
    try:
        exact_rate = _rate(runtime.encode, curly)
        exact_ids = runtime.encode(curly)["token_ids"]
    finally:
        runtime_module.tokenizers_matches = fast_path
    identical = fast_ids.shape == exact_ids.shape and bool(np.array_equal(fast_ids, exact_ids))
    print(f"{len(rows)} headlines, {changed} changed by news typography; batches of 32")
    print("| texts | path | texts/s |")
    print("| --- | --- | ---: |")
    print(f"| as in the file (ASCII) | tokenizer.json | {ascii_rate:,.0f} |")
    print(f"| typographic | tokenizer.json (now) | {fast_rate:,.0f} |")
    print(f"| typographic | exact KerasHub port for non-ASCII (before) | {exact_rate:,.0f} |")
    print(f"identical token ids on both paths: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
