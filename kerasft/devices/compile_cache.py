"""A persistent XLA compilation cache for JAX training: the second run of the same shapes
compiles nothing.

A JAX fit compiles its train and validation steps once per batch shape, in every run: nothing
kept them. `persistent_compile_cache` points JAX's own persistent cache
(`jax_compilation_cache_dir`) at `$KERASFT_CACHE/xla/jax` and caches every program (JAX skips
those that compiled in under a second by default; a step of a small model is one of them). The
cache is keyed by the program and the machine's XLA flags and device, so a change of model,
recipe or CPU compiles again. A cache the user chose (`JAX_COMPILATION_CACHE_DIR`) is kept.
PyTorch builds its kernels in memory, TensorFlow's XLA keeps no cache of its own between runs.
"""

from __future__ import annotations

import logging
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

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = cache_dir() / "xla" / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: compile as before
        log.warning("no persistent compilation cache (%s): %s", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
