"""The same `TwoStageFineTuner` API call on JAX, TensorFlow and PyTorch (one process each)."""

import pytest

from conftest import BACKENDS, ROOT, run_backend

TUNER_CODE = """
import json, os, sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft import TwoStageFineTuner
from kerasft.util.metrics import classification_metrics

texts, labels = toy_texts(256, seed=0)
val_texts, val_labels = toy_texts(64, seed=1)
names = np.array(["neg", "pos"])
tuner = TwoStageFineTuner(
    {preset!r}, sequence_length=32, warmup_epochs=2, warmup_learning_rate=1e-2,
    finetune_epochs=8, finetune_learning_rate=3e-3, batch_size=16, seed=3, verbose=0,
    bucket_width=16,  # toy texts are 6-16 tokens: one batch shape to compile
)
history = tuner.fit(texts, names[labels], validation_data=(val_texts, names[val_labels]))
proba = tuner.predict_proba(val_texts)
pred = tuner.predict(val_texts)
path = os.path.join({tmp!r}, "model.keras")
tuner.save(path)
loaded = TwoStageFineTuner.load(path)
# `score` of fit's validation rows reuses its last validation pass where fit trained in float32
# (the default trains in bfloat16 on CPUs that compute it): equal to predicting again
reused = tuner._validated is not None
float32 = tuner.recipe.mixed_precision is None  # `fit` resolved "auto"
scored = tuner.score(val_texts, names[val_labels])
predicted = classification_metrics(np.array(val_labels), proba.argmax(-1), 2)
evaluated = tuner.evaluate(val_texts, names[val_labels])
bias = tuner.model.output_dense.bias
bias.assign(np.array([1e4, -1e4], "float32"))  # other weights: every row predicted "neg"
changed = tuner.score(val_texts, names[val_labels])["confusion_matrix"]
onehot = np.eye(2)[labels]
again = TwoStageFineTuner({preset!r}, sequence_length=32, warmup_epochs=1, finetune_epochs=0,
                          batch_size=16, verbose=0)
again_history = again.fit(texts, onehot)
print(json.dumps({{
    "history": history.history,
    "label_names": tuner.label_names,
    "proba_shape": list(proba.shape),
    "proba_sums": np.round(proba.sum(1), 5).tolist(),
    "val_accuracy": float((pred == names[val_labels]).mean()),  # labels, as given to fit
    "evaluate": evaluated,
    "loaded_same": bool(np.allclose(loaded.predict_proba(val_texts), proba, atol=1e-5)),
    "loaded_labels": loaded.label_names,
    "trainable": tuner.model.backbone.trainable,
    "onehot_stages": again_history.history["stage"],
    "seconds": tuner.stage_seconds,
    "reused": reused,
    "float32": float32,
    "scored_as_predicted": scored == predicted,
    "changed": changed,
}}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_two_stage_fit_predict_save_load(backend, tiny_preset, tmp_path):
    code = TUNER_CODE.format(tests=str(ROOT / "tests"), preset=str(tiny_preset), tmp=str(tmp_path))
    r = run_backend(backend, code)
    h = r["history"]
    assert h["stage"] == [1] * 2 + [2] * 8
    assert len(h["loss"]) == len(h["val_accuracy"]) == 10
    assert h["loss"][-1] < h["loss"][0], h["loss"]
    assert r["val_accuracy"] >= 0.9, r
    assert r["label_names"] == ["neg", "pos"]
    assert r["proba_shape"] == [64, 2] and set(r["proba_sums"]) == {1.0}
    assert abs(r["evaluate"]["accuracy"] - r["val_accuracy"]) < 1e-6
    assert r["loaded_same"] and r["loaded_labels"] == ["neg", "pos"]
    assert r["trainable"] is True
    assert r["onehot_stages"] == [1]
    assert set(r["seconds"]) == {"warmup", "finetune"}
    assert r["reused"] == r["float32"] and r["scored_as_predicted"], r
    assert r["changed"] == [[32, 0], [32, 0]], r["changed"]  # not the kept scores


HEAD_CODE = """
import json
import keras
from kerasft.model.presets import load_classifier
from kerasft.training.recipe import initialize_head
clf = load_classifier({preset!r}, num_classes=3, sequence_length=16)
initialize_head(clf, seed=11)
kernel = keras.ops.convert_to_numpy(clf.output_dense.kernel).ravel()[:20]
bias = float(abs(keras.ops.convert_to_numpy(clf.output_dense.bias)).sum())
print(json.dumps({{"kernel": kernel.tolist(), "bias": bias}}))
"""


@pytest.mark.slow
def test_seeded_head_is_identical_on_every_backend(tiny_preset):
    results = [run_backend(b, HEAD_CODE.format(preset=str(tiny_preset))) for b in BACKENDS]
    assert results[0]["kernel"] == results[1]["kernel"] == results[2]["kernel"]
    assert max(abs(v) for v in results[0]["kernel"]) <= 0.04 and results[0]["bias"] == 0
    assert len(set(results[0]["kernel"])) == 20  # really drawn, not constant
