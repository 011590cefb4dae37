"""What machine a measurement ran on: CPU model, ISA flags, cores (one reader of /proc/cpuinfo).

Every results file and model card names its CPU and the instruction sets that decide its speed
(AVX2, AVX-512, VNNI, BF16, AMX): absolute times do not carry across machines.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The flags that decide the speed of fp32/INT8/bf16 matrix work, in the order reports print them.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends here
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's model name (e.g. `"AMD EPYC"`), or `platform.processor()` where unknown."""
    return _cpuinfo().get("model name") or platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU feature flags (empty where /proc/cpuinfo is unavailable)."""
    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def computes_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU has native bfloat16 matrix instructions (AVX512_BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def isa(flags: set[str] | None = None) -> list[str]:
    """The speed-relevant instruction sets in `flags` (default: this CPU's), `ISA_FLAGS` order."""
    flags = cpu_flags() if flags is None else flags
    return [name for name in ISA_FLAGS if name in flags]


def peak_fp32_gflops(cores: int | None = None) -> tuple[float | None, str]:
    """A nominal fp32 peak of this CPU, and how it was computed.

    cores x clock x FLOPs per cycle, with 32 FLOPs per cycle (two 256-bit FMA pipes: AVX2
    CPUs, and AMD Zen 4's AVX-512, which runs 512-bit FMAs on 256-bit pipes) or 64 (Intel AVX-512
    with two 512-bit FMA units). The clock is /proc/cpuinfo's `cpu MHz` (under a hypervisor,
    the nominal one). A yardstick for "share of peak", not a measurement.

    Returns:
        `(GFLOP/s or None where the clock is unknown, the formula as text)`.
    """
    cores = cores or os.cpu_count() or 1
    info = _cpuinfo()
    try:
        mhz = float(info["cpu MHz"])
    except (KeyError, ValueError):
        return None, "unknown clock"
    intel512 = "avx512f" in cpu_flags() and "Intel" in info.get("vendor_id", "")
    per_cycle = 64 if intel512 else 32 if "fma" in cpu_flags() else 8
    return cores * mhz / 1e3 * per_cycle, f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle"


def describe() -> dict:
    """`{"cpu", "isa", "cores", "python", "platform"}` of this machine."""
    return {
        "cpu": cpu_model(),
        "isa": isa(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
