"""Data loading, bad-input messages, the reference split and the stratified limit."""

import json

import numpy as np
import pytest

from kerasft.data import DataError, load_dataset, reference_split, stratified_limit


def write(path, text):
    path.write_text(text)
    return path


def test_jsonl_sarcasm_columns_autodetected(tmp_path):
    f = write(
        tmp_path / "d.jsonl",
        '{"article_link": "x", "headline": "a b", "is_sarcastic": 1}\r\n'
        '{"article_link": "y", "headline": "c d", "is_sarcastic": 0}\r\n',
    )
    ds = load_dataset(f)
    assert ds.texts == ["a b", "c d"]
    assert ds.labels.tolist() == [1, 0]
    assert ds.label_names == ["0", "1"]
    assert ds.columns == {"text": "headline", "label": "is_sarcastic"}


def test_json_array(tmp_path):
    rows = [{"headline": "x", "is_sarcastic": 0}, {"headline": "y", "is_sarcastic": 1}]
    ds = load_dataset(write(tmp_path / "d.json", json.dumps(rows)))
    assert ds.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "name, text",
    [
        ("d.tsv", "label\tsentence\npos\tnice one\nneg\tbad one\npos\tgreat\n"),
        ("d.tsv", "sentence\tlabel\nnice one\tpos\nbad one\tneg\ngreat\tpos\n"),
        ("d.csv", 'sentence,label\n"nice, one",pos\nbad one,neg\ngreat,pos\n'),
    ],
)
def test_tsv_csv_with_string_labels(tmp_path, name, text):
    ds = load_dataset(write(tmp_path / name, text))
    assert ds.label_names == ["neg", "pos"]
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.texts[0] in ("nice one", "nice, one")


def test_int_labels_sort_numerically(tmp_path):
    ds = load_dataset(write(tmp_path / "d.csv", "text,label\na,10\nb,2\nc,2\n"))
    assert ds.label_names == ["2", "10"]
    assert ds.labels.tolist() == [1, 0, 0]


def test_columns_by_name(tmp_path):
    f = write(tmp_path / "d.csv", "body,title,stars\nx,a,1\ny,b,2\n")
    ds = load_dataset(f, text_column="body", label_column="stars")
    assert ds.texts == ["x", "y"]


# --- bad input: every message names the file, the row and the problem ---------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset(tmp_path / "nope.jsonl")


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"e\.jsonl: the file is empty"):
        load_dataset(write(tmp_path / "e.jsonl", ""))


def test_header_only_csv(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        load_dataset(write(tmp_path / "h.csv", "text,label\n"))


def test_malformed_json_line(tmp_path):
    f = write(tmp_path / "m.jsonl", '{"headline": "a", "is_sarcastic": 1}\n{"headline": "b", \n')
    with pytest.raises(DataError, match=r"m\.jsonl: line 2: malformed JSON"):
        load_dataset(f)


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'.*Supported"):
        load_dataset(write(tmp_path / "d.xlsx", "x"))


def test_missing_text_column(tmp_path):
    with pytest.raises(DataError, match=r"no text column found among \['body', 'label'\]"):
        load_dataset(write(tmp_path / "d.csv", "body,label\nx,1\ny,0\n"))


def test_ambiguous_label_column(tmp_path):
    f = write(tmp_path / "d.csv", "text,label,target\nx,1,1\ny,0,0\n")
    with pytest.raises(DataError, match=r"ambiguous label column: \['label', 'target'\]"):
        load_dataset(f)


def test_named_column_not_found(tmp_path):
    with pytest.raises(DataError, match=r"text column 'body' not found. Available columns"):
        load_dataset(write(tmp_path / "d.csv", "text,label\nx,1\n"), text_column="body")


def test_missing_label_names_line(tmp_path):
    f = write(tmp_path / "d.tsv", "label\tsentence\n1\tok\n\tno label here\n0\tfine\n")
    with pytest.raises(DataError, match=r"d\.tsv: line 3: missing label in column 'label'"):
        load_dataset(f)


def test_skip_invalid_counts_rows(tmp_path, caplog):
    f = write(tmp_path / "d.tsv", "label\tsentence\n1\tok\n\tno label\n0\t\n0\tfine\n")
    ds = load_dataset(f, skip_invalid=True)
    assert (len(ds), ds.skipped) == (2, 2)
    assert "skipped 2 invalid rows" in caplog.text


def test_single_class(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,1\nb,1\n")
    with pytest.raises(DataError, match=r"only one class \('1'\)"):
        load_dataset(f)


def test_ragged_csv_row(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,1\nb,0,extra\n")
    with pytest.raises(DataError, match="line 3: more fields than the header"):
        load_dataset(f)


# --- split and limit -------------------------------------------------------------------------


def test_reference_split_selects_sklearn_rows(sarcasm_file):
    from sklearn.model_selection import train_test_split

    ds = load_dataset(sarcasm_file)
    assert len(ds) == 26709 and int(ds.labels.sum()) == 11724
    x, y = np.array(ds.texts, dtype=object), ds.labels
    x_rest, x_test, y_rest, _ = train_test_split(x, y, test_size=0.2, stratify=y, random_state=30)
    x_train, x_val, _, _ = train_test_split(
        x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=30
    )
    train, val, test = reference_split(ds.labels)
    assert (len(train), len(val), len(test)) == (16025, 5342, 5342)
    assert x[train].tolist() == x_train.tolist()
    assert x[val].tolist() == x_val.tolist()
    assert x[test].tolist() == x_test.tolist()
    assert len(set(train) | set(val) | set(test)) == len(ds)


def test_stratified_limit():
    labels = np.array([0] * 600 + [1] * 400)
    keep = stratified_limit(labels, 100, seed=30)
    assert len(keep) == 100 and np.all(np.diff(keep) > 0)
    assert labels[keep].sum() == 40
    assert keep.tolist() == stratified_limit(labels, 100, seed=30).tolist()
    with pytest.raises(
        DataError, match=r"limit must be an int in \[8, 1000\]. Received: limit=5000"
    ):
        stratified_limit(labels, 5000)
