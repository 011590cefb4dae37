"""`RecipeConfig` is the one source of every fit option: flags, `config.json` and `--resume`."""

import dataclasses
import json

import pytest

from kerasft.cli import parser as cli
from kerasft.cli import preflight
from kerasft.training.config import RecipeConfig, flag_name
from kerasft.training.tuner import TwoStageFineTuner

# A value other than the default for every field (a field missing here still round-trips its
# default; `test_every_field_has_a_non_default_example` asks for one).
EXAMPLES = {
    "preset": "some/dir",
    "num_classes": 3,
    "sequence_length": 64,
    "warmup_epochs": 1,
    "warmup_learning_rate": 5e-4,
    "finetune_epochs": 3,
    "finetune_learning_rate": 2e-5,
    "batch_size": 16,
    "seed": 7,
    "cache_features": False,
    "finetune_schedule": "constant",
    "select_best": "f1",
    "early_stopping_patience": 2,
    "weight_decay": [0.0, 0.01],
    "warmup_ratio": 0.1,
    "max_grad_norm": 1.0,
    "gradient_accumulation_steps": 2,
    "mixed_precision": "bfloat16",
    "class_weight": {"1": 2.5, "0": 1.0},
    "finetune_method": "lora",
    "lora_rank": 4,
    "lora_alpha": 16.0,
    "lora_targets": ["query", "key"],
    "label_smoothing": 0.1,
    "freeze_word_embeddings": True,
    "bucket_width": 1,
}
FIELDS = dataclasses.fields(RecipeConfig)


def fit_action(name: str):
    parser = cli.build_parser()
    fit = parser._subparsers._group_actions[0].choices["fit"]
    return {a.dest: a for a in fit._actions}[name]


def parse_fit(*flags: str):
    return cli.build_parser().parse_args(["fit", "--out", "run", *flags])


def test_every_field_has_a_non_default_example():
    assert {f.name for f in FIELDS} <= set(EXAMPLES)
    for field in FIELDS:
        assert EXAMPLES[field.name] != field.default, field.name


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_field_is_a_fit_flag_with_its_default_and_help(field):
    action = fit_action(field.name)
    assert flag_name(field) in action.option_strings
    assert action.help == field.metadata["help"]
    assert getattr(parse_fit(), field.name) == field.default
    if field.metadata["choices"]:
        assert tuple(action.choices) == field.metadata["choices"]
    assert cli.recipe_from_args(parse_fit()) == RecipeConfig()


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_each_flag_sets_its_field_alone(field):
    recipe = RecipeConfig(**{field.name: EXAMPLES[field.name]})
    flags = cli.recipe_flags(recipe)
    assert flags[0] == flag_name(field)
    assert cli.recipe_from_args(parse_fit(*flags)) == recipe


def test_all_flags_round_trip_through_config_json_and_resume(tmp_path):
    recipe = RecipeConfig(**EXAMPLES)
    args = parse_fit(*cli.recipe_flags(recipe))
    assert cli.recipe_from_args(args) == recipe
    # config.json: the tuner's config, as `rundir.write_run` stores it
    tuner = TwoStageFineTuner(recipe=recipe)
    config = json.loads(json.dumps(tuner.get_config()))
    assert TwoStageFineTuner.from_config(config).recipe == recipe
    # --resume: fit-args.json as `cmd_fit` writes it, read back into a bare `--resume RUN`
    options = cli.run_options()
    saved = json.loads(json.dumps({k: getattr(args, k) for k in options}))
    resumed = cli.build_parser().parse_args(["fit", "--resume", "run"])
    preflight.resolve_interrupted(resumed, tmp_path / "run", saved, options)
    assert cli.recipe_from_args(resumed) == recipe


def test_an_interrupted_run_with_other_options_is_named_by_flag(tmp_path):
    options = cli.run_options()
    saved = {k: getattr(parse_fit(), k) for k in options}
    typed = parse_fit("--warmup-lr", "0.002")
    with pytest.raises(FileExistsError, match=r"--warmup-lr 0.001 -> 0.002"):
        preflight.resolve_interrupted(typed, tmp_path / "run", saved, options)


def test_tuner_keywords_are_the_recipe_fields():
    tuner = TwoStageFineTuner(**{k: v for k, v in EXAMPLES.items() if k != "preset"})
    assert tuner.recipe == RecipeConfig(**{**EXAMPLES, "preset": RecipeConfig.preset})
    assert tuner.lora_rank == 4 and tuner.num_classes == 3  # attributes read the recipe
    with pytest.raises(ValueError, match=r"Unknown recipe keys \['learning_rate'\]"):
        TwoStageFineTuner(learning_rate=0.1)
    with pytest.raises(ValueError, match="either recipe=RecipeConfig"):
        TwoStageFineTuner(recipe=RecipeConfig(), batch_size=8)


def test_bad_flag_values_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_fit("--class-weight", "heavy")
    assert "expected 'balanced' or LABEL=WEIGHT" in capsys.readouterr().err


def test_one_weight_decay_value_is_both_stages():
    assert cli.recipe_from_args(parse_fit("--weight-decay", "0.1")).weight_decay == 0.1
    assert cli.recipe_from_args(parse_fit("--weight-decay", "0", "0.1")).weight_decay == [0, 0.1]


def test_mixed_precision_none_opts_out_of_the_auto_default(capsys):
    assert parse_fit().mixed_precision == "auto"
    off = RecipeConfig(mixed_precision=None)
    assert cli.recipe_flags(off) == ["--mixed-precision", "none"]
    assert cli.recipe_from_args(parse_fit(*cli.recipe_flags(off))) == off
    with pytest.raises(SystemExit):
        parse_fit("--mixed-precision", "fp8")
    error = capsys.readouterr().err
    assert "must be one of auto, none, bfloat16, float16. Received: 'fp8'" in error
