"""The recipe's steps: stage learning-rate schedules and the frozen/unfrozen backbone."""

import numpy as np
import pytest

from conftest import BACKENDS, run_backend, toy_texts
from kerasft.training import recipe


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


CLS_ONLY_CODE = """
import json, keras, numpy as np
from kerasft.training import recipe
clf = recipe.load_pretrained_classifier({preset!r}, num_classes=2, sequence_length=16)
rng = np.random.default_rng(0)
vocab = clf.backbone.vocabulary_size
ids = rng.integers(5, vocab, (8, 12)).astype("int32"); ids[:, 0] = 2
mask = np.ones((8, 12), "int32")
for row, n in enumerate(rng.integers(3, 13, 8)):
    ids[row, n:] = 0; mask[row, n:] = 0
x = {{"token_ids": ids, "padding_mask": mask}}
full = keras.Model(clf.input, clf.output)
core = recipe.core_model(clf)
last = clf.backbone.transformer_layers[-1]
logits = [keras.ops.convert_to_numpy(m(x, training=False)) for m in (full, core)]
print(json.dumps({{
    "diff": float(np.abs(logits[0] - logits[1]).max()),
    "same_weights": sorted(map(id, full.trainable_weights))
    == sorted(map(id, core.trainable_weights)),
    # the last layer's feed-forward is called by the view itself (at [CLS]), not inside the
    # backbone's own graph, as in the classifier's
    "ffn_in_view": any(
        x is last._feedforward_intermediate_dense for x in core._flatten_layers()
    ) and not any(x is last for x in core._flatten_layers()),
    "ffn_in_full": any(x is last._feedforward_intermediate_dense for x in full.layers),
}}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_view_computes_the_last_layer_at_cls_only(backend, tiny_preset):
    """The training/prediction view runs the last encoder layer at [CLS] alone: the classifier's
    own weights (every one of them trains), its logits to float rounding."""
    r = run_backend(backend, CLS_ONLY_CODE.format(preset=str(tiny_preset)))
    assert r["diff"] < 1e-5 and r["same_weights"]
    assert r["ffn_in_view"] and not r["ffn_in_full"]


PACKED_CODE = """
import json, keras, numpy as np
from kerasft.model import encoder
from kerasft.training import recipe
clf = recipe.load_pretrained_classifier({preset!r}, num_classes=2, sequence_length=16)
recipe.initialize_head(clf, 0)
packed_calls = []
packed = encoder.ClsEncoder._packed
encoder.ClsEncoder._packed = lambda *a, **k: packed_calls.append(1) or packed(*a, **k)
rng = np.random.default_rng(1)
ids = rng.integers(5, clf.backbone.vocabulary_size, (8, 12)).astype("int32"); ids[:, 0] = 2
mask = np.ones((8, 12), "int32")
for row, n in enumerate(rng.integers(3, 12, 8)):
    ids[row, n:] = 0; mask[row, n:] = 0
x = {{"token_ids": ids, "padding_mask": mask}}
mask2 = np.roll(mask, 3, axis=0)  # another batch, other rows of the table
second = {{"token_ids": (rng.integers(5, clf.backbone.vocabulary_size, ids.shape) * mask2)
          .astype("int32"), "padding_mask": mask2}}
core = recipe.core_model(clf)
view = next(x for x in core._flatten_layers() if isinstance(x, encoder.ClsEncoder))
out = {{"paths": [v.path for v in core.weights]}}
for skip in (True, False):
    view.skip_padding = skip
    out[str(skip)] = keras.ops.convert_to_numpy(core(x, training=False)).tolist()
    if keras.backend.backend() == "torch":
        import torch
        loss = core({{k: torch.as_tensor(v) for k, v in x.items()}}, training=False).square().sum()
        grads = torch.autograd.grad(loss, [v.value for v in core.trainable_weights])
        out["grads" + str(skip)] = [g.numpy().tolist() for g in grads]
        # a second batch: the packed path's kept word-embedding gradient holds its rows alone
        x2 = {{k: torch.as_tensor(v) for k, v in second.items()}}
        loss = core(x2, training=False).square().sum()
        grads = torch.autograd.grad(loss, [v.value for v in core.trainable_weights])
        out["second" + str(skip)] = [g.numpy().tolist() for g in grads]
        view.skip_padding = skip  # a training pass (dropout on packed tokens) runs too
        out["train_shape" + str(skip)] = list(core(x, training=True).shape)
out["packed_calls"] = len(packed_calls)
out["variables"] = len({{id(v) for v in clf.weights}})
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_tokens_give_the_padded_batch_logits_and_gradients(backend, tiny_preset):
    """On PyTorch the view packs a padded batch's real tokens (`kerasft.model.encoder`): the same
    logits and gradients as the padded batch, to float rounding; JAX and TensorFlow run the
    padded batch. The view holds the classifier's variables, each once."""
    r = run_backend(backend, PACKED_CODE.format(preset=str(tiny_preset)))
    assert np.allclose(r["True"], r["False"], atol=1e-6)
    assert len(r["paths"]) == len(set(r["paths"])) == r["variables"]
    if backend == "torch":
        assert r["packed_calls"] == 4  # inference, 2 gradient and a training pass; not unpacked
        for name in ("grads", "second"):
            for packed, padded in zip(r[name + "True"], r[name + "False"], strict=True):
                assert np.allclose(packed, padded, rtol=1e-4, atol=1e-7)
        assert r["train_shapeTrue"] == r["train_shapeFalse"] == [8, 2]
    else:
        assert r["packed_calls"] == 0


