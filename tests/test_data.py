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
    with pytest.raises(DataError, match=r"m\.jsonl: line 2, column \d+: malformed JSON: .*"
                       r"Expected one JSON object per line"):  # fmt: skip
        load_dataset(f)


def test_json_line_cut_short_names_line_column_and_expectation(tmp_path):
    """A line cut in the middle of a string (a truncated download) or a raw tab inside one: the
    message says where, what, and what a line should be, not json's bare "... at"."""
    f = write(tmp_path / "cut.jsonl", '{"text": "a", "label": 1}\n{"text": "half a headl\n')
    with pytest.raises(DataError) as cut:
        load_dataset(f)
    assert str(cut.value) == (
        f"{f}: line 2, column 23: malformed JSON: Invalid control character (the line ends "
        'inside a string: cut short?). Expected one JSON object per line, such as {"text": '
        '"...", "label": 1}.'
    )
    f = write(tmp_path / "tab.jsonl", '{"text": "a\tb", "label": 1}\n')
    tab = r"line 1, column 12: malformed JSON: Invalid control character \('\\t' inside a string"
    with pytest.raises(DataError, match=tab):
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
    with pytest.raises(DataError, match=r"d\.tsv: line 3: missing label \(''\) in column 'label'"):
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


def test_excel_bom_in_every_format_is_ignored(tmp_path):
    bom = "\ufeff"
    files = {
        "a.csv": bom + "text,label\ngood day,1\nbad day,0\n",
        "a.tsv": bom + "text\tlabel\ngood day\t1\nbad day\t0\n",
        "a.jsonl": bom + '{"text": "good day", "label": 1}\n{"text": "bad day", "label": 0}\n',
        "a.json": bom + '[{"text": "good day", "label": 1}, {"text": "bad day", "label": 0}]',
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        data = load_dataset(tmp_path / name)
        assert data.columns == {"text": "text", "label": "label"}, name
        assert data.texts == ["good day", "bad day"] and data.label_names == ["0", "1"], name


def test_gzipped_files_are_read(tmp_path):
    import gzip

    rows = "".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n" for i in range(6))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(rows)
    with gzip.open(tmp_path / "d.csv.gz", "wt", encoding="utf-8") as f:
        f.write("sentence,label\nhello,a\nbye,b\n")
    assert len(load_dataset(tmp_path / "d.jsonl.gz")) == 6
    assert load_dataset(tmp_path / "d.csv.gz").label_names == ["a", "b"]
    (tmp_path / "d.txt.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt\.gz'.*optionally gzipped"):
        load_dataset(tmp_path / "d.txt.gz")


@pytest.mark.parametrize(
    "spelling, line",
    [("", "text,label\nok,1\nno label,\n"), ("nan", "text,label\nok,1\nno label,nan\n"),
     ("NaN", "text,label\nok,1\nno label,NaN\n"), ("None", "text,label\nok,1\nno label,None\n"),
     ("null", '{"text": "ok", "label": 1}\n{"text": "no label", "label": null}\n'),
     ("NaN-json", '{"text": "ok", "label": 1}\n{"text": "no label", "label": NaN}\n')],
)  # fmt: skip
def test_missing_labels_in_every_spelling(tmp_path, spelling, line):
    path = tmp_path / ("d.jsonl" if line.startswith("{") else "d.csv")
    path.write_text(line)
    with pytest.raises(DataError, match=rf"{path.name}: line 3|{path.name}: line 2"):
        load_dataset(path)
    with pytest.raises(DataError, match="missing label"):
        load_dataset(path)


def test_single_member_class_names_file_class_and_count(tmp_path):
    from kerasft.data import split_dataset

    rows = [(f"text {i}", "common") for i in range(40)] + [("lonely text", "rare")]
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    with pytest.raises(DataError, match=rf"{path}: class 'rare' has 1 row\(s\); .* at least 3"):
        split_dataset(load_dataset(path))
