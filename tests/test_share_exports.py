"""Sharing a fine-tuned model the way its users' ecosystems do: a KerasHub preset that
`TextClassifier.from_preset` loads on every backend, and a transformers checkpoint that
`AutoModelForSequenceClassification` and `pipeline()` load; both verified like every export,
from a plain run and a LoRA run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKENDS, CLI_ENV, HAS_TENSORFLOW, fit_args, run_backend, shared_dir, toy_texts

TEXTS = toy_texts(12, seed=11)[0]
# The run's own logits for TEXTS, on the preprocessor-free model training and every export use.
REFERENCE = """
import json, numpy as np
from kerasft.tokens.batching import tokenize
from kerasft.training.recipe import core_model
from kerasft.training.tuner import load_tuner

texts = {texts!r}
tuner = load_tuner({run!r})
tokens = tokenize(tuner.model.preprocessor, texts)
ids = tokens.padded(np.arange(len(texts)), int(tokens.lengths.max()))
feed = {{"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}}
want = np.asarray(core_model(tuner.model).predict_on_batch(feed), dtype="float32")
"""
KERAS_HUB = (
    REFERENCE
    + """
import keras_hub
preset = keras_hub.models.TextClassifier.from_preset({export!r}, preprocessor=None)
got = np.asarray(preset.predict_on_batch(feed), dtype="float32")
names = json.load(open({export!r} + "/metadata.json"))["label_names"]
print(json.dumps({{"diff": float(np.abs(got - want).max()), "task": type(preset).__name__,
                  "same": bool((got.argmax(-1) == want.argmax(-1)).all()), "names": names,
                  "run_names": tuner.label_names}}))
"""
)
TRANSFORMERS = (
    REFERENCE
    + """
import torch
from transformers import AutoModelForSequenceClassification, pipeline
model = AutoModelForSequenceClassification.from_pretrained({export!r}).eval()
with torch.inference_mode():
    got = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(feed["padding_mask"]).long()).logits.numpy()
served = [r["label"] for r in pipeline("text-classification", model={export!r})(texts)]
print(json.dumps({{"diff": float(np.abs(got - want).max()), "served": served,
                  "want": [tuner.label_names[i] for i in want.argmax(-1)]}}))
"""
)
OFFLINE = {"HF_HUB_OFFLINE": "1", "USE_TF": "0", "TRANSFORMERS_OFFLINE": "1"}


def _kerasft(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kerasft", *map(str, args)], capture_output=True,
                          text=True, env=CLI_ENV, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="session")
def lora_run(tiny_preset, toy_data, tmp_path_factory):
    """A finished PyTorch LoRA toy run (its `model.keras` holds the merged weights)."""

    def build(directory: Path) -> None:
        args = fit_args("torch", tiny_preset, toy_data, directory / "lora", 1, 2)
        args += ["--finetune-method", "lora", "--lora-rank", "4"]
        proc = subprocess.run(args, capture_output=True, text=True, env=CLI_ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    return shared_dir(tmp_path_factory, "lora_run", build) / "lora"


@pytest.fixture(scope="session")
def shared(toy_runs, lora_run, tmp_path_factory):
    """`{(run, format): export}` for the plain TensorFlow toy run and the LoRA run, exported by
    the CLI once per test run (read them, never change them)."""
    runs = {"plain": toy_runs["tensorflow"], "lora": lora_run}

    def build(directory: Path) -> None:
        for name, run in runs.items():
            for fmt in ("keras_hub", "transformers"):
                proc = _kerasft(
                    "export", run, "--format", fmt, "--out", directory / f"{name}-{fmt}"
                )
                assert proc.returncode == 0, proc.stderr[-4000:]

    root = shared_dir(tmp_path_factory, "shared_exports", build)
    return {(name, fmt): (runs[name], root / f"{name}-{fmt}")
            for name in runs for fmt in ("keras_hub", "transformers")}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "lora"])
def test_keras_hub_preset_loads_on_every_backend(shared, name):
    run, export = shared[name, "keras_hub"]
    manifest = json.loads((export / "manifest.json").read_text())
    check = manifest["verification"]
    assert (
        check["passed"]
        and check["max_abs_logit_diff"] <= 1e-4
        and check["tokenizer_mismatches"] == 0
    )
    for backend in BACKENDS:  # (those installed: the TensorFlow-free environment has two)
        out = run_backend(backend, KERAS_HUB.format(texts=TEXTS, run=str(run), export=str(export)))
        assert out["task"] == "DistilBertTextClassifier", (backend, out)
        assert out["diff"] <= 1e-4 and out["same"], (backend, out)
        assert out["names"] == out["run_names"], (backend, out)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "lora"])
def test_transformers_checkpoint_loads_and_serves_the_label_names(shared, name):
    run, export = shared[name, "transformers"]
    manifest = json.loads((export / "manifest.json").read_text())
    check = manifest["verification"]
    assert check["passed"] and check["max_abs_logit_diff"] <= 1e-4
    assert check["transformers_tokenizer_mismatches"] == 0, check
    config = json.loads((export / "config.json").read_text())
    assert list(config["id2label"].values()) == manifest["label_names"]
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (export / name).is_file(), name
    code = TRANSFORMERS.format(texts=TEXTS, run=str(run), export=str(export))
    out = run_backend("torch", code, env=OFFLINE)
    assert out["diff"] <= 1e-4, out
    assert out["served"] == out["want"], out  # pipeline(): the run's label names, its labels


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras_hub", "transformers"])
def test_predict_serves_both_formats(shared, fmt):
    run, export = shared["plain", fmt]
    proc = _kerasft("predict", export, "--json", *TEXTS[:3])
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = [row["label"] for row in json.loads(proc.stdout)]
    proc = _kerasft("predict", run, "--json", *TEXTS[:3])
    assert served == [row["label"] for row in json.loads(proc.stdout)]


@pytest.mark.slow
def test_a_tampered_checkpoint_is_refused_at_predict(shared, tmp_path):
    import shutil

    _, export = shared["plain", "transformers"]
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    proc = _kerasft("predict", copy, "hello")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "model.safetensors has sha256" in errors[0] and "Refusing to load it" in errors[0]


@pytest.mark.slow
def test_an_existing_out_is_refused(toy_runs, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = _kerasft("export", toy_runs["torch"], "--format", "keras_hub", "--out", tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "exists and is not empty. Pass --overwrite" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras_hub", "transformers"])
def test_label_names_that_collide_as_strings_are_refused(toy_runs, tmp_path, fmt):
    """Label names a Python program gave (1 and "1") that one export file could not tell
    apart: refused before anything is written."""
    from kerasft.exporters.dispatch import export
    from kerasft.training.tuner import TwoStageFineTuner

    tuner = TwoStageFineTuner.load(toy_runs["torch"] / "model.keras")
    tuner.label_names = [1, "1"]
    with pytest.raises(
        ValueError, match=r"Label names must stay distinct as strings: \{'1': \[1, '1'\]\}"
    ):
        export(tuner, tmp_path / "out", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_a_backbone_the_mapping_does_not_cover_is_refused(tmp_path):
    """The transformers mapping covers DistilBERT; another backbone is named, with the formats
    that take it, before any work."""
    from types import SimpleNamespace

    from kerasft.exporters import hf_checkpoint

    class BertBackbone:  # what the check reads: the backbone's class
        pass

    with pytest.raises(ValueError, match=r"maps DistilBertBackbone .* backbone is BertBackbone"):
        hf_checkpoint.check(SimpleNamespace(backbone=BertBackbone()))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORFLOW, reason="builds a BERT classifier's preset with KerasHub")
def test_the_cli_refuses_an_unmapped_backbone_in_one_line(tiny_preset, tmp_path):
    """A `.keras` of a KerasHub BERT classifier (not DistilBERT): one line, exit 2, no
    directory."""
    code = f"""
import json, keras_hub
from kerasft.training.tuner import TwoStageFineTuner
vocab = [l.strip() for l in open({str(tiny_preset / "assets/tokenizer/vocabulary.txt")!r})]
backbone = keras_hub.models.BertBackbone(vocabulary_size=len(vocab), num_layers=1, num_heads=1,
                                         hidden_dim=8, intermediate_dim=16, max_sequence_length=32)
pre = keras_hub.models.BertTextClassifierPreprocessor(
    keras_hub.models.BertTokenizer(vocabulary=vocab), sequence_length=32)
tuner = TwoStageFineTuner(verbose=0)
tuner.model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=pre)
tuner.label_names = ["neg", "pos"]
tuner.save({str(tmp_path / "bert.keras")!r})
print(json.dumps({{}}))
"""
    run_backend("tensorflow", code)
    before = set(tmp_path.iterdir())
    proc = _kerasft("export", tmp_path / "bert.keras", "--format", "transformers", "--out",
                    tmp_path / "hf")  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "backbone is BertBackbone" in errors[0], errors
    assert set(tmp_path.iterdir()) == before
    assert os.path.exists(tmp_path / "bert.keras")
