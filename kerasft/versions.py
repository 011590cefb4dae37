"""Installed versions of the libraries a run or an export depends on (for reports)."""

from __future__ import annotations

import importlib.metadata

TRAINING = ("keras", "keras-hub", "tensorflow", "jax", "torch", "numpy", "scikit-learn")
EXPORT = ("keras", "keras-hub", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "tokenizers",
          "ai-edge-litert", "openvino", "nncf")  # fmt: skip


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Returns `{distribution: version}` for those of `names` that are installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
