"""Memory and speed of the data path as the data grows: the sarcasm file, then 10x of it.

    python -m kerasft.benchmarks.scale [--data FILE] [--factor 10] [--preset scale-tiny]

For each size (the file as it is; `--factor` times as many rows, every copy of a headline
varied by one inserted word so that no text repeats), one process loads the file, splits it
60/20/20 as the reference does, and fits one warm-up epoch (stage 1: the frozen backbone runs
once over training and validation rows, the head trains on the cached features). It prints
peak RSS (and its growth over the process after loading the model), tokenization texts/s of
the training path (`kerasft.tokens.batching.tokenize`) and of KerasHub's preprocessor alone, and
warm-up samples/s.

The default model, `scale-tiny`, is a one-layer DistilBERT with the offline preset's shapes
(hidden 384, 12 heads, its 30,522-word vocabulary and tokenizer; random weights): the data
path is the reference one, the model is cut to one layer so that 267k rows fit in minutes on a
2-core CPU. `--preset all_minilm_l6_v2` runs the real six layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kerasft.benchmarks.report import cpu_line, header, provenance, write_results
from kerasft.data import DATA_ENV, load_dataset, split_dataset
from kerasft.model.presets import load_classifier, minilm_source_dir
from kerasft.util.versions import TRAINING, source_commit

INSERTED = (
    "today", "again", "now", "also", "still", "really", "just", "even", "here", "there",
    "finally", "reportedly", "apparently", "somehow", "suddenly", "officially", "quietly",
)  # fmt: skip


def synthetic(rows: list[dict], factor: int, text_key: str) -> list[dict]:
    """`factor` copies of `rows` in which no text repeats.

    Copy 0 is `rows` as they are; copy k > 0 inserts word k into every text at a spot that
    depends on the text. A text already seen (the file's own duplicates, and their copies)
    gets one more inserted word, then another, until it is new.
    """
    if factor > len(INSERTED) + 1:
        raise ValueError(f"factor must be <= {len(INSERTED) + 1}. Received: factor={factor}")
    out, seen = [], set()
    for k in range(factor):
        for row in rows:
            words, extra = row[text_key].split(), k
            text = row[text_key] if k == 0 else None
            while text is None or text in seen:
                word = INSERTED[extra % len(INSERTED) - 1] if extra else INSERTED[-1]
                at = (len(words) * 7 + extra) % (len(words) + 1)
                words = words[:at] + [word] + words[at:]
                text, extra = " ".join(words), extra + 1
            seen.add(text)
            out.append({**row, text_key: text})
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _tiny_preset(directory: Path) -> Path:
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.DistilBertTokenizer(
        vocabulary=str(minilm_source_dir() / "vocab.txt"), lowercase=True
    )
    backbone = keras_hub.models.DistilBertBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=12,
        hidden_dim=384, intermediate_dim=1536, max_sequence_length=512,
    )  # fmt: skip
    backbone.save_to_preset(str(directory))
    tokenizer.save_to_preset(str(directory))
    return directory


def child(args) -> dict:
    """One size, in its own process: load, split, tokenize, one warm-up epoch."""
    import keras

    # lazy: they load Keras, under the backend this process was given
    from kerasft.tokens.batching import kerashub_tokenize, tokenize
    from kerasft.training.tuner import TwoStageFineTuner

    preset = args.preset
    if preset == "scale-tiny":
        preset = str(_tiny_preset(Path(tempfile.mkdtemp()) / "preset"))
    classifier = load_classifier(preset, 2, 128)
    baseline = _rss_mb()
    start = time.perf_counter()
    data = load_dataset(args.data)
    train, val, _ = split_dataset(data)
    rows, load_seconds = len(data), time.perf_counter() - start
    del data
    start = time.perf_counter()
    ids = tokenize(classifier.preprocessor, train.texts)
    fast = len(train.texts) / (time.perf_counter() - start)
    slow = None
    if args.kerashub_tokenizer:
        start = time.perf_counter()
        kerashub_tokenize(classifier.preprocessor, train.texts)
        slow = len(train.texts) / (time.perf_counter() - start)
    del classifier, ids
    tuner = TwoStageFineTuner(preset, warmup_epochs=1, finetune_epochs=0, verbose=0)
    tuner.fit(train, validation_data=val)
    return {
        "rows": rows,
        "train": len(train),
        "validation": len(val),
        "load_seconds": load_seconds,
        "tokenize_texts_per_s": fast,
        "kerashub_texts_per_s": slow,
        "warmup_seconds": tuner.stage_seconds["warmup"],
        "warmup_samples_per_s": tuner.stage_samples_per_second["warmup"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline,
        "backend": keras.backend.backend(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get(DATA_ENV, "../shared/data/sarcasm_headlines_v1.jsonl")),
    )
    parser.add_argument("--factor", type=int, default=10, help="rows of the large run, x file")
    parser.add_argument("--preset", default="scale-tiny", help="scale-tiny, or a kerasft preset")
    parser.add_argument("--out", type=Path, help="report file (.md; JSON beside)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kerashub-tokenizer", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if not args.data.is_file():
        parser.error(f"data file not found: {str(args.data)!r} (pass --data or ${DATA_ENV})")

    command, commit = "python -m kerasft.benchmarks.scale " + shlex.join(argv), source_commit()
    rows = [json.loads(line) for line in args.data.open() if line.strip()]
    text_key = "headline" if "headline" in rows[0] else "text"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / f"x{args.factor}.jsonl"
        texts = synthetic(rows, args.factor, text_key)
        repeats = len(texts) - len({r[text_key] for r in texts})
        with big.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in texts)
        del texts
        for path, factor in ((args.data.resolve(), 1), (big, args.factor)):
            print(f"[scale] {factor}x: {path.name}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "kerasft.benchmarks.scale", "--child", "--data", str(path)]
            cmd += ["--preset", args.preset] + (["--kerashub-tokenizer"] if factor == 1 else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            results.append({"factor": factor, **json.loads(proc.stdout.strip().splitlines()[-1])})
    text = format_report(results, args, repeats, len(rows))
    if args.out:
        measured = {**provenance(command, commit, TRAINING), "results": results}
        head = header("Memory and speed of the data path as rows grow", measured,
                      cpu_line(measured["machine"]), measured["versions"])  # fmt: skip
        write_results(args.out, measured, "\n".join([*head, "", text, ""]))
    else:
        print(text)
    return 0


def format_report(results: list[dict], args, repeats: int, file_rows: int) -> str:
    first, last = results[0], results[-1]
    lines = [
        f"backend {first['backend']}, preset {args.preset}, one warm-up epoch (stage 1) per size; "
        f"{file_rows:,} rows x {args.factor} with {repeats} repeated texts",
        "",
        "| rows | train / validation | peak RSS MB | RSS growth over the loaded model MB | "
        "tokenize texts/s (training path) | KerasHub tokenizer texts/s | warm-up s | "
        "warm-up samples/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        slow = f"{r['kerashub_texts_per_s']:,.0f}" if r["kerashub_texts_per_s"] else "-"
        lines.append(
            f"| {r['rows']:,} | {r['train']:,} / {r['validation']:,} | {r['peak_rss_mb']:,.0f} | "
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:,.0f} | {r['tokenize_texts_per_s']:,.0f} | "
            f"{slow} | {r['warmup_seconds']:,.0f} | {r['warmup_samples_per_s']:,.0f} |"
        )
    growth = last["peak_rss_mb"] - first["peak_rss_mb"]
    lines += [
        "",
        f"peak RSS growth from {first['rows']:,} to {last['rows']:,} rows: {growth:,.0f} MB",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
