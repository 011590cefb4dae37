"""Exports from models trained on every backend, verified; runtime isolation; atomic writes."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import PurePosixPath

import numpy as np
import pytest

from conftest import BACKENDS, ROOT, ir_ops
from kerasft.exporters.dispatch import export
from kerasft.exporters.formats import FORMATS, check_format
from kerasft.exporters.runtime import load, verify_checksums

# fp32 of every format from a run of every backend; each reduced-precision recipe from one
# backend's run, the backends taking turns: the `.keras` file is backend-neutral and each format
# is traced under its own graph source, so the training backend changes only the weights (and
# test_tf_free exports JAX and PyTorch runs with `--int8 auto` too).
MATRIX = [(fmt, None, backend) for fmt in FORMATS for backend in BACKENDS] + [
    ("saved_model", "keras", "tensorflow"),
    ("onnx", "calibrated", "jax"),
    ("onnx", "dynamic", "torch"),
    ("onnx", "static", "tensorflow"),
    ("onnx", "auto", "torch"),
    ("openvino", "nncf", "jax"),
    ("openvino", "qdq", "torch"),
    ("openvino", "auto", "tensorflow"),
    ("litert", "dynamic", "jax"),
]


def _assert_batch_independent(out, check: dict, run) -> None:
    """ONNX calibrated and static and OpenVINO NNCF INT8 calibrate their ranges once: a text's
    logits are the same served alone and inside a padded batch, and verification (at batch 1
    and 32, the worst deciding) says so."""
    from kerasft.runs.rundir import run_splits

    assert check["label_agreement"] == min(
        r["label_agreement"] for r in check["per_batch_size"].values()
    )
    assert check["batch_independent"] is True and check["labels_changed_by_batch_size"] == 0
    texts = run_splits(run)[2].texts[:40]
    served = load(out)
    alone = np.concatenate([served.predict([t]).logits for t in texts])
    batched = served.predict(texts, batch_size=len(texts)).logits
    np.testing.assert_allclose(alone, batched, atol=1e-4)


def test_format_checked_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"Unrecognized format='tflite'. Supported formats are"):
        check_format("tflite", None)
    with pytest.raises(ValueError, match=r"format='onnx' does not support quantize='keras'"):
        export(tmp_path / "missing-run", tmp_path / "out", format="onnx", quantize="keras")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("format, quantize, backend", MATRIX)
@pytest.mark.slow
def test_export_matrix(format, quantize, backend, toy_runs, tmp_path):
    run = toy_runs[backend]
    assert json.loads((run / "metrics.json").read_text())["test"]["accuracy"] >= 0.9
    out = export(run, tmp_path / "export", format=format, quantize=quantize)
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["verification"]
    # Every split verifies: 400 toy rows -> train 240 (120 of them calibrate), validation 80,
    # test 80; the accuracy drop is measured on the 160 held-out texts.
    assert check["passed"] and check["tokenizer_mismatches"] == 0
    assert check["texts_per_split"] == {"test": 80, "train": 120, "validation": 80}
    assert check["accuracy"]["texts"] == 160 and check["accuracy"]["reference"] >= 0.9
    # fp32 (or auto, where no INT8 recipe is faster); OpenVINO's bf16 inference precision, which
    # `auto` may pick on a bf16 CPU, is judged by the INT8 gate like a quantized recipe
    full_precision = manifest.get("inference_precision") in (None, "f32")
    if manifest["quantization"] is None and full_precision:
        assert check["max_abs_logit_diff"] <= 1e-4 and check["label_agreement"] == 1.0
        assert check["accuracy"]["drop"] == 0.0
    else:  # judged on the held-out texts, at batch 1 and 32
        assert check["agreement_texts"] == 160 and set(check["per_batch_size"]) == {"1", "32"}
        assert check["label_agreement"] >= 0.99 and check["accuracy"]["drop"] <= 0.005
    if quantize in ("calibrated", "static", "nncf"):  # ranges calibrated once, at export
        _assert_batch_independent(out, check, run)
    if (format, quantize) == ("onnx", "dynamic"):  # ranges from each call's own batch
        assert check["batch_independent"] is False
    if quantize == "auto":  # every candidate timed here, the fastest that passed kept
        auto = manifest["int8_auto"]
        assert auto["chosen"]["mode"] == (manifest["quantization"] or "fp32").removeprefix("int8-")
        assert {c["mode"] for c in auto["candidates"]} <= {*FORMATS[format].int8, "fp32"}
        assert all(c["p50_ms"]["1"] > 0 and c["p50_ms"]["32"] > 0 for c in auto["candidates"])
        assert check.get("labels_changed_by_batch_size", 0) == 0  # batch-independent only
    assert manifest["graph_source"] == FORMATS[format].default_source
    assert manifest["source_backend"] == backend
    assert manifest["label_names"] == ["neg", "pos"] and manifest["sequence_length"] == 32
    tokenizer = PurePosixPath(manifest["tokenizer_file"])  # serving/ in a KerasHub preset
    assert {str(tokenizer), str(tokenizer.parent / "vocab.txt"), "README.md"} <= set(
        manifest["files"]
    )
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name:") and "model-index:" in card
    assert f"exported by kerasft as **{format} {manifest['quantization'] or 'fp32'}**" in card
    assert manifest["latency"]["batch"] == 1 and manifest["latency"]["p50_ms"] > 0
    if format == "onnx":  # attention, GELU and LayerNorm run as onnxruntime's fused ops
        fusions = manifest["fusions"]
        assert fusions["Attention"] == 2
        assert fusions.get("Gelu", 0) + fusions.get("BiasGelu", 0) == 2
        assert fusions["LayerNormalization"] == 5  # embeddings + 2 per layer
        ops = _session_ops(out / manifest["model_file"], tmp_path / "session.onnx")
        assert ops["SkipLayerNormalization"] == 0  # slower on CPU, kept out (residual_add_to_sum)
        assert ops["Reshape"] == 0  # no reshapes around the Dense layers
        # the last layer runs at [CLS] alone (queries != keys): MultiHeadAttention
        assert ops["QAttention"] + ops["Attention"] == 1 and ops["MultiHeadAttention"] == 1
        assert ops["Softmax"] == 0
        integer = manifest["quantization"] in ("int8-dynamic", "int8-calibrated")
        kept = {k["node"] for k in manifest.get("kept_fp32") or []}
        kept_attention = sum(bool(re.fullmatch(r"kerasft_attention_\d+", n)) for n in kept)
        assert ops["QAttention"] == (1 - kept_attention if integer else 0)
        if manifest["quantization"] == "int8-calibrated":  # constant ranges, integer kernels
            assert ops["DynamicQuantizeLinear"] == 0 and ops["MatMulInteger"] == 0
            assert ops["MatMulIntegerToFloat"] >= 1  # fewer where nodes stay in fp32
    if format == "openvino":
        assert manifest["model_file"] == "model.xml" and "model.bin" in manifest["files"]
        # `auto` may pick bf16 on a CPU that computes it (timed against f32 there)
        allowed = ("f32", "bf16") if quantize == "auto" else ("f32",)
        assert manifest["inference_precision"] in allowed
        if manifest["quantization"] != "int8-qdq":  # QDQ: the table is INT8, no constant shape
            assert manifest["fusions"]["ShapeOf (constant, folded)"] == 1  # no 2nd fp32 copy
        if quantize == "nncf":  # NNCF's plain recipe passes here; accuracy control: fallback
            assert manifest["quantization_recipe"].startswith("nncf.quantize (")
        ops = ir_ops(out / "model.xml")  # OpenVINO's fused attention kernel, one per layer
        # qdq reads onnxruntime's fused graph: OpenVINO breaks `Attention` into a Softmax but
        # keeps the [CLS] layer's `MultiHeadAttention` fused
        fused = manifest["quantization"] != "int8-qdq"
        assert ops["ScaledDotProductAttention"] == (2 if fused else 1)
        assert ops["Softmax"] == (0 if fused else 1) and ops["Einsum"] == 0
        if fused:  # kerasft's passes on the graph OpenVINO reads (`onnx_graph`)
            fusions = manifest["fusions"]
            assert fusions["Add (bias before the head split)"] == 6  # Q, K, V x 2 layers
            assert fusions["Where (index wrap dropped)"] == 1 and fusions["Expand (dropped)"] == 1
            assert ops["Broadcast"] == 0 and ops["Less"] == 0
    verify_checksums(out)
    result = load(out).predict(["the day was so good and great", "an awful sad grim movie"])
    assert result.labels == ["pos", "neg"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _session_ops(model_file, optimized_file):
    """Operator counts of the graph onnxruntime runs, after its load-time fusions."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized_file)
    ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(optimized_file)).graph.node)


