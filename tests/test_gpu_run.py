"""The prepared GPU run (`benchmarks/gpu/`) runs end to end on CPU, so that a lent GPU's minutes
are spent measuring, not debugging."""

import json
import subprocess
import sys

import pytest

from conftest import CLI_ENV, ROOT, TOY_BUCKETS


@pytest.mark.slow
def test_gpu_run_quick_on_cpu(tiny_preset, toy_data, tmp_path):
    out = tmp_path / "gpu.md"
    command = [sys.executable, "-m", "kerasft.benchmarks.gpu.run", "--device", "cpu", "--quick",
               "--data", str(toy_data), "--preset", str(tiny_preset), "--work", str(tmp_path / "w"),
               "--fit-args", " ".join(["--sequence-length 32 --batch-size 16", *TOY_BUCKETS]),
               "--out", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=CLI_ENV, cwd=ROOT,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["fits"]) == {"torch float32", "torch bfloat16", "jax float32",
                                   "jax bfloat16"}  # fmt: skip
    for fit in report["fits"].values():
        assert 0 <= fit["test_accuracy"] <= 1 and fit["seconds"]["finetune"] > 0
        assert fit["device"].startswith("cpu")
    for name in ("keras torch fp32", "keras jax fp32"):
        cells = report["keras"][name]["cells"]
        assert set(cells) == {"b1_s32", "b8_s32"}
        assert all(c["p50_ms"] > 0 and c["n"] == 3 for c in cells.values())
    assert "transformers eager" in report["peers"]["cells"]
    assert any("onnxruntime" in n for n in report["peers"]["notes"])  # found or not: said
    text = out.read_text()
    assert "GPU: none" in text and "--quick: a smoke run" in text
