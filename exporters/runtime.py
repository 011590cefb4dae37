"""Dependency-light inference on export directories.

`load(export_dir).predict(texts)` tokenizes with the export's `tokenizer.json` (`tokenizers`),
runs the model with its own runtime and returns labels and probabilities:

- ONNX: `onnxruntime` + `tokenizers` + `numpy` only. Importing this module never imports keras,
  keras_hub, tensorflow, jax or torch.
- OpenVINO: `openvino` + `tokenizers` + `numpy` only.
- SavedModel: TensorFlow only (no Keras model objects). Loading a SavedModel runs its TensorFlow
  graph, which can hold arbitrary operations (file reads and writes included): load SavedModels
  only from sources you trust, and prefer ONNX or OpenVINO on devices.
- LiteRT: the LiteRT interpreter (`ai-edge-litert`, or `tf.lite` when TensorFlow is installed).
- KerasHub preset: Keras and KerasHub, under the process's backend (`TextClassifier.from_preset`).
- transformers checkpoint: `transformers` on PyTorch (`AutoModelForSequenceClassification`).

Before anything is loaded, every file the manifest lists is checked against its sha256, and the
model file must be one of them, inside the export directory. The manifest itself is covered by
pinning its hash: `kerasft export` prints it, and `load(dir, manifest_sha256=...)` refuses a
manifest that differs (edited label names or `model_file`, say).

Example:
    >>> from kerasft.exporters.runtime import load
    >>> model = load("exports/sarcasm-onnx-int8")
    >>> model.predict(["area man wins argument with toaster"]).labels
    ['1']
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasft.exporters import hf_checkpoint as hf_format
from kerasft.exporters import kerashub as kerashub_format
from kerasft.exporters import litert as litert_format
from kerasft.exporters import onnx as onnx_format
from kerasft.exporters import openvino as openvino_format
from kerasft.exporters import saved_model as saved_model_format
from kerasft.exporters.exportdir import (  # noqa: F401  (re-exported: the runtime's API)
    IntegrityError,
    manifest_format,
    read_manifest,
    sha256_file,
    tokenizer_file,
)
from kerasft.tokens.wordpiece import token_ids


@dataclass
class Predictions:
    """Per-text results: `labels[i]` is the arg-max class name of `probabilities[i]`."""

    labels: list[str]
    probabilities: np.ndarray
    logits: np.ndarray


class ExportedClassifier:
    """Base class: tokenization, batching and softmax; subclasses run the model.

    Every runtime's `predict` is safe to call from several threads at once, without a lock
    around the model: onnxruntime's and TensorFlow's sessions are, OpenVINO and LiteRT get one
    infer request or interpreter per thread.

    Args:
        export_dir: a directory written by `kerasft.exporters.export`.
        manifest_sha256: pin the manifest's sha256 (see `read_manifest`).

    Raises:
        IntegrityError: see `read_manifest`; nothing is loaded then.
    """

    chunk_rows = 1024  # texts sorted by length together (`predict`)
    pad_multiple = 1  # a batch is padded to its longest text, rounded up to a multiple of this

    def __init__(self, export_dir: str | Path, manifest_sha256: str | None = None):
        from tokenizers import Tokenizer

        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir, manifest_sha256)
        self.model_path = self.export_dir / self.manifest["model_file"]
        self.label_names = self.manifest["label_names"]
        self.tokenizer = Tokenizer.from_file(str(self.export_dir / tokenizer_file(self.manifest)))
        self.tokenizer.no_padding()
        self._settings = self.manifest["tokenizer"]
        self._max_len = self.manifest["sequence_length"]
        # (batch, sequence) the model was exported with; None = a dynamic axis.
        self.fixed_batch, self.fixed_length = self.manifest.get("input_shape", [None, None])
        self._pad_id = self.tokenizer.token_to_id("[PAD]")

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Returns `{"token_ids", "padding_mask"}` int32, padded to the longest text.

        Texts go through `tokenizer.json`, which is identical to KerasHub on ASCII text and on
        text whose other characters case-fold like they lowercase (curly quotes, dashes, most
        accented letters: `kerasft.tokens.wordpiece.tokenizers_matches`). The rest (ligatures, `…`,
        combining marks, words over KerasHub's 100-byte limit) take the exact KerasHub
        pre-tokenisation with the same WordPiece model.
        """
        if isinstance(texts, str):
            raise TypeError("predict() takes a list of texts; wrap a single string in a list.")
        rows = token_ids(self.tokenizer, list(texts), **self._settings,
                         sequence_length=self._max_len)  # fmt: skip
        return self._pad(rows)

    def _pad(self, rows: list) -> dict[str, np.ndarray]:
        """Token id rows as the model's int32 inputs, padded to the longest (or fixed) length."""
        lengths = np.array([len(r) for r in rows])
        step = self.pad_multiple
        width = self.fixed_length or -(-lengths.max(initial=0) // step) * step
        ids = np.full((len(rows), width), self._pad_id, dtype="int32")
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return {"token_ids": ids, "padding_mask": mask.astype("int32")}

    def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The model's logits for one batch of `_pad`ded inputs (thread-safe)."""
        raise NotImplementedError

    def predict(self, texts: list[str], batch_size: int = 32) -> Predictions:
        """Classifies `texts`.

        Texts are taken `chunk_rows` at a time, in order; within a chunk they are tokenized once,
        sorted by length and run `batch_size` at a time, each batch padded to its longest text
        (as training buckets do), then put back in input order. The same texts give the same
        batches however they arrive (one call or `chunk_rows` at a time, as `kerasft predict
        --data` streams them), which matters to recipes whose answer depends on the batch (ONNX
        dynamic INT8).

        Safe to call from several threads at once (see each runtime's class).

        Args:
            texts: the texts.
            batch_size: texts per model call (a fixed batch axis overrides it).

        Returns:
            `Predictions` with labels, probabilities `(N, K)` and logits.
        """
        if isinstance(texts, str):
            raise TypeError("predict() takes a list of texts; wrap a single string in a list.")
        texts = list(texts)
        logits = [
            self._chunk_logits(texts[i : i + self.chunk_rows], self.fixed_batch or batch_size)
            for i in range(0, len(texts), self.chunk_rows)
        ]
        logits = np.concatenate(logits) if logits else np.zeros((0, len(self.label_names)))
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        proba = shifted / shifted.sum(axis=-1, keepdims=True)
        return Predictions([self.label_names[i] for i in proba.argmax(-1)], proba, logits)

    def _chunk_logits(self, texts: list[str], batch_size: int) -> np.ndarray:
        rows = token_ids(self.tokenizer, texts, **self._settings, sequence_length=self._max_len)
        order = np.argsort([len(r) for r in rows], kind="stable")
        takes, feeds = [], []
        for i in range(0, len(order), batch_size):
            take = order[i : i + batch_size]
            batch = [rows[j] for j in take]
            if self.fixed_batch:  # a short last batch is filled up with its first text
                batch += batch[:1] * (batch_size - len(batch))
            takes.append(take)
            feeds.append(self._pad(batch))
        logits = np.zeros((len(rows), len(self.label_names)), dtype="float32")
        for take, out in zip(takes, self._batch_logits(feeds), strict=True):
            logits[take] = out[: len(take)]
        return logits

    def _batch_logits(self, feeds: list[dict]) -> list[np.ndarray]:
        """The logits of a chunk's batches: one after another (a runtime may overlap them)."""
        return [self.logits(feed) for feed in feeds]


class OnnxClassifier(ExportedClassifier):
    """ONNX export on onnxruntime (CPU provider unless `providers` says otherwise).

    One `InferenceSession` serves every thread: its `run` is thread-safe.
    """

    def __init__(
        self,
        export_dir,
        providers: list[str] | None = None,
        threads: int | None = None,
        manifest_sha256: str | None = None,
    ):
        super().__init__(export_dir, manifest_sha256)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.model_path),
            options,
            providers=providers or ["CPUExecutionProvider"],
        )
        self.input_names = {i.name for i in self.session.get_inputs()}

    def logits(self, inputs):
        feed = {k: v for k, v in inputs.items() if k in self.input_names}
        return self.session.run(None, feed)[0]


