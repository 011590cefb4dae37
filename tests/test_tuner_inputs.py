"""Bad inputs to the tuner fail before any model is loaded, with a message that names them."""

import pytest

from kerasft.data import DataError
from kerasft.data import label_ids as _label_ids
from kerasft.training.stages import merge_histories
from kerasft.training.tuner import TwoStageFineTuner


def tuner(**kwargs):
    return TwoStageFineTuner("does/not/matter", **kwargs)


def test_fewer_rows_than_one_batch():
    with pytest.raises(
        DataError, match="Fewer training rows than one batch. Received: rows=10, batch_size=32"
    ):
        tuner().fit(["a"] * 10, [0, 1] * 5)


def test_single_class_labels():
    with pytest.raises(DataError, match=r"single class \('1'\)"):
        tuner(batch_size=2).fit(["a"] * 4, [1, 1, 1, 1])


def test_length_mismatch():
    with pytest.raises(DataError, match=r"len\(x\)=3, len\(y\)=2"):
        tuner(batch_size=2).fit(["a", "b", "c"], [0, 1])


def test_non_string_text():
    with pytest.raises(DataError, match=r"Texts must be strings. Received: x\[1\]=3"):
        tuner(batch_size=2).fit(["a", 3, "c"], [0, 1, 0])


def test_more_classes_than_num_classes():
    with pytest.raises(DataError, match="more than num_classes=2"):
        tuner(batch_size=2, num_classes=2).fit(["a", "b", "c"], ["x", "y", "z"])


def test_predict_before_fit():
    with pytest.raises(RuntimeError, match="not fitted yet"):
        tuner().predict(["a"])


def test_save_needs_keras_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"ending in \.keras. Received: path="):
        tuner().save(tmp_path / "model.h5")


def test_label_ids_forms():
    ids, names = _label_ids(["b", "a", "b"], None)
    assert ids.tolist() == [1, 0, 1] and names == ["a", "b"]
    with pytest.raises(DataError, match=r"Unknown labels \['c'\]. Known labels: \['a', 'b'\]"):
        _label_ids(["c"], ["a", "b"])


def test_merge_histories_marks_stages():
    import keras

    a, b = keras.callbacks.History(), keras.callbacks.History()
    a.history, a.epoch = {"loss": [3.0]}, [0]
    b.history, b.epoch = {"loss": [2.0, 1.0]}, [1, 2]
    merged = merge_histories(a, b)
    assert merged.history == {"stage": [1, 2, 2], "loss": [3.0, 2.0, 1.0]}
    assert merged.epoch == [0, 1, 2]
