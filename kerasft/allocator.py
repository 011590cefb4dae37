"""The C allocator under PyTorch training: keep freed blocks for the next step (glibc only).

PyTorch's CPU tensors come from the C library's `malloc`. A fine-tuning step allocates and frees
the same large buffers every step, the biggest being the dense gradient of the word-embedding
table (30,522 x 384 floats, 47 MB, for the offline preset). glibc serves a block above its mmap
threshold (adjusted at run time, at most 32 MiB) with a fresh `mmap` and unmaps it on `free`,
so each step faults in its pages again, and the kernel zeroes every one. PyTorch's CPU
performance guide avoids this by preloading jemalloc or tcmalloc; that needs a library and a
restart. glibc's own switch does it in the running process: `mallopt` with higher mmap and trim
thresholds keeps freed blocks in the heap, where the next step reuses them.
`benchmarks/results/train_speed.md` reports the page faults per step and the step time it gives.

Only the PyTorch backend gets it. JAX and TensorFlow allocate through their own runtimes: the
same thresholds set from the environment left their page faults per step as they were (58,309
-> 58,335 on JAX, 204,114 -> 207,197 on TensorFlow) and their steps no faster
(`benchmarks/results/allocator_jax_tf_default.md` against `..._malloc_env.md`).
Settings already chosen for the process are kept: `GLIBC_TUNABLES` with a malloc tunable,
glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`, or jemalloc or tcmalloc in
`LD_PRELOAD`. Elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("kerasft")

# mallopt's parameter numbers (glibc's malloc.h) and the values set.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30  # 1 GiB: above any per-step buffer of the presets kerasft trains

_applied: bool | None = None  # None: not tried yet; then whether the thresholds were set


def _chosen_elsewhere(environ) -> str | None:
    """The environment variable that already sets the allocator, or None."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name in environ:
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "LD_PRELOAD"
    return None


def keep_freed_memory(environ=None) -> bool:
    """Raises glibc's mmap and trim thresholds to `THRESHOLD_BYTES`, once per process.

    Large blocks freed by one training step then stay in the heap for the next instead of
    being unmapped and faulted in again. The process keeps up to that much freed memory
    instead of returning it to the system.

    Args:
        environ: the environment to read (default `os.environ`): where it already chooses the
            allocator's settings (see the module docstring), nothing changes.

    Returns:
        Whether the thresholds are set (False where the environment chose, or off glibc).

    Example:
        >>> keep_freed_memory()  # before a PyTorch training loop
        True
    """
    global _applied
    if _applied is not None:
        return _applied
    environ = os.environ if environ is None else environ
    _applied = False
    chosen = _chosen_elsewhere(environ)
    if chosen is not None:
        log.debug("allocator: %s is set; glibc's malloc thresholds left as they are", chosen)
    elif platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)  # the process's own C library
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES)
        )
        log.debug("allocator: glibc mmap/trim thresholds %s", "set" if _applied else "refused")
    return _applied
