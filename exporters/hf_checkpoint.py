"""Hugging Face transformers export: a `DistilBertForSequenceClassification` checkpoint that
`AutoModelForSequenceClassification.from_pretrained(DIR)` and `pipeline("text-classification",
model=DIR)` load, and that serving engines and `optimum-cli` read.

`write_model` is the one home of the weight mapping (the inverse of KerasHub's DistilBERT
converter, plus the head: `pooled_dense` -> `pre_classifier`, `output_dense` -> `classifier`);
the benchmarks build their Hugging Face peers with it too. The export adds the tokenizer as
transformers loads it: kerasft's `tokenizer.json` (KerasHub's ids, verified with every export)
as a `PreTrainedTokenizerFast`, with `vocab.txt`, `tokenizer_config.json` and
`special_tokens_map.json`; `config.json` names the classes (`id2label` / `label2id`).

Example:
    >>> from transformers import pipeline
    >>> pipeline("text-classification", model="exports/sarcasm-hf")("area man wins argument")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kerasft.exporters.contract import FormatContract

CONTRACT = FormatContract(
    "transformers",
    "Hugging Face DistilBertForSequenceClassification: from_pretrained(DIR), pipeline(), optimum",
    graph_sources=("torch",),
    needs=("transformers", "safetensors"),
    checkpoint=True,
    extra="hub",
)
# the model card's library and use (`kerasft.exporters.model_card`)
CARD_LIBRARY = "transformers"
CARD_USE = (
    "from transformers import pipeline",
    'classify = pipeline("text-classification", model="path/to/this/dir")',
    'classify(["some text"])',
)
MODEL_FILE = "model.safetensors"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}  # fmt: skip
MAPPED_BACKBONES = ("DistilBertBackbone",)


def write(graph, out_dir: Path, *, classifier, label_names: list[str], **_) -> dict:
    """Writes `classifier` as a transformers checkpoint with its tokenizer configuration (the
    dispatcher adds `tokenizer.json` and `vocab.txt`).

    Args:
        graph: the serving graph (unused: the checkpoint is the classifier's weights).
        out_dir: the (temporary) export directory.
        classifier: the fine-tuned KerasHub `DistilBertTextClassifier`, float32.
        label_names: the class names, in class-id order.

    Returns:
        `{"model_file": "model.safetensors"}`.

    Raises:
        ValueError: a backbone the mapping does not cover.
    """
    out_dir = Path(out_dir)
    write_model(classifier, out_dir, label_names)
    sequence_length = classifier.preprocessor.sequence_length
    tokenizer = classifier.preprocessor.tokenizer
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": sequence_length,
              "do_lower_case": bool(tokenizer.lowercase), "padding_side": "right",
              "truncation_side": "right", "model_input_names": ["input_ids", "attention_mask"],
              **SPECIAL_TOKENS}  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    return {"model_file": MODEL_FILE}


def check(classifier) -> None:
    """Raises ValueError when the mapping does not cover `classifier`'s backbone."""
    kind = type(classifier.backbone).__name__
    if kind not in MAPPED_BACKBONES:
        raise ValueError(
            f"format 'transformers' maps {', '.join(MAPPED_BACKBONES)} weights to transformers; "
            f"this run's backbone is {kind}. Export it as keras_hub, onnx or openvino instead."
        )


def write_model(classifier, out_dir: str | Path, label_names: list[str]) -> Path:
    """Writes the classifier's weights as a `DistilBertForSequenceClassification` checkpoint
    (`config.json` with `id2label` / `label2id`, `model.safetensors`).

    Args:
        classifier: a KerasHub `DistilBertTextClassifier`.
        out_dir: the directory to write into.
        label_names: class names, in class-id order.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: a backbone the mapping does not cover, or a mapping that leaves a weight
            of either side unset.
    """
    import torch  # lazily: the format registry imports this module
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    check(classifier)
    b = classifier.backbone
    config = DistilBertConfig(
        vocab_size=b.vocabulary_size, max_position_embeddings=b.max_sequence_length,
        n_layers=b.num_layers, n_heads=b.num_heads, dim=b.hidden_dim,
        hidden_dim=b.intermediate_dim, activation="gelu", num_labels=classifier.num_classes,
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )  # fmt: skip
    model = DistilBertForSequenceClassification(config).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype="float32"))
             for k, v in _state_dict(classifier).items()}  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"Weight mapping incomplete: missing={missing}, unexpected={unexpected}")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _state_dict(classifier) -> dict[str, np.ndarray]:
    """transformers' parameter names -> the classifier's weights, laid out as torch's Linear."""
    b, h = classifier.backbone, classifier.backbone.hidden_dim

    def t(w):
        return np.asarray(w.numpy() if hasattr(w, "numpy") else w)

    emb = b.get_layer("token_and_position_embedding")
    sd = {
        "distilbert.embeddings.word_embeddings.weight": t(emb.token_embedding.embeddings),
        "distilbert.embeddings.position_embeddings.weight": t(
            emb.position_embedding.position_embeddings
        ),
        "distilbert.embeddings.LayerNorm.weight": t(b.embeddings_layer_norm.gamma),
        "distilbert.embeddings.LayerNorm.bias": t(b.embeddings_layer_norm.beta),
        "pre_classifier.weight": t(classifier.pooled_dense.kernel).T,
        "pre_classifier.bias": t(classifier.pooled_dense.bias),
        "classifier.weight": t(classifier.output_dense.kernel).T,
        "classifier.bias": t(classifier.output_dense.bias),
    }
    for i, layer in enumerate(b.transformer_layers):
        p = f"distilbert.transformer.layer.{i}."
        att = layer._self_attention_layer
        for ours, theirs in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin")):
            dense = getattr(att, f"{ours}_dense")
            sd[p + f"attention.{theirs}.weight"] = t(dense.kernel).reshape(h, h).T
            sd[p + f"attention.{theirs}.bias"] = t(dense.bias).reshape(h)
        sd[p + "attention.out_lin.weight"] = t(att.output_dense.kernel).reshape(h, h).T
        sd[p + "attention.out_lin.bias"] = t(att.output_dense.bias)
        for ours, theirs in (
            (layer._self_attention_layer_norm, "sa_layer_norm"),
            (layer._feedforward_layer_norm, "output_layer_norm"),
        ):
            sd[p + f"{theirs}.weight"] = t(ours.gamma)
            sd[p + f"{theirs}.bias"] = t(ours.beta)
        sd[p + "ffn.lin1.weight"] = t(layer._feedforward_intermediate_dense.kernel).T
        sd[p + "ffn.lin1.bias"] = t(layer._feedforward_intermediate_dense.bias)
        sd[p + "ffn.lin2.weight"] = t(layer._feedforward_output_dense.kernel).T
        sd[p + "ffn.lin2.bias"] = t(layer._feedforward_output_dense.bias)
    return sd
