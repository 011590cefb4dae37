"""One prepared GPU run: fine-tuning per backend and precision, Keras inference latency, peers.

    # on a machine with a CUDA GPU (jax[cuda] or a CUDA torch installed), or here on CPU:
    python -m kerasft.benchmarks.gpu.run --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --device cuda --out benchmarks/results/gpu.md
    python -m kerasft.benchmarks.gpu.run --device cpu --quick --data FILE --out /tmp/gpu.md

Meant to fit in about 8 minutes of a 15-minute lease (no GPU has run it yet): every step runs in
its own process, one after another, and a step that fails is reported with its error instead of
ending the run.

1. **Fine-tuning**: `kerasft fit` on the reference split for each backend (`--backends`, default
   torch and jax) in float32 and under Keras' `mixed_bfloat16` policy: seconds per stage,
   samples/s and test accuracy from the run's `metrics.json`. On a machine with several GPUs,
   also PyTorch in bfloat16 over all of them: `torchrun --nproc-per-node N -m kerasft fit
   --devices all` (torch.distributed, NCCL, one GPU per process).
2. **Keras inference**: the float32 run's model on each backend, batch 1, 8, 32 and 128 x 32 and
   128 tokens; the device is synchronised around every timed call (`torch.cuda.synchronize`,
   JAX's `block_until_ready`), p50 and p90 of the calls.
3. **Peers on the same weights**: Hugging Face transformers eager in float16, the same under
   `torch.compile`, and onnxruntime's CUDA provider when the installed onnxruntime has it (the
   report says which were found).

The report (markdown, JSON beside it) names the GPU, its driver, the CPU and the versions.
`--quick` shrinks everything (a data subsample, one epoch per stage, two cells, few calls) so
that the whole script runs in the test suite on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kerasft.benchmarks.models import to_transformers
from kerasft.benchmarks.report import cpu_line, header, write_results
from kerasft.data import DATA_ENV
from kerasft.model.presets import DEFAULT_PRESET
from kerasft.util.machine import describe
from kerasft.util.timing import call_seconds
from kerasft.util.versions import package_versions, source_commit

BACKENDS = ("torch", "jax")
PRECISIONS = ("float32", "bfloat16")
BATCHES, LENGTHS = (1, 8, 32, 128), (32, 128)
QUICK_BATCHES, QUICK_LENGTHS = (1, 8), (32,)


def _env(device: str, backend: str | None = None) -> dict:
    """The environment of a step: the CPU-only one hides every GPU from both frameworks."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "USE_TF": "0"}
    if backend:
        env["KERAS_BACKEND"] = backend
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    return env


def _step(name: str, command: list[str], env: dict, log_dir: Path, progress) -> dict:
    """Runs one step in its own process; returns its JSON reply (last stdout line) or error."""
    progress(f"[gpu] {name} ...")
    started = time.perf_counter()
    log = log_dir / f"{name.replace(' ', '_')}.log"
    with open(log, "w") as out:
        proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
    seconds = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = log.read_text(errors="replace")[-1500:]
        progress(f"[gpu] {name}: FAILED ({seconds:.0f} s)\n{tail}")
        return {"error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1:] or ''}"}
    progress(f"[gpu] {name}: {seconds:.0f} s")
    return {**json.loads(lines[-1]), "step_seconds": seconds}


# --- the steps (each runs as `python -m kerasft.benchmarks.gpu.run --step NAME ...`) ----------


def fit_step(args) -> dict:
    """`kerasft fit` of one backend and precision; its metrics and the device it trained on."""
    processes = int(args.processes or 1)
    out = Path(args.work) / f"run-{args.backend}-{args.precision}-x{processes}"
    launcher = [sys.executable, "-m", "kerasft"]
    if processes > 1:  # torchrun, one process per GPU (torch.distributed, NCCL)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(processes), "-m", "kerasft"]  # fmt: skip
    command = [*launcher, "--backend", args.backend, "fit",
               "--data", args.data, "--preset", args.preset, "--out", str(out), "--quiet",
               "--overwrite", *shlex.split(args.fit_args)]  # fmt: skip
    command += ["--devices", "all"] if processes > 1 else []
    # explicit either way: the default (`auto`) is bfloat16 on CPUs that compute it
    command += ["--mixed-precision", "none" if args.precision == "float32" else args.precision]
    started = time.perf_counter()
    proc = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode:
        raise RuntimeError(f"kerasft fit exited {proc.returncode}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "run": str(out),
        "wall_seconds": time.perf_counter() - started,
        "seconds": metrics["seconds"],
        "samples_per_second": metrics["samples_per_second"],
        "test_accuracy": metrics["test"]["accuracy"],
        "test_f1": metrics["test"]["f1"],
        "device": _keras_device(),
    }


