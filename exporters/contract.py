"""What a format module declares about itself (`CONTRACT`), read by the registry and the CLI.

Each format module (`saved_model`, `onnx`, `openvino`, `litert`) holds one `FormatContract`
and one `write(graph, out_dir, quantize=..., **options) -> dict` entry; `kerasft.exporters.formats`
collects them. Like optimum's `AutoQuantizationConfig` presets, each INT8 mode is a named
`QuantizationConfig`: the recipes it tries in order (the next only when the previous misses
the verification gate) and what they need.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from kerasft.exporters.keras_graph import ServingGraph
from kerasft.exporters.torch_graph import TorchServingGraph

# The packages a graph source traces with: the one mapping from source to packages, for what an
# export needs (`needs_with`) and what its manifest records (`formats.traced_with`).
SOURCE_PACKAGES = {"torch": ("torch",), "tensorflow": ("tensorflow", "tf2onnx")}


@dataclass(frozen=True)
class QuantizationConfig:
    """One `--int8` mode of a format.

    Attributes:
        mode: the `quantize=` / `--int8` value.
        description: one line for `--help` and the docs.
        attempts: `(recipe, settings)` pairs passed to `write(quantize=recipe, **settings)`,
            tried in order: the next only when the previous misses the gate.
        calibration: the recipes calibrate (or measure node sensitivity) on training texts.
        validation: the recipes need labelled validation feeds (accuracy control).
        batch_dependent: a text's output depends on the other texts of its batch (activation
            ranges taken per call); `--int8 auto` never picks such a mode.
        untimed: recipes `--int8 auto` does not write just to time them (too costly: NNCF's
            accuracy control runs a validation loop), tried after every timed one.
    """

    mode: str
    description: str
    attempts: tuple[tuple[str, dict], ...]
    calibration: bool = False
    validation: bool = False
    batch_dependent: bool = False
    untimed: tuple[str, ...] = ()


@dataclass(frozen=True)
class FormatContract:
    """What a format supports and how it is written.

    Attributes:
        name: the `format=` / `--format` value.
        description: one line for the docs.
        int8: the INT8 modes, by name.
        onnx_graph: traced with ONNX-friendly ops (`keras_graph.onnx_friendly_ops`).
        calibration_batch: rows per calibration feed (1: texts one at a time, as served).
        needs: the Python modules `write` needs besides the graph source's, for a one-line
            error when one is missing.
        auto: the `--int8 auto` candidates, `(mode, settings)`: the modes it times on this
            machine (with `settings` added to each of their recipes) and tries fastest first;
            mode None is fp32, kept where no INT8 recipe is faster on this CPU.
        graph_sources: the Keras backends the graph can be traced under (`"torch"`:
            `kerasft.exporters.torch_graph`, `"tensorflow"`: `kerasft.exporters.keras_graph`),
            the default first.
        precisions: the inference precisions the runtime can be verified and recorded with
            (empty: float32 only); any but the first is judged by the INT8 gate.
        keep_fp32_modes: the INT8 modes that take `keep_fp32` (nodes kept in fp32).
        companion_suffixes: files beside the model file that hold its weights (OpenVINO's
            `.bin`), counted in its size.
        cpu_only: its runtime runs on the CPU only (skipped on a GPU).
        packages: the distributions whose versions its manifests record (default: `needs`).
        checkpoint: written from the trained classifier as it is (a KerasHub preset, a
            transformers checkpoint), not from a traced serving graph: no fixed shapes, and
            the classifier is not rewritten for tracing first.
        tokenizer_dir: where in the export kerasft's `tokenizer.json` and `vocab.txt` go
            ("": its root; a KerasHub preset keeps a `tokenizer.json` of its own there).
        extra: the kerasft extra that installs `needs` (TensorFlow's: `export`).
    """

    name: str
    description: str
    int8: dict[str, QuantizationConfig] = field(default_factory=dict)
    onnx_graph: bool = False
    calibration_batch: int = 32
    needs: tuple[str, ...] = ()
    auto: tuple[tuple[str, dict], ...] = ()
    graph_sources: tuple[str, ...] = ("tensorflow",)
    precisions: tuple[str, ...] = ()
    keep_fp32_modes: tuple[str, ...] = ()
    companion_suffixes: tuple[str, ...] = ()
    cpu_only: bool = False
    packages: tuple[str, ...] | None = None
    checkpoint: bool = False
    tokenizer_dir: str = ""
    extra: str = "edge"

    @property
    def modes(self) -> tuple[str | None, ...]:
        """Every `quantize` value the format takes, fp32 (None) first, `"auto"` last."""
        return (None, *self.int8, *(("auto",) if self.auto else ()))

    @property
    def default_source(self) -> str:
        """The Keras backend the format's graph is traced under unless asked otherwise."""
        return self.graph_sources[0]

    def resolve_source(self, graph_source: str | None) -> str:
        """The graph source to trace under: `graph_source`, or the format's default.

        Raises:
            ValueError: a source the format cannot be traced under.
        """
        if graph_source is None:
            return self.default_source
        if graph_source not in self.graph_sources:
            raise ValueError(
                f"format {self.name!r} is traced under {' or '.join(self.graph_sources)}. "
                f"Received: graph_source={graph_source!r}"
            )
        return graph_source

    @staticmethod
    def graph_class(source: str):
        """The serving-graph class that traces under `source`."""
        if source == "torch":
            return TorchServingGraph

        return ServingGraph

    def needs_with(self, source: str) -> tuple[str, ...]:
        """The Python modules an export traced under `source` needs (tf2onnx only where the
        graph goes to ONNX)."""
        traced = [p for p in SOURCE_PACKAGES[source] if self.onnx_graph or p != "tf2onnx"]
        return (*traced, *self.needs)

    def check_installed(self, source: str) -> None:
        """Raises `RuntimeError` naming the extra to install when a module the format needs
        under `source` is missing (TensorFlow, above all, for SavedModel and LiteRT in a JAX- or
        PyTorch-only environment)."""
        needs = self.needs_with(source)
        missing = [name for name in needs if not _installed(name)]
        if missing:
            extra = "export" if "tensorflow" in missing or "tf2onnx" in missing else self.extra
            raise RuntimeError(
                f"format {self.name!r} needs {', '.join(needs)} to export (not "
                f"installed: {', '.join(missing)}): pip install 'kerasft[{extra}]'"
            )

    def model_bytes(self, model_path) -> int:
        """The size of an export's model: its file (or directory) and companion files."""
        from pathlib import Path

        path = Path(model_path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        files += [path.with_suffix(suffix) for suffix in self.companion_suffixes]
        return sum(p.stat().st_size for p in files)

    def reduced(self, mode: str | None, precision: str) -> bool:
        """Whether an export computes in reduced precision (judged by the INT8 gate): INT8,
        or an inference precision other than the format's first."""
        return mode is not None or (bool(self.precisions) and precision != self.precisions[0])

    def attempts(self, mode: str | None) -> tuple[tuple[str | None, dict], ...]:
        """The recipes `mode` tries in order (fp32: one, unquantized; `"auto"`: every candidate's,
        in the order given, before `--int8 auto` times them)."""
        if mode == "auto":
            return tuple((a, {**s, **over}) for m, over in self.auto for a, s in self.attempts(m))
        return ((None, {}),) if mode is None else self.int8[mode].attempts

    def needs_of(self, mode: str | None) -> tuple[bool, bool]:
        """Whether `mode`'s recipes need calibration texts, and labelled validation texts."""
        modes = [m for m, _ in self.auto] if mode == "auto" else [mode]
        configs = [self.int8[m] for m in modes if m]
        return any(c.calibration for c in configs), any(c.validation for c in configs)


def int8(mode: str, description: str, *attempts: tuple[str, dict], **needs) -> QuantizationConfig:
    """Shorthand for a `QuantizationConfig` (one attempt `(mode, {})` when none is given)."""
    return QuantizationConfig(mode, description, attempts or ((mode, {}),), **needs)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses the module
        return False
