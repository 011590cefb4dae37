"""Labelling files: rows/s per export format, threads, and memory as the file grows.

    python -m kerasft.benchmarks.labelling --run RUN --exports DIR --out labelling.md

`DIR` holds exports of `RUN` (as `kerasft.benchmarks.export_accuracy --exports DIR` writes
them: `onnx-dynamic`, `openvino-nncf`, ...). Each measurement runs in its own process:

- **File**: `kerasft predict EXPORT --data TEST --out FILE` as the CLI runs it
  (`kerasft.labelling.labeller.label_file`: read, tokenize, sort by length, predict, write; the
  export loaded for throughput, `runtime.load(..., throughput=True)`), on the run's test
  split, after a warm-up on 256 texts; the run directory (Keras) too.
- **Threads**: one export as `runtime.load(dir)` loads it by default, its `predict` called
  from 1, 2 and 4 threads at once, each thread on its own share of the test split; rows/s of
  the whole, after a warm-up on 256 texts.
- **Peers** (`--peers`): the pipelines a Hugging Face user writes for the same job,
  `transformers.pipeline("text-classification", model=..., batch_size=32)` over optimum-intel's
  `OVModelForSequenceClassification` and over Optimum's `ORTModelForSequenceClassification`, each
  on its INT8 model as `kerasft bench` builds it (`--peers ARTIFACTS/run`: that role's
  `index.json`), with default settings; rows/s of the test split, tokenization included, and
  test accuracy. The summary compares kerasft's fastest export within 0.15 points of the run's
  own test accuracy with the fastest peer, through `runtime.load(...).predict` (1 thread) and
  through `kerasft predict --data`.
- **Memory**: peak RSS of the `kerasft predict --data` process on generated files of
  `--memory-rows` rows (the test split's texts, cycled), through `--memory-export` (default: the
  run's `onnx-dynamic`). What grows with the file is the streaming path (reader, chunk, writer),
  not the model, so a small export can label a million rows in minutes on 2 cores where the
  reference model takes hours; the report names the export and its size.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kerasft.benchmarks.report import (
    MAX_ACCURACY_DROP,
    cpu_line,
    header,
    provenance,
    results_parser,
    write_results,
)
from kerasft.exporters import exportdir
from kerasft.exporters.exportdir import read_manifest
from kerasft.exporters.formats import EXPORT_PACKAGES as EXPORT
from kerasft.exporters.runtime import load
from kerasft.labelling.labeller import CHUNK_ROWS, label_file
from kerasft.labelling.textstream import read_texts
from kerasft.runs.rundir import run_splits
from kerasft.util.versions import source_commit


def build_parser() -> argparse.ArgumentParser:
    parser = results_parser("labelling", __doc__, "a directory of its exports")
    parser.add_argument("--threads", default="1,2,4", help="thread counts to call predict from")
    parser.add_argument(
        "--memory-rows", default="10000,1000000", help="rows of the generated files"
    )
    parser.add_argument(
        "--memory-export", type=Path,
        help="the export that labels those files (default: EXPORTS/onnx-dynamic)",
    )  # fmt: skip
    peers = "time the peers' pipelines too, from a `kerasft bench` artifact dir (ARTIFACTS/run)"
    parser.add_argument("--peers", type=Path, help=peers)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one measurement, JSON out
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_work(json.loads(args.worker))))
        return 0

    source = source_commit()
    threads = [int(t) for t in args.threads.split(",")]
    exports = sorted(p for p in args.exports.iterdir() if exportdir.is_export(p))
    if not exports:
        raise SystemExit(f"no exports in {args.exports}")
    test = run_splits(args.run)[2]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in test.texts))
        labels = Path(tmp) / "labels.json"
        labels.write_text(json.dumps([str(x) for x in test.labels]))
        rows = [_measure(str(args.run), data, tmp, None)]
        rows += [_measure(str(p), data, tmp, threads, labels) for p in exports]
        peers = [_measure_peer(job, data, labels) for job in _peer_jobs(args.peers)]
        export = args.memory_export or args.exports / "onnx-dynamic"
        memory = [_memory(export, test.texts, int(n), tmp) for n in args.memory_rows.split(",")]
    command = "python -m kerasft.benchmarks.labelling " + shlex.join(argv)
    reference = json.loads((args.run / "metrics.json").read_text())["test"]["accuracy"]
    report = {**provenance(command, source, EXPORT), "run": str(args.run),
              "test_rows": len(test), "rows": rows, "memory": memory, "peers": peers,
              "reference_accuracy": reference}  # fmt: skip
    report["summary"] = summary(report)
    write_results(args.out, report, render(report))
    return 0


def _measure(model: str, data: Path, tmp: str, threads: list[int] | None, labels=None) -> dict:
    job = {"model": model, "data": str(data), "out": f"{tmp}/labels.jsonl", "threads": threads,
           "labels": str(labels) if labels else None}  # fmt: skip
    return _run_worker(job)


def _run_worker(job: dict) -> dict:
    model = job["model"]
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch")}
    cmd = [sys.executable, "-m", "kerasft.benchmarks.labelling", "--run", "-", "--exports", "-",
           "--out", "-", "--worker", json.dumps(job)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{model}: {proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    rate = row.get("file_rows_per_second") or row["pipeline_rows_per_second"]
    print(f"{row['name']}: {rate:.0f} rows/s"
          + "".join(f", {t} threads {r:.0f}" for t, r in row.get("threads", {}).items()),
          flush=True)  # fmt: skip
    return row


def _peer_jobs(artifacts: Path | None) -> list[dict]:
    """The peers' pipeline jobs for a `kerasft bench` artifact directory (none without one)."""
    if artifacts is None:
        return []
    index = json.loads((artifacts / "index.json").read_text())
    jobs = []
    for key in ("optimum_intel", "optimum"):  # the bench index's peers
        if key in index:
            path = Path(index[key]["int8"])
            jobs.append({"peer": key, "model": str(path.parent), "file": path.name,
                         "tokenizer": index["transformers"]})  # fmt: skip
    return jobs


