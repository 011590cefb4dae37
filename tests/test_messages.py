"""Errors in the words the user typed: `--flags` on the command line, keywords in Python."""

import subprocess
import sys

import pytest

from conftest import CLI_ENV
from kerasft.cli import main
from kerasft.data import DataError, load_dataset
from kerasft.training.config import RecipeConfig


def _cli_error(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_two_text_columns_name_text_column(tmp_path, capsys):
    data = tmp_path / "two.csv"
    data.write_text("text,headline,label\na,b,1\nc,d,0\n")
    with pytest.raises(DataError, match=r"Choose one with text_column=\.\.\.\.$"):
        load_dataset(data)
    err = _cli_error(["fit", "--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert "ambiguous text column: ['text', 'headline'] all match. Choose one with " in err
    assert err.rstrip().endswith("--text-column TEXT_COLUMN.")


def test_no_label_column_names_label_column(tmp_path, capsys):
    data = tmp_path / "nolabel.jsonl"
    data.write_text('{"text": "a", "verdict": 1}\n')
    with pytest.raises(DataError, match=r"or name it with label_column=\.\.\.\.$"):
        load_dataset(data)
    err = _cli_error(["fit", "--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert err.rstrip().endswith("or name it with --label-column LABEL_COLUMN.")


def test_a_missing_label_names_skip_invalid(tmp_path, capsys):
    data = tmp_path / "gap.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match=r"line 2: .* pass skip_invalid=True to drop such rows"):
        load_dataset(data)
    err = _cli_error(["fit", "--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert (
        "line 2: missing label (None) in column 'label'. Fix the row or pass --skip-invalid " in err
    )


def test_a_header_of_unknown_names_suggests_no_header(tmp_path, capsys):
    data = tmp_path / "odd.csv"
    data.write_text("words,class_id\nsome text,1\nother text,0\nmore text,1\n")
    with pytest.raises(DataError, match=r"not column names, pass header=False\.$"):
        load_dataset(data)
    err = _cli_error(["fit", "--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert err.rstrip().endswith("not column names, pass --no-header.")


def test_an_encoding_error_names_encoding(tmp_path, capsys):
    data = tmp_path / "latin.csv"
    data.write_bytes("text,label\ncaf\xe9 day,1\nbad,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"Pass the file's encoding: encoding='latin-1'"):
        load_dataset(data)
    err = _cli_error(["fit", "--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert "Pass the file's encoding: --encoding latin-1 (or cp1252, ...)." in err


def test_a_bad_recipe_value_names_the_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"Received: warmup_epochs=-1$"):
        RecipeConfig(warmup_epochs=-1)
    err = _cli_error(["fit", "--data", "x.jsonl", "--out", str(tmp_path / "r"),
                      "--warmup-epochs", "0", "--finetune-epochs", "0"], capsys)  # fmt: skip
    assert (
        "At least one stage needs epochs. Received: --warmup-epochs 0, --finetune-epochs 0" in err
    )


def test_a_bad_backend_lists_the_three(tmp_path):
    env = {**CLI_ENV, "KERAS_BACKEND": "bogus"}
    cli = subprocess.run([sys.executable, "-m", "kerasft", "predict", str(tmp_path), "hi"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert cli.returncode == 2
    assert cli.stderr.strip() == (
        "kerasft predict: error: KERAS_BACKEND='bogus' is not a backend kerasft runs on. Use one "
        "of: jax, tensorflow, torch (--backend NAME, or unset KERAS_BACKEND for torch)."
    )
    api = subprocess.run([sys.executable, "-c", "from kerasft import TwoStageFineTuner"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert api.returncode == 1
    assert api.stderr.strip().splitlines()[-1] == (
        "ValueError: KERAS_BACKEND='bogus' is not a backend kerasft runs on. Set it to one of: "
        "jax, tensorflow, torch."
    )


def test_a_malformed_json_line_names_line_and_expectation(tmp_path, capsys):
    data = tmp_path / "cut.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": "cut sho\n')
    err = _cli_error(["fit", "--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert err.strip() == (
        f"kerasft fit: error: {data}: line 2, column 18: malformed JSON: Invalid control "
        "character (the line ends inside a string: cut short?). Expected one JSON object per "
        'line, such as {"text": "...", "label": 1}.'
    )