BF16_PACKED_CODE = """
import json, keras, numpy as np, torch
from kerasft.model import encoder
from kerasft.training import recipe
keras.config.set_dtype_policy("mixed_bfloat16")
clf = recipe.load_pretrained_classifier({preset!r}, num_classes=2, sequence_length=16)
recipe.initialize_head(clf, 0)
rng = np.random.default_rng(2)
ids = rng.integers(5, clf.backbone.vocabulary_size, (8, 12)).astype("int32"); ids[:, 0] = 2
mask = np.ones((8, 12), "int32")
for row, n in enumerate(rng.integers(3, 12, 8)):
    ids[row, n:] = 0; mask[row, n:] = 0
x = {{"token_ids": torch.as_tensor(ids), "padding_mask": torch.as_tensor(mask)}}
core = recipe.core_model(clf)
view = next(x for x in core._flatten_layers() if isinstance(x, encoder.ClsEncoder))
products = []
addmm = torch.addmm
torch.addmm = lambda *a, **k: products.append(a[1].dtype) or addmm(*a, **k)
out = {{}}
for skip in (True, False):
    view.skip_padding = skip
    features = view(x, training=False)
    out[str(skip)] = features.detach().float().numpy().tolist()
    out["dtype"] = str(features.dtype)
out["products"] = [str(d) for d in products]
print(json.dumps(out))
"""


def test_packed_path_in_bfloat16_takes_the_direct_products_and_matches_keras(tiny_preset):
    """Under mixed bfloat16 the packed path's direct projections and layer norms (see
    `kerasft.model.encoder`) compute in bfloat16 and give Keras' own layers' [CLS] features to
    bfloat16 rounding."""
    r = run_backend("torch", BF16_PACKED_CODE.format(preset=str(tiny_preset)))
    packed, padded = np.array(r["True"]), np.array(r["False"])
    assert r["dtype"] == "torch.bfloat16"
    assert r["products"] and set(r["products"]) == {"torch.bfloat16"}  # packed pass only
    scale = np.abs(padded).max()
    assert np.abs(packed - padded).max() <= 0.03 * scale


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


def test_label_smoothing_reaches_the_loss():
    """`label_smoothing` is the recipe's stage option and the compiled loss's smoothing: a
    confident right answer costs more with it than without."""
    import keras

    from kerasft.training.config import RecipeConfig
    from kerasft.training.recipe import compile_classifier

    assert RecipeConfig(label_smoothing=0.2).stage_options("warmup")["label_smoothing"] == 0.2
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2, use_bias=False)(inputs))
    model.layers[-1].set_weights([np.array([[20.0, -20.0], [-20.0, 20.0]])])
    x, y = np.eye(2, dtype="float32"), np.eye(2, dtype="float32")
    losses = {}
    for smoothing in (0.0, 0.2):
        compile_classifier(model, 1e-3, label_smoothing=smoothing)
        losses[smoothing] = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert losses[0.0] < 1e-6 < 1.0 < losses[0.2]


@pytest.mark.parametrize("num_classes", [2, 3])
def test_scores_from_a_confusion_matrix_equal_scores_from_predictions(num_classes):
    from kerasft.util.metrics import classification_metrics, confusion_metrics

    rng = np.random.default_rng(num_classes)
    true = rng.integers(0, num_classes, 500)
    predicted = np.where(rng.random(500) < 0.7, true, rng.integers(0, num_classes, 500))
    direct = classification_metrics(true, predicted, num_classes)
    assert confusion_metrics(direct["confusion_matrix"]) == direct


@pytest.mark.parametrize("bad", [[[1, 2]], [[1, -1], [0, 2]], [[1.5, 0], [0, 1]]])
def test_confusion_metrics_names_a_bad_matrix(bad):
    from kerasft.util.metrics import confusion_metrics

    with pytest.raises(ValueError, match="square matrix of non-negative counts"):
        confusion_metrics(bad)


def test_packing_fills_rows_to_a_multiple_and_unpacks_real_tokens_only():
    """`kerasft.model.encoder`'s packing (PyTorch): real tokens in order, then filler rows up to
    `PACKED_ROWS_MULTIPLE`; unpacking gives zeros at padding, never a filler row."""
    import torch

    from kerasft.model.encoder import PACKED_ROWS_MULTIPLE, _torch_packing

    packing = _torch_packing(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), cls_index=0)
    x = torch.arange(1.0, 9.0).reshape(2, 4, 1)
    packed = packing.pack(x)
    assert packed.shape == (1, PACKED_ROWS_MULTIPLE, 1)
    assert packed[0, :5, 0].tolist() == [1, 2, 3, 5, 6]
    assert packing.unpack(packed)[..., 0].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0]]
    assert packing.positions[:5].tolist() == [0, 1, 2, 0, 1]
    assert packing.cls_rows.tolist() == [0, 3]
    assert packing.score_bias[:, 0, 0].tolist() == [[0, 0, 0, -1e9], [0, 0, -1e9, -1e9]]
