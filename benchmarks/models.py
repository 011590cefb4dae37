"""The models the latency harness measures, built from a fine-tuned run's classifier.

- `widen`: a DistilBERT-base-shaped classifier (e.g. hidden 768, 12 heads, FFN 3072) that
  computes *exactly* the fine-tuned model's function. Every hidden feature, head dimension and
  FFN unit is duplicated `factor` times (LayerNorm statistics of `[x, x]` equal those of `x`;
  kernels that read duplicated inputs are divided by `factor`; the query is scaled so that the
  attention scores keep their `1/sqrt(head_dim)` temperature). Latency depends only on shapes, so
  this gives real DistilBERT-base timings with weights whose predictions mean something (INT8
  exports of it still verify against it), where the pretrained base preset is unreachable.
- `to_transformers`: the same weights as a Hugging Face `DistilBertForSequenceClassification`
  checkpoint (the exporter's mapping) with Hugging Face's own tokenizer, for the peers
  (transformers eager, Optimum's ONNX export and INT8 quantization).
- `optimum_export`: Optimum's own export and dynamic INT8 recipe, as its documentation shows it.
- `optimum_intel_export`: optimum-intel's OpenVINO export (`OVModelForSequenceClassification`)
  and its post-training INT8 (`OVQuantizer` with the default `OVQuantizationConfig`), the path a
  Hugging Face user takes to OpenVINO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kerasft.exporters.hf_checkpoint import write_model
from kerasft.util.machine import cpu_flags


def _widened_weight(src: np.ndarray, shape: tuple, path: str, factor: int) -> np.ndarray:
    reps = []
    for have, want in zip(src.shape, shape, strict=True):
        if want not in (have, have * factor):
            raise ValueError(f"{path}: cannot widen shape {src.shape} to {shape}.")
        reps.append(want // have)
    out = np.tile(src, reps)
    tiled = [axis for axis, r in enumerate(reps) if r > 1]
    if path.endswith("kernel") and any(axis < src.ndim - 1 for axis in tiled):
        out = out / factor  # the kernel reads `factor` copies of each input feature
    if "query" in path:
        out = out / math.sqrt(factor)  # q·k doubles per head; keep the softmax temperature
    return out.astype(src.dtype)


def widen(classifier, factor: int):
    """Returns a classifier `factor` times wider that computes the same logits as `classifier`.

    Args:
        classifier: a KerasHub `DistilBertTextClassifier`.
        factor: integer width multiplier for hidden size, head size and FFN size (the number of
            heads and layers stay). 2 turns all-MiniLM-L6-v2 (384/12/1536) into the
            DistilBERT-base shape (768/12/3072).

    Returns:
        A new `DistilBertTextClassifier` sharing `classifier`'s preprocessor.

    Raises:
        ValueError: if `factor` is not an int >= 1.

    Example:
        >>> base_shaped = widen(load_classifier("all_minilm_l6_v2"), 2)
    """
    import keras_hub

    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1. Received: factor={factor!r}")
    b = classifier.backbone
    backbone = keras_hub.models.DistilBertBackbone(
        vocabulary_size=b.vocabulary_size,
        num_layers=b.num_layers,
        num_heads=b.num_heads,
        hidden_dim=b.hidden_dim * factor,
        intermediate_dim=b.intermediate_dim * factor,
        dropout=b.dropout,
        max_sequence_length=b.max_sequence_length,
    )
    wide = keras_hub.models.DistilBertTextClassifier(
        backbone,
        num_classes=classifier.num_classes,
        preprocessor=classifier.preprocessor,
        activation=classifier.activation,
        dropout=classifier.dropout,
    )
    src_weights = classifier.backbone.weights + _head_weights(classifier)
    dst_weights = backbone.weights + _head_weights(wide)
    if len(src_weights) != len(dst_weights):
        raise ValueError("Source and widened models have different variables.")
    for src, dst in zip(src_weights, dst_weights, strict=True):
        value = np.asarray(src.numpy() if hasattr(src, "numpy") else src)
        dst.assign(_widened_weight(value, tuple(dst.shape), src.path, factor))
    return wide


def _head_weights(classifier) -> list:
    layers = (classifier.pooled_dense, classifier.output_dense)
    return [w for layer in layers for w in (layer.kernel, layer.bias)]


def to_transformers(classifier, out_dir: str | Path, label_names: list[str]) -> Path:
    """Writes the classifier as a Hugging Face `DistilBertForSequenceClassification` checkpoint
    with Hugging Face's own DistilBERT tokenizer (from `vocab.txt`), as a Trainer user has it.

    The weights through the exporter's mapping (`kerasft.exporters.hf_checkpoint.write_model`,
    the one home of it); unlike `kerasft export --format transformers`, no kerasft tokenizer.

    Args:
        classifier: a KerasHub `DistilBertTextClassifier`.
        out_dir: directory for `config.json`, `model.safetensors` and the tokenizer files.
        label_names: class names, in class-id order.

    Returns:
        `out_dir` as a `Path`.
    """
    out_dir = write_model(classifier, out_dir, label_names)
    vocab = classifier.preprocessor.tokenizer.get_vocabulary()
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "DistilBertTokenizer"})
    )
    return out_dir


def optimum_config(flags: set[str]):
    """Optimum's recommended dynamic INT8 configuration for this CPU (its factory presets)."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if "avx512_vnni" in flags:
        return "avx512_vnni", AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    if "avx512f" in flags:
        return "avx512", AutoQuantizationConfig.avx512(is_static=False, per_channel=False)
    if "avx2" in flags:
        return "avx2", AutoQuantizationConfig.avx2(is_static=False, per_channel=False)
    return "arm64", AutoQuantizationConfig.arm64(is_static=False, per_channel=False)


