"""Builds (or reuses) every artifact the latency harness serves, for one model role.

Run by the harness in a TensorFlow-backend subprocess:

    python -m kerasft.benchmarks.artifacts --run RUN_DIR --root DIR --role run|base [--widen 2]

For the role `run` the fine-tuned model is used as it is; for `base` it is first widened to the
DistilBERT-base shape (`kerasft.benchmarks.models.widen`). Then every export variant is written by
`kerasft.exporters.export` (so each is verified against the Keras model, on
`--verify-per-split` texts of
each split of the run), plus the peers' artifacts: a transformers checkpoint of the same weights,
Optimum's ONNX export with its INT8 quantization, and optimum-intel's OpenVINO export with its
INT8 quantization.
Every artifact is built in a temporary directory and renamed into place, so an existing one is
complete and is reused; `index.json` lists them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kerasft.benchmarks.models import optimum_export, optimum_intel_export, to_transformers
from kerasft.benchmarks.models import widen as widen_model
from kerasft.devices.backends import keep_to_backend
from kerasft.exporters import openvino
from kerasft.exporters.exportdir import is_export
from kerasft.exporters.formats import AUTO_VARIANTS, FORMATS, VARIANTS
from kerasft.exporters.isolated import exports_in_subprocess, log_progress
from kerasft.exporters.vset import verification_set
from kerasft.runs.rundir import MODEL_FILE
from kerasft.util.fileio import publish_target

BASE_CALIBRATION_TEXTS = 8
# The harness verifies each export on up to this many texts per split (3,072 in all): the gate
# is the one `kerasft export` applies, on fewer texts so that cold artifacts build in minutes.
VERIFY_PER_SPLIT = 1024


def export_name(fmt: str, quantize: str | None) -> str:
    return f"{fmt}-{'int8-' + quantize if quantize else 'fp32'}"


def has_peers() -> bool:
    """Whether the optional `bench` extra (transformers, Optimum) is installed."""
    return all(importlib.util.find_spec(m) for m in ("transformers", "optimum.onnxruntime"))


def has_openvino_peer() -> bool:
    """Whether optimum-intel (the OpenVINO peer, `bench` extra) is installed."""
    return all(importlib.util.find_spec(m) for m in ("optimum.intel", *openvino.CONTRACT.needs))


def _build(target: Path, make) -> Path:
    """Calls `make(tmp_dir)` and publishes the result as `target`; skips a complete `target`."""
    if target.is_dir() and (target / ".complete").is_file():
        return target
    with publish_target(target, overwrite=True, what="Artifact directory") as tmp:
        make(tmp)
        (tmp / ".complete").write_text("")
    return target


def _peer_export(target: Path, make, listing: str) -> dict:
    """Builds (or reuses) a peer's fp32 + INT8 export with `make(tmp) -> {"fp32", "int8",
    "recipe"}`, listed in `target / listing`, and returns those paths under `target`."""

    def build(tmp):
        info = make(tmp)
        rel = {k: str(Path(v).relative_to(tmp)) if k != "recipe" else v for k, v in info.items()}
        (tmp / listing).write_text(json.dumps(rel))

    built = _build(target, build)
    info = json.loads((built / listing).read_text())
    return {
        "fp32": str(built / info["fp32"]), "int8": str(built / info["int8"]),
        "recipe": info["recipe"],
    }  # fmt: skip


def prepare(
    run: Path, root: Path, role: str, widen: int, per_split: int, peers: bool, log,
    auto_only: bool = False,
):  # fmt: skip
    """Builds the role's artifacts under `root / role` and returns the index written there.

    With `auto_only` (`bench --quick`), only the variants `--int8 auto` chooses among
    (`formats.AUTO_VARIANTS`); the index lists what was built, and a later full run reuses it.
    """
    # lazy: loads Keras, under the backend this process was given
    from kerasft.training.tuner import TwoStageFineTuner

    out = root / role
    out.mkdir(parents=True, exist_ok=True)
    vset = verification_set(run, per_split)
    # Every recipe calibrates (and ranks nodes for `keep_fp32`) on the run's calibration texts,
    # never on the verification texts it is judged on (`export` falls back to those when given
    # `texts` without `calibration_texts`).
    calibration = {}
    if role == "base":
        # onnxruntime's quantize_static peaks at 17 GB resident on the DistilBERT-base shape
        # with 8 calibration texts and is killed (24 GB) with 64: calibrate on 8 there.
        calibration["static"] = vset.calibration[:BASE_CALIBRATION_TEXTS]
    tuner = TwoStageFineTuner.load(run / MODEL_FILE)
    model_file = run / MODEL_FILE
    if role == "base":

        def make_base(tmp):
            wide = TwoStageFineTuner.load(run / MODEL_FILE)
            wide.model = widen_model(tuner.model, widen)
            wide.save(tmp / MODEL_FILE)

        log(f"widening the model x{widen} to the DistilBERT-base shape")
        model_file = _build(out / "keras", make_base) / MODEL_FILE
        tuner = TwoStageFineTuner.load(model_file)
    index = _index(role, model_file, tuner)
    jobs: dict[str, list] = {}  # by graph source
    for fmt, quantize in AUTO_VARIANTS if auto_only else VARIANTS:
        if quantize == "auto":  # one of the format's other variants, chosen on the machine
            continue
        if FORMATS[fmt].checkpoint:  # a format to share, not to serve (`sharing.py` loads it)
            continue
        name = export_name(fmt, quantize)
        target = out / "exports" / name
        if not is_export(target):  # exports publish atomically
            options = dict(
                format=fmt, quantize=quantize, overwrite=True, texts=vset.texts,
                labels=list(vset.labels), splits=vset.splits,
                calibration_texts=calibration.get(quantize, vset.calibration),
            )  # fmt: skip
            jobs.setdefault(FORMATS[fmt].default_source, []).append((target, options))
        index["exports"][name] = str(target)

    # Under each format's graph source (else each export would start another process): the
    # run's own model, one process per graph source; the base shape, one per export, whose
    # memory returns when it ends (static INT8 needs ~17 GB alone and was killed at 24 GB
    # after other exports in the same process). Two export processes side by side were slower:
    # each computes the Keras reference with both cores' threads (267 s against 202 s for a
    # first `bench --quick`).
    def export_all():
        for backend, pending in jobs.items():
            for group in [pending] if role == "run" else [[job] for job in pending]:
                log(f"{role}: export {', '.join(Path(target).name for target, _ in group)}")
                exports_in_subprocess(model_file, group, backend=backend)

    peers = peers and has_peers()
    if peers and role == "run":  # the exports' subprocess and the peers side by side
        with ThreadPoolExecutor(1) as pool:
            exporting = pool.submit(export_all)
            index.update(_peer_exports(out, role, tuner, vset.calibration, log))
            exporting.result()
    else:  # the base shape's builds one at a time: together they would not fit in memory
        export_all()
        if peers:
            index.update(_peer_exports(out, role, tuner, vset.calibration, log))
    (out / "index.json").write_text(json.dumps(index, indent=2))
    return index


def _index(role: str, model_file: Path, tuner) -> dict:
    """The role's `index.json` before its exports are listed: the model and its shape."""
    backbone = tuner.model.backbone
    index = {
        "role": role,
        "keras": str(model_file),
        "shape": {
            "layers": backbone.num_layers,
            "hidden": backbone.hidden_dim,
            "heads": backbone.num_heads,
            "intermediate": backbone.intermediate_dim,
            "parameters": int(tuner.model.count_params()),
            "max_sequence_length": backbone.max_sequence_length,
        },
        "vocabulary_size": backbone.vocabulary_size,
        "label_names": tuner.label_names,
        "exports": {},
    }
    return index


def _peer_exports(out: Path, role: str, tuner, calibration: list[str], log) -> dict:
    """The peers' artifacts of the same weights: a transformers checkpoint, Optimum's ONNX
    fp32 + INT8 and, when optimum-intel is installed, its OpenVINO fp32 + INT8."""
    log(f"{role}: transformers checkpoint of the same weights")
    hf = _build(
        out / "transformers", lambda tmp: to_transformers(tuner.model, tmp, tuner.label_names)
    )
    index = {"transformers": str(hf)}
    log(f"{role}: Optimum ONNX export + Optimum dynamic INT8")
    index["optimum"] = _peer_export(
        out / "optimum", lambda tmp: optimum_export(hf, tmp / "fp32", tmp / "int8"), "optimum.json"
    )
    if has_openvino_peer():
        log(f"{role}: optimum-intel OpenVINO export + OVQuantizer INT8")
        index["optimum_intel"] = _peer_export(
            out / "optimum-intel",
            lambda tmp: optimum_intel_export(hf, tmp / "fp32", tmp / "int8", calibration),
            "optimum_intel.json",
        )
    return index


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--role", required=True, choices=("run", "base"))
    parser.add_argument("--widen", type=int, default=2)
    parser.add_argument("--verify-per-split", type=int, default=VERIFY_PER_SPLIT)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--auto-only", action="store_true", help="only `--int8 auto`'s variants")
    parser.add_argument(
        "--backend", default="tensorflow", choices=("tensorflow", "torch"),
        help="this process's Keras backend (torch: no TensorFlow, for the ONNX and OpenVINO "
        "exports alone)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    keep_to_backend(args.backend)  # KerasHub would import TensorFlow on PyTorch too

    log_progress("[bench] ")  # the exports' progress, as the harness shows it

    def log(message):
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    prepare(args.run, args.root, args.role, args.widen, args.verify_per_split,
            not args.no_peers, log, auto_only=args.auto_only)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
