"""The machine the latency harness measures on: the device it times (a CUDA GPU when
`nvidia-smi` lists one and `--device auto`) and the report's machine line."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from kerasft.exporters.formats import EXPORT_PACKAGES as EXPORT
from kerasft.util.machine import cpu_model, isa
from kerasft.util.versions import package_versions


def detect_device(requested: str) -> tuple[str, str]:
    """Returns `(device, description)`; `auto` picks the GPU when `nvidia-smi` lists one.

    Raises:
        ValueError: `gpu` was requested and no NVIDIA GPU is visible.
    """
    gpus = ""
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = proc.stdout.strip() if proc.returncode == 0 else ""
    if requested == "gpu" and not gpus:
        raise ValueError("--device gpu was requested but `nvidia-smi -L` lists no NVIDIA GPU.")
    device = "gpu" if requested == "gpu" or (requested == "auto" and gpus) else "cpu"
    return device, gpus or "none"


def machine_info(threads: int, gpus: str) -> dict:
    """The report's machine: CPU model and ISA, cores, threads, GPU, Python, and versions."""
    names = (
        *EXPORT,
        "jax",
        "torch",
        "optimum-intel",
        "transformers",
        "optimum",
        "optimum-onnx",
        "numpy",
    )
    return {
        "cpu": cpu_model(),
        "isa": isa(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(names),
    }
