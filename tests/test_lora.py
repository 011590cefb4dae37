"""LoRA as the stage-2 method: what trains, the merged model, the adapter file, the export."""

import json

import pytest

from conftest import BACKENDS, ROOT, run_backend
from kerasft.training.config import RecipeConfig

LORA_CODE = """
import json, sys
import keras
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft import TwoStageFineTuner
from kerasft.model.lora import adapted_layers
from kerasft.training.tuner import load_adapter

class Snapshot(keras.callbacks.Callback):
    # the classifier's variables when each stage starts (callbacks see the whole classifier)
    def on_train_begin(self, logs=None):
        self.weights = {{v.path: keras.ops.convert_to_numpy(v).copy() for v in self.model.weights}}

texts, labels = toy_texts(128, seed=9)
snap = Snapshot()
tuner = TwoStageFineTuner({preset!r}, sequence_length=32, warmup_epochs=1, finetune_epochs=3,
                          finetune_learning_rate=1e-2, batch_size=16, seed=2, verbose=0,
                          finetune_method="lora", lora_rank=4, callbacks=[snap],
                          mixed_precision=None)  # merged vs adapter at 1e-5: float32 compute
tuner.fit(texts, labels)
lora_model = tuner.adapter_model
after = {{v.path: keras.ops.convert_to_numpy(v) for v in lora_model.weights}}
changed = sorted(p for p, w in snap.weights.items() if not np.array_equal(w, after[p]))
unchanged = sorted(p for p, w in snap.weights.items() if np.array_equal(w, after[p]))
layers = adapted_layers(lora_model)
factors = [v for la in layers for v in (la.lora_kernel_a, la.lora_kernel_b)]
lora_size = sum(int(np.prod(v.shape)) for v in factors)
head_size = sum(int(np.prod(v.shape)) for la in (lora_model.pooled_dense, lora_model.output_dense)
                for v in la.weights)
probe = texts[:16]
merged = keras.ops.convert_to_numpy(tuner.model.predict(probe, verbose=0))
adapter = keras.ops.convert_to_numpy(lora_model.predict(probe, verbose=0))
tuner.save_adapter({tmp!r} + "/adapter")
again = load_adapter({tmp!r} + "/adapter")
reloaded = keras.ops.convert_to_numpy(again.model.predict(probe, verbose=0))
print(json.dumps({{
    "changed": changed, "unchanged": unchanged, "adapted": [la.path for la in layers],
    "parameters": tuner.parameters, "lora_size": lora_size, "head_size": head_size,
    "merged_vs_adapter": float(np.abs(merged - adapter).max()),
    "reloaded_vs_adapter": float(np.abs(reloaded - adapter).max()),
    "merged_has_lora": bool(adapted_layers(tuner.model)),
    "labels": again.label_names, "loss": tuner.history.history["loss"],
}}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_lora_stage_2_trains_only_adapters_and_head(backend, tiny_preset, tmp_path):
    code = LORA_CODE.format(tests=str(ROOT / "tests"), preset=str(tiny_preset), tmp=str(tmp_path))
    r = run_backend(backend, code)
    assert len(r["adapted"]) == 4  # query and value of 2 layers
    # Everything that changed in stage 2 is an adapter factor or the head...
    for path in r["changed"]:
        assert "lora_kernel" in path or path.split("/")[0] in ("pooled_dense", "logits"), path
    assert any("lora_kernel_b" in p for p in r["changed"]), r["changed"]
    assert any(p.startswith("logits/") for p in r["changed"]), r["changed"]
    # ...and every base weight of the backbone stayed bit-identical.
    base = [p for p in r["unchanged"] if "lora" not in p]
    assert any("query" in p and p.endswith("kernel") for p in base), base
    assert r["parameters"]["trainable"] == r["lora_size"] + r["head_size"]
    assert r["parameters"]["total"] > 5 * r["parameters"]["trainable"]
    assert r["merged_vs_adapter"] <= 1e-5 and not r["merged_has_lora"]
    assert r["reloaded_vs_adapter"] <= 1e-5 and r["labels"] == ["0", "1"]
    assert r["loss"][-1] < r["loss"][1]


def test_lora_options_are_validated():
    with pytest.raises(ValueError, match="finetune_method must be one of"):
        RecipeConfig(finetune_method="qlora")
    with pytest.raises(ValueError, match=r"lora_rank must be an int in \[1, 1024\]"):
        RecipeConfig(lora_rank=0)
    with pytest.raises(ValueError, match="lora_targets must be a non-empty list"):
        RecipeConfig(lora_targets=[])


def test_unknown_lora_targets_are_named(tiny_preset):
    from kerasft.model.lora import enable_lora
    from kerasft.model.presets import load_classifier

    clf = load_classifier(str(tiny_preset), 2, 32)
    with pytest.raises(ValueError, match=r"lora_targets \['qkv'\] name no layer.*'query'"):
        enable_lora(clf, 4, targets=["qkv"])


@pytest.mark.slow
def test_lora_run_exports_to_onnx_int8_and_verifies(tiny_preset, toy_data, tmp_path):
    from conftest import fit_args
    from kerasft.cli import main

    args = fit_args("tensorflow", tiny_preset, toy_data, tmp_path / "run", 1, 4)[3:]
    assert main(args + ["--finetune-method", "lora", "--lora-rank", "4"]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert 0 < metrics["adapter_bytes"] < (run / "model.keras").stat().st_size
    out = tmp_path / "onnx-int8"
    assert (
        main(["export", str(run), "--format", "onnx", "--int8", "dynamic", "--out", str(out)]) == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["quantization"] == "int8-dynamic"
    # --int8 auto: the merged LoRA kernels are what the PyTorch graph reads, so attention still
    # fuses (onnxruntime's, found by its weights; OpenVINO's own) and the chosen recipe passes
    for fmt in ("onnx", "openvino"):
        out = tmp_path / f"{fmt}-auto"
        assert main(["export", str(run), "--format", fmt, "--int8", "auto", "--out", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["verification"]["passed"] and manifest["int8_auto"]["chosen"]
        fused = "ScaledDotProductAttention" if fmt == "openvino" else "Attention"
        assert manifest["fusions"][fused] == 2
