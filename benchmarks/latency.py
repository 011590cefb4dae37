"""Latency of every way kerasft can serve a fine-tuned classifier, beside Hugging Face's peers.

    python -m kerasft.benchmarks.latency --run RUN_DIR --out REPORT_DIR [--device cpu|gpu|auto]
        [--batch-sizes 1,8,32] [--seq-lens 32,128] [--quick]

(also `kerasft bench ...`). Variants: the Keras model on each installed backend (compiled
predict, each backend in its own process), Keras' native INT8 model, the SavedModel on
TensorFlow, ONNX fp32 and every ONNX INT8 recipe on onnxruntime, OpenVINO fp32 and NNCF INT8,
LiteRT fp32 and INT8, and the peers on the same weights: transformers PyTorch eager, Optimum's
ONNX export with its dynamic INT8 quantization, and optimum-intel's OpenVINO export with its INT8
quantization (optional `bench` extra; the report says when they are missing).

End to end: every kerasft export is also timed as users serve it, with
`runtime.load(dir).predict(texts)` on raw test-split strings (tokenization included), at batch
1 and 32.

Method: accuracy and label agreement are measured with the fine-tuned model on its sarcasm test
split; latency with a DistilBERT-base-shaped model that computes the same function
(`--latency-model base`, see `kerasft.benchmarks.models.widen`) or the run's own model
(`--latency-model run`). Every variant runs in its own worker process; after per-shape warm-up
(compilation excluded), the timed rounds interleave the variants in a new random order per round
so machine noise hits all of them alike; each variant gets blocks of equal time, each after an
untimed pause that lets the previous runtime's spinning threads go idle. Threads are fixed
(`--threads`) and reported. Output: `report.json`, `report.md` and PNG charts in REPORT_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import kerasft.exporters
from kerasft.benchmarks.artifacts import has_peers
from kerasft.benchmarks.device import detect_device, machine_info
from kerasft.benchmarks.latency_options import build_parser, settings_of
from kerasft.benchmarks.pipe import Child
from kerasft.benchmarks.report import BASELINE, OPTIMUM_INT8, write_report
from kerasft.benchmarks.variants import Variant, end_to_end_variants, variants
from kerasft.exporters.runtime import load
from kerasft.runs.rundir import MODEL_FILE, read_config, run_splits
from kerasft.util.cache import cache_dir
from kerasft.util.fileio import publish_target
from kerasft.util.versions import source_commit

HERE = Path(__file__).resolve().parent


class Worker(Child):
    """A running `kerasft.benchmarks.worker` process for one variant; `info` is what it
    loaded."""

    def __init__(self, variant: Variant, log_dir: Path, device: str):
        env = {**os.environ, **variant.env}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # no framework may grab a GPU in a CPU benchmark
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        self.variant = variant
        log = log_dir / f"{variant.name.replace(' ', '_')}.log"
        super().__init__(variant.name, ["kerasft.benchmarks.worker", json.dumps(variant.spec)],
                         log, env)  # fmt: skip
        self.info = self.read()


def _prepare(run: Path, root: Path, role: str, widen: int, peers: bool, auto_only: bool) -> dict:
    """Builds the role's artifacts in a TensorFlow subprocess, showing its progress lines
    (elapsed time first) while the whole output goes to a log; returns its index.

    Exports are verified as `kerasft export` verifies them (on `artifacts.VERIFY_PER_SPLIT`
    texts per split), `--quick` or not: with few texts the INT8 gate (>= 99% agreement) hinges
    on one or two flips (128 texts: 98.4%).
    """
    cmd = [sys.executable, "-m", "kerasft.benchmarks.artifacts", "--run", str(run),
           "--root", str(root), "--role", role, "--widen", str(widen)]  # fmt: skip
    cmd += ["--no-peers"] if not peers else []
    # --quick's variants (ONNX, OpenVINO) trace under PyTorch: no TensorFlow to load for them
    backend = "torch" if auto_only else "tensorflow"
    cmd += ["--auto-only", "--backend", backend] if auto_only else []
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log, started = root / f"prepare-{role}.log", time.time()
    with log.open("w") as f, subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:  # fmt: skip
        for line in proc.stdout:
            f.write(line)
            if line.startswith("[bench] "):
                minutes, seconds = divmod(int(time.time() - started), 60)
                print(f"[bench] {minutes}:{seconds:02d} {line[8:].rstrip()}", file=sys.stderr,
                      flush=True)  # fmt: skip
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"Preparing the {role} artifacts failed (log: {log}):\n{tail}")
    return json.loads((root / role / "index.json").read_text())


def _default_artifacts(run: Path) -> Path:
    """`$KERASFT_CACHE/bench/<key>`: the key hashes the model file and the code that builds the
    artifacts (kerasft.exporters, kerasft.benchmarks.artifacts and .models), so changed exporters
    rebuild."""
    import hashlib

    h = hashlib.sha256()

    sources = sorted(Path(kerasft.exporters.__file__).parent.glob("*.py"))
    sources += [HERE / "artifacts.py", HERE / "models.py"]
    for path in [run / MODEL_FILE, *sources]:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                h.update(chunk)
    return cache_dir() / "bench" / h.hexdigest()[:16]


def _test_inputs(index: dict, run: Path, rows: int | None, path: Path) -> np.ndarray:
    """Tokenizes the run's test split with the export runtime's tokenizer (KerasHub-exact)."""
    test = run_splits(run)[2]
    order = np.arange(len(test))
    if rows is not None and rows < len(test):
        order = np.sort(np.random.default_rng(0).permutation(len(test))[:rows])
    texts = [test.texts[i] for i in order]
    encoder = load(index["exports"]["onnx-fp32"])
    for size, target in ((32, path), (1, _batch1(path))):  # INT8 is also scored at batch 1
        batches = {}
        for n, i in enumerate(range(0, len(texts), size)):
            feed = encoder.encode(texts[i : i + size])
            batches[f"ids_{n}"], batches[f"mask_{n}"] = feed["token_ids"], feed["padding_mask"]
        np.savez(target, **batches)
    return test.labels[order]


def _batch1(path: Path) -> Path:
    return path.with_name(f"{path.stem}_b1{path.suffix}")


def open_workers(vs: list[Variant], work: Path, device: str, progress) -> tuple[dict, dict]:
    """Starts one worker per variant; returns `(workers, failed)` by variant name."""
    workers, failed = {}, {}
    for v in vs:
        progress.set_description(f"loading {v.name}")
        try:
            workers[v.name] = Worker(v, work, device)
        except RuntimeError as e:
            failed[v.name] = str(e)
    return workers, failed


def _close(workers: dict) -> None:
    for w in workers.values():
        w.close()


def measure_accuracy(
    index, run, rows, work: Path, progress, workers: dict, vs, quick: bool = False,
    only: set[str] | None = None,
) -> dict:  # fmt: skip
    """Classifies the test split with every variant's worker: at batch 32, and quantized ones
    also at batch 1.

    `quick`: the batch-1 pass only for recipes that take activation ranges per batch, an
    fp32 export served as verified (`Variant.exact`) is given the reference's labels, as its
    export's parity check (every verification text within `verify.FP32_TOLERANCE`) found, and
    the peers are not classified (the targets hold kerasft to the fastest peer whatever its
    accuracy). `only`: the variants to classify (None: every one); the rest get no accuracy.
    """
    labels = _test_inputs(index, run, rows, work / "test_inputs.npz")
    results, preds, exact = {}, {}, []
    for v in vs:
        progress.set_description(f"accuracy: {v.name}")
        out = work / f"logits-{v.name.replace(' ', '_')}.npy"
        if quick and (v.exact or v.family == "peer"):
            if v.exact:
                exact.append(v.name)
            progress.update(1)
            continue
        if only is not None and v.name not in only:  # never a contender: not classified
            progress.update(1)
            continue
        try:
            if v.name not in workers:
                raise RuntimeError("worker did not start")
            workers[v.name].call(op="predict", inputs=str(work / "test_inputs.npz"), out=str(out))
            at_b1 = v.quantized and not (quick and v.batch_independent)
            if at_b1:  # a quantized answer may depend on the batch: batch 1 too
                inputs_b1 = _batch1(work / "test_inputs.npz")
                workers[v.name].call(op="predict", inputs=str(inputs_b1), out=str(out) + ".b1")
        except RuntimeError as e:
            results[v.name] = {"error": str(e)}
        else:
            preds[v.name] = np.load(out).argmax(-1)
            results[v.name] = {"accuracy": float(np.mean(preds[v.name] == labels))}
            if at_b1:
                b1 = np.load(str(out) + ".b1.npy").argmax(-1)
                results[v.name]["accuracy_b1"] = float(np.mean(b1 == labels))
        progress.update(1)
    # Agreement is with the Keras fp32 model on the default backend (else any Keras fp32).
    fp32 = [v.name for v in vs if v.family == "keras" and not v.quantized and v.name in preds]
    reference = BASELINE if BASELINE in preds else (fp32[0] if fp32 else None)
    for name in exact:
        if reference:
            preds[name] = preds[reference]
            results[name] = {"accuracy": results[reference]["accuracy"],
                             "from": "the export's fp32 parity check"}  # fmt: skip
        else:
            results[name] = {"error": "no Keras fp32 reference to take the labels of"}
    for name, pred in preds.items():
        if reference:
            results[name]["agreement_with_fp32"] = float(np.mean(pred == preds[reference]))
    return {"rows": int(len(labels)), "reference": reference, "results": results}


def measure_latency(
    settings, progress, workers: dict, failed: dict, vs, cells=None, op: str = "time",
    prune: float | None = None, keep: frozenset = frozenset(),
) -> tuple[dict, dict]:  # fmt: skip
    """Interleaved timing of every variant on every cell.

    Args:
        cells: `(batch, sequence)` pairs (default: every configured batch size x sequence
            length); with `op="time_texts"`, `(batch, "text")`: raw test strings end to end.
        op: the worker command, `"time"` (token ids) or `"time_texts"` (raw strings).
        prune: after the first round, a cell times on only the variants within `prune` times
            its fastest (`--quick`: what decides its targets), and those of `keep` within
            `prune` times the fastest of `keep`. A variant left out is timed in one round: it
            is fastest nowhere and tied with nothing (`report.tied_with` needs every round).
    """
    if cells is None:
        cells = [(b, s) for s in settings["seq_lens"] for b in settings["batch_sizes"]]
    workers = dict(workers)
    samples = {(name, cell): [] for name in workers for cell in cells}
    per_round = {(name, cell): [] for name in workers for cell in cells}  # one median a round
    warm = set()

    def timed(name, cell, seconds, min_runs, settle):
        try:
            return workers[name].call(
                op=op, batch=cell[0], seq=cell[1], seconds=seconds, min_runs=min_runs,
                settle=settle,
            )["seconds"]  # fmt: skip
        except RuntimeError as e:  # a variant that fails is reported, the others go on
            failed[name] = str(e)
            workers.pop(name)
            return None

    for cell in cells:  # warm-up: compilation and first-call allocation are never timed
        for name in list(workers):
            progress.set_description(f"latency: warm-up {name} b{cell[0]} s{cell[1]}")
            if timed(name, cell, 0.0, 2, 0.0):
                warm.add((name, cell))
            progress.update(1)
    # Blocks of equal time per variant, whatever its speed. The pause before each block lets the
    # previous variant's idle runtime threads (which spin for a while after work) leave the cores.
    rng = np.random.default_rng(0)
    for r in range(settings["rounds"]):
        if r == 1 and prune:
            warm = _contenders(warm, per_round, prune, keep)
        for cell in cells:
            for name in rng.permutation([n for n in workers if (n, cell) in warm]):
                progress.set_description(f"latency: round {r + 1} b{cell[0]} s{cell[1]}")
                t = (
                    timed(name, cell, settings["round_seconds"], 1, settings["settle_seconds"])
                    if name in workers else None
                )  # fmt: skip
                samples[(name, cell)] += t or []
                if t:
                    per_round[(name, cell)].append(float(np.median(t) * 1e3))
                progress.update(1)
    table = _latency_table(workers, failed, vs, cells, samples, per_round)
    return table, {"cells": [f"b{b}_s{s}" for b, s in cells]}


def _latency_table(workers: dict, failed: dict, vs, cells, samples: dict, per_round: dict):
    """`{variant: {family, ..., "cells": {"bB_sS": percentiles}}}` of the timed samples (and
    the failed variants' errors); each worker's peak memory asked for last."""
    memory = {name: w.call(op="stats")["peak_rss_mb"] for name, w in workers.items()}
    info = {name: w.info["info"] for name, w in workers.items()}
    table = {}
    by_name = {v.name: v for v in vs}
    for name in workers:
        v = by_name[name]
        table[name] = {
            "family": v.family,
            "quantized": v.quantized,
            "onnx_int8": v.onnx_int8,
            "size_bytes": v.size_bytes,
            "peak_rss_mb": memory[name],
            "runtime": info[name],
            "cells": {},
        }
        for b, s in cells:
            t = np.array(samples[(name, (b, s))])
            if not len(t):
                continue
            table[name]["cells"][f"b{b}_s{s}"] = {
                "batch": b, "seq": s, "n": int(len(t)),
                "p50_ms": float(np.percentile(t, 50) * 1e3),
                "p90_ms": float(np.percentile(t, 90) * 1e3),
                "p99_ms": float(np.percentile(t, 99) * 1e3),
                "mean_ms": float(t.mean() * 1e3),
                "samples_per_s": float(b / t.mean()),
                "round_p50_ms": per_round[(name, (b, s))],
            }  # fmt: skip
    for name, error in failed.items():
        table[name] = {"error": error, "cells": {}}
    return table


def _contenders_of(latency: dict, rounds: int) -> set[str]:
    """The variants timed in every round of some cell (`measure_latency`'s `prune` kept them:
    the ones a targets verdict can name, or tie) and the accuracy reference."""
    return {BASELINE} | {
        name for name, row in latency.items()
        for cell in row.get("cells", {}).values() if len(cell.get("round_p50_ms", [])) == rounds
    }  # fmt: skip


def _contenders(warm: set, per_round: dict, prune: float, keep: frozenset) -> set:
    """The `(variant, cell)` pairs whose first round came within `prune` times the cell's
    fastest, or, for a variant in `keep`, within `prune` times the fastest of `keep`."""
    first = {pair: medians[0] for pair, medians in per_round.items() if medians}

    def fastest(names) -> dict:
        best = {}
        for (name, cell), median in first.items():
            if name in names:
                best[cell] = min(best.get(cell, np.inf), median)
        return best

    every, kept = fastest({name for name, _ in first}), fastest(keep)
    return {
        (name, cell) for name, cell in warm
        if first.get((name, cell), np.inf)
        <= prune * (kept[cell] if name in keep else every[cell])
        or first.get((name, cell), np.inf) <= prune * every[cell]
    }  # fmt: skip


END_TO_END_BATCHES = (1, 32)
# --quick times, after its first round, the variants within this factor of each cell's fastest
QUICK_PRUNE = 1.3
QUICK_NOTE = (
    "--quick: no end-to-end (raw strings) pass; the batch-1 accuracy pass only for recipes "
    "whose activation ranges are taken per batch; fp32 exports served as verified take the "
    "reference's labels (their export's parity check); the peers' accuracy is not measured "
    "(the targets compare with the fastest peer whatever its accuracy); run without --quick "
    "for all four"
)


def measure_end_to_end(index, run, settings, work: Path, device, progress) -> dict:
    """Times `kerasft.exporters.runtime.load(dir).predict(texts)` on raw test strings (every
    export)."""
    texts_file = work / "test_texts.json"
    texts_file.write_text(json.dumps(run_splits(run)[2].texts))
    vs = end_to_end_variants(index, settings["threads"], texts_file)
    workers, failed = open_workers(vs, work, device, progress)
    try:
        table, cells = measure_latency(
            settings, progress, workers, failed, vs,
            cells=[(b, "text") for b in END_TO_END_BATCHES], op="time_texts",
        )  # fmt: skip
    finally:
        _close(workers)
    return {"latency": table, "cells": cells["cells"], "texts": "test split (raw strings)"}


def main(argv: list[str] | None = None, prog: str = "python -m kerasft.benchmarks.latency") -> int:
    """Entry point of `python -m kerasft.benchmarks.latency` and `kerasft bench`.

    Returns:
        The exit code.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _max_sequence_length(run_dir: Path) -> int | None:
    """The run's position embeddings from `model.keras`'s config (no weights loaded), which
    bound every latency cell (the wide model keeps them); `None` where a KerasHub classifier
    would not keep them."""
    import zipfile

    try:
        with zipfile.ZipFile(Path(run_dir) / MODEL_FILE) as archive:
            config = json.loads(archive.read("config.json"))
        return int(config["config"]["backbone"]["config"]["max_sequence_length"])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None


def _check_seq_lens(seq_lens: list[int], longest: int | None) -> None:
    if longest is not None and max(seq_lens) > longest:
        raise ValueError(f"seq_lens={seq_lens} exceed the model's {longest} position embeddings.")


def run(args) -> int:
    settings = settings_of(args)
    read_config(args.run)  # a run directory, or a FileNotFoundError that says what is missing
    run_splits(args.run)  # its data file unchanged since the fit, or a DataChangedError
    _check_seq_lens(settings["seq_lens"], _max_sequence_length(args.run))  # before any export
    with publish_target(args.out, args.overwrite, "Report directory") as tmp:
        report = _measure(args, settings)
        write_report(report, tmp)
    print((args.out / "report.md").read_text())
    print(f"[bench] {report['seconds']:.0f} s -> {args.out}", file=sys.stderr)
    return 0


def _measure(args, settings) -> dict:
    """Prepares the artifacts, measures every variant and returns the report."""
    from tqdm import tqdm

    started, commit = time.time(), source_commit()  # the code measured
    device, gpus = detect_device(args.device)
    indexes, root, notes = _prepare_roles(args, settings, device)
    latency_index = indexes[settings["latency_model"]]
    _check_seq_lens(settings["seq_lens"], latency_index["shape"]["max_sequence_length"])
    work = root / "work"
    work.mkdir(exist_ok=True)
    run_vs, notes_run = variants(indexes["run"], settings["threads"], device, args.quick)
    lat_vs, notes_lat = variants(latency_index, settings["threads"], device, args.quick)
    n_cells = len(settings["batch_sizes"]) * len(settings["seq_lens"])
    n_e2e = 0 if args.quick else len(indexes["run"]["exports"])  # quick: no end-to-end pass
    total = len(run_vs) + len(lat_vs) * n_cells * (1 + settings["rounds"])
    total += n_e2e * (1 + len(END_TO_END_BATCHES) * (1 + settings["rounds"]))
    with tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True) as progress:
        workers, failed = open_workers(run_vs, work, device, progress)
        try:
            if args.quick:  # the run's own workers time first, then classify what contends
                accuracy = None
            else:
                accuracy = measure_accuracy(indexes["run"], args.run, settings["test_rows"],
                                            work, progress, workers, run_vs)  # fmt: skip
            if latency_index is not indexes["run"]:  # new workers on the latency model
                _close(workers)
                workers, failed = open_workers(lat_vs, work, device, progress)
            # --quick: after one round, only the contenders of each cell, and those of the ONNX
            # INT8 table (this project's recipes against Optimum's)
            keep = frozenset(v.name for v in lat_vs if v.onnx_int8 or v.name == OPTIMUM_INT8)
            latency, cells = measure_latency(settings, progress, workers, failed, lat_vs,
                                             prune=QUICK_PRUNE if args.quick else None,
                                             keep=keep)  # fmt: skip
            if accuracy is None:  # --quick: the variants a verdict can name, and the reference
                accuracy = measure_accuracy(
                    indexes["run"], args.run, settings["test_rows"], work, progress, workers,
                    run_vs, quick=True, only=_contenders_of(latency, settings["rounds"]),
                )  # fmt: skip
        finally:
            _close(workers)
        end_to_end = None
        if not args.quick:
            end_to_end = measure_end_to_end(
                indexes["run"], args.run, settings, work, device, progress
            )
    return {
        "command": args.command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "commit": commit,
        "device": device,
        "machine": machine_info(settings["threads"], gpus),
        "settings": settings,
        "models": {
            role: {"shape": idx["shape"], "keras": idx["keras"]} for role, idx in indexes.items()
        },
        "latency_model": settings["latency_model"],
        "optimum_recipe": latency_index.get("optimum", {}).get("recipe"),
        "optimum_intel_recipe": latency_index.get("optimum_intel", {}).get("recipe"),
        "accuracy": accuracy,
        "latency": latency,
        **cells,
        "end_to_end": end_to_end,
        "notes": sorted({*notes, *notes_run, *notes_lat, *([QUICK_NOTE] if args.quick else [])}),
        "seconds": round(time.time() - started, 1),
    }


def _prepare_roles(args, settings, device: str) -> tuple[dict, Path, list[str]]:
    """The artifact index of the run's model (and of the base-shaped latency model)."""
    peers, notes = not args.no_peers, []
    if peers and not has_peers():
        peers = False
        notes.append("peers (transformers, Optimum) not installed: pip install -e '.[bench]'")
    root = args.artifacts or _default_artifacts(args.run)
    root.mkdir(parents=True, exist_ok=True)
    roles = ["run"] + (["base"] if settings["latency_model"] == "base" else [])
    print(f"[bench] device {device}; artifacts in {root}", file=sys.stderr, flush=True)
    indexes = {}
    for role in roles:
        print(f"[bench] preparing the {role} model's artifacts (exports are verified)...",
              file=sys.stderr, flush=True)  # fmt: skip
        indexes[role] = _prepare(args.run, root, role, args.widen, peers, args.quick)
    return indexes, root, notes


if __name__ == "__main__":
    sys.exit(main())
