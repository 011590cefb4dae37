"""Length-bucketed batches: coverage, shapes, per-epoch reshuffle, order restoration."""

import numpy as np

from kerasft.tokens.batching import BucketedBatches, TokenIds


def make(n=203, shuffle=True, seed=0, batch_size=32, bucket_width=None):
    """Batches of random lengths; the bucket width defaults to the (monkeypatched) backend's,
    as the recipe resolves it."""
    import keras

    from kerasft.training.config import default_bucket_width

    width = bucket_width or default_bucket_width(keras.backend.backend())
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 40, n).astype("int32")
    ids = np.zeros((n, 64), "int32")
    for i, length in enumerate(lengths):
        ids[i, :length] = np.arange(1, length + 1)
    labels = rng.integers(0, 2, n)
    batches = BucketedBatches(ids, lengths, labels, 2, batch_size, shuffle, seed,
                              bucket_width=width)  # fmt: skip
    return batches, lengths, labels


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


def test_feature_pass_parts_have_one_shape_each_and_cover_the_pass():
    from kerasft.training.recipe import _same_shape_parts

    ds, _, _ = make(n=203, shuffle=False, batch_size=16)
    for most in (1, 2, 3, 100):
        parts = _same_shape_parts(ds, most)
        assert [i for part in parts for i in part] == list(range(len(ds)))
        for part in parts:
            assert 1 <= len(part) <= most
            assert len({ds[i][0]["token_ids"].shape for i in part}) == 1


def test_restore_order_unshuffled():
    ds, lengths, _ = make(shuffle=False)
    per_row = np.concatenate([ds[i][0]["padding_mask"].sum(1) for i in range(len(ds))])
    assert ds.restore_order(per_row).tolist() == lengths.tolist()


def test_even_batches_across_devices():
    # 203 rows, batches of 32: the leftovers do not split across 2 devices.
    ds = BucketedBatches(*_ids(203), labels=np.arange(203) % 2, num_classes=2, batch_size=32,
                         shuffle=True, seed=3, replicas=2, bucket_width=8)  # fmt: skip
    assert all(len(b) % 2 == 0 for b in ds.batches)
    assert ds.dropped == 1 and len(epoch_rows(ds)) == 202
    left_out = set(range(203)) - set(epoch_rows(ds).tolist())
    ds.on_epoch_end()
    assert ds.dropped == 1 and set(range(203)) - set(epoch_rows(ds).tolist()) != left_out
    # An unshuffled pass pads instead: every row once, one zero-weight copy, order restored.
    ev = BucketedBatches(*_ids(203), labels=np.arange(203) % 2, num_classes=2, batch_size=32,
                         replicas=2, bucket_width=8)  # fmt: skip
    assert ev.padded == 1 and all(len(b) % 2 == 0 for b in ev.batches)
    weights = np.concatenate([ev[i][2] for i in range(len(ev))])
    assert weights.sum() == 203 and (weights == 0).sum() == 1
    per_row = np.concatenate([ev[i][0]["padding_mask"].sum(1) for i in range(len(ev))])
    assert ev.restore_order(per_row).tolist() == ev.lengths.tolist()


def test_process_shards_split_each_global_batch():
    ids, lengths = _ids(96)
    whole = BucketedBatches(ids, lengths, batch_size=32, shuffle=True, seed=1, replicas=2,
                            bucket_width=8)  # fmt: skip
    parts = [
        BucketedBatches(
            ids,
            lengths,
            batch_size=32,
            shuffle=True,
            seed=1,
            replicas=2,
            shard=(i, 2),
            bucket_width=8,
        )  # fmt: skip
        for i in range(2)
    ]
    for i in range(len(whole)):
        full = whole[i][0]["token_ids"]
        halves = [p[i][0]["token_ids"] for p in parts]
        assert all(h.shape == (len(full) // 2, full.shape[1]) for h in halves)
        assert np.array_equal(np.concatenate(halves), full)


def test_token_ids_are_compact():
    ids, lengths = _ids(203)
    compact = TokenIds.from_padded(ids, lengths, vocabulary_size=30522)
    assert compact.flat.dtype == np.uint16 and len(compact.flat) == lengths.sum()
    rows = np.array([5, 0, 17])
    assert np.array_equal(compact.padded(rows, 40), ids[rows, :40])


def _ids(n):
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 40, n).astype("int32")
    ids = np.zeros((n, 64), "int32")
    for i, length in enumerate(lengths):
        ids[i, :length] = np.arange(1, length + 1)
    return ids, lengths


def test_bucket_width_one_cuts_each_batch_to_its_longest_text():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 40, 203).astype("int32")
    ids = np.zeros((203, 64), "int32")
    for i, length in enumerate(lengths):
        ids[i, :length] = np.arange(1, length + 1)
    ds = BucketedBatches(ids, lengths, rng.integers(0, 2, 203), 2, 32, True, 0, bucket_width=1)
    assert sorted(epoch_rows(ds).tolist()) == list(range(203))
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x["token_ids"].shape[1] == x["padding_mask"].sum(1).max()  # no padding column
    padded = sum(len(b) * int(ds.bucket_len[b].max()) for b in ds.batches)
    eight = make()[0]
    assert padded < sum(len(b) * int(eight.bucket_len[b].max()) for b in eight.batches)


def test_unshuffled_passes_on_torch_cut_each_batch_to_its_longest_text(monkeypatch):
    """Sorted rows make the same batches at any width; eager PyTorch skips their padding, the
    compiled backends keep the bucket widths (their shapes). Training batches stay as they are."""
    import keras

    def batches(backend, shuffle):
        monkeypatch.setattr(keras.backend, "backend", lambda: backend)
        ds = make(shuffle=shuffle)[0]
        return ds, [ds[i][0]["token_ids"].shape[1] for i in range(len(ds))]

    torch, torch_widths = batches("torch", shuffle=False)
    jax, jax_widths = batches("jax", shuffle=False)
    assert [b.tolist() for b in torch.batches] == [b.tolist() for b in jax.batches]
    assert torch_widths == [int(torch.lengths[b].max()) for b in torch.batches]
    assert all(w % 8 == 0 for w in jax_widths) and sum(torch_widths) < sum(jax_widths)
    assert all(w % 4 == 0 for w in batches("torch", shuffle=True)[1])  # torch's default width


def test_the_default_bucket_width_is_4_on_pytorch_and_8_on_the_compiled_backends(monkeypatch):
    import keras

    from kerasft.training.config import default_bucket_width

    widths = {}
    for backend in ("torch", "jax", "tensorflow"):
        monkeypatch.setattr(keras.backend, "backend", lambda b=backend: b)
        widths[backend] = sorted({int(n) for n in make(shuffle=True)[0].bucket_len})
        assert default_bucket_width(backend) == (4 if backend == "torch" else 8)
    assert all(n % 4 == 0 for n in widths["torch"]) and any(n % 8 for n in widths["torch"])
    assert widths["jax"] == widths["tensorflow"] and all(n % 8 == 0 for n in widths["jax"])
