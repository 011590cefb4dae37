"""Dependency-light inference on export directories.

`load(export_dir).predict(texts)` tokenizes with the export's `tokenizer.json` (`tokenizers`),
runs the model with its own runtime and returns labels and probabilities:

- ONNX: `onnxruntime` + `tokenizers` + `numpy` only. Importing this module never imports keras,
  keras_hub, tensorflow, jax or torch.
- SavedModel: TensorFlow only (no Keras model objects).
- LiteRT: the LiteRT interpreter (`ai-edge-litert`, or `tf.lite` when TensorFlow is installed).

Example:
    >>> from exporters.runtime import load
    >>> model = load("exports/sarcasm-onnx-int8")
    >>> model.predict(["area man wins argument with toaster"]).labels
    ['1']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.tokenizer import kerashub_words


@dataclass
class Predictions:
    """Per-text results: `labels[i]` is the arg-max class name of `probabilities[i]`."""

    labels: list[str]
    probabilities: np.ndarray
    logits: np.ndarray


class ExportedClassifier:
    """Base class: tokenization, batching and softmax; subclasses run the model.

    Args:
        export_dir: a directory written by `exporters.export`.
    """

    def __init__(self, export_dir: str | Path):
        from tokenizers import Tokenizer

        self.export_dir = Path(export_dir)
        manifest_path = self.export_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"No manifest.json in {str(self.export_dir)!r}: not an export.")
        self.manifest = json.loads(manifest_path.read_text())
        self.label_names = self.manifest["label_names"]
        self.tokenizer = Tokenizer.from_file(str(self.export_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self._settings = self.manifest["tokenizer"]
        self._max_len = self.manifest["sequence_length"]
        # (batch, sequence) the model was exported with; None = a dynamic axis.
        self.fixed_batch, self.fixed_length = self.manifest.get("input_shape", [None, None])
        self._cls, self._sep = (self.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))
        self._unk, self._pad = (self.tokenizer.token_to_id(t) for t in ("[UNK]", "[PAD]"))

    def _exact_ids(self, text: str) -> list[int]:
        """KerasHub's tokenization of a non-ASCII text (see `exporters.tokenizer`)."""
        ids = []
        for word in kerashub_words(text, **self._settings):
            if len(word.encode("utf-8")) > 100:  # KerasHub's FastWordpiece byte limit
                ids.append(self._unk)
            else:
                ids += [t.id for t in self.tokenizer.model.tokenize(word)]
        return [self._cls, *ids[: self._max_len - 2], self._sep]

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Returns `{"token_ids", "padding_mask"}` int32, padded to the longest text.

        ASCII texts go through `tokenizer.json` (identical to KerasHub there); texts with other
        characters through the exact KerasHub pre-tokenisation and the same WordPiece model.
        """
        if isinstance(texts, str):
            raise TypeError("predict() takes a list of texts; wrap a single string in a list.")
        texts = list(texts)
        rows = [e.ids for e in self.tokenizer.encode_batch(texts)]
        rows = [r if t.isascii() else self._exact_ids(t) for r, t in zip(rows, texts, strict=True)]
        lengths = np.array([len(r) for r in rows])
        width = self.fixed_length or lengths.max(initial=0)
        ids = np.full((len(rows), width), self._pad, dtype="int32")
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return {"token_ids": ids, "padding_mask": mask.astype("int32")}

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def predict(self, texts: list[str], batch_size: int = 32) -> Predictions:
        """Classifies `texts`.

        Args:
            texts: the texts.
            batch_size: texts per model call.

        Returns:
            `Predictions` with labels, probabilities `(N, K)` and logits.
        """
        texts = list(texts)
        batch_size = self.fixed_batch or batch_size
        logits = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            # A fixed batch axis gets a short last batch filled up with its first text.
            filled = chunk + chunk[:1] * (batch_size - len(chunk)) if self.fixed_batch else chunk
            logits.append(self.logits(self.encode(filled))[: len(chunk)])
        logits = np.concatenate(logits) if logits else np.zeros((0, len(self.label_names)))
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        proba = shifted / shifted.sum(axis=-1, keepdims=True)
        return Predictions([self.label_names[i] for i in proba.argmax(-1)], proba, logits)


class OnnxClassifier(ExportedClassifier):
    """ONNX export on onnxruntime (CPU provider unless `providers` says otherwise)."""

    def __init__(self, export_dir, providers: list[str] | None = None, threads: int | None = None):
        super().__init__(export_dir)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.export_dir / self.manifest["model_file"]),
            options,
            providers=providers or ["CPUExecutionProvider"],
        )
        self.input_names = {i.name for i in self.session.get_inputs()}

    def logits(self, inputs):
        feed = {k: v for k, v in inputs.items() if k in self.input_names}
        return self.session.run(None, feed)[0]


class SavedModelClassifier(ExportedClassifier):
    """SavedModel export served by TensorFlow's `serving_default` signature."""

    def __init__(self, export_dir):
        super().__init__(export_dir)
        import tensorflow as tf

        self._tf = tf
        self.signature = tf.saved_model.load(str(self.export_dir / "saved_model")).signatures[
            "serving_default"
        ]

    def logits(self, inputs):
        out = self.signature(**{k: self._tf.constant(v) for k, v in inputs.items()})
        return next(iter(out.values())).numpy()


class LiteRTClassifier(ExportedClassifier):
    """LiteRT (TFLite) export on the LiteRT interpreter, resized to each batch's shape."""

    def __init__(self, export_dir, threads: int | None = None):
        super().__init__(export_dir)
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # pragma: no cover - fallback when only TensorFlow is installed
            from tensorflow.lite import Interpreter
        self.interpreter = Interpreter(
            model_path=str(self.export_dir / self.manifest["model_file"]), num_threads=threads
        )
        self.runner = self.interpreter.get_signature_runner("serving_default")

    def logits(self, inputs):
        out = self.runner(**inputs)
        return next(iter(out.values()))


def verify_checksums(export_dir: str | Path) -> None:
    """Checks every file of an export against the sha256 in its manifest.

    Raises:
        ValueError: naming the first file that is missing or differs.
    """
    import hashlib

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for name, expected in manifest["files"].items():
        path = export_dir / name
        if not path.is_file():
            raise ValueError(f"{export_dir}: {name} is missing.")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"{export_dir}: {name} has sha256 {digest}, manifest says {expected}.")


_RUNTIMES = {
    "onnx": OnnxClassifier,
    "saved_model": SavedModelClassifier,
    "litert": LiteRTClassifier,
}


def load(export_dir: str | Path, **kwargs) -> ExportedClassifier:
    """Opens an export directory with the runtime its manifest names.

    Args:
        export_dir: the export directory.
        **kwargs: runtime options (`providers`, `threads` for ONNX; `threads` for LiteRT).

    Returns:
        An `ExportedClassifier`.

    Raises:
        FileNotFoundError: if `export_dir` has no `manifest.json`.
        ValueError: for an unknown format in the manifest.
    """
    manifest_path = Path(export_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"No manifest.json in {str(export_dir)!r}: not an export directory."
        )
    fmt = json.loads(manifest_path.read_text()).get("format")
    if fmt not in _RUNTIMES:
        raise ValueError(f"Unknown export format={fmt!r}. Supported formats: {sorted(_RUNTIMES)}")
    return _RUNTIMES[fmt](export_dir, **kwargs)
