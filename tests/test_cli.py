"""The `kerasft` command line: error paths (fast) and a short real run with the offline preset."""

import json
import os
import subprocess
import sys

import pytest

from conftest import CLI_ENV, HAS_TENSORFLOW, ROOT
from kerasft.cli import main


def test_fit_refuses_non_empty_run_dir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    code = main(["fit", "--data", "x.jsonl", "--out", str(tmp_path)])
    assert code == 2
    assert "exists and is not empty. Pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_fit_without_data(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KERASFT_DATA", raising=False)
    assert main(["fit", "--out", str(tmp_path / "run")]) == 2
    assert "No data file: pass --data FILE or set $KERASFT_DATA" in capsys.readouterr().err


def test_fit_missing_data_file_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "Data file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run dir, no temp dir left behind


def test_fit_bad_hyperparameter(tmp_path, capsys):
    assert main(["fit", "--data", "x", "--out", str(tmp_path / "r"), "--batch-size", "0"]) == 2
    assert "batch_size must be an int >= 1. Received: --batch-size 0" in capsys.readouterr().err


def test_predict_on_a_non_run_dir(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "hello"]) == 2
    assert "No model.keras in" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_log_redirected_to_a_file_has_no_progress_bars(tiny_preset, toy_data, tmp_path):
    from conftest import fit_args

    args = [a for a in fit_args("tensorflow", tiny_preset, toy_data, tmp_path / "r", 1, 1)
            if a != "--quiet"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ,
                          "PYTHONPATH": str(ROOT)}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch 2/2" in proc.stdout  # one line per epoch
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "\x1b[" not in stream, stream[-2000:]


