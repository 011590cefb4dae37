"""Training and serving on JAX and PyTorch without TensorFlow (`-m tf_free`; CI runs these in a
second environment that has no TensorFlow at all).

Where TensorFlow is installed, each subprocess blocks `import tensorflow` (and
tensorflow-text, tf-keras), so the same tests prove that nothing on these paths needs it.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fit_args, ir_ops, run_backend, shared_dir

pytestmark = pytest.mark.tf_free

TF_FREE_BACKENDS = ("jax", "torch")
# `import tensorflow` (tensorflow-text, tf-keras) then raises ImportError and
# `importlib.util.find_spec` says None, as if they were not installed.
BLOCK_TF = """
import sys
sys.modules.update(dict.fromkeys(("tensorflow", "tensorflow_text", "tf_keras")))
"""
# sha256 of the training token ids (lengths, then ids) of every reference headline at sequence
# length 128. `test_tokenizer_assets` checks, where TensorFlow exists, that these ids are
# KerasHub's preprocessor's and that they hash to this.
REFERENCE_IDS_SHA256 = "0aa9b546dbd080334be26e41100cf5a55b003b47c14ae754c47e1cc44220c0c9"


def ids_digest(ids) -> str:
    digest = hashlib.sha256(np.asarray(ids.lengths, dtype="int32").tobytes())
    digest.update(np.asarray(ids.flat, dtype="int32").tobytes())
    return digest.hexdigest()


FIT_CODE = """
import json, sys, tempfile
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import toy_texts
from kerasft import TwoStageFineTuner
from kerasft.training.tuner import load_tuner

texts, labels = toy_texts(96, seed=2)
tuner = TwoStageFineTuner({preset!r}, sequence_length=32, warmup_epochs=1, finetune_epochs=1,
                          batch_size=16, seed=3, verbose=0)