class OpenVINOClassifier(ExportedClassifier):
    """OpenVINO IR export on OpenVINO's CPU plugin (or another `device`).

    An infer request serves one inference at a time (another thread's call raises "Infer
    Request is busy"), so each thread gets its own from the one compiled model, as OpenVINO's
    guide for concurrent inference does; the compiled model is shared.

    Args:
        export_dir: the export directory.
        threads: inference threads (OpenVINO's default: all cores).
        precision: OpenVINO's `INFERENCE_PRECISION_HINT`, `"f32"` or `"bf16"`; default: the
            precision the export was verified with (`manifest["inference_precision"]`).
        device: the OpenVINO device.
        manifest_sha256: pin the manifest's sha256.
        throughput: serve many batches in a row (a file): OpenVINO's THROUGHPUT hint (a
            stream per core or two) with a chunk's batches in flight side by side, instead of
            one batch at a time across every core (its LATENCY hint, the default).
    """

    pad_multiple = 2  # (see above)

    def __init__(
        self,
        export_dir,
        threads: int | None = None,
        precision: str | None = None,
        device: str = "CPU",
        manifest_sha256: str | None = None,
        throughput: bool = False,
    ):
        super().__init__(export_dir, manifest_sha256)
        import openvino as ov

        self._ov, self.throughput = ov, throughput
        self.precision = precision or self.manifest.get("inference_precision") or "f32"
        hint = "THROUGHPUT" if throughput else "LATENCY"
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(str(self.model_path), device, config)
        self._local = threading.local()  # one infer request per thread
        self.input_names = {name for port in self.compiled.inputs for name in port.get_names()}

    @property
    def request(self):
        """This thread's infer request (created on its first call)."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def logits(self, inputs):
        feed = {k: v for k, v in inputs.items() if k in self.input_names}
        return np.array(self.request.infer(feed)[self.compiled.output(0)])

    def _batch_logits(self, feeds: list[dict]) -> list[np.ndarray]:
        if not self.throughput:
            return super()._batch_logits(feeds)
        out: list = [None] * len(feeds)
        jobs = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = self._ov.AsyncInferQueue(self.compiled, jobs)  # this call's own requests

        def done(request, index):
            out[index] = np.array(request.get_output_tensor(0).data)

        queue.set_callback(done)
        for index, inputs in enumerate(feeds):
            queue.start_async({k: v for k, v in inputs.items() if k in self.input_names}, index)
        queue.wait_all()
        return out


class SavedModelClassifier(ExportedClassifier):
    """SavedModel export served by TensorFlow's `serving_default` signature (thread-safe).

    Loading a SavedModel executes its TensorFlow graph, which may contain arbitrary operations
    (reading or writing files included): load only SavedModels from a source you trust. The
    sha256 checks guard against corruption and tampering after export, not against a malicious
    exporter.
    """

    def __init__(self, export_dir, manifest_sha256: str | None = None):
        super().__init__(export_dir, manifest_sha256)
        import tensorflow as tf

        self._tf = tf
        self.signature = tf.saved_model.load(str(self.model_path)).signatures["serving_default"]

    def logits(self, inputs):
        out = self.signature(**{k: self._tf.constant(v) for k, v in inputs.items()})
        return next(iter(out.values())).numpy()


class LiteRTClassifier(ExportedClassifier):
    """LiteRT (TFLite) export on the LiteRT interpreter, resized to each batch's shape.

    An interpreter is not thread-safe, so each thread gets its own (they map the same file).
    """

    def __init__(self, export_dir, threads: int | None = None, manifest_sha256: str | None = None):
        super().__init__(export_dir, manifest_sha256)
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # pragma: no cover - fallback when only TensorFlow is installed
            from tensorflow.lite import Interpreter
        self._interpreter = functools.partial(
            Interpreter, model_path=str(self.model_path), num_threads=threads
        )
        self._local = threading.local()
        self.interpreter = self._local.interpreter = self._interpreter()  # checked at load

    @property
    def runner(self):
        """This thread's `serving_default` signature runner (its own interpreter)."""
        runner = getattr(self._local, "runner", None)
        if runner is None:
            interpreter = getattr(self._local, "interpreter", None) or self._interpreter()
            runner = self._local.runner = interpreter.get_signature_runner("serving_default")
        return runner

    def logits(self, inputs):
        out = self.runner(**inputs)
        return next(iter(out.values()))


