"""Length-bucketed batches: coverage, shapes, per-epoch reshuffle, order restoration."""

import numpy as np

from kerasft.batching import BucketedBatches


def make(n=203, shuffle=True, seed=0, batch_size=32):
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 40, n).astype("int32")
    ids = np.zeros((n, 64), "int32")
    for i, length in enumerate(lengths):
        ids[i, :length] = np.arange(1, length + 1)
    labels = rng.integers(0, 2, n)
    return BucketedBatches(ids, lengths, labels, 2, batch_size, shuffle, seed), lengths, labels


def epoch_rows(ds):
    return np.concatenate(ds.batches)


def test_every_row_once_per_epoch_and_padded_to_bucket():
    ds, lengths, _ = make()
    assert sorted(epoch_rows(ds).tolist()) == list(range(203))
    for i in range(len(ds)):
        x, y = ds[i]
        width = x["token_ids"].shape[1]
        assert width % 8 == 0 and width >= x["padding_mask"].sum(1).max()
        assert width - 8 < x["padding_mask"].sum(1).max()  # no bucket wasted
        assert y.shape == (len(x["token_ids"]), 2)
    # Few shapes for compiled backends: one per bucket plus the remainder batch.
    assert ds.num_shapes <= len(np.unique(np.ceil(lengths / 8))) + 1


def test_reshuffles_every_epoch_reproducibly():
    ds, _, _ = make(seed=7)
    first = epoch_rows(ds).copy()
    ds.on_epoch_end()
    second = epoch_rows(ds).copy()
    assert sorted(second.tolist()) == list(range(203))
    assert first.tolist() != second.tolist()
    again, _, _ = make(seed=7)
    assert epoch_rows(again).tolist() == first.tolist()
    other, _, _ = make(seed=8)
    assert epoch_rows(other).tolist() != first.tolist()


def test_first_two_batches_differ_in_both_dims():
    # Keras on TensorFlow infers the dataset signature from the first two batches.
    for seed in range(5):
        ds, _, _ = make(seed=seed)
        (a, _), (b, _) = ds[0], ds[1]
        assert a["token_ids"].shape[0] != b["token_ids"].shape[0]
        assert a["token_ids"].shape[1] != b["token_ids"].shape[1]


def test_restore_order_unshuffled():
    ds, lengths, _ = make(shuffle=False)
    per_row = np.concatenate([ds[i][0]["padding_mask"].sum(1) for i in range(len(ds))])
    assert ds.restore_order(per_row).tolist() == lengths.tolist()