tuner.fit(texts[:64], labels[:64], validation_data=(texts[64:], labels[64:]))
run = tempfile.mkdtemp() + "/run"
tuner.save_run(run, validation=(texts[64:80], labels[64:80]), test=(texts[80:], labels[80:]))
again = load_tuner(run)
print(json.dumps({{
    "predict": again.predict(texts[80:84]).tolist(),
    "same": bool(np.allclose(again.predict_proba(texts[80:]), tuner.predict_proba(texts[80:]),
                             atol=1e-5)),
    "evaluate": again.evaluate(texts[80:], labels[80:])["accuracy"],
    "tensorflow_loaded": any(m.split(".")[0] == "tensorflow" and sys.modules[m] is not None
                             for m in list(sys.modules)),
}}))
"""


@pytest.mark.parametrize("backend", TF_FREE_BACKENDS)
@pytest.mark.slow
def test_fit_save_load_predict_without_tensorflow(backend, tiny_preset):
    code = FIT_CODE.format(tests=str(ROOT / "tests"), preset=str(tiny_preset))
    r = run_backend(backend, BLOCK_TF + code)
    assert r["tensorflow_loaded"] is False
    assert r["same"] and len(r["predict"]) == 4 and 0 <= r["evaluate"] <= 1


def _cli(backend: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """`kerasft ARGS` in a subprocess whose imports of TensorFlow fail."""
    code = BLOCK_TF + "import sys\nfrom kerasft.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": backend}
    command = [sys.executable, "-c", code, "--backend", backend, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.fixture(scope="session")
def tf_free_runs(tiny_preset, toy_data, tmp_path_factory) -> dict:
    """`kerasft fit` of the toy data on each backend without TensorFlow: the runs that the CLI
    and export tests serve, trained once per test run."""

    def build(directory):
        for backend in TF_FREE_BACKENDS:
            # the toy recipe at 1 + 2 epochs, without `python -m kerasft --backend B`
            args = fit_args(backend, tiny_preset, toy_data, directory / backend, 1, 2)[5:]
            fit = _cli(backend, *args)
            assert fit.returncode == 0 and "test accuracy" in fit.stdout, fit.stderr[-3000:]

    root = shared_dir(tmp_path_factory, "tf-free-runs", build)
    return {backend: root / backend for backend in TF_FREE_BACKENDS}


@pytest.mark.parametrize("backend", TF_FREE_BACKENDS)
@pytest.mark.slow
def test_cli_fit_predict_evaluate_without_tensorflow(backend, tf_free_runs, toy_data, tmp_path):
    run = tf_free_runs[backend]
    assert json.loads((run / "metrics.json").read_text())["backend"] == backend
    predict = _cli(backend, "predict", str(run), "a good day", "--json")
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert json.loads(predict.stdout)[0]["label"] in ("neg", "pos")
    labels = _cli(backend, "predict", str(run), "--data", str(toy_data), "--score", "--out",
                  str(tmp_path / "labels.csv"))  # fmt: skip
    assert labels.returncode == 0, labels.stderr[-3000:]
    assert "scored 400 rows: accuracy" in labels.stderr
    assert len((tmp_path / "labels.csv").read_text().splitlines()) == 401
    evaluate = _cli(backend, "evaluate", str(run), "--data", str(toy_data), "--json")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads(evaluate.stdout)["rows"] == 400


def test_exports_that_need_tensorflow_refuse_in_one_line(tmp_path):
    """Without TensorFlow a format traced under it (SavedModel, LiteRT) names the extra to
    install, before any work (the run directory is not even read)."""
    result = _cli("torch", "export", str(tmp_path), "--format", "saved_model", "--out",
                  str(tmp_path / "x"))  # fmt: skip
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "kerasft export: error: format 'saved_model' needs tensorflow to export "
        "(not installed: tensorflow"
    ), line
    assert line.endswith("): pip install 'kerasft[export]'"), line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backend", TF_FREE_BACKENDS)
@pytest.mark.slow
def test_onnx_and_openvino_export_without_tensorflow(backend, tf_free_runs, tmp_path):
    """A run trained on JAX or PyTorch exports to ONNX and OpenVINO, fp32 and `--int8 auto`,
    traced under PyTorch, and every export passes its verification (#30). Each backend's run
    takes two of the four, crosswise: the `.keras` file is backend-neutral and every one of them
    traces under PyTorch, so the training backend changes only the weights."""
    run = tf_free_runs[backend]
    pairs = {"jax": (("onnx", None), ("openvino", "auto")),
             "torch": (("onnx", "auto"), ("openvino", None))}  # fmt: skip
    for fmt, int8 in pairs[backend]:
        out = tmp_path / f"{fmt}-{int8 or 'fp32'}"
        flags = ["--int8", int8] if int8 else []
        result = _cli(backend, "export", str(run), "--format", fmt, "--out", str(out), *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["verification"]["passed"] is True
        assert manifest["graph_source"] == "torch" and manifest["source_backend"] == backend
        assert "torch" in manifest["versions"] and "tensorflow" not in manifest["versions"]
        if int8:
            chosen = manifest["int8_auto"]["chosen"]["mode"]
            assert chosen == (manifest["quantization"] or "fp32").removeprefix("int8-")
        if fmt == "openvino":  # one fused attention kernel per layer, fp32 and INT8 alike
            ops = ir_ops(out / "model.xml")
            assert ops["ScaledDotProductAttention"] == 2 and ops["Softmax"] == 0
        else:  # onnxruntime's fused Attention (QAttention once quantized), one per layer
            assert manifest["fusions"]["Attention"] == 2
        labels = _cli(backend, "predict", str(out), "a good day", "--json")
        assert labels.returncode == 0, labels.stderr[-3000:]


REF_IDS_CODE = """
import json, sys, hashlib
import numpy as np
import keras_hub
sys.path.insert(0, {tests!r})
from test_tf_free import ids_digest
from kerasft.tokens.batching import tokenize
from kerasft.model.presets import minilm_source_dir

tokenizer = keras_hub.models.DistilBertTokenizer(
    vocabulary=str(minilm_source_dir() / "vocab.txt"), lowercase=True
)
preprocessor = keras_hub.models.DistilBertTextClassifierPreprocessor(tokenizer)
rows = [json.loads(line)["headline"] for line in open({data!r}, encoding="utf-8")]
print(json.dumps({{"rows": len(rows), "digest": ids_digest(tokenize(preprocessor, rows))}}))
"""


@pytest.mark.parametrize("backend", TF_FREE_BACKENDS)
@pytest.mark.slow
def test_reference_ids_without_tensorflow(backend, sarcasm_file):
    """The training ids of every reference headline, without TensorFlow, are the ones
    `test_tokenizer_assets` checks against KerasHub's preprocessor where TensorFlow exists."""
    code = REF_IDS_CODE.format(tests=str(ROOT / "tests"), data=str(sarcasm_file))
    r = run_backend(backend, BLOCK_TF + code)
    assert r == {"rows": 26709, "digest": REFERENCE_IDS_SHA256}


@pytest.mark.slow
def test_sharing_formats_without_tensorflow(tf_free_runs, tmp_path):
    """A KerasHub preset and a transformers checkpoint of a JAX run, exported and served
    without TensorFlow (KerasHub's `save_to_preset` needs none), each verified."""
    for fmt in ("keras_hub", "transformers"):
        out = tmp_path / fmt
        result = _cli(
            "torch", "export", str(tf_free_runs["jax"]), "--format", fmt, "--out", str(out)
        )
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["verification"]["passed"] and manifest["source_backend"] == "jax"
        assert "tensorflow" not in manifest["versions"]
        labels = _cli("torch", "predict", str(out), "a good day", "--json")
        assert labels.returncode == 0, labels.stderr[-3000:]
        assert json.loads(labels.stdout)[0]["label"] in ("neg", "pos")
