"""Latency harness: the equivalent wide model, the transformers peer, targets, the quick run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from kerasft.benchmarks.latency import main as bench_main
from kerasft.benchmarks.report import targets


@pytest.fixture(scope="module")
def tiny_classifier(tiny_preset):
    import keras

    from kerasft.model.presets import load_classifier

    clf = load_classifier(str(tiny_preset), num_classes=2, sequence_length=32)
    rng = np.random.default_rng(1)  # a head that is not ~0, so logits differ per text
    for w in clf.pooled_dense.weights + clf.output_dense.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    keras.utils.set_random_seed(0)
    return clf


TEXTS = ["the day was good", "an awful grim movie and so rainy today", "happy"]


def test_widen_is_the_same_function(tiny_classifier):
    from kerasft.benchmarks.models import widen

    wide = widen(tiny_classifier, 2)
    assert wide.backbone.hidden_dim == 64 and wide.backbone.intermediate_dim == 128
    assert wide.backbone.num_heads == tiny_classifier.backbone.num_heads
    a = tiny_classifier.predict(TEXTS, verbose=0)
    b = wide.predict(TEXTS, verbose=0)
    assert np.abs(a - b).max() < 1e-5 and np.abs(a).max() > 1e-2
    with pytest.raises(ValueError, match="factor must be an int >= 1. Received: factor=0"):
        widen(tiny_classifier, 0)


def test_transformers_checkpoint_has_the_same_weights(tiny_classifier, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from kerasft.benchmarks.models import to_transformers

    hf_dir = to_transformers(tiny_classifier, tmp_path / "hf", ["neg", "pos"])
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    x = tiny_classifier.preprocessor(TEXTS)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(np.asarray(x["token_ids"])).long(),
            attention_mask=torch.tensor(np.asarray(x["padding_mask"])).long(),
        ).logits.numpy()
    assert np.abs(logits - tiny_classifier.predict(TEXTS, verbose=0)).max() < 1e-5
    assert model.config.id2label == {0: "neg", 1: "pos"}


CELLS = ["b1_s32", "b1_s128", "b32_s32", "b32_s128"]


def _latency(*p50, **extra) -> dict:
    """A latency row: medians for the four target cells (or a dict of cells), plus fields."""
    cells = p50[0] if isinstance(p50[0], dict) else dict(zip(CELLS, p50, strict=True))
    return {"cells": {c: {"p50_ms": v} for c, v in cells.items()}, **extra}


def test_targets_use_one_recipe_and_the_noise_margin():
    latency = {
        "onnx int8-dynamic": _latency(1.0, 2.0, 10, 40, onnx_int8=True),
        "onnx int8-static": _latency(0.9, 3.0, 20, 80, onnx_int8=True),
        "optimum onnx int8": _latency(1.0, 1.95, 10, 30),
        "keras jax fp32": _latency({"b1_s128": 7.0}, family="keras"),
        "keras torch fp32": _latency({"b1_s128": 5.0}, family="keras"),
    }
    goals = targets({"latency": latency, "cells": CELLS})
    assert goals["best_onnx_int8"] == "onnx int8-dynamic"  # geometric mean over all cells
    assert goals["vs_optimum"]["b1_s32"]["met"]  # 1.0 / 1.0: a tie is met
    assert not goals["vs_optimum"]["b1_s128"]["met"]  # 2.0 / 1.95 = 1.026: no noise margin
    assert not goals["vs_optimum"]["b32_s128"]["met"]  # 40 / 30
    assert goals["vs_slowest_keras"] == {"slowest": "keras jax fp32", "speedup": 3.5, "met": True}


def test_fastest_variant_vs_fastest_peer_respects_the_accuracy_budget():
    from kerasft.benchmarks.report import fastest_vs_peers

    latency = {
        "keras tensorflow fp32": _latency({"b1_s32": 20.0}, family="keras"),
        "openvino int8-nncf": _latency({"b1_s32": 1.0}, family="export"),
        "onnx int8-dynamic": _latency({"b1_s32": 1.2}, family="export"),
        "onnx int8-calibrated": _latency({"b1_s32": 1.05}, family="export"),
        "optimum-intel openvino int8": _latency({"b1_s32": 1.1}, family="peer"),
        "optimum onnx int8": _latency({"b1_s32": 1.5}, family="peer"),
    }
    accuracy = {"keras tensorflow fp32": 0.9240, "openvino int8-nncf": 0.9200,
                "onnx int8-dynamic": 0.9230, "onnx int8-calibrated": 0.9240,
                "optimum-intel openvino int8": 0.9}  # fmt: skip
    results = {k: {"accuracy": v} for k, v in accuracy.items()}
    results["onnx int8-calibrated"]["accuracy_b1"] = 0.9220  # 0.2 points lost served at batch 1
    report = {
        "latency": latency, "cells": ["b1_s32"],
        "accuracy": {"reference": "keras tensorflow fp32", "results": results},
    }  # fmt: skip
    goal = fastest_vs_peers(report)["b1_s32"]
    # The 1.0 ms variant loses 0.4 points and the 1.05 ms one 0.2 at batch 1, over the 0.15
    # budget: the 1.2 ms one (0.1 points) is kerasft's.
    assert (goal["ours"], goal["peer"]) == ("onnx int8-dynamic", "optimum-intel openvino int8")
    assert goal["ratio"] == pytest.approx(1.2 / 1.1) and not goal["met"]
    assert goal["accuracy_drop"] == pytest.approx(0.001)


def test_variants_that_won_a_round_are_tied_with_the_fastest():
    from kerasft.benchmarks.report import tied_with

    rounds = {
        "a": [1.00, 1.02, 0.99],  # fastest by its overall median
        "b": [1.03, 1.01, 1.04],  # won round 2: noise cannot order it behind "a"
        "c": [1.10, 1.08, 1.09],  # beaten in every round
        "d": [0.90, 0.95],  # measured in fewer rounds (a failed round): not comparable
    }
    latency = {n: {"cells": {"b1_s32": {"p50_ms": float(np.median(r)), "round_p50_ms": r}}}
               for n, r in rounds.items()}  # fmt: skip
    latency["e"] = {"cells": {"b1_s32": {"p50_ms": 1.0}}}  # an older report: no rounds
    assert tied_with(latency, "a", list(latency), "b1_s32") == ["b"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-sizes", "1,x"], "batch_sizes must be comma-separated integers in [1, 1024]"),
        (["--seq-lens", "1024"], "seq_lens must be comma-separated integers in [2, 512]"),
        (["--rounds", "0"], "rounds must be >= 1. Received: rounds=0"),
        (["--settle-seconds", "-1"], "settle_seconds must be >= 0. Received: -1.0"),
        (["--quick", "--seq-lens", "128"], "seq_lens=[128] exceed the model's 64 position"),
    ],
)
def test_bad_options_are_named(argv, message, toy_runs, tmp_path, capsys):
    out = tmp_path / "report"
    run = ["--run", str(toy_runs["tensorflow"]), "--artifacts", str(tmp_path / "a")]
    assert bench_main([*run, "--out", str(out), "--no-peers", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "a").exists()  # refused before any artifact was built


def test_scale_data_repeats_no_text():
    from kerasft.benchmarks.scale import synthetic

    rows = [{"text": "a b c"}, {"text": "a b c"}, {"text": "d"}]
    texts = [r["text"] for r in synthetic(rows, 4, "text")]
    assert len(texts) == 12 and len(set(texts)) == 12
    assert texts[0] == "a b c" and texts[2] == "d"  # the file's rows first, as they are
    assert texts[3].split().count("today") == 1  # copy 1 inserts the first word
    with pytest.raises(ValueError, match="factor must be <= 18. Received: factor=19"):
        synthetic(rows, 19, "text")


def test_missing_run_is_named(tmp_path, capsys):
    assert bench_main(["--run", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "No model.keras in" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_every_variant_and_quick_the_deciding_ones(toy_runs, tmp_path):
    from kerasft.runs.rundir import run_splits
    from kerasft.util.machine import computes_bf16

    out, artifacts = tmp_path / "report", tmp_path / "artifacts"
    cmd = [sys.executable, "-m", "kerasft", "bench", "--run", str(toy_runs["tensorflow"])]
    cmd += ["--artifacts", str(artifacts), "--device", "cpu", "--seq-lens", "32"]
    # every variant and step, not a measurement: the shortest timing blocks (3 rounds still)
    cmd += ["--round-seconds", "0.02", "--settle-seconds", "0"]
    full = [*cmd, "--out", str(out), "--latency-model", "run", "--batch-sizes", "1,8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*full, "--rounds", "3"], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[bench] 0:" in proc.stderr and "writing openvino nncf" in proc.stderr  # progress
    report = json.loads((out / "report.json").read_text())
    bf16 = {"openvino fp32 bf16", "openvino int8-nncf bf16", "openvino int8-qdq bf16"}
    expected = {
        "keras jax fp32", "keras tensorflow fp32", "keras torch fp32", "keras tensorflow int8",
        "onnx fp32", "onnx int8-calibrated", "onnx int8-dynamic", "onnx int8-static",
        "openvino fp32", "openvino int8-nncf", "openvino int8-qdq", "savedmodel fp32",
        "savedmodel int8-keras", "litert fp32",
        "litert int8-dynamic", "transformers torch-eager fp32", "optimum onnx fp32",
        "optimum onnx int8", "optimum-intel openvino fp32", "optimum-intel openvino int8",
        "optimum-intel openvino fp32 (plugin default precision)",
        "optimum-intel openvino int8 (plugin default precision)",
        *(bf16 if computes_bf16() else ()),  # served at each precision the CPU computes
    }  # fmt: skip
    assert set(report["latency"]) == expected
    for name, row in report["latency"].items():
        assert set(row["cells"]) == {"b1_s32", "b8_s32"}, name
        for cell in row["cells"].values():
            assert cell["n"] >= 3 and 0 < cell["p50_ms"] <= cell["p90_ms"] <= cell["p99_ms"]
        assert row["peak_rss_mb"] > 0
    for name, acc in report["accuracy"]["results"].items():  # the toy task is easy
        assert acc["accuracy"] >= 0.9 and acc["agreement_with_fp32"] >= 0.95, name
    assert report["machine"]["threads"] >= 1 and report["machine"]["versions"]["onnxruntime"]
    assert report["targets"]["best_onnx_int8"] in {
        "onnx int8-calibrated", "onnx int8-dynamic", "onnx int8-static",
    }  # fmt: skip
    for name in ("onnx int8-calibrated", "optimum onnx int8"):  # INT8: scored at batch 1 too
        assert report["accuracy"]["results"][name]["accuracy_b1"] >= 0.9
    assert set(report["targets"]["fastest_vs_peers"]) == {"b1_s32", "b8_s32"}
    for cell in report["latency"]["onnx fp32"]["cells"].values():  # one median a round
        assert len(cell["round_p50_ms"]) == 3
    # INT8 recipes calibrate on the run's calibration texts, not on the texts they are judged on
    index = json.loads((artifacts / "run" / "index.json").read_text())
    for name in ("onnx-int8-calibrated", "onnx-int8-static", "openvino-int8-nncf"):
        manifest = json.loads((Path(index["exports"][name]) / "manifest.json").read_text())
        assert 0 < manifest["calibration_texts"] < manifest["verification"]["texts"], name
    # End to end: every export served from raw strings by kerasft.exporters.runtime, batch 1 and 32.
    e2e = report["end_to_end"]
    exports = {n for n in expected - bf16
               if n.split()[0] in ("onnx", "openvino", "savedmodel", "litert")}  # fmt: skip
    assert set(e2e["latency"]) == {f"{n} (runtime)" for n in exports}
    for name, row in e2e["latency"].items():
        assert set(row["cells"]) == {"b1_stext", "b32_stext"}, name
        assert row["cells"]["b32_stext"]["samples_per_s"] > 0
    assert {p.name for p in out.iterdir()} == {
        "report.json", "report.md", "latency.png", "accuracy_vs_latency.png",
    }  # fmt: skip
    md = (out / "report.md").read_text()
    assert md.startswith("# kerasft latency report\n\nCommand: `") and "ISA: " in md
    assert f"commit {report['commit']}" in md and report["date"] in md
    assert "### batch 1, 32 tokens" in md and "| optimum onnx int8 |" in md
    assert "## End to end" in md and "| openvino int8-nncf (runtime) |" in md
    # A second run refuses to overwrite the report.
    again = subprocess.run(full, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    # --quick: what decides the targets table (the variants `--int8 auto` chooses among, the
    # accuracy reference, the peers that can be fastest), artifacts reused, batch 1 and 32.
    quick = tmp_path / "quick"
    proc = subprocess.run([*cmd, "--out", str(quick), "--quick"], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((quick / "report.json").read_text())
    ours = {"keras tensorflow fp32", "onnx fp32", "onnx int8-calibrated", "onnx int8-static",
            "openvino fp32", "openvino int8-nncf"}  # fmt: skip
    peers = {"optimum onnx int8", "optimum-intel openvino int8",
             "optimum-intel openvino fp32 (plugin default precision)",
             "optimum-intel openvino int8 (plugin default precision)"}  # fmt: skip
    bf16 = {"openvino fp32 bf16", "openvino int8-nncf bf16"} if computes_bf16() else set()
    assert set(report["latency"]) == ours | peers | bf16
    assert all(set(r["cells"]) == {"b1_s32", "b32_s32"} for r in report["latency"].values())
    assert report["end_to_end"] is None and report["settings"]["test_rows"] is None
    results = report["accuracy"]["results"]
    assert report["accuracy"]["rows"] == len(run_splits(toy_runs["tensorflow"])[2])
    assert results["onnx fp32"]["from"] == "the export's fp32 parity check"  # not predicted
    assert "accuracy_b1" not in results["onnx int8-calibrated"]  # ranges fixed at export
    assert not set(results) & peers  # a peer's accuracy does not decide the targets
    assert set(report["targets"]["fastest_vs_peers"]) == {"b1_s32", "b32_s32"}


@pytest.mark.slow
def test_export_accuracy_serves_the_test_split_at_each_batch_size(toy_runs, tmp_path):
    from kerasft.benchmarks import export_accuracy
    from kerasft.runs.rundir import run_splits

    out, exports = tmp_path / "int8.md", tmp_path / "exports"
    argv = ["--run", str(toy_runs["tensorflow"]), "--exports", str(exports), "--out", str(out)]
    argv += ["--variants", "onnx:fp32,onnx:dynamic", "--serving-batches", "1,8"]
    assert export_accuracy.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    test_rows = len(run_splits(toy_runs["tensorflow"])[2])
    assert report["test_rows"] == test_rows and report["serving_batches"] == [1, 8]
    fp32, dynamic = report["rows"]
    for batch in ("1", "8"):  # fp32 gives Keras' labels whatever the batch
        assert fp32["serving"][batch]["agreement"] == 1.0
        assert fp32["serving"][batch]["accuracy"] == report["keras_accuracy"]
        assert 0.5 <= dynamic["serving"][batch]["agreement"] <= 1.0
    assert dynamic["verification"]["passed"] and dynamic["model_bytes"] > 0
    text = out.read_text()
    assert text.startswith("# Export variants on the test split\n\nCommand: `python -m")
    assert "ISA:" in text and "| onnx dynamic |" in text
    # --reuse keeps the verified exports instead of exporting again
    assert export_accuracy.main([*argv, "--reuse"]) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert [row["reused"] for row in again["rows"]] == [True, True]
    assert again["rows"][1]["serving"] == dynamic["serving"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "onnx:bogus"], "unknown variants in 'onnx:bogus'; known: saved_model:fp32"),
        (["--serving-batches", "0,32"], "--serving-batches must be >= 1. Received: [0, 32]"),
        (["--serving-batches", "one"], "--serving-batches: comma-separated ints. Received: one"),
    ],
)
def test_export_accuracy_names_bad_options(argv, message, tmp_path, capsys):
    from kerasft.benchmarks import export_accuracy

    base = ["--run", str(tmp_path), "--exports", str(tmp_path), "--out", str(tmp_path / "r.md")]
    with pytest.raises(SystemExit):
        export_accuracy.main(base + argv)
    assert message in capsys.readouterr().err


def test_labelling_summary_takes_the_fastest_accurate_export_against_the_fastest_peer(tmp_path):
    """labelling.md's verdict: an export that loses more than 0.15 points of the run's test
    accuracy is never the one compared, however fast; the fastest peer pipeline is."""
    from kerasft.benchmarks.labelling import _peer_jobs, summary

    def row(name, accuracy, runtime, file):
        return {"name": name, "accuracy": accuracy, "threads": {"1": runtime},
                "file_rows_per_second": file}  # fmt: skip

    report = {
        "reference_accuracy": 0.9250,
        "rows": [
            {"name": "run directory (Keras, torch)", "file_rows_per_second": 100.0},
            row("onnx int8-dynamic", 0.9200, 900.0, 950.0),  # fast, but -0.5 points
            row("openvino int8-nncf", 0.9240, 600.0, 500.0),
            row("onnx fp32", 0.9250, 400.0, 520.0),
        ],
        "peers": [
            {"name": "ov pipeline", "pipeline_rows_per_second": 300.0, "accuracy": 0.92},
            {"name": "ort pipeline", "pipeline_rows_per_second": 200.0, "accuracy": 0.92},
        ],
    }
    s = summary(report)
    assert s["peer"] == "ov pipeline" and s["peer_rows_per_second"] == 300.0
    assert s["runtime"]["export"] == "openvino int8-nncf" and s["runtime"]["ratio"] == 2.0
    assert s["file"]["export"] == "onnx fp32" and s["file"]["ratio"] == 520.0 / 300.0
    assert summary({**report, "peers": []}) is None
    assert _peer_jobs(None) == []
    index = {"transformers": "/hf", "optimum": {"int8": "/o/int8/model_quantized.onnx"},
             "optimum_intel": {"int8": "/oi/int8/openvino_model.xml"}}  # fmt: skip
    (tmp_path / "index.json").write_text(json.dumps(index))
    jobs = _peer_jobs(tmp_path)
    assert [(j["peer"], j["model"], j["file"]) for j in jobs] == [
        ("optimum_intel", "/oi/int8", "openvino_model.xml"),
        ("optimum", "/o/int8", "model_quantized.onnx"),
    ]


def test_quick_times_only_the_contenders_after_its_first_round():
    """`bench --quick` keeps, after round 1, a cell's variants within 1.3x of its fastest, and
    the ONNX INT8 table's within 1.3x of that table's fastest; it classifies only those."""
    from kerasft.benchmarks.latency import QUICK_PRUNE, _contenders, _contenders_of

    first = {"ov": 1.0, "peer": 1.2, "slow": 1.4, "onnx-a": 1.8, "onnx-b": 2.5, "optimum": 2.2}
    per_round = {(n, "b1"): [ms] for n, ms in first.items()}
    warm = set(per_round)
    kept = _contenders(warm, per_round, QUICK_PRUNE, frozenset({"onnx-a", "onnx-b", "optimum"}))
    assert {n for n, _ in kept} == {"ov", "peer", "onnx-a", "optimum"}
    latency = {n: {"cells": {"b1": {"round_p50_ms": [1.0] * (3 if (n, "b1") in kept else 1)}}}
               for n in first}  # fmt: skip
    from kerasft.benchmarks.report import BASELINE

    assert _contenders_of(latency, 3) == {"ov", "peer", "onnx-a", "optimum", BASELINE}
