"""The `kerasft` parser: one builder per command, the recipe's flags from `RecipeConfig`'s
fields, the data-file flags declared once, and the options that define a run.

Building the parser loads no Keras, backend or runtime: `kerasft --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses

from kerasft import BACKENDS
from kerasft.data import DATA_ENV, REFERENCE_SEED
from kerasft.exporters.formats import FORMATS, INT8_MODES, int8_help
from kerasft.exporters.verify import AUTO_MIN_AGREEMENT, INT8_MAX_ACCURACY_DROP, INT8_MIN_AGREEMENT
from kerasft.labelling.labeller import OUTPUT_FORMATS
from kerasft.labelling.textstream import INPUT_FORMATS
from kerasft.training.config import RecipeConfig, flag_name

DEFAULT_BACKEND = "torch"


def _devices(text: str) -> int | str:
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a device count >= 1 or 'all', got {text!r}")
    return int(text)


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `RecipeConfig` field: its flag, default, help and choices come from it."""
    for field in dataclasses.fields(RecipeConfig):
        meta, flag = field.metadata, flag_name(field)
        if isinstance(field.default, bool):  # `--no-X` turns off, any other flag turns on
            action = "store_false" if field.default else "store_true"
            parser.add_argument(
                flag, dest=field.name, action=action, default=field.default, help=meta["help"]
            )
            continue
        parse = meta["parse"]
        metavar = meta["metavar"]
        if metavar is None and not meta["choices"]:
            metavar = flag[2:].replace("-", "_").upper()  # `--warmup-lr WARMUP_LR`
        parser.add_argument(
            flag, dest=field.name, default=field.default, help=meta["help"],
            type=parse if parse in (None, int, float) else _arg_type(parse),
            choices=meta["choices"], metavar=metavar, nargs=meta["nargs"],
        )  # fmt: skip