class KerasHubClassifier(ExportedClassifier):
    """KerasHub preset export on Keras, under the process's backend:
    `keras_hub.models.TextClassifier.from_preset(DIR)` fed kerasft's token ids (KerasHub's own
    preprocessing of raw strings needs TensorFlow or `grain`). One call at a time (a lock):
    Keras models are not documented as thread-safe.
    """

    def __init__(self, export_dir, manifest_sha256: str | None = None):
        super().__init__(export_dir, manifest_sha256)
        import keras_hub

        self.model = keras_hub.models.TextClassifier.from_preset(
            str(self.export_dir), preprocessor=None
        )
        self._lock = threading.Lock()

    def logits(self, inputs):
        with self._lock:
            return np.asarray(self.model.predict_on_batch(inputs), dtype="float32")


class TransformersClassifier(ExportedClassifier):
    """transformers checkpoint export on PyTorch: `AutoModelForSequenceClassification` fed
    kerasft's token ids, under `torch.inference_mode` (thread-safe)."""

    def __init__(self, export_dir, threads: int | None = None, manifest_sha256: str | None = None):
        super().__init__(export_dir, manifest_sha256)
        import torch
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = AutoModelForSequenceClassification.from_pretrained(str(self.export_dir))
        self.model.eval()

    def logits(self, inputs):
        torch = self._torch
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(inputs["token_ids"]).long(),
                attention_mask=torch.from_numpy(inputs["padding_mask"]).long(),
            )
        return out.logits.float().numpy()

    def checks(self, texts: list[str], keras_ids: np.ndarray) -> dict:
        """What a transformers user's own tokenizer gives: the texts whose
        `AutoTokenizer.from_pretrained(DIR)` ids (the `pipeline()` path) differ from KerasHub's."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.export_dir))
        rows = tokenizer(list(texts), truncation=True, max_length=self._max_len)["input_ids"]
        differ = sum(list(row) != [int(i) for i in ids if i != 0]
                     for row, ids in zip(rows, keras_ids, strict=True))  # fmt: skip
        return {"transformers_tokenizer_mismatches": int(differ)}


def verify_checksums(export_dir: str | Path, manifest_sha256: str | None = None) -> None:
    """Checks every file of an export against the sha256 in its manifest (see `read_manifest`).

    Raises:
        IntegrityError: naming the first file that is missing, differs or is not allowed.
    """
    read_manifest(export_dir, manifest_sha256)


# By the format names the format modules declare (their `CONTRACT`s: light imports, no
# TensorFlow, Keras or PyTorch).
_RUNTIMES = {
    onnx_format.CONTRACT.name: OnnxClassifier,
    openvino_format.CONTRACT.name: OpenVINOClassifier,
    saved_model_format.CONTRACT.name: SavedModelClassifier,
    litert_format.CONTRACT.name: LiteRTClassifier,
    kerashub_format.CONTRACT.name: KerasHubClassifier,
    hf_format.CONTRACT.name: TransformersClassifier,
}
# The exports whose runtime is TensorFlow's (LiteRT's interpreter falls back to `tf.lite`).
TENSORFLOW_FORMATS = (saved_model_format.CONTRACT.name, litert_format.CONTRACT.name)


def load(
    export_dir: str | Path, manifest_sha256: str | None = None, throughput: bool = False, **kwargs
) -> ExportedClassifier:
    """Opens an export directory with the runtime its manifest names, after checking its files.

    Args:
        export_dir: the export directory.
        manifest_sha256: pin the manifest's sha256 (printed by `kerasft export`); a manifest
            that differs is refused.
        throughput: the model will label many batches in a row (a file, as `kerasft predict
            --data` does): the runtimes that trade one batch's latency for throughput do
            (OpenVINO's THROUGHPUT hint); the others ignore it.
        **kwargs: runtime options (`providers`, `threads` for ONNX; `threads`, `precision`,
            `device` for OpenVINO; `threads` for LiteRT).

    Returns:
        An `ExportedClassifier`.

    Raises:
        FileNotFoundError: if `export_dir` has no `manifest.json`.
        IntegrityError: a file differs from its sha256, is missing or unlisted, a path leaves the
            directory, or the manifest is not the pinned one.
        ValueError: for an unknown format in the manifest.

    Example:
        >>> model = load("exports/sarcasm-ov-int8", manifest_sha256="9f2c...")
        >>> model.predict(["area man wins argument with toaster"]).labels
    """
    fmt = manifest_format(export_dir)
    if fmt not in _RUNTIMES:
        raise ValueError(f"Unknown export format={fmt!r}. Supported formats: {sorted(_RUNTIMES)}")
    if throughput and _RUNTIMES[fmt] is OpenVINOClassifier:
        kwargs["throughput"] = True
    return _RUNTIMES[fmt](export_dir, manifest_sha256=manifest_sha256, **kwargs)
