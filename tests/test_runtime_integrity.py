"""Artifacts a device can trust: checksums, a pinned manifest, paths that stay inside; the gate."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from kerasft.exporters.dispatch import export
from kerasft.exporters.runtime import IntegrityError, load, sha256_file
from kerasft.exporters.verify import VerificationError, accuracy_drop, verify

TEXTS = ["the day was so good and great", "an awful sad grim movie"]


@pytest.fixture(scope="module")
def onnx_export(toy_export):
    return toy_export("onnx")


@pytest.fixture
def copy(onnx_export, tmp_path):
    """A fresh copy of the export to tamper with."""
    return shutil.copytree(onnx_export, tmp_path / "copy")


def _edit_manifest(export_dir, **changes):
    path = export_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest, indent=2))


def test_tampered_model_file_is_refused(copy):
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model.onnx has sha256 \w+, the manifest says \w+"):
        load(copy)


def test_missing_listed_file_is_refused(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(
        IntegrityError, match="tokenizer.json is listed in the manifest but missing"
    ):
        load(copy)


def test_pinned_manifest_detects_an_edit(copy):
    pinned = sha256_file(copy / "manifest.json")
    assert load(copy, manifest_sha256=pinned).predict(TEXTS).labels == ["pos", "neg"]
    _edit_manifest(copy, label_names=["pos", "neg"])  # every file's hash still matches
    assert load(copy).predict(TEXTS).labels == ["neg", "pos"]  # why a deployment pins
    with pytest.raises(IntegrityError, match=f"differs from the pinned manifest_sha256={pinned}"):
        load(copy, manifest_sha256=pinned)


@pytest.mark.parametrize("model_file", ["../x", "/etc/passwd", "sub/../../x"])
def test_model_file_outside_the_export_is_refused(copy, model_file):
    _edit_manifest(copy, model_file=model_file)
    with pytest.raises(IntegrityError, match=rf"model_file '{model_file}' is not a relative path"):
        load(copy)


def test_listed_path_outside_the_export_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    _edit_manifest(copy, files={**manifest["files"], "../../etc/passwd": "0" * 64})
    with pytest.raises(IntegrityError, match=r"file '../../etc/passwd' is not a relative path"):
        load(copy)


def test_symlink_that_leaves_the_export_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "model.onnx", outside)
    (copy / "model.onnx").unlink()
    os.symlink(outside, copy / "model.onnx")
    with pytest.raises(IntegrityError, match="resolves outside the export directory"):
        load(copy)


def test_unlisted_model_file_is_refused(copy):
    shutil.copy(copy / "model.onnx", copy / "other.onnx")
    _edit_manifest(copy, model_file="other.onnx")
    with pytest.raises(IntegrityError, match="'other.onnx' is not among the files the manifest"):
        load(copy)


def test_cli_predict_refuses_with_one_line(copy):
    pinned = sha256_file(copy / "manifest.json")
    _edit_manifest(copy, label_names=["pos", "neg"])
    cmd = [sys.executable, "-m", "kerasft", "predict", str(copy), "so good"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd + ["--manifest-sha256", pinned], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"kerasft predict: error: {copy / 'manifest.json'}: sha256 "
        f"{sha256_file(copy / 'manifest.json')} differs from the pinned manifest_sha256={pinned}; "
        "the manifest was edited or replaced. Refusing to load it."
    ]


@pytest.mark.slow
def test_cli_export_prints_the_manifest_hash(toy_runs, tmp_path):
    out = tmp_path / "e"
    cmd = [sys.executable, "-m", "kerasft", "export", str(toy_runs["jax"]), "--format",
           "openvino", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"manifest sha256 {sha256_file(out / 'manifest.json')}" in proc.stdout
    assert "Quantization parameters" not in proc.stderr


# --- the gate -------------------------------------------------------------------------------


def test_accuracy_drop_is_paired_with_a_confidence_interval():
    labels = np.array([1] * 100)
    reference = np.array([1] * 90 + [0] * 10)  # 90% right
    candidate = reference.copy()
    candidate[:4] = 0  # 4 texts only the reference gets right
    candidate[95:97] = 1  # 2 texts only the candidate gets right
    r = accuracy_drop(labels, reference, candidate)
    assert (r["reference"], r["export"]) == (0.90, 0.88)
    assert r["only_reference_right"] == 4 and r["only_export_right"] == 2
    assert r["drop"] == pytest.approx(0.02)
    se = np.sqrt(4 + 2 - 2**2 / 100) / 100
    assert r["drop_ci95"] == pytest.approx([0.02 - 1.96 * se, 0.02 + 1.96 * se])


class _FakeRuntime:
    def __init__(self, ids, logits):
        self.ids, self._logits = ids, logits

    def encode(self, texts):
        return {"token_ids": self.ids}

    def predict(self, texts, batch_size=32):
        class P:
            logits = self._logits

        return P


def test_gate_judges_agreement_and_held_out_accuracy():
    n = 400
    ids = np.ones((n, 4), dtype="int32")
    labels = np.array([0, 1] * (n // 2))
    keras = np.eye(2)[labels]  # fp32 is always right
    export_logits = keras.copy()
    export_logits[[1, 3]] = np.eye(2)[[0, 0]]  # 2 flips on held-out texts
    export_logits[range(201, 221, 2)] = np.eye(2)[[0] * 10]  # 10 on training texts: not counted
    splits = ["validation"] * 100 + ["test"] * 100 + ["train"] * 200
    r = verify(_FakeRuntime(ids, export_logits), ["t"] * n, ids, keras, True, labels, splits,
               max_accuracy_drop=0.02)  # fmt: skip
    assert r["passed"] and r["label_agreement"] == 198 / 200 and r["agreement_texts"] == 200
    assert r["label_agreement_all_splits"] == 388 / 400
    assert r["accuracy"]["texts"] == 200 and r["accuracy"]["drop"] == pytest.approx(0.01)
    assert set(r["per_batch_size"]) == {"1", "32"} and r["labels_changed_by_batch_size"] == 0
    # the default gate allows half a point
    with pytest.raises(VerificationError, match=r"loses 1.00 accuracy points on 200 held-out"):
        verify(_FakeRuntime(ids, export_logits), ["t"] * n, ids, keras, True, labels, splits)
    with pytest.raises(VerificationError, match=r"on 99.00% of 200 held-out texts \(2 differ\)"):
        verify(_FakeRuntime(ids, export_logits), ["t"] * n, ids, keras, True, labels, splits,
               min_agreement=0.995, max_accuracy_drop=0.02)  # fmt: skip


class _BatchDependentRuntime(_FakeRuntime):
    """Gives `logits_by_batch[batch_size]`: a recipe whose answers depend on the batch."""

    def __init__(self, ids, logits_by_batch):
        super().__init__(ids, None)
        self.by_batch, self.sizes = logits_by_batch, []

    def predict(self, texts, batch_size=32):
        self.sizes.append(batch_size)
        self._logits = self.by_batch[batch_size]
        return super().predict(texts, batch_size)


def test_a_batch_dependent_recipe_is_gated_at_its_worst_serving_batch_size():
    n = 400
    ids = np.ones((n, 4), dtype="int32")
    labels = np.array([0, 1] * (n // 2))
    keras = np.eye(2)[labels]
    at_32 = keras.copy()
    at_32[[200, 202, 204, 206, 208]] = np.eye(2)[[1, 1, 1, 1, 1]]  # 5 flips (98.75%), train rows
    served = {1: keras, 32: at_32}  # batch 1 agrees everywhere, batch 32 does not
    runtime = _BatchDependentRuntime(ids, served)
    with pytest.raises(VerificationError) as refused:
        verify(runtime, ["t"] * n, ids, keras, True, labels, batch_dependent=True)
    assert str(refused.value).startswith(
        "Quantized export agrees with the fp32 model on 98.75% of 400 texts (5 differ) served at "
        "batch size 32; at least 99.00% is required"
    )
    assert refused.value.report["per_batch_size"] == {
        "1": {"label_agreement": 1.0, "disagreements": 0, "label_agreement_all_splits": 1.0,
              "accuracy_drop": 0.0},
        "32": {"label_agreement": 0.9875, "disagreements": 5,
               "label_agreement_all_splits": 0.9875, "accuracy_drop": 0.0125},
    }  # fmt: skip
    assert refused.value.report["labels_changed_by_batch_size"] == 5
    assert sorted(set(runtime.sizes)) == [1, 32]
    # the same export passes when only batch 1 disagrees a little: the worst size decides
    at_1 = keras.copy()
    at_1[[200, 202]] = np.eye(2)[[1, 1]]
    report = verify(_BatchDependentRuntime(ids, {1: at_1, 32: keras}), ["t"] * n, ids, keras,
                    True, labels, batch_dependent=True, max_accuracy_drop=0.01)  # fmt: skip
    assert report["passed"] and report["label_agreement"] == 0.995
    assert report["batch_independent"] is False and "at batch sizes [1, 32]" in report["criterion"]


def test_gate_options_are_validated_up_front(toy_runs, tmp_path):
    with pytest.raises(ValueError, match=r"min_agreement must be a number in \[0, 1\]. Received: "
                                         r"min_agreement=99"):  # fmt: skip
        export(toy_runs["tensorflow"], tmp_path / "e", format="onnx", min_agreement=99)
    with pytest.raises(ValueError, match=r"precision must be one of \['f32', 'bf16'\]"):
        export(toy_runs["tensorflow"], tmp_path / "e", format="openvino", precision="int4")
    assert not (tmp_path / "e").exists()


def test_quantizer_log_lines_go_to_debug(caplog):
    from kerasft.exporters.onnx import quantizer_logs_to_debug

    # the logger's own level: `kerasft` CLI runs in this process set the "kerasft" tree to INFO
    with caplog.at_level(logging.DEBUG, logger="kerasft.exporters.onnx"), quantizer_logs_to_debug():
        # as onnxruntime.quantization does: the root logger, at INFO, from its own file
        record = logging.getLogger().makeRecord(
            "root", logging.INFO, "/x/onnxruntime/quantization/onnx_quantizer.py", 1,
            'Quantization parameters for tensor:"t" not specified', None, None,
        )  # fmt: skip
        logging.getLogger().handle(record)
    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("kerasft.exporters.onnx", logging.DEBUG)
    ]
    assert "onnxruntime: Quantization parameters" in caplog.records[0].getMessage()


@pytest.mark.parametrize("tokenizer_file", ["../tokenizer.json", "unlisted.json"])
def test_a_tokenizer_file_outside_or_unlisted_is_refused(copy, tokenizer_file):
    """A manifest may name its `tokenizers` file (a KerasHub preset keeps `tokenizer.json`
    for its own): it must be inside the export and listed with its sha256."""
    _edit_manifest(copy, tokenizer_file=tokenizer_file)
    with pytest.raises(IntegrityError, match="tokenizer_file"):
        load(copy)
