"""The latency harness's variant catalogue: every way kerasft serves a fine-tuned classifier
(the Keras model on each installed backend, Keras' INT8, every export of the run) and the Hugging
Face peers on the same weights (transformers, Optimum's ONNX, optimum-intel's OpenVINO), each
as a worker spec for `kerasft.benchmarks.worker`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from kerasft.benchmarks.report import BASELINE
from kerasft.exporters import onnx as onnx_format
from kerasft.exporters import openvino as openvino_format
from kerasft.exporters.exportdir import read_manifest
from kerasft.exporters.formats import FORMATS
from kerasft.exporters.verify import FP32_TOLERANCE
from kerasft.util.machine import computes_bf16

# the formats the peers are served as (Optimum: ONNX; optimum-intel: OpenVINO IR)
ONNX, OPENVINO = onnx_format.CONTRACT.name, openvino_format.CONTRACT.name
KERAS_BACKENDS = ("jax", "tensorflow", "torch")


@dataclass
class Variant:
    """One way of serving the model: a worker spec plus where its numbers go."""

    name: str
    family: str  # keras | export | peer
    spec: dict
    env: dict = field(default_factory=dict)
    size_bytes: int | None = None
    quantized: bool = False
    onnx_int8: bool = False
    batch_independent: bool = False  # a quantized text's label never depends on its batch
    exact: bool = False  # fp32, served as verified: its export found the Keras logits (parity)


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _installed(module: str) -> bool:

    return importlib.util.find_spec(module) is not None


def variants(
    index: dict, threads: int, device: str, quick: bool = False
) -> tuple[list[Variant], list[str]]:
    """The variants for one model role, and notes on those that cannot run here.

    `quick`: the accuracy reference (Keras fp32 on one backend), the exports listed in `index`
    and the peers that can be the fastest (INT8, and optimum-intel's fp32 at the plugin's
    default precision): what decides the targets table.
    """
    base = {"threads": threads, "device": device, "vocabulary_size": index["vocabulary_size"]}
    out, notes = [], []
    keras_file = index["keras"]
    installed = [b for b in KERAS_BACKENDS if _installed(b)]
    reference = [b for b in installed if f"keras {b} fp32" == BASELINE] or installed[:1]
    for backend in KERAS_BACKENDS:
        if not _installed(backend):
            notes.append(f"keras {backend}: {backend} is not installed")
            continue
        if quick and backend not in reference:
            continue
        out.append(
            Variant(
                f"keras {backend} fp32",
                "keras",
                {**base, "kind": "keras", "path": keras_file},
                {"KERAS_BACKEND": backend},
                _size(keras_file),
            )
        )
    if not quick:
        out.append(Variant("keras tensorflow int8", "keras",
                           {**base, "kind": "keras", "int8": True, "path": keras_file},
                           {"KERAS_BACKEND": "tensorflow"}, quantized=True))  # fmt: skip
    out += _export_variants(index, base, device, notes)
    out += _peer_variants(index, base, quick, notes)
    return out, notes


def _export_variants(index: dict, base: dict, device: str, notes: list[str]) -> list[Variant]:
    """Every export of `index`; a format served at an inference precision (OpenVINO) at each
    precision this CPU computes, the one it was verified with first."""

    out = []
    for name, export_dir in index["exports"].items():
        manifest = read_manifest(export_dir)
        fmt = manifest["format"]
        contract = FORMATS[fmt]
        model_path = Path(export_dir) / manifest["model_file"]
        if contract.cpu_only and device == "gpu":
            notes.append(f"{name}: its runtime runs on the CPU only; skipped on GPU")
            continue
        quant = manifest["quantization"]
        label = f"{fmt.replace('_', '')} {quant or 'fp32'}"
        spec = {**base, "kind": fmt, "path": str(model_path)}
        precisions = [None]
        if contract.precisions:  # as loaded (verified with), then the others this CPU computes
            verified = manifest.get("inference_precision") or contract.precisions[0]
            precisions = list(dict.fromkeys([verified, *contract.precisions]))
            precisions = [p for p in precisions if p != "bf16" or computes_bf16()]
        default = contract.precisions[0] if contract.precisions else None
        mode = contract.int8.get((quant or "").removeprefix("int8-"))
        check = manifest.get("verification", {})
        parity = not quant and check.get("label_agreement") == 1.0
        parity = parity and check.get("max_abs_logit_diff", 1.0) <= FP32_TOLERANCE
        for precision in precisions:
            suffix = "" if precision == default else f" {precision}"
            served = spec if precision is None else {**spec, "precision": precision}
            out.append(Variant(label + suffix, "export", served,
                               size_bytes=contract.model_bytes(model_path),
                               quantized=bool(quant), onnx_int8=fmt == ONNX and bool(quant),
                               batch_independent=mode is not None and not mode.batch_dependent,
                               exact=parity and precision in (None, precisions[0])))  # fmt: skip
    return out


def _peer_variants(index: dict, base: dict, quick: bool, notes: list[str]) -> list[Variant]:
    """The peers on the same weights (`quick`: those that can be the fastest)."""
    out = []
    if "transformers" not in index:
        notes.append(
            "peers (transformers, Optimum) not installed: pip install -e '.[bench]' to compare"
        )
        return out
    hf = index["transformers"]
    if not quick:
        out.append(Variant("transformers torch-eager fp32", "peer",
                           {**base, "kind": "transformers", "path": hf},
                           size_bytes=_size(Path(hf) / "model.safetensors")))  # fmt: skip
    for precision in ("int8",) if quick else ("fp32", "int8"):
        path = index["optimum"][precision]
        out.append(Variant(f"optimum onnx {precision}", "peer",
                           {**base, "kind": ONNX, "path": path}, size_bytes=_size(path),
                           quantized=precision == "int8"))  # fmt: skip
    if "optimum_intel" not in index:
        notes.append("optimum-intel not installed: pip install -e '.[bench]' to compare")
        return out
    # fp32 and INT8 (static ranges) at f32 and at the plugin's default precision (bf16 where
    # the CPU computes it), as a user who sets no hint runs them
    for precision, hint in (("fp32", "f32"), ("fp32", "default"), ("int8", "f32"),
                            ("int8", "default")):  # fmt: skip
        if quick and (precision, hint) == ("fp32", "f32"):
            continue
        path = index["optimum_intel"][precision]
        suffix = " (plugin default precision)" if hint == "default" else ""
        out.append(Variant(f"optimum-intel openvino {precision}{suffix}", "peer",
                           {**base, "kind": OPENVINO, "path": path, "precision": hint},
                           size_bytes=FORMATS[OPENVINO].model_bytes(path),
                           quantized=precision == "int8",
                           batch_independent=precision == "int8"))  # fmt: skip
    return out


def end_to_end_variants(index: dict, threads: int, texts_file: Path) -> list[Variant]:
    """One `runtime` variant per kerasft export: raw strings through `kerasft.exporters.runtime`."""
    out = []
    for export_dir in index["exports"].values():
        manifest = read_manifest(export_dir)
        fmt, quant = manifest["format"], manifest["quantization"]
        spec = {"kind": "runtime", "format": fmt, "path": str(export_dir), "threads": threads,
                "texts": str(texts_file)}  # fmt: skip
        out.append(Variant(f"{fmt.replace('_', '')} {quant or 'fp32'} (runtime)", "export", spec,
                           quantized=bool(quant)))  # fmt: skip
    return out
