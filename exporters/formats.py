"""The format registry: every export format's contract, by name (`FORMATS`).

`kerasft.exporters.dispatch` checks format x INT8 mode against it before any work, and the CLI
takes its `--format` and `--int8` choices from it. Importing it imports no heavy library.

Example:
    >>> from kerasft.exporters.formats import FORMATS, VARIANTS
    >>> FORMATS["onnx"].modes
    (None, 'dynamic', 'static')
"""

from __future__ import annotations

from types import ModuleType

from kerasft.exporters import hf_checkpoint, kerashub, litert, onnx, openvino, saved_model
from kerasft.exporters.contract import SOURCE_PACKAGES, FormatContract

MODULES: dict[str, ModuleType] = {
    m.CONTRACT.name: m for m in (saved_model, onnx, openvino, litert, kerashub, hf_checkpoint)
}
FORMATS: dict[str, FormatContract] = {name: m.CONTRACT for name, m in MODULES.items()}
DEFAULT_FORMAT = onnx.CONTRACT.name  # `export`'s default
# The distributions an export may use, whose versions manifests and results files record:
# Keras, KerasHub, the tokenizer, every graph source's and every format's.
EXPORT_PACKAGES = tuple(dict.fromkeys([
    "keras", "keras-hub", "tokenizers",
    *(p for names in SOURCE_PACKAGES.values() for p in names),
    *(p for c in FORMATS.values() for p in (c.needs if c.packages is None else c.packages)),
]))  # fmt: skip


def traced_with(source: str) -> tuple[str, ...]:
    """The packages an export's manifest records: `EXPORT_PACKAGES` but the other graph
    sources' (an export traced under PyTorch does not name TensorFlow)."""
    other = {p for s, names in SOURCE_PACKAGES.items() if s != source for p in names}
    return tuple(n for n in EXPORT_PACKAGES if n not in other)


# format -> allowed `quantize` values (None = fp32).
SUPPORTED = {name: contract.modes for name, contract in FORMATS.items()}
# Every (format, quantize) pair `export` supports, fp32 first within each format.
VARIANTS = [(name, mode) for name, contract in FORMATS.items() for mode in contract.modes]
# The (format, quantize) pairs `--int8 auto` chooses among (fp32 included where a format's
# auto falls back to it): what a user gets from kerasft at its fastest, so `bench --quick`'s scope.
AUTO_VARIANTS = list(dict.fromkeys(
    (name, mode) for name, contract in FORMATS.items() for mode, _ in contract.auto
))  # fmt: skip
INT8_MODES = tuple(
    dict.fromkeys([*(mode for c in FORMATS.values() for mode in c.int8),
                   *(("auto",) if any(c.auto for c in FORMATS.values()) else ())])
)  # fmt: skip


def check_format(format: str, quantize: str | None) -> FormatContract:
    """The contract of `format`, after checking that it takes `quantize`.

    Raises:
        ValueError: an unknown format, or a quantization the format does not support (the
            message lists what is supported).
    """
    if format not in FORMATS:
        raise ValueError(f"Unrecognized format={format!r}. Supported formats are: {list(FORMATS)}")
    contract = FORMATS[format]
    if quantize not in contract.modes:
        raise ValueError(
            f"format={format!r} does not support quantize={quantize!r}. "
            f"Supported for {format}: {list(contract.modes)}"
        )
    return contract


def int8_help() -> str:
    """`--int8` help: each mode with the formats that take it."""
    parts = []
    for mode in INT8_MODES:
        uses = [f"{c.int8[mode].description} ({c.name})" if mode in c.int8 else c.name
                for c in FORMATS.values() if mode in c.modes]  # fmt: skip
        if mode == "auto":
            uses = [f"the fastest recipe on this CPU that passes the gate ({', '.join(uses)})"]
        parts.append(f"{mode}: {' or '.join(uses)}")
    return "; ".join(parts)