def cli(*args, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "kerasft", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_fit_predict_evaluate_offline_preset(sarcasm_file, tmp_path_factory):
    env = {"KERASFT_CACHE": str(tmp_path_factory.getbasetemp() / "kerasft-cache")}
    run = tmp_path_factory.mktemp("cli") / "run"
    # PyTorch, the CLI's default backend: it compiles no batch shape (TensorFlow took 2.5x as long)
    args = ["--backend", "torch", "fit", "--data", str(sarcasm_file), "--out", str(run)]
    args += ["--preset", "all_minilm_l6_v2", "--limit", "1000", "--quiet"]
    args += ["--warmup-epochs", "1", "--finetune-epochs", "2", "--finetune-lr", "1e-4"]
    out = cli(*args, env=env)
    assert "test accuracy" in out
    assert {p.name for p in run.iterdir()} == {
        "model.keras", "model.keras.json", "metrics.json", "history.json",
        "training_curves.png", "config.json",
    }  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert metrics["rows"] == {
        "file": 26709, "used": 1000, "skipped": 0, "train": 600, "validation": 200, "test": 200,
    }  # fmt: skip
    assert metrics["backend"] == "torch"
    for split in ("validation", "test"):
        assert {"accuracy", "precision", "recall", "f1", "confusion_matrix"} <= set(metrics[split])
    assert history["stage"] == [1, 2, 2]
    assert history["loss"][-1] < history["loss"][0]
    # Majority class is 56% of the rows: the model must do clearly better than chance.
    assert metrics["test"]["accuracy"] >= 0.65, metrics["test"]
    assert set(metrics["seconds"]) == {"warmup", "finetune", "checkpoints", "total"}

    lines = cli("predict", str(run), "area man wins argument with toaster", env=env).splitlines()
    label, probability, text = lines[-1].split("\t")
    assert label in ("0", "1") and 0.5 <= float(probability) <= 1.0
    assert text == "area man wins argument with toaster"

    # evaluate reads any file of the same columns: 2,000 of the file's rows keep this test short
    part = run.parent / "part.jsonl"
    with open(sarcasm_file, encoding="utf-8") as f:
        part.write_text("".join(line for _, line in zip(range(2000), f, strict=False)))
    scored = json.loads(cli("evaluate", str(run), "--data", str(part), "--json", env=env))
    assert scored["rows"] == 2000 and scored["accuracy"] >= 0.6


def test_installed_names_live_under_kerasft(tmp_path):
    """`exporters` and `benchmarks` install as kerasft.exporters / kerasft.benchmarks only."""
    code = (
        "import importlib.util as u, json; "
        "print(json.dumps([u.find_spec(m) is not None for m in "
        "('exporters', 'benchmarks', 'kerasft.exporters', 'kerasft.benchmarks.latency')]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, False, True, True]


def test_a_damaged_model_file_says_so(toy_runs, tmp_path, capsys):
    import shutil

    run = shutil.copytree(toy_runs["torch"], tmp_path / "run")
    model = run / "model.keras"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a cut copy
    assert main(["--backend", "torch", "predict", str(run), "a good day"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "model.keras' is damaged: not a complete Keras archive (truncated or overwritten). "
            "Restore it or fit again."
        )
    )


def test_a_file_that_is_not_utf8_is_named_and_read_with_encoding(toy_runs, tmp_path, capsys):
    data = tmp_path / "latin.csv"
    data.write_bytes("text,label\nthe caf\xe9 day was good great,pos\nan awful day,neg\n"
                     .encode("latin-1"))  # fmt: skip
    assert main(["fit", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data}: line 2: byte 0xe9 (offset 18) is not utf-8" in err
    assert "--encoding latin-1" in err and not (tmp_path / "run").exists()
    code = main(["evaluate", str(toy_runs["torch"]), "--data", str(data), "--encoding",
                 "latin-1", "--json"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2


@pytest.mark.slow
def test_a_headerless_label_text_tsv_fits(tiny_preset, tmp_path, capsys):
    """A `label<TAB>text` file without a header row: the first row is data, and is trained on."""
    from conftest import toy_texts

    texts, labels = toy_texts(120, seed=7)
    data = tmp_path / "plain.tsv"
    data.write_text("".join(f"{y}\t{t}\n" for t, y in zip(texts, labels, strict=True)))
    run = tmp_path / "run"
    code = main(["fit", "--data", str(data), "--out", str(run), "--preset", str(tiny_preset),
                 "--sequence-length", "32", "--batch-size", "16", "--warmup-epochs", "1",
                 "--finetune-epochs", "1", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["header"] is False
    assert (config["data"]["text_column"], config["data"]["label_column"]) == ("1", "0")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"]["file"] == 120 and metrics["label_names"] == ["0", "1"]


def test_a_header_that_names_no_known_column_suggests_no_header(tmp_path, capsys):
    data = tmp_path / "odd.csv"
    data.write_text("words,class_id\nsome text,1\nother text,0\nmore text,1\n")
    assert main(["fit", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no text column found among ['words', 'class_id']" in err
    assert "If the first row is data, not column names, pass --no-header" in err


def test_evaluate_names_and_takes_skip_invalid(toy_runs, tmp_path, capsys):
    data = tmp_path / "gap.jsonl"
    data.write_text('{"text": "good day", "label": "pos"}\n{"text": "sad", "label": ""}\n'
                    '{"text": "awful grim day", "label": "neg"}\n')  # fmt: skip
    assert main(["evaluate", str(toy_runs["torch"]), "--data", str(data)]) == 2
    assert "line 2: missing label ('') in column 'label'. Fix the row or pass --skip-invalid" in (
        capsys.readouterr().err
    )
    assert main(["evaluate", str(toy_runs["torch"]), "--data", str(data), "--skip-invalid",
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["rows"] == 2


TENSORFLOW_LINES = ("oneDNN custom operations", "cuda", "cuInit", "absl::InitializeLog", "XLA")


@pytest.mark.skipif(not HAS_TENSORFLOW, reason="nothing to keep out without TensorFlow")
def test_a_pytorch_fit_and_predict_print_no_tensorflow_line(tiny_preset, toy_data, tmp_path):
    """keras-hub imports TensorFlow whenever it is installed; the `kerasft` command keeps it out
    of a PyTorch run: none of its start-up lines, and not in the process at all."""
    code = (
        "import sys\nfrom kerasft.cli import main\nsys.argv[1:] = {argv!r}\ncode = main()\n"
        "imported = sys.modules.get('tensorflow') is not None\n"
        "print('tensorflow imported:', imported, file=sys.stderr)\n"
        "sys.exit(code)"
    )
    run = tmp_path / "run"
    fit = ["--backend", "torch", "fit", "--data", str(toy_data), "--out", str(run), "--preset",
           str(tiny_preset), "--sequence-length", "32", "--warmup-epochs", "1",
           "--finetune-epochs", "1"]  # fmt: skip
    for argv in (fit, ["predict", str(run), "area man wins argument"]):
        env = {**CLI_ENV, "KERAS_BACKEND": "torch"}
        proc = subprocess.run([sys.executable, "-c", code.format(argv=argv)], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "tensorflow imported: False" in proc.stderr, proc.stderr[-3000:]
        output = proc.stdout + proc.stderr
        assert not [w for w in TENSORFLOW_LINES if w in output], output[-3000:]