def _measure_peer(job: dict, data: Path, labels: Path) -> dict:
    return _run_worker({**job, "data": str(data), "labels": str(labels)})


def _peer_work(job: dict) -> dict:
    """One process: `transformers.pipeline` over the peer's INT8 model, as users write it."""
    from transformers import AutoTokenizer, pipeline

    if job["peer"] == "optimum_intel":
        from optimum.intel import OVModelForSequenceClassification as Model

        name = "pipeline() over optimum-intel OVModelForSequenceClassification (INT8)"
    else:
        from optimum.onnxruntime import ORTModelForSequenceClassification as Model

        name = "pipeline() over Optimum ORTModelForSequenceClassification (INT8)"
    model = Model.from_pretrained(job["model"], file_name=job["file"])
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, batch_size=32)
    texts = [json.loads(line)["text"] for line in Path(job["data"]).read_text().splitlines()]
    classify(texts[:256])  # warm-up
    start = time.perf_counter()
    answers = classify(texts)
    seconds = time.perf_counter() - start
    predicted = [model.config.label2id[a["label"]] for a in answers]
    return {"name": name, "model": job["model"], "rows": len(texts),
            "pipeline_rows_per_second": len(texts) / seconds,
            "accuracy": _accuracy(predicted, job["labels"], None)}  # fmt: skip


def _accuracy(predicted: list, labels_file: str, names: list[str] | None) -> float:
    """Test accuracy of class ids (or, with `names`, of labels) against the labels file."""
    truth = json.loads(Path(labels_file).read_text())
    if names is not None:
        predicted = [names.index(p) for p in predicted]
    ids = [int(t) if t.isdigit() else names.index(t) for t in truth]
    return sum(int(p == t) for p, t in zip(predicted, ids, strict=True)) / len(ids)


