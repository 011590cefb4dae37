"""One label rule in files and in the Python API: labels are class names."""

import json

import numpy as np
import pytest

from conftest import toy_texts
from kerasft.cli import main
from kerasft.data import DataError, encode_labels, label_values, load_dataset
from kerasft.data import label_ids as _label_ids
from kerasft.training.tuner import TwoStageFineTuner


def tuner(preset="does/not/matter", **kwargs):
    options = dict(sequence_length=32, batch_size=16, warmup_epochs=1, finetune_epochs=0)
    return TwoStageFineTuner(preset, verbose=0, **{**options, **kwargs})


def test_integer_labels_are_names_everywhere():
    assert encode_labels([2, 1, 2]) == (pytest.approx([1, 0, 1]), ["1", "2"])
    ids, names = encode_labels(["2", "1", 1.0, np.int64(2)])
    assert ids.tolist() == [1, 0, 0, 1] and names == ["1", "2"]
    assert encode_labels([10, 2])[1] == ["2", "10"]  # numeric order, not "10" < "2"
    assert encode_labels([0, 1, 1])[0].tolist() == [0, 1, 1]  # the reference: ids unchanged
    assert encode_labels([2], known=["1", "2"])[0].tolist() == [1]
    assert label_values(["1", "2"]).tolist() == [1, 2]
    assert label_values(["neg", "pos"]).tolist() == ["neg", "pos"]


@pytest.mark.parametrize("missing", [None, float("nan"), "", " nan ", "NULL", "None"])
def test_missing_labels_in_the_api(missing):
    with pytest.raises(DataError, match=r"Missing label \(.*\) at row index 1"):
        tuner(batch_size=2).fit(["a", "b", "c"], [0, missing, 1])


def test_two_dimensional_labels_that_are_not_one_hot_are_refused():
    texts = ["a", "b", "c", "d"]
    with pytest.raises(DataError, match=r"y has shape \(4, 1\): a column of labels"):
        tuner(batch_size=2).fit(texts, np.array([[0], [1], [0], [1]]))
    multi_hot = np.array([[1, 0], [1, 1], [0, 1], [1, 0]])
    with pytest.raises(DataError, match=r"one-hot rows .* row 1 is \[1, 1\]. Multi-label"):
        tuner(batch_size=2).fit(texts, multi_hot)
    with pytest.raises(DataError, match=r"row 0 is \[0.7, 0.3\]"):
        tuner(batch_size=2).fit(texts, np.array([[0.7, 0.3], [0, 1], [1, 0], [0, 1]]))
    ids, names = _label_ids(np.eye(3)[[2, 0]], None)
    assert ids.tolist() == [2, 0] and names == ["0", "1", "2"]
    with pytest.raises(DataError, match="One-hot y has 3 columns; the model has 2 classes"):
        _label_ids(np.eye(3)[[2, 0]], ["0", "1"])


@pytest.fixture(scope="module")
def one_two(tmp_path_factory):
    """Toy texts labelled 1 and 2 (as 1..5-star sets are), in a file and as arrays."""
    texts, labels = toy_texts(64, seed=11)
    stars = [y + 1 for y in labels]
    path = tmp_path_factory.mktemp("stars") / "stars.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": s}) + "\n"
                            for t, s in zip(texts, stars, strict=True)))  # fmt: skip
    return texts, stars, path


def test_labels_one_and_two_make_two_classes_in_the_api(tiny_preset, one_two):
    texts, stars, _ = one_two
    model = tuner(tiny_preset)
    model.fit(texts, stars)
    assert model.num_classes == 2 and model.label_names == ["1", "2"]
    predicted = model.predict(texts)
    assert predicted.dtype.kind == "i" and set(predicted.tolist()) <= {1, 2}
    accuracy = float(np.mean(predicted == np.array(stars)))  # comparable with the file
    scores = model.score(texts, stars)
    assert scores["accuracy"] == pytest.approx(accuracy)
    assert len(scores["confusion_matrix"]) == 2


def test_labels_one_and_two_make_two_classes_in_the_cli(tiny_preset, one_two, tmp_path, capsys):
    texts, stars, path = one_two
    assert load_dataset(path).label_names == ["1", "2"]
    run = tmp_path / "run"
    args = ["fit", "--data", str(path), "--out", str(run), "--preset", str(tiny_preset),
            "--sequence-length", "32", "--batch-size", "16", "--warmup-epochs", "1",
            "--finetune-epochs", "0", "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    meta = json.loads((run / "model.keras.json").read_text())
    assert meta["label_names"] == ["1", "2"]
    capsys.readouterr()
    assert main(["predict", str(run), texts[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in ("1", "2")
    assert main(["evaluate", str(run), "--data", str(path), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["rows"] == 64 and len(scored["confusion_matrix"]) == 2
    # the CLI's model, scored from Python with the file's integers: the same ids
    loaded = TwoStageFineTuner.load(run / "model.keras")
    assert loaded.score(texts, stars)["accuracy"] == pytest.approx(scored["accuracy"])


def test_truncated_texts_are_counted_and_logged(tiny_preset, caplog):
    from kerasft.model.presets import load_classifier
    from kerasft.tokens.batching import count_truncated, tokenize

    pre = load_classifier(str(tiny_preset), 2, sequence_length=8).preprocessor
    texts = ["good day", "the day was very good and so nice", "the day was good and nice"]
    with caplog.at_level("WARNING", logger="kerasft.tokens.batching"):
        lengths = tokenize(pre, texts).lengths
    # 2 + 8 words do not fit in 8 places; 2 + 6 fit exactly, 2 + 2 easily
    assert lengths.tolist() == [4, 8, 8]
    assert count_truncated(pre, texts, lengths) == 1
    assert "1 of 3 texts are longer than sequence_length=8 tokens and were truncated" in caplog.text


def test_export_verification_labels_are_names_integers_included():
    """One name -> id rule everywhere: the export's verification labels follow `encode_labels`
    (an integer label is the class of that name, not an index)."""
    from kerasft.exporters.vset import label_ids as export_label_ids

    assert export_label_ids([2, 1, 2], ["1", "2"]).tolist() == [1, 0, 1]
    assert export_label_ids(["2", "1"], ["1", "2"]).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"Unknown labels \['0'\]"):
        export_label_ids([0, 1], ["1", "2"])  # ids would have been accepted before
    assert export_label_ids(None, ["1", "2"]) is None
