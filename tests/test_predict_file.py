"""`kerasft predict RUN_OR_EXPORT --data FILE`: every input kind, the same labels as the API,
scores, CSV/JSONL output, no half-written file, and runtimes that serve many threads."""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import CLI_ENV, toy_texts
from kerasft.cli import main

TEXTS, LABELS = toy_texts(60, seed=11)
NAMES = ["neg", "pos"]


def _jsonl(path, texts, labels=None):
    rows = [{"text": t, **({"label": NAMES[y]} if labels else {})} for t, y in
            zip(texts, labels or [0] * len(texts), strict=True)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _inputs(tmp_path):
    """Every input kind `--data` reads: `{kind: (file, extra flags)}`, each holding TEXTS."""
    csv_rows = "".join(
        f'{i},"{t}",{NAMES[y]}\n' for i, (t, y) in enumerate(zip(TEXTS, LABELS, strict=True))
    )
    latin = [t.replace("day", "café") for t in TEXTS]  # é is one byte in latin-1
    files = {
        "jsonl": (_jsonl(tmp_path / "in.jsonl", TEXTS), []),
        "jsonl.gz": (tmp_path / "in.jsonl.gz", []),
        "csv-with-labels": (tmp_path / "in.csv", []),
        "tsv-headerless-label-text": (tmp_path / "in.tsv", []),
        "txt-one-per-line": (tmp_path / "in.txt", []),
        "csv-one-column-headerless": (tmp_path / "one.csv", []),
        "latin-1": (tmp_path / "latin.csv", ["--encoding", "latin-1"]),
    }
    with gzip.open(files["jsonl.gz"][0], "wt") as f:
        f.write(files["jsonl"][0].read_text())
    files["csv-with-labels"][0].write_text("id,text,label\n" + csv_rows)
    files["tsv-headerless-label-text"][0].write_text(
        "".join(f"{NAMES[y]}\t{t}\n" for t, y in zip(TEXTS, LABELS, strict=True))
    )
    files["txt-one-per-line"][0].write_text("\n".join(TEXTS) + "\n")
    files["csv-one-column-headerless"][0].write_text("".join(f'"{t}"\n' for t in TEXTS))
    files["latin-1"][0].write_bytes(("text\n" + "\n".join(latin) + "\n").encode("latin-1"))
    return files, latin


def _labels(path):
    return [json.loads(line)["label"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_input_kind_is_labelled_as_the_api_labels_it(toy_export, tmp_path, capsys):
    from kerasft.exporters.runtime import load

    export = toy_export("onnx")
    expected = load(export).predict(TEXTS).labels
    files, latin = _inputs(tmp_path)
    for kind, (path, flags) in files.items():
        out = tmp_path / f"{kind}.jsonl"
        assert main(["predict", str(export), "--data", str(path), "--out", str(out), *flags]) == 0
        want = load(export).predict(latin).labels if kind == "latin-1" else expected
        assert _labels(out) == want, kind
    rows = [json.loads(line) for line in (tmp_path / "csv-with-labels.jsonl").open()]
    assert [r["line"] for r in rows[:2]] == [2, 3] and [r["id"] for r in rows[:2]] == ["0", "1"]
    assert set(rows[0]["probabilities"]) == set(NAMES)
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def test_standard_input_is_one_text_per_line(toy_export, monkeypatch, capsys):
    from kerasft.exporters.runtime import load

    export = toy_export("onnx")
    stdin = io.TextIOWrapper(io.BytesIO(("\n".join(TEXTS) + "\n").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["predict", str(export), "--data", "-", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == load(export).predict(TEXTS).labels
    assert [r["line"] for r in rows] == list(range(1, len(TEXTS) + 1))


@pytest.mark.slow
def test_run_directory_file_arguments_and_api_agree(toy_runs, tmp_path, capsys):
    """A run directory (Keras): --data, texts as arguments and `TwoStageFineTuner.predict`."""
    from kerasft.training.tuner import load_tuner

    run = toy_runs["torch"]
    data = _jsonl(tmp_path / "in.jsonl", TEXTS)
    assert main(["predict", str(run), "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert main(["predict", str(run), "--json", *TEXTS]) == 0
    by_args = [r["label"] for r in json.loads(capsys.readouterr().out)]
    api = [str(v) for v in load_tuner(run).predict(TEXTS)]
    assert _labels(tmp_path / "o.jsonl") == by_args == api


@pytest.mark.slow
def test_a_batch_dependent_int8_export_gives_the_same_labels_every_way(toy_export, tmp_path,
                                                                       capsys):  # fmt: skip
    """ONNX dynamic INT8 answers by batch; file, arguments and API batch the same texts alike,
    across several streamed chunks."""
    from kerasft.exporters.runtime import load

    export = toy_export("onnx", "dynamic")
    texts, _ = toy_texts(2500, seed=3)  # > 2 chunks of 1024
    data = _jsonl(tmp_path / "many.jsonl", texts)
    out = tmp_path / "many.jsonl.out"
    assert main(["predict", str(export), "--data", str(data), "--out", str(out)]) == 0
    assert main(["predict", str(export), "--json", *texts]) == 0
    by_args = [r["label"] for r in json.loads(capsys.readouterr().out)]
    assert _labels(out) == by_args == load(export).predict(texts).labels


def test_scores_csv_output_and_refusals(toy_export, tmp_path, capsys):
    export = toy_export("onnx")
    files, _ = _inputs(tmp_path)
    labelled = files["csv-with-labels"][0]
    out = tmp_path / "preds.csv"
    assert (
        main(["predict", str(export), "--data", str(labelled), "--score", "--out", str(out)]) == 0
    )
    err = capsys.readouterr().err
    assert f"scored {len(TEXTS)} rows: accuracy" in err
    header, first = out.read_text().splitlines()[:2]
    assert header == "line,id,label,probability_neg,probability_pos"
    assert first.startswith("2,0,")
    # an existing --out is kept unless --overwrite
    assert main(["predict", str(export), "--data", str(labelled), "--out", str(out)]) == 2
    assert "exists. Pass --overwrite to replace it." in capsys.readouterr().err
    # texts and --data, neither, --score without labels, an unknown label
    assert main(["predict", str(export), "hi", "--data", str(labelled)]) == 2
    assert "Give texts or --data, not both" in capsys.readouterr().err
    assert main(["predict", str(export)]) == 2
    assert "Nothing to label: give texts, or --data FILE" in capsys.readouterr().err
    assert main(["predict", str(export), "hi", "--out", "x.csv", "--score"]) == 2
    assert "--out, --score apply to --data FILE only" in capsys.readouterr().err
    assert main(["predict", str(export), "--data", str(files["jsonl"][0]), "--score"]) == 2
    assert "no label column found among ['text']" in capsys.readouterr().err
    odd = tmp_path / "odd.csv"
    odd.write_text("text,label\ngood day,pos\nbad day,maybe\n")
    assert main(["predict", str(export), "--data", str(odd), "--score"]) == 2
    assert "lines 2-3: Unknown labels ['maybe']" in capsys.readouterr().err


def test_progress_shows_rows_rate_and_time_left(toy_export, tmp_path, capsys):
    from kerasft.exporters.runtime import load
    from kerasft.labelling.labeller import label_file
    from kerasft.labelling.textstream import read_texts

    model = load(toy_export("onnx"))
    data = _jsonl(tmp_path / "in.jsonl", TEXTS)
    summary = label_file(read_texts(data), lambda t: model.predict(t).probabilities,
                         model.label_names, out=tmp_path / "o.jsonl", progress=True)  # fmt: skip
    assert summary["rows"] == len(TEXTS) and summary["rows_per_second"] > 0
    assert f"{len(TEXTS)} rows" in capsys.readouterr().err
    # the CLI's stderr here is not a terminal: no progress line
    assert main(["predict", str(toy_export("onnx")), "--data", str(data)]) == 0
    assert "rows/s," not in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_predict_leaves_no_output_file(toy_export, tmp_path):
    texts, _ = toy_texts(1000, seed=1)
    data = _jsonl(tmp_path / "big.jsonl", texts * 200)  # 200,000 rows: runs for a while
    out = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "kerasft", "predict", str(toy_export("onnx")), "--data",
           str(data), "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".preds.jsonl.tmp-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no rows written in 120 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("format", ["onnx", "openvino", "saved_model", "litert"])
def test_every_runtime_serves_many_threads_at_once(toy_export, format):
    """8 threads call one loaded model at the same moment; each gets the serial answer (the
    OpenVINO runtime raised "Infer Request is busy" when its one request was shared)."""
    from kerasft.exporters.runtime import load

    model = load(toy_export(format))
    texts, _ = toy_texts(200, seed=7)
    serial = model.predict(texts).logits
    barrier, results, errors = threading.Barrier(8), [None] * 8, []

    def call(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = model.predict(texts, batch_size=8).logits
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for logits in results:
        np.testing.assert_allclose(logits, serial, atol=1e-4)
        assert (logits.argmax(-1) == serial.argmax(-1)).all()


@pytest.mark.slow
def test_an_openvino_export_loaded_for_throughput_gives_the_same_answers(toy_export):
    """`runtime.load(dir, throughput=True)` (how `kerasft predict --data` loads an export):
    OpenVINO's THROUGHPUT hint and a chunk's batches in flight side by side, the same labels
    and logits as one batch at a time; even batch lengths (fewer shapes to prepare)."""
    from conftest import toy_texts
    from kerasft.exporters.runtime import load

    texts = toy_texts(150, seed=9)[0]
    export = toy_export("openvino")
    one, many = load(export), load(export, throughput=True)
    assert many.throughput and not one.throughput
    a, b = one.predict(texts), many.predict(texts, batch_size=8)
    assert a.labels == b.labels
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    assert one._pad([[101, 7, 102]])["token_ids"].shape == (1, 4)  # 3 ids: padded to 4
    onnx = load(toy_export("onnx"), throughput=True)  # ignored where it means nothing
    assert onnx._pad([[101, 7, 102]])["token_ids"].shape == (1, 3)
