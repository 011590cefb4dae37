"""Recipe validation and config round trips."""

import json

import pytest

from kerasft.training.config import RecipeConfig
from kerasft.training.tuner import TwoStageFineTuner


def test_tuner_config_json_round_trip():
    tuner = TwoStageFineTuner(
        "some/dir", num_classes=3, warmup_epochs=0, finetune_learning_rate=2e-5
    )
    config = json.loads(json.dumps(tuner.get_config()))
    again = TwoStageFineTuner.from_config(config)
    assert again.get_config() == tuner.get_config()
    for name, value in config.items():
        assert getattr(again, name) == value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1. Received: batch_size=0"),
        ({"sequence_length": 4}, r"sequence_length must be an int in \[8, 512\]"),
        ({"warmup_learning_rate": -1.0}, r"warmup_learning_rate must be a float in \(0, 1\]"),
        ({"finetune_epochs": 1.5}, "finetune_epochs must be an int >= 0. Received"),
        ({"num_classes": 1}, "num_classes must be >= 2 or None. Received: num_classes=1"),
        ({"warmup_epochs": 0, "finetune_epochs": 0}, "At least one stage needs epochs"),
    ],
)
def test_bad_recipe_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TwoStageFineTuner(**kwargs)


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match=r"Unknown recipe keys \['learning_rate'\]"):
        RecipeConfig.from_dict({"learning_rate": 0.1})