def optimum_export(hf_dir: str | Path, fp32_dir: str | Path, int8_dir: str | Path) -> dict:
    """Optimum's ONNX export of a transformers checkpoint, and its dynamic INT8 quantization.

    Exactly the documented path a user takes: `ORTModelForSequenceClassification.from_pretrained(
    ..., export=True)`, then `ORTQuantizer` with the `AutoQuantizationConfig` preset for the CPU.

    Returns:
        `{"fp32": path, "int8": path, "recipe": name}` (paths of the `.onnx` files).
    """
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer

    model = ORTModelForSequenceClassification.from_pretrained(str(hf_dir), export=True)
    model.save_pretrained(str(fp32_dir))
    recipe, qconfig = optimum_config(cpu_flags())
    quantizer = ORTQuantizer.from_pretrained(str(fp32_dir))
    quantizer.quantize(save_dir=str(int8_dir), quantization_config=qconfig)
    (int8,) = Path(int8_dir).glob("*.onnx")
    return {"fp32": str(Path(fp32_dir) / "model.onnx"), "int8": str(int8), "recipe": recipe}


def optimum_intel_export(
    hf_dir: str | Path, fp32_dir: str | Path, int8_dir: str | Path, calibration_texts: list[str]
) -> dict:
    """optimum-intel's OpenVINO export of a transformers checkpoint, and its static INT8.

    The documented path: `OVModelForSequenceClassification.from_pretrained(..., export=True)`,
    then `OVQuantizer.quantize` with `OVConfig(quantization_config=OVQuantizationConfig())` (its
    defaults: 8-bit, transformer model type). The calibration texts are tokenized with the
    checkpoint's own tokenizer and given as an `nncf.Dataset` (the hub datasets its examples
    download are unreachable here); the same training texts kerasft's NNCF export calibrates on.

    Returns:
        `{"fp32": path, "int8": path, "recipe": description}` (paths of the `.xml` files).
    """
    import nncf
    from optimum.intel import (
        OVConfig,
        OVModelForSequenceClassification,
        OVQuantizationConfig,
        OVQuantizer,
    )
    from transformers import AutoTokenizer

    model = OVModelForSequenceClassification.from_pretrained(str(hf_dir), export=True)
    model.save_pretrained(str(fp32_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    feeds = [dict(tokenizer(text, return_tensors="np")) for text in calibration_texts]
    quantizer = OVQuantizer.from_pretrained(model)
    quantizer.quantize(
        calibration_dataset=nncf.Dataset(feeds),
        ov_config=OVConfig(quantization_config=OVQuantizationConfig()),
        save_directory=str(int8_dir),
    )
    return {
        "fp32": str(Path(fp32_dir) / "openvino_model.xml"),
        "int8": str(Path(int8_dir) / "openvino_model.xml"),
        "recipe": f"OVQuantizer, OVQuantizationConfig() defaults, {len(feeds)} calibration texts",
    }
