"""Exporters: SavedModel, ONNX, OpenVINO and LiteRT (+ INT8) for serving, a KerasHub preset and a
transformers checkpoint for sharing, each verified against the Keras model.

One module per format (`saved_model`, `onnx`, `openvino`, `litert`, `kerashub`, `hf_checkpoint`;
ONNX's graph passes in `onnx_graph`, `onnx_attention`, `onnx_calibration`), each with a `CONTRACT`
(its INT8 modes and recipes, collected in the `formats` registry) and one `write()`; one
dispatcher (`export`); one shared verification step (`verify`); one owner of the export
directory's manifest (`exportdir`); and a dependency-light `runtime` for the exports. Importing
this package imports nothing heavy.

Example:
    >>> from kerasft.exporters import export
    >>> export("runs/sarcasm", "exports/sarcasm-onnx", format="onnx")
"""

import importlib

_EXPORTS = {
    "export": "kerasft.exporters.dispatch",
    "SUPPORTED": "kerasft.exporters.formats",
    "VerificationError": "kerasft.exporters.verify",
    "load": "kerasft.exporters.runtime",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kerasft.exporters' has no attribute {name!r}")