RUNTIME_ONLY = """
import json, sys
BLOCKED = {"keras", "keras_hub", "tensorflow", "jax", "torch"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
from kerasft.exporters.runtime import load
result = load(sys.argv[1]).predict(["the day was so good and great", "an awful sad grim movie"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"labels": result.labels, "loaded": loaded}))
"""


@pytest.mark.parametrize("format, quantize", [("onnx", "dynamic"), ("openvino", "nncf")])
@pytest.mark.slow
def test_runtime_runs_without_keras_tf_jax_torch(format, quantize, toy_runs, tmp_path):
    out = export(toy_runs["torch"], tmp_path / format, format=format, quantize=quantize)
    proc = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY, str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"labels": ["pos", "neg"], "loaded": []}


def test_export_twice_refuses_then_overwrites(toy_runs, tmp_path):
    out = export(toy_runs["tensorflow"], tmp_path / "e", format="onnx")
    before = (out / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="exists and is not empty. Pass --overwrite"):
        export(toy_runs["tensorflow"], out, format="onnx")
    assert (out / "manifest.json").read_text() == before
    export(toy_runs["jax"], out, format="onnx", overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["source_backend"] == "jax"
    verify_checksums(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


# `kerasft export` with its verification step replaced by SIGKILL: the process dies after the
# new artifact is written (in its temporary directory) and before it would be published.
KILLED_BEFORE_PUBLISH = """
import os, signal, sys
from kerasft.exporters import dispatch
dispatch._verify = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from kerasft.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_killed_export_never_leaves_a_broken_artifact(toy_runs, tmp_path):
    target = tmp_path / "e"
    export(toy_runs["tensorflow"], target, format="onnx")
    good = (target / "manifest.json").read_text()
    cmd = [sys.executable, "-c", KILLED_BEFORE_PUBLISH, "export", str(toy_runs["jax"])]
    cmd += ["--format", "onnx", "--out", str(target), "--overwrite"]
    # PyTorch: ONNX is traced in the CLI's own process, where `_verify` is replaced
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "torch"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith(".e.tmp-")]
    assert (work / "model.onnx").is_file()  # killed with the new artifact written, unpublished
    # The target is still the previous, complete, verified export.
    assert (target / "manifest.json").read_text() == good
    verify_checksums(target)
    assert load(target).predict(["so good"]).labels == ["pos"]
    # the next export takes over the dead writer's lock and removes its leftovers
    export(toy_runs["jax"], target, format="onnx", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


IN_MEMORY_CODE = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft.exporters import export
from kerasft import TwoStageFineTuner

texts, labels = toy_texts(96, seed=2)
tuner = TwoStageFineTuner({preset!r}, sequence_length=32, warmup_epochs=1, finetune_epochs=1,
                          batch_size=16, bucket_width=16, verbose=0)  # one shape to compile
tuner.fit(texts, labels)
before = tuner.predict_proba(texts[:8])
out = export(tuner, {out!r}, format={fmt!r}, quantize={quantize!r}, texts=texts[:40])
manifest = json.loads((out / "manifest.json").read_text())
print(json.dumps({{
    "backend": manifest["source_backend"], "passed": manifest["verification"]["passed"],
    "unchanged": bool(np.array_equal(before, tuner.predict_proba(texts[:8]))),
}}))
"""


@pytest.mark.parametrize(
    "backend, fmt, quantize", [("jax", "onnx", None), ("tensorflow", "saved_model", "keras")]
)
@pytest.mark.slow
def test_export_in_memory_tuner(backend, fmt, quantize, tiny_preset, tmp_path):
    from conftest import run_backend

    code = IN_MEMORY_CODE.format(
        tests=str(ROOT / "tests"), preset=str(tiny_preset), out=str(tmp_path / "e"),
        fmt=fmt, quantize=quantize,
    )  # fmt: skip
    r = run_backend(backend, code)
    # From JAX the export re-runs under TensorFlow; Keras INT8 never touches the caller's model.
    assert r == {"backend": backend, "passed": True, "unchanged": True}


def test_fixed_shape_export_pads_every_call(toy_runs, tmp_path):
    import onnxruntime as ort

    out = export(toy_runs["torch"], tmp_path / "e", format="onnx", quantize="dynamic",
                 fixed_shape=(4, 16))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_shape"] == [4, 16] and manifest["verification"]["passed"]
    session = ort.InferenceSession(str(out / manifest["model_file"]))
    assert [i.shape for i in session.get_inputs()] == [[4, 16], [4, 16]]
    texts = ["the day was so good and great", "an awful sad grim movie", "good", "bad", "nice"]
    assert load(out).predict(texts).labels == ["pos", "neg", "pos", "neg", "pos"]  # 4 + 1 (filled)
    with pytest.raises(ValueError, match=r"Received: fixed_shape=\(1, 1000\)"):
        export(toy_runs["torch"], tmp_path / "bad", format="onnx", fixed_shape=(1, 1000))
    assert not (tmp_path / "bad").exists()


def test_onnx_int8_keeps_the_most_sensitive_nodes_in_fp32(toy_runs, tmp_path):
    import onnx

    from kerasft.exporters.onnx import quantizable_nodes

    out = export(toy_runs["tensorflow"], tmp_path / "e", format="onnx", quantize="dynamic",
                 keep_fp32=3)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["kept_fp32"]
    scores = [k["mean_abs_logit_diff"] for k in kept]
    assert len(kept) == 3 and scores == sorted(scores, reverse=True) and scores[0] > 0
    assert "3 most sensitive nodes kept in fp32" in manifest["quantization_recipe"]
    # The kept nodes are the only fp32 nodes left that dynamic INT8 would quantize.
    int8 = onnx.load(str(out / manifest["model_file"]))
    assert set(quantizable_nodes(int8)) == {k["node"] for k in kept}
    with pytest.raises(ValueError, match=r"keep_fp32 must be an int >= 0 and applies to"):
        export(toy_runs["tensorflow"], tmp_path / "x", format="openvino", keep_fp32=2)


@pytest.mark.slow
def test_nncf_falls_back_to_accuracy_control_when_the_plain_recipe_misses(
    toy_runs, tmp_path, monkeypatch
):
    import openvino as ov
    import openvino.opset13 as ops

    from kerasft.exporters import openvino as ov_export

    plain = ov_export.quantize_nncf

    def broken(model, calibration):  # the plain recipe's model with its logits negated
        model = plain(model, calibration)
        logits = model.get_results()[0].input_value(0)
        return ov.Model([ops.result(ops.negative(logits))], model.get_parameters())

    monkeypatch.setattr(ov_export, "quantize_nncf", broken)
    # traced in this (TensorFlow-backend) process, so that the patch applies
    out = export(toy_runs["tensorflow"], tmp_path / "e", format="openvino", quantize="nncf",
                 graph_source="tensorflow")  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization_recipe"].startswith("nncf.quantize_with_accuracy_control")
    failed = manifest["verification"]["recipes_failed"]
    assert [f["recipe"] for f in failed] == ["nncf"]
    assert "agrees with the fp32 model on 0.00%" in failed[0]["error"]
    check = manifest["verification"]
    assert check["passed"] and check["label_agreement"] >= 0.99


def test_tensorflow_graph_fuses_every_attention_block(toy_runs, tmp_path):
    """tf2onnx's graph (`graph_source="tensorflow"`) gets onnxruntime's fused attention in every
    layer, the last one (computed at [CLS] alone, named by `ClsEncoder`) included."""
    out = export(toy_runs["tensorflow"], tmp_path / "onnx", format="onnx",
                 graph_source="tensorflow")  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graph_source"] == "tensorflow" and manifest["fusions"]["Attention"] == 2
    ops = _session_ops(out / manifest["model_file"], tmp_path / "session.onnx")
    assert ops["Attention"] == 1 and ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 0


def test_int8_auto_times_bf16_candidates_only_where_the_cpu_computes_bf16(monkeypatch):
    """OpenVINO's bf16 candidates of `--int8 auto` are timed only on CPUs with AVX512_BF16 or
    AMX-BF16 (the machine probe mocked both ways); fp32 is always a candidate."""
    from kerasft.exporters.auto import auto_candidates
    from kerasft.util import machine

    ov = FORMATS["openvino"]
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma"})
    assert auto_candidates(ov) == [("nncf", {}), (None, {})]  # all with fused attention
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert ("nncf", {"precision": "bf16"}) in auto_candidates(ov)
    assert machine.computes_bf16({"amx_bf16"}) and not machine.computes_bf16({"avx512_vnni"})
    assert auto_candidates(FORMATS["onnx"]) == [("calibrated", {}), ("static", {}), (None, {})]
    assert check_format("onnx", "auto") and "auto" not in FORMATS["saved_model"].modes