def _gpu_count() -> int:
    """NVIDIA GPUs `nvidia-smi -L` lists (0 without it)."""
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in proc.stdout.splitlines())


def _keras_device() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0])
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _sync_call(fn, sync):
    def call():
        out = fn()
        sync(out)
        return out

    return call


def _time(call, calls: int, warmup: int = 3) -> dict:
    import numpy as np

    ms = np.array(call_seconds(call, warmup=warmup, calls=calls)) * 1e3
    return {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "n": calls}


def _feeds(vocabulary_size: int, cells, cls_id: int):
    """Token ids (every position attended, `[CLS]` first) per (batch, tokens) cell."""
    import numpy as np

    rng = np.random.default_rng(0)
    for batch, tokens in cells:
        low = min(1000, vocabulary_size // 2)  # past the special tokens
        ids = rng.integers(low, vocabulary_size, size=(batch, tokens)).astype("int32")
        ids[:, 0] = cls_id
        yield (batch, tokens), ids, np.ones_like(ids)


def keras_step(args) -> dict:
    """Keras inference latency of the float32 run's model on this backend."""
    import keras

    # lazy: loads Keras, under the backend this process was given
    from kerasft.training.recipe import core_model
    from kerasft.training.tuner import load_tuner

    tuner = load_tuner(args.run)
    core = core_model(tuner.model)
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        def sync(_):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    else:

        def sync(out):
            out.block_until_ready()

    results = {}
    cls_id = tuner.model.preprocessor.tokenizer.token_to_id("[CLS]")
    vocabulary_size = tuner.model.backbone.vocabulary_size
    for (batch, tokens), ids, mask in _feeds(vocabulary_size, _cells(args), cls_id):
        feed = {"token_ids": keras.ops.convert_to_tensor(ids),
                "padding_mask": keras.ops.convert_to_tensor(mask)}  # fmt: skip
        if backend == "torch":
            import torch

            def forward(feed=feed):
                with torch.no_grad():
                    return core(feed, training=False)
        else:
            forward = _jax_forward(core, feed)
        sync(forward())
        results[f"b{batch}_s{tokens}"] = _time(_sync_call(forward, sync), args.calls)
    return {"device": _keras_device(), "cells": results}


def _jax_forward(core, feed):
    """A jitted stateless forward of `core` (what `predict` compiles), on `feed`."""
    import jax

    trainable = [v.value for v in core.trainable_variables]
    other = [v.value for v in core.non_trainable_variables]

    @jax.jit
    def run(trainable, other, feed):
        logits, _ = core.stateless_call(trainable, other, feed, training=False)
        return logits

    return lambda: run(trainable, other, feed)


def _cells(args):
    batches, lengths = (QUICK_BATCHES, QUICK_LENGTHS) if args.quick else (BATCHES, LENGTHS)
    return [(b, s) for b in batches for s in lengths]


def transformers_step(args) -> dict:
    """A transformers checkpoint of the run's weights (written on the CPU, Keras on torch)."""
    # lazy: loads Keras, under the backend this process was given
    from kerasft.training.tuner import load_tuner

    tuner = load_tuner(args.run)
    out = Path(args.work) / "transformers"
    to_transformers(tuner.model, out, tuner.label_names)
    return {"checkpoint": str(out)}


def peers_step(args) -> dict:
    """transformers eager fp16, `torch.compile`, onnxruntime CUDA: latency on the same cells."""
    import torch
    from transformers import AutoTokenizer, DistilBertForSequenceClassification

    cls_id = AutoTokenizer.from_pretrained(args.checkpoint).cls_token_id
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32  # fp16 matmuls need the GPU
    model = DistilBertForSequenceClassification.from_pretrained(args.checkpoint).eval()
    model = model.to(device=device, dtype=dtype)
    compiled = torch.compile(model)

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    results, notes = {}, [f"transformers on {device} in {str(dtype).replace('torch.', '')}"]
    for name, net in (("transformers eager", model), ("transformers torch.compile", compiled)):
        try:
            results[name] = _torch_cells(net, model.config.vocab_size, cls_id, device, sync, args)
        except Exception as e:  # e.g. torch.compile without a C++ compiler: say so, go on
            notes.append(f"{name} failed: {type(e).__name__}: {str(e)[:200]}")
    try:
        ort, note = _onnxruntime_cuda(model.float(), cls_id, device, args)
    except Exception as e:
        ort, note = None, f"onnxruntime CUDA failed: {type(e).__name__}: {str(e)[:200]}"
    notes.append(note)
    if ort:
        results["onnxruntime CUDA fp32"] = ort
    return {"device": device, "cells": results, "notes": notes}


def _torch_cells(net, vocabulary_size: int, cls_id: int, device: str, sync, args) -> dict:
    import torch

    cells = {}
    for (batch, tokens), ids, mask in _feeds(vocabulary_size, _cells(args), cls_id):
        feed = {"input_ids": torch.from_numpy(ids).long().to(device),
                "attention_mask": torch.from_numpy(mask).long().to(device)}  # fmt: skip

        def forward(feed=feed):
            with torch.inference_mode():
                return net(**feed).logits

        cells[f"b{batch}_s{tokens}"] = _time(_sync_call(forward, sync), args.calls)
    return cells


def _onnxruntime_cuda(model, cls_id: int, device: str, args) -> tuple[dict | None, str]:
    """onnxruntime's CUDA provider on a `torch.onnx` export, where the installed build has it."""
    import onnxruntime as ort
    import torch

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers or device != "cuda":
        return None, f"onnxruntime {ort.__version__}: no CUDA provider ({', '.join(providers)})"
    path = Path(args.work) / "model.onnx"
    ids = torch.ones((1, 8), dtype=torch.long, device=device)
    torch.onnx.export(
        model, (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
        output_names=["logits"], dynamic_axes={n: {0: "b", 1: "s"} for n in
                                               ("input_ids", "attention_mask")},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    results = {}
    for (batch, tokens), ids, mask in _feeds(model.config.vocab_size, _cells(args), cls_id):
        feed = {"input_ids": ids.astype("int64"), "attention_mask": mask.astype("int64")}
        results[f"b{batch}_s{tokens}"] = _time(
            lambda feed=feed: session.run(None, feed), args.calls
        )
    return results, f"onnxruntime {ort.__version__} with its CUDA provider (fp32, torch.onnx)"


STEPS = {"fit": fit_step, "keras": keras_step, "transformers": transformers_step,
         "peers": peers_step}  # fmt: skip


# --- the driver -------------------------------------------------------------------------------


def machine() -> dict:
    """GPU name and driver (nvidia-smi), CPU, and the versions this run used."""
    info = {**describe(), "gpu": None, "driver": None}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        if out:
            name, driver, memory = (p.strip() for p in out.splitlines()[0].split(","))
            info.update(gpu=name, driver=driver, gpu_memory=memory)
    except (OSError, subprocess.SubprocessError):
        pass
    info["versions"] = package_versions(("keras", "keras-hub", "torch", "jax", "jaxlib",
                                         "transformers", "onnxruntime", "onnxruntime-gpu",
                                         "numpy"))  # fmt: skip
    return info


def measure(args, progress=print) -> dict:
    """Runs every step (see the module docstring); returns the report."""
    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="kerasft-gpu-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, "-m", "kerasft.benchmarks.gpu.run"]
    common = ["--work", str(work), "--calls", str(args.calls)] + (["--quick"] if args.quick else [])
    fit_args = "--limit 400 --warmup-epochs 1 --finetune-epochs 1" if args.quick else ""
    fit_args = f"{fit_args} {args.fit_args}".strip()
    fits, keras_cells = {}, {}
    for backend in args.backends:
        for precision in PRECISIONS:
            fits[f"{backend} {precision}"] = _step(
                f"fit {backend} {precision}",
                [*me, "--step", "fit", *common, "--backend", backend, "--precision", precision,
                 "--data", args.data, "--preset", args.preset, "--fit-args", fit_args],
                _env(args.device, backend), logs, progress,
            )  # fmt: skip
    gpus = _gpu_count() if args.device == "cuda" else 0
    if gpus > 1 and "torch" in args.backends:  # data parallel over every GPU, with torchrun
        fits[f"torch bfloat16 x{gpus}"] = _step(
            f"fit torch bfloat16 torchrun x{gpus}",
            [*me, "--step", "fit", *common, "--backend", "torch", "--precision", "bfloat16",
             "--processes", str(gpus), "--data", args.data, "--preset", args.preset,
             "--fit-args", fit_args],
            _env(args.device, "torch"), logs, progress,
        )  # fmt: skip
    run = next((f["run"] for k, f in fits.items() if k.endswith("float32") and "run" in f), None)
    peers = {"error": "no float32 run to take the weights from"}
    if run is not None:
        for backend in args.backends:
            keras_cells[f"keras {backend} fp32"] = _step(
                f"keras {backend}", [*me, "--step", "keras", *common, "--run", run],
                _env(args.device, backend), logs, progress,
            )  # fmt: skip
        hf = _step("transformers checkpoint", [*me, "--step", "transformers", *common,
                                               "--run", run], _env("cpu", "torch"), logs,
                   progress)  # fmt: skip
        if "checkpoint" in hf:
            command = [*me, "--step", "peers", *common, "--checkpoint", hf["checkpoint"]]
            peers = _step("peers", command, _env(args.device), logs, progress)
        else:
            peers = hf
    return {
        "command": args.command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": source_commit(),
        "device": args.device,
        "quick": args.quick,
        "machine": machine(),
        "preset": args.preset,
        "fit_args": fit_args,
        "fits": fits,
        "keras": keras_cells,
        "peers": peers,
        "seconds": time.perf_counter() - started,
    }


def render(report: dict) -> str:
    """The report as markdown (`benchmarks.report.write_results` writes it with the JSON)."""
    m = report["machine"]
    device = (f"Device: **{report['device']}**; GPU: {m.get('gpu') or 'none'} (driver "
              f"{m.get('driver') or '-'}); {cpu_line(m)}")  # fmt: skip
    lines = [
        *header("kerasft on a GPU: fine-tuning and inference", report, device, m["versions"]),
        f"Preset `{report['preset']}`; fit options `{report['fit_args'] or '(the defaults)'}`"
        + ("; **--quick: a smoke run, not a measurement**" if report["quick"] else ""),
        "",
        "## Fine-tuning (`kerasft fit`, reference split)",
        "",
        "| backend | precision | device | warm-up s | fine-tune s | fine-tune samples/s "
        "| test accuracy | wall s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, fit in report["fits"].items():
        backend, precision = name.split(" ", 1)  # "bfloat16 x8": over 8 GPUs
        if "error" in fit:
            lines.append(f"| {backend} | {precision} | failed: {fit['error'][:160]} | | | | | |")
            continue
        s, rate = fit["seconds"], fit["samples_per_second"]
        lines.append(
            f"| {backend} | {precision} | {fit['device']} | {s.get('warmup', 0):.1f} | "
            f"{s.get('finetune', 0):.1f} | {rate.get('finetune', 0):.1f} | "
            f"{fit['test_accuracy']:.4f} | {fit['wall_seconds']:.0f} |"
        )
    variants = {k: v for k, v in report["keras"].items()}
    peers = report["peers"]
    variants.update((k, {"cells": v, "device": peers.get("device")})
                    for k, v in peers.get("cells", {}).items())  # fmt: skip
    cells = sorted({c for v in variants.values() for c in v.get("cells", {})},
                   key=lambda c: tuple(int(x) for x in c[1:].split("_s")))  # fmt: skip
    lines += [
        "",
        "## Inference latency (p50 ms, device synchronised around every call; p90 in the JSON)",
        "",
        "| variant | device | " + " | ".join(f"b{c[1:].replace('_s', ' x ')}" for c in cells)
        + " |",
        "| --- | --- |" + " ---: |" * len(cells),
    ]  # fmt: skip
    for name, v in variants.items():
        if "error" in v:
            lines.append(f"| {name} | failed: {v['error'][:160]} |" + " |" * len(cells))
            continue
        row = [f"{v['cells'][c]['p50_ms']:.2f}" if c in v["cells"] else "" for c in cells]
        lines.append(f"| {name} | {v.get('device')} | " + " | ".join(row) + " |")
    if "error" in peers:
        lines.append(f"\nPeers failed: {peers['error'][:300]}")
    notes = peers.get("notes", [])
    lines += ["", *[f"- {n}" for n in notes], "", f"Total {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(DATA_ENV),
                        help=f"the reference data file (or ${DATA_ENV})")  # fmt: skip
    parser.add_argument("--out", type=Path, help="report markdown (JSON beside it)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", type=lambda t: t.split(","), default=list(BACKENDS))
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--fit-args", default="", help="more `kerasft fit` options, quoted")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per cell")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step")
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    # one step, in its own process (used by `measure`)
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    for name in ("--backend", "--precision", "--processes", "--run", "--checkpoint"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.step:  # one step: its result as the last line of stdout
        print(json.dumps(STEPS[args.step](args)))
        return 0
    if args.quick:
        args.calls = min(args.calls, 3)
    if not args.data or not Path(args.data).is_file():
        parser.error(f"--data: no such file {args.data!r}")
    args.data = str(Path(args.data).resolve())
    args.command = "python -m kerasft.benchmarks.gpu.run " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )

    report = measure(args, progress=lambda s: print(s, file=sys.stderr, flush=True))
    text = render(report)
    if args.out:
        write_results(args.out, report, text)
    else:
        print(text)
    failed = [k for k, v in {**report["fits"], **report["keras"]}.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