def summary(report: dict) -> dict | None:
    """kerasft's fastest export within 0.15 points of the run's test accuracy against the
    fastest peer pipeline: rows/s through the runtime (1 thread) and through the file CLI."""
    accurate = [
        r
        for r in report["rows"]
        if r.get("accuracy") is not None
        and report["reference_accuracy"] - r["accuracy"] <= MAX_ACCURACY_DROP + 1e-12
    ]
    if not accurate or not report["peers"]:
        return None
    peer = max(report["peers"], key=lambda r: r["pipeline_rows_per_second"])
    out = {"peer": peer["name"], "peer_rows_per_second": peer["pipeline_rows_per_second"]}
    for key, rate in (("runtime", lambda r: r["threads"]["1"]),
                      ("file", lambda r: r["file_rows_per_second"])):  # fmt: skip
        best = max(accurate, key=rate)
        out[key] = {"export": best["name"], "rows_per_second": rate(best),
                    "ratio": rate(best) / peer["pipeline_rows_per_second"]}  # fmt: skip
    return out


def _work(job: dict) -> dict:
    """One process: the CLI's file labelling on `job["data"]`, then predict from threads (or,
    for a peer, its pipeline)."""
    if job.get("peer"):
        return _peer_work(job)

    model = Path(job["model"])
    if exportdir.is_export(model):
        for_file = load(model, throughput=True)  # as `kerasft predict --data` loads it
        name = for_file.manifest["format"] + " " + exportdir.variant(for_file.manifest)
        predict_proba, chunk = (lambda t: for_file.predict(t).probabilities), for_file.chunk_rows
        names = for_file.label_names
    else:
        import keras

        # lazy: loads Keras, which the export variants' runs never need
        from kerasft.training.tuner import load_tuner

        tuner = load_tuner(model)
        tuner.verbose = 0
        name = f"run directory (Keras, {keras.backend.backend()})"
        predict_proba, chunk, names = tuner.predict_proba, CHUNK_ROWS, tuner.label_names
    texts = [t for _, t, _, _ in read_texts(job["data"])]
    predict_proba(texts[:256])  # warm-up
    summary = label_file(read_texts(job["data"]), predict_proba, names, out=job["out"],
                         chunk_rows=chunk, overwrite=True)  # fmt: skip
    row = {"name": name, "model": str(model), "rows": summary["rows"],
           "file_rows_per_second": summary["rows_per_second"]}  # fmt: skip
    if exportdir.is_export(model):  # `runtime.load(dir)` as it loads by default
        served = load(model)
        served.predict(texts[:256])  # warm-up
        if job["threads"]:
            row["threads"] = {str(n): _threaded(served, texts, n) for n in job["threads"]}
        if job.get("labels"):
            row["accuracy"] = _accuracy(served.predict(texts).labels, job["labels"], names)
    return row


def _threaded(served, texts: list[str], n: int) -> float:
    """Rows/s of `served.predict` called from `n` threads at once, each on its share."""
    shares = [texts[i::n] for i in range(n)]
    barrier = threading.Barrier(n + 1)

    def call(share):
        barrier.wait()
        served.predict(share)

    workers = [threading.Thread(target=call, args=(s,)) for s in shares]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return len(texts) / (time.perf_counter() - start)


