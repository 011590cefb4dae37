"""Preset resolution, the BERT -> DistilBERT mapping, and the offline preset's exactness."""

import json

import numpy as np
import pytest

from conftest import BACKENDS, ROOT, run_backend
from kerasft.model.presets import bert_to_distilbert, resolve_preset


def tiny_bert(layers=2, hidden=4, vocab=7, positions=5):
    rng = np.random.default_rng(0)
    t = {
        "embeddings.word_embeddings.weight": rng.normal(size=(vocab, hidden)),
        "embeddings.position_embeddings.weight": rng.normal(size=(positions, hidden)),
        "embeddings.token_type_embeddings.weight": rng.normal(size=(2, hidden)),
        "embeddings.LayerNorm.weight": rng.normal(size=hidden),
        "embeddings.LayerNorm.bias": rng.normal(size=hidden),
        "pooler.dense.weight": rng.normal(size=(hidden, hidden)),
    }
    for i in range(layers):
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ):
            t[f"encoder.layer.{i}.{name}.weight"] = rng.normal(size=(hidden, hidden))
            t[f"encoder.layer.{i}.{name}.bias"] = rng.normal(size=hidden)
    config = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "vocab_size": vocab,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "hidden_size": hidden,
        "intermediate_size": hidden,
        "max_position_embeddings": positions,
    }
    return t, config


def test_mapping_folds_token_type_row_zero_and_drops_pooler():
    t, config = tiny_bert()
    out, dconfig = bert_to_distilbert(t, config)
    np.testing.assert_array_equal(
        out["distilbert.embeddings.position_embeddings.weight"],
        t["embeddings.position_embeddings.weight"]
        + t["embeddings.token_type_embeddings.weight"][0],
    )
    np.testing.assert_array_equal(
        out["distilbert.transformer.layer.1.ffn.lin2.weight"],
        t["encoder.layer.1.output.dense.weight"],
    )
    # Every BERT tensor but the token-type table and the pooler maps to exactly one target.
    assert len(out) == len(t) - 2
    assert dconfig["model_type"] == "distilbert" and dconfig["n_layers"] == 2


def test_mapping_rejects_other_models():
    t, config = tiny_bert()
    with pytest.raises(
        ValueError, match="Expected a BERT checkpoint. Received: model_type='roberta'"
    ):
        bert_to_distilbert(t, {**config, "model_type": "roberta"})
    del t["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match="'encoder.layer.1.output.dense.bias' is missing"):
        bert_to_distilbert(t, config)


def test_resolve_preset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Preset directory not found"):
        resolve_preset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_preset(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        resolve_preset(str(tmp_path))
    assert resolve_preset("distil_bert_base_en_uncased") == "distil_bert_base_en_uncased"


EXACTNESS_CODE = """
import json, sys
import keras, numpy as np
from safetensors.numpy import load_file
sys.path.insert(0, {tests!r})
from numpy_bert import bert_forward
from kerasft.model.presets import load_classifier, minilm_source_dir

texts = [
    "thirtysomething scientists unveil doomsday clock of hair loss",
    "dem rep. totally nails why congress is falling short on gender, racial and economic equality",
    "eat your veggies: 9 deliciously different recipes",
    "mother comes pretty close to using word 'streaming' correctly",
]
clf = load_classifier("all_minilm_l6_v2", num_classes=2, sequence_length=64)
x = clf.preprocessor(texts)
hidden = keras.ops.convert_to_numpy(clf.backbone(x))
ids = keras.ops.convert_to_numpy(x["token_ids"])
mask = keras.ops.convert_to_numpy(x["padding_mask"]).astype(bool)
src = minilm_source_dir()
tensors = load_file(str(src / "model.safetensors"))
config = json.loads((src / "config.json").read_text())
diffs = [float(np.abs(bert_forward(tensors, config, ids[i][mask[i]]) - hidden[i][mask[i]]).max())
         for i in range(len(texts))]
print(json.dumps({{"max_diff": max(diffs), "lengths": mask.sum(1).tolist(),
                   "sequence_length": clf.preprocessor.sequence_length}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_offline_preset_equals_numpy_bert(backend, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "kerasft-cache"  # shared: converted once per session
    r = run_backend(
        backend, EXACTNESS_CODE.format(tests=str(ROOT / "tests")), env={"KERASFT_CACHE": str(cache)}
    )
    assert r["sequence_length"] == 64
    assert min(r["lengths"]) > 5
    assert r["max_diff"] <= 1e-4, r


def test_unreachable_remote_preset_suggests_offline(monkeypatch):
    import keras_hub

    from kerasft.model.presets import load_classifier

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(
        keras_hub.models.DistilBertTextClassifierPreprocessor, "from_preset", offline
    )
    with pytest.raises(RuntimeError, match="use the offline preset: preset='all_minilm_l6_v2'"):
        load_classifier("distil_bert_base_en_uncased")


def test_api_and_cli_default_to_the_same_offline_preset():
    from kerasft import TwoStageFineTuner
    from kerasft.cli.parser import build_parser
    from kerasft.model.presets import OFFLINE_PRESET

    cli_default = build_parser().parse_args(["fit"]).preset
    assert TwoStageFineTuner().preset == cli_default == OFFLINE_PRESET
