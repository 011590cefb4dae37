"""The recipe's steps: stage learning-rate schedules and the frozen/unfrozen backbone."""

import numpy as np
import pytest

from conftest import toy_texts
from kerasft import recipe


@pytest.mark.parametrize("linear_decay, final_lr", [(True, 0.0), (False, 1e-3)])
def test_stage_learning_rate_schedule(tiny_preset, linear_decay, final_lr):
    clf = recipe.load_pretrained_classifier(str(tiny_preset), num_classes=2, sequence_length=16)
    texts, labels = toy_texts(64)
    train = recipe.encode(clf, texts, np.array(labels), batch_size=16, shuffle=True)
    history = recipe.train_stage(
        clf, train, epochs=2, learning_rate=1e-3, train_base=True,
        linear_decay=linear_decay, verbose=0,
    )  # fmt: skip
    optimizer = history.model.optimizer
    assert int(optimizer.iterations) == 2 * len(train)
    assert float(optimizer.learning_rate) == pytest.approx(final_lr, abs=1e-9)
    assert clf.backbone.trainable


def test_frozen_stage_leaves_backbone_weights_unchanged(tiny_preset):
    clf = recipe.load_pretrained_classifier(str(tiny_preset), num_classes=2, sequence_length=16)
    texts, labels = toy_texts(64)
    before = [np.array(w) for w in clf.backbone.get_weights()]
    head_before = np.array(clf.output_dense.kernel)
    train = recipe.encode(clf, texts, np.array(labels), batch_size=16, shuffle=True)
    recipe.train_stage(clf, train, epochs=1, learning_rate=1e-2, train_base=False, verbose=0)
    assert all(
        np.array_equal(a, b) for a, b in zip(before, clf.backbone.get_weights(), strict=True)
    )
    assert not np.array_equal(head_before, np.array(clf.output_dense.kernel))