def _memory(export: Path, texts: list[str], rows: int, tmp: str) -> dict:
    """Peak RSS of `kerasft predict EXPORT --data FILE --out OUT` on a file of `rows` rows."""
    data = Path(tmp) / f"rows-{rows}.jsonl"
    with data.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "text": texts[i % len(texts)]}) + "\n")
    out = Path(tmp) / f"rows-{rows}.out.jsonl"
    cmd = [sys.executable, "-m", "kerasft", "predict", str(export), "--data", str(data),
           "--out", str(out), "--overwrite", "--quiet"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"{shlex.join(cmd)}: {proc.stderr.read().decode()[-3000:]}")
    with out.open() as f:
        written = sum(1 for _ in f)
    data.unlink()
    out.unlink()

    manifest = read_manifest(export)
    result = {"export": str(export), "export_mb": manifest["size_bytes"] / 1e6,
              "rows": rows, "rows_written": written,
              "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds}  # fmt: skip
    print(f"{rows:,} rows: peak RSS {result['peak_rss_mb']:.0f} MB, {seconds:.0f} s", flush=True)
    return result


def _peer_lines(report: dict) -> list[str]:
    """The peers' pipelines and the summary against them (none when not measured)."""
    if not report.get("peers"):
        return []
    lines = ["", "**Peers**: `transformers.pipeline(\"text-classification\", model=..., "
             "batch_size=32)` over each peer's INT8 model with its defaults, the test split in "
             "one call, tokenization included, after a warm-up on 256 texts.", "",
             "| peer pipeline | test accuracy | rows/s |", "| --- | ---: | ---: |"]  # fmt: skip
    for r in report["peers"]:
        lines.append(f"| {r['name']} | {r['accuracy']:.4f} | "
                     f"{r['pipeline_rows_per_second']:,.0f} |")  # fmt: skip
    s = report.get("summary")
    if s:
        lines += ["", f"kerasft's fastest export within 0.15 points of the run's test accuracy "
                  f"({report['reference_accuracy']:.4f}) against the fastest peer, {s['peer']} "
                  f"({s['peer_rows_per_second']:,.0f} rows/s): through `runtime.load(...)"
                  f".predict`, {s['runtime']['export']} {s['runtime']['rows_per_second']:,.0f} "
                  f"rows/s (**{s['runtime']['ratio']:.2f}x**); through `kerasft predict --data`, "
                  f"{s['file']['export']} {s['file']['rows_per_second']:,.0f} rows/s "
                  f"(**{s['file']['ratio']:.2f}x**)."]  # fmt: skip
    return lines


def render(report: dict) -> str:
    lines = [
        *header("Labelling files", report, cpu_line(report["machine"]), report["versions"]),
        "",
        f"Run `{report['run']}`, its test split ({report['test_rows']:,} headlines). **File**: "
        "rows/s of `kerasft predict MODEL --data FILE --out OUT` as the CLI runs it (read, "
        "tokenize, sort each 1,024-row chunk by length, predict in batches of 32, write JSON "
        "Lines), after a warm-up. **Threads**: rows/s of one loaded export whose `predict` is "
        "called from N threads at once (each on its share of the texts; the runtime's own "
        "intra-op threads as by default).",
        "",
    ]
    counts = sorted({t for r in report["rows"] for t in r.get("threads", {})}, key=int)
    lines += [
        "| model | test accuracy | file rows/s | "
        + " | ".join(f"{t} thread(s) rows/s" for t in counts)
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in counts) + " |",
    ]
    reference = report.get("reference_accuracy")
    for r in report["rows"]:
        cells = [f"{r['threads'][t]:,.0f}" if t in r.get("threads", {}) else "-" for t in counts]
        accuracy = r.get("accuracy", reference if "threads" not in r else None)
        lines.append(f"| {r['name']} | {'-' if accuracy is None else f'{accuracy:.4f}'} | "
                     f"{r['file_rows_per_second']:,.0f} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += _peer_lines(report)
    lines += [
        "",
        "**Memory**: peak RSS of the `kerasft predict --data` process (the export's runtime, "
        "tokenizer and one chunk) on generated JSON Lines files (`id`, `text`: the test split's "
        "texts cycled), through the export named. What could grow with the file is the "
        "streaming path (reader, chunk, writer), not the model, so a small export may stand in "
        "for the reference one, which would take hours for a million rows on 2 cores.",
        "",
        "| export (size) | rows | rows written | peak RSS MB | seconds | rows/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in report["memory"]:
        lines.append(f"| `{m['export']}` ({m['export_mb']:.1f} MB) | {m['rows']:,} | "
                     f"{m['rows_written']:,} | {m['peak_rss_mb']:,.0f} | {m['seconds']:,.0f} | "
                     f"{m['rows'] / m['seconds']:,.0f} |")  # fmt: skip
    if len(report["memory"]) > 1:
        small, big = report["memory"][0], report["memory"][-1]
        lines += ["", f"Peak RSS grows {big['peak_rss_mb'] - small['peak_rss_mb']:+,.0f} MB from "
                  f"{small['rows']:,} to {big['rows']:,} rows."]  # fmt: skip
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
