"""The C allocator under PyTorch and JAX training: keep freed blocks for the next step (glibc only).

PyTorch's CPU tensors come from the C library's `malloc`. A fine-tuning step allocates and frees
the same large buffers every step, the biggest being the dense gradient of the word-embedding
table (30,522 x 384 floats, 47 MB, for the offline preset). glibc serves a block above its mmap
threshold (adjusted at run time, at most 32 MiB) with a fresh `mmap` and unmaps it on `free`,
so each step faults in its pages again, and the kernel zeroes every one. PyTorch's CPU
performance guide avoids this by preloading jemalloc or tcmalloc; that needs a library and a
restart. glibc's own switch does it in the running process: `mallopt` with higher mmap and trim
thresholds keeps freed blocks in the heap, where the next step reuses them.
`benchmarks/results/train_speed.md` reports the page faults per step and the step time it gives.

JAX's XLA CPU runtime allocates through `malloc` too, but from its own worker threads, and glibc
gives each thread an arena of its own whose heaps hold at most 64 MiB: a larger block (a step's
temporaries) is mapped afresh whatever the thresholds, which is why they alone left JAX's page
faults per step as they were (58,309 -> 58,335, `benchmarks/results/allocator_jax_tf_default.md`
against `..._malloc_env.md`). On JAX the process also keeps one arena (`M_ARENA_MAX` 1), so
every thread allocates from the main heap, where the thresholds apply: on the AMX Xeon, 57,531
-> 951 page faults per step and 0.95x -> 1.11x Trainer's samples/s
(`benchmarks/results/train_speed_amx.md` at commits f735dcf and 950fd87). A thread keeps the
arena it first allocated from, so this must run before XLA starts its threads, i.e. before the
first JAX computation: `TwoStageFineTuner.fit` calls it first thing
(`kerasft.training.recipe.prepare_stage` again, a no-op by then). TensorFlow and PyTorch gained
nothing from one arena in single-engine runs there (107.2 vs 108.0 and 202.0 vs 205.7 samples/s),
and TensorFlow's faults were few (2,365 per step), so TensorFlow keeps glibc's defaults.
Settings already chosen for the process are kept: `GLIBC_TUNABLES` with a malloc tunable,
glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` / `MALLOC_ARENA_MAX`, or jemalloc or
tcmalloc in `LD_PRELOAD`. Elsewhere than glibc (macOS, musl) nothing changes.
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
_M_ARENA_MAX = -8
THRESHOLD_BYTES = 1 << 30  # 1 GiB: above any per-step buffer of the presets kerasft trains
BACKENDS = ("torch", "jax")  # the backends whose training gets it
ONE_ARENA = ("jax",)  # and those whose runtime allocates big blocks from its own threads

_applied: bool | None = None  # None: not tried yet; then whether the thresholds were set


def _chosen_elsewhere(environ) -> str | None:
    """The environment variable that already sets the allocator, or None."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        if name in environ:
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "LD_PRELOAD"
    return None


def keep_freed_memory(backend: str, environ=None) -> bool:
    """Raises glibc's mmap and trim thresholds to `THRESHOLD_BYTES`, once per process, for a
    backend in `BACKENDS`; on JAX also keeps the process to one malloc arena.

    Large blocks freed by one training step then stay in the heap for the next instead of
    being unmapped and faulted in again. The process keeps up to that much freed memory
    instead of returning it to the system. On JAX, call it before the first JAX computation
    (see the module docstring).

    Args:
        backend: the Keras backend that trains (`keras.backend.backend()`); elsewhere than
            `BACKENDS` nothing changes.
        environ: the environment to read (default `os.environ`): where it already chooses the
            allocator's settings (see the module docstring), nothing changes.

    Returns:
        Whether the settings are made (False for another backend, where the environment chose,
        or off glibc).

    Example:
        >>> keep_freed_memory(keras.backend.backend())  # before a training loop
        True
    """
    global _applied
    if backend not in BACKENDS:
        return False
    if _applied is not None:
        return _applied
    environ = os.environ if environ is None else environ
    _applied = False
    chosen = _chosen_elsewhere(environ)
    if chosen is not None:
        log.debug("allocator: %s is set; glibc's malloc settings left as they are", chosen)
    elif platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)  # the process's own C library
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES)
        )
        if _applied and backend in ONE_ARENA:
            _applied = bool(libc.mallopt(_M_ARENA_MAX, 1))
        log.debug("allocator: glibc malloc settings %s", "made" if _applied else "refused")
    return _applied
