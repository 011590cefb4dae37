"""Where kerasft keeps what it builds once and reuses: `$KERASFT_CACHE`, else `~/.cache/kerasft`.

Converted presets (`kerasft.model.presets`), compiled XLA programs
(`kerasft.devices.compile_cache`) and the benchmark's exports live under it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "KERASFT_CACHE"


def cache_dir() -> Path:
    """Returns the directory kerasft caches under: `$KERASFT_CACHE` when set, else
    `~/.cache/kerasft`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kerasft")
