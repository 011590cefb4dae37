"""Installed versions of the libraries a run or an export depends on (for reports)."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

TRAINING = ("keras", "keras-hub", "tensorflow", "jax", "torch", "numpy", "scikit-learn")
# The export side's packages are the format registry's: `kerasft.exporters.formats.EXPORT_PACKAGES`.


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Returns `{distribution: version}` for those of `names` that are installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def source_commit() -> str:
    """The git commit of the kerasft checkout this code runs from, e.g. `"cf53761"`.

    `"cf53761 (uncommitted changes)"` when tracked files differ from it; `"unknown"` outside a
    git checkout (an installed wheel).
    """
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=here,
        )  # fmt: skip
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, timeout=10, cwd=here,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" (uncommitted changes)" if dirty else "")
