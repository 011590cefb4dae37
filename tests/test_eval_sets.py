"""`kerasft fit --validation-data FILE --test-data FILE`: evaluation sets from their own files."""

import json

import pytest

from conftest import toy_texts
from kerasft.cli import main
from kerasft.runs import rundir


def _write(path, n, seed, names=("neg", "pos")):
    texts, labels = toy_texts(n, seed=seed)
    path.write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n"
                            for t, y in zip(texts, labels, strict=True)))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    return {
        "train": _write(root / "train.jsonl", 96, 21),
        "validation": _write(root / "val.jsonl", 32, 22),
        "test": _write(root / "test.jsonl", 40, 23),
    }


def fit(preset, out, *extra):
    args = ["fit", "--out", str(out), "--preset", str(preset), "--sequence-length", "32"]
    args += ["--batch-size", "16", "--warmup-epochs", "1", "--finetune-epochs", "0", "--quiet"]
    return main(args + [str(a) for a in extra])


def test_both_files_given_the_training_file_is_used_whole(tiny_preset, files, tmp_path, capsys):
    out = tmp_path / "run"
    code = fit(tiny_preset, out, "--data", files["train"],
               "--validation-data", files["validation"], "--test-data", files["test"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / rundir.METRICS_FILE).read_text())
    assert metrics["rows"]["train"] == 96
    assert metrics["rows"]["validation"] == 32 and metrics["rows"]["test"] == 40
    assert (
        metrics["test"]["confusion_matrix"]
        and sum(map(sum, metrics["test"]["confusion_matrix"])) == 40
    )
    train, val, test = rundir.run_splits(out)  # export/bench rebuild the same sets
    assert (len(train), len(val), len(test)) == (96, 32, 40)
    assert test.texts == toy_texts(40, seed=23)[0]
    source = rundir.data_source(out)
    assert source.test_file["path"] == str(files["test"]) and source.test_file["sha256"]


def test_one_file_given_the_data_file_gives_the_other_set(tiny_preset, files, tmp_path, capsys):
    out = tmp_path / "run"
    code = fit(tiny_preset, out, "--data", files["train"], "--test-data", files["test"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / rundir.METRICS_FILE).read_text())["rows"]
    assert (rows["train"], rows["validation"], rows["test"]) == (72, 24, 40)


def test_evaluation_file_with_unknown_labels(tiny_preset, files, tmp_path, capsys):
    odd = _write(tmp_path / "odd.jsonl", 8, 3, names=("neg", "meh"))
    out = tmp_path / "run"
    assert fit(tiny_preset, out, "--data", files["train"], "--validation-data", odd) == 2
    err = capsys.readouterr().err
    assert f"{odd}: labels ['meh'] are not among the training labels ['neg', 'pos']" in err
    assert not out.exists()


def test_changed_evaluation_file_is_detected(tiny_preset, files, tmp_path, capsys):
    test_copy = tmp_path / "test.jsonl"
    test_copy.write_bytes(files["test"].read_bytes())
    out = tmp_path / "run"
    assert fit(tiny_preset, out, "--data", files["train"], "--validation-data",
               files["validation"], "--test-data", test_copy) == 0  # fmt: skip
    with test_copy.open("a") as f:
        f.write(json.dumps({"text": "a good day", "label": "pos"}) + "\n")
    with pytest.raises(rundir.DataChangedError, match="The run's test data file .* has changed"):
        rundir.run_splits(out)


@pytest.mark.parametrize("kind", ["excel-bom.csv", "gzipped.jsonl.gz"])
def test_files_as_they_come_fit(tiny_preset, tmp_path, capsys, kind):
    import csv
    import gzip
    import io

    texts, labels = toy_texts(64, seed=31)
    if kind.endswith(".csv"):  # as Excel saves "CSV UTF-8": a byte-order mark, CRLF rows
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
        path = tmp_path / kind
        path.write_bytes(b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8"))
    else:
        path = tmp_path / kind
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"text": t, "label": y}) + "\n"
                for t, y in zip(texts, labels, strict=True)
            )
    out = tmp_path / "run"
    assert fit(tiny_preset, out, "--data", path) == 0, capsys.readouterr().err
    metrics = json.loads((out / rundir.METRICS_FILE).read_text())
    assert metrics["label_names"] == ["0", "1"] and metrics["rows"]["used"] == 64
    assert rundir.read_config(out)["data"]["text_column"] == "text"
