"""JAX training compiles once and sooner: a persistent XLA compilation cache (the second run of
the same shapes compiles nothing), and LLVM at -O1 for XLA's CPU programs.

A JAX fit compiles its train and validation steps once per batch shape, in every run: nothing
kept them. `persistent_compile_cache` points JAX's own persistent cache
(`jax_compilation_cache_dir`) at `$KERASFT_CACHE/xla/jax` and caches every program (JAX skips
those that compiled in under a second by default; a step of a small model is one of them). The
cache is keyed by the program and the machine's XLA flags and device, so a change of model,
recipe or CPU compiles again. A cache the user chose (`JAX_COMPILATION_CACHE_DIR`) is kept, and so
are thresholds they set (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, ...).
PyTorch builds its kernels in memory, TensorFlow's XLA keeps no cache of its own between runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kerasft.util.cache import cache_dir

log = logging.getLogger(__name__)


def persistent_compile_cache(backend: str) -> Path | None:
    """On JAX, turns on the persistent compilation cache (before the first compilation).

    Args:
        backend: the Keras backend of this process.

    Returns:
        The cache directory in use on JAX (the user's own, if set), else None.

    Example:
        >>> persistent_compile_cache("jax")
        PosixPath('/home/me/.cache/kerasft/xla/jax')
    """
    if backend != "jax":
        return None
    import jax  # lazily: only a JAX process has it to configure

    path = jax.config.jax_compilation_cache_dir  # the user's own (JAX_COMPILATION_CACHE_DIR)
    if not path:
        path = cache_dir() / "xla" / "jax"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only home: compile as before
            log.warning("no persistent compilation cache (%s): %s", path, e)
            return None
        jax.config.update("jax_compilation_cache_dir", str(path))
    for option, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                          ("jax_persistent_cache_min_entry_size_bytes", 0)):  # fmt: skip
        if option.upper() not in os.environ:  # the user's own thresholds stand
            jax.config.update(option, value)
    return Path(path)


# XLA's CPU backend runs LLVM at -O3 by default. At -O1 a JAX train step of the reference model
# compiled in 14.2 s against 19.3 s (4 batch shapes) and stepped no slower (265 against 274 ms):
# its matrix products are library calls, which the optimisation level does not touch (AMX Xeon,
# scratch measurement; the whole-run figures are in benchmarks/results/whole_runs_amx.md).
XLA_OPTIMIZATION = "--xla_backend_optimization_level=1"


def quicker_compiles(backend: str) -> bool:
    """On JAX, compiles XLA's CPU programs with LLVM at -O1 (`XLA_OPTIMIZATION`), unless the
    user's `XLA_FLAGS` set a level. Call it before JAX's backend starts (it reads `XLA_FLAGS`
    then). Returns whether it did."""
    flags = os.environ.get("XLA_FLAGS", "")
    if backend != "jax" or "xla_backend_optimization_level" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_OPTIMIZATION}".strip()
    return True