def _arg_type(parse):
    """`parse` for argparse: its `ValueError` message becomes the usage error."""

    def arg_type(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    arg_type.__name__ = parse.__name__
    return arg_type


def recipe_from_args(args: argparse.Namespace):
    """The `RecipeConfig` of parsed `kerasft fit` arguments.

    Raises:
        ValueError: a value out of range (the message names the option).
    """
    values = {}
    for field in dataclasses.fields(RecipeConfig):
        value = getattr(args, field.name)
        if field.metadata["nargs"] and isinstance(value, list) and len(value) == 1:
            value = value[0]  # `--weight-decay X`: one value for both stages
        values[field.name] = value
    return RecipeConfig(**values)


def recipe_flags(recipe) -> list[str]:
    """The `kerasft fit` flags that give `recipe` (defaults left out): the inverse of
    `recipe_from_args`.

    Example:
        >>> recipe_flags(RecipeConfig(warmup_epochs=1, weight_decay=[0.0, 0.01]))
        ['--warmup-epochs', '1', '--weight-decay', '0.0', '0.01']
    """
    flags = []
    for field in dataclasses.fields(recipe):
        value, flag = getattr(recipe, field.name), flag_name(field)
        if value == field.default:
            continue
        if isinstance(value, bool):  # booleans are flags without a value
            flags.append(flag)
        elif value is None:  # off, where the default is on (`--mixed-precision none`)
            flags += [flag, "none"]
        elif isinstance(value, dict):
            flags += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        elif isinstance(value, list):
            texts = [str(v) for v in value]
            flags += [flag, *texts] if field.metadata["nargs"] else [flag, ",".join(texts)]
        else:
            flags += [flag, str(value)]
    return flags


def _data_file_flags() -> argparse.ArgumentParser:
    """The data-file flags `fit`, `predict --data` and `evaluate` share, declared once (an
    argparse parent)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("data file")
    group.add_argument("--text-column", help="the text column (default: detected)")
    group.add_argument(
        "--label-column",
        help="the label column (default: detected; predict reads it only with --score)",
    )
    group.add_argument("--encoding", default="utf-8", help="the data file's text encoding")
    group.add_argument(
        "--no-header", action="store_true",
        help="CSV/TSV: the first row is data; columns are named 0, 1, ... (default: detected)",
    )  # fmt: skip
    invalid = "drop rows without a text (or without a label, where labels are read)"
    group.add_argument("--skip-invalid", action="store_true", help=invalid)
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The `kerasft` parser: one builder per command, the data-file flags declared once."""
    parser = argparse.ArgumentParser(prog="kerasft", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help=f"Keras backend (default: $KERAS_BACKEND, else {DEFAULT_BACKEND})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data_file = _data_file_flags()
    _fit_parser(sub, data_file)
    _export_parser(sub)
    _predict_parser(sub, data_file)
    _evaluate_parser(sub, data_file)
    sub.add_parser(
        "bench",
        add_help=False,
        help="latency of every variant vs Hugging Face peers "
        "(python -m kerasft.benchmarks.latency)",
    )
    return parser


def _fit_parser(sub, data_file: argparse.ArgumentParser) -> None:
    fit = sub.add_parser(
        "fit", parents=[data_file], help="two-stage fine-tuning on the reference 60/20/20 split"
    )
    fit.add_argument("--data", help=f"data file (default: ${DATA_ENV})")
    fit.add_argument("--out", help="run directory to create")
    fit.add_argument(
        "--resume", metavar="RUN",
        help="continue the interrupted run RUN from its last completed epoch, with the options "
        "it was started with (running the same command again does the same)",
    )  # fmt: skip
    fit.add_argument("--limit", type=int, help="stratified subsample of N rows before the split")
    fit.add_argument(
        "--split-seed", type=int, default=REFERENCE_SEED,
        help=f"random_state of the 60/20/20 split, apart from --seed (default {REFERENCE_SEED}, "
        "the reference split)",
    )  # fmt: skip
    fit.add_argument(
        "--validation-data", metavar="FILE",
        help="validation rows from their own file (labels matched by name); see --test-data",
    )  # fmt: skip
    fit.add_argument(
        "--test-data", metavar="FILE",
        help="test rows from their own file. With both, --data is used whole for training; "
        "with one, --data is split 75/25 (stratified, --split-seed) into training rows and the "
        "other set",
    )  # fmt: skip
    _add_recipe_flags(fit)
    fit.add_argument(
        "--devices", type=_devices, metavar="N|all",
        help="data-parallel training over N devices, or all (jax: keras.distribution, "
        "tensorflow: tf.distribute, torch: torch.distributed, one process per device; default: "
        "one device). --batch-size stays the global batch",
    )  # fmt: skip
    fit.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    fit.add_argument("--quiet", action="store_true", help="no per-step progress bars")


def _export_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="export a run to ONNX, OpenVINO, SavedModel, LiteRT, a KerasHub preset or a "
        "transformers checkpoint, verified",
    )
    export.add_argument("run_dir", help="a `kerasft fit` run directory")
    export.add_argument("--format", required=True, choices=list(FORMATS), help="artifact format")
    export.add_argument("--int8", choices=INT8_MODES, help=int8_help())
    export.add_argument(
        "--min-agreement", type=float,
        help="INT8 gate: least label agreement with fp32 on held-out texts, at batch 1 and 32 "
        f"(default {INT8_MIN_AGREEMENT}; {AUTO_MIN_AGREEMENT} with --int8 auto)",
    )  # fmt: skip
    export.add_argument(
        "--max-accuracy-drop", type=float, default=INT8_MAX_ACCURACY_DROP,
        help="INT8 gate: largest accuracy drop on held-out labelled texts, as a fraction "
        f"(default {INT8_MAX_ACCURACY_DROP} = half a point)",
    )  # fmt: skip
    export.add_argument(
        "--keep-fp32", type=int, metavar="N",
        help="onnx --int8 calibrated or dynamic: keep the N most sensitive nodes in fp32 "
        "(measured); default: all quantized, more kept only when the gate needs it",
    )  # fmt: skip
    export.add_argument(
        "--precision", choices=("f32", "bf16"), default="f32",
        help="openvino: inference precision to verify with and record (default f32)",
    )  # fmt: skip
    export.add_argument("--out", required=True, help="export directory to create")
    export.add_argument("--batch-size", type=int, help="fix the batch axis to N (default: dynamic)")
    export.add_argument(
        "--sequence-length",
        type=int,
        help="fix the sequence axis to N tokens; texts are cut to N (default: dynamic)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _predict_parser(sub, data_file: argparse.ArgumentParser) -> None:
    predict = sub.add_parser(
        "predict", parents=[data_file],
        help="label texts, or a file of texts, with a run or export directory",
    )  # fmt: skip
    predict.add_argument("run_dir", help="a `kerasft fit` run or a `kerasft export` directory")
    predict.add_argument("texts", nargs="*", help="texts to label (or --data)")
    predict.add_argument(
        "--data", metavar="FILE",
        help="label every row of FILE (JSONL/JSON/CSV/TSV/.txt, optionally gzipped; - reads "
        "standard input, one text per line unless --input-format), streamed in chunks",
    )  # fmt: skip
    file_only = predict.add_argument_group("with --data")
    file_only.add_argument(
        "--out", metavar="FILE",
        help="--data: write the predictions to FILE, complete or not at all (default: stdout)",
    )  # fmt: skip
    file_only.add_argument(
        "--output-format", choices=OUTPUT_FORMATS,
        help="--data: jsonl (default) or csv (default for a .csv --out): line, id, label and "
        "one probability per class",
    )  # fmt: skip
    input_format = "--data: the file's format (default: from its suffix; lines for stdin)"
    file_only.add_argument("--input-format", choices=INPUT_FORMATS, help=input_format)
    file_only.add_argument(
        "--id-column", help="--data: a column copied to each output row (default: `id`, if any)"
    )
    file_only.add_argument(
        "--score", action="store_true",
        help="--data: score the predictions against the file's label column (--label-column, "
        "default: detected); labels are otherwise ignored",
    )  # fmt: skip
    file_only.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    file_only.add_argument(
        "--quiet", action="store_true",
        help="--data: no progress on stderr (shown only when stderr is a terminal)",
    )  # fmt: skip
    # for the check that these (and the data-file flags) are not given with texts, not --data
    only_with_data = [*file_only._group_actions, *data_file._actions]
    predict.set_defaults(file_flags=[(a.option_strings[-1], a.dest, a.default)
                                     for a in only_with_data])  # fmt: skip
    predict.add_argument(
        "--json", action="store_true",
        help="texts: a JSON list of {text, label, probability} instead of 'label<TAB>probability"
        "<TAB>text' lines",
    )  # fmt: skip
    predict.add_argument(
        "--manifest-sha256", help="export only: refuse a manifest whose sha256 differs"
    )


def _evaluate_parser(sub, data_file: argparse.ArgumentParser) -> None:
    evaluate = sub.add_parser(
        "evaluate", parents=[data_file], help="score every row of a labelled file"
    )
    evaluate.add_argument("run_dir", help="a `kerasft fit` run directory")
    evaluate.add_argument("--data", required=True, help="labelled data file, scored whole")
    evaluate.add_argument(
        "--json",
        action="store_true",
        help="the metrics as one JSON object instead of 'name: value' lines",
    )


# `kerasft fit` options that define a run, besides the recipe's: the same values continue an
# interrupted run (`run_options`).
DATA_OPTIONS = (
    "backend", "data", "text_column", "label_column", "skip_invalid", "limit", "split_seed",
    "validation_data", "test_data", "encoding", "no_header",
)  # fmt: skip


def run_options() -> dict[str, str]:
    """`{dest: flag}` of every `kerasft fit` option that defines a run (data and recipe)."""
    options = {name: "--" + name.replace("_", "-") for name in DATA_OPTIONS}
    options.update((f.name, flag_name(f)) for f in dataclasses.fields(RecipeConfig))
    return options
