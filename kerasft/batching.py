"""Tokenize once, then serve length-bucketed batches.

Headlines are short (p50 12 tokens) but a fixed-length pipeline pads every one of them to the
preprocessor's `sequence_length`. Here every text is tokenized once by the classifier's own
KerasHub preprocessor; each batch is then cut to its bucket length (a multiple of
`bucket_width`), so compute follows the real lengths while the set of shapes compiled backends
see stays small: one `(batch_size, L)` per bucket plus at most one short remainder batch.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

log = logging.getLogger(__name__)

PROGRESS_FROM = 8192  # texts: smaller inputs tokenize in a few seconds, without a progress bar


def tokenize(
    preprocessor, texts: list[str], chunk_size: int = 2048, verbose: int | str = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes `texts` with a KerasHub text classifier preprocessor.

    Texts longer than the preprocessor's `sequence_length` are truncated (as KerasHub does);
    how many were is logged (a warning) when any were.

    Args:
        preprocessor: e.g. `DistilBertTextClassifierPreprocessor`; its `sequence_length` is the
            maximum length (longer texts are truncated exactly as KerasHub does).
        texts: the texts.
        chunk_size: texts per preprocessor call.
        verbose: Keras verbosity of a progress bar, shown from `PROGRESS_FROM` texts.

    Returns:
        `(token_ids, lengths)`: int32 `(N, sequence_length)` padded ids and int32 `(N,)` lengths
        (number of real tokens, `[CLS]` and `[SEP]` included).
    """
    ids, lengths = [], []
    progress = None
    if verbose and len(texts) >= PROGRESS_FROM:
        progress = keras.utils.Progbar(
            len(texts), verbose=1 if verbose == "auto" else verbose, unit_name="text"
        )
    for start in range(0, len(texts), chunk_size):
        out = preprocessor(list(texts[start : start + chunk_size]))
        ids.append(keras.ops.convert_to_numpy(out["token_ids"]).astype("int32"))
        mask = keras.ops.convert_to_numpy(out["padding_mask"]).astype(bool)
        lengths.append(mask.sum(axis=1).astype("int32"))
        if progress is not None:
            progress.update(min(len(texts), start + chunk_size))
    token_ids, lengths = np.concatenate(ids), np.concatenate(lengths)
    truncated = count_truncated(preprocessor, texts, lengths)
    if truncated:
        log.warning(
            "%d of %d texts are longer than sequence_length=%d tokens and were truncated.",
            truncated, len(texts), token_ids.shape[1],
        )  # fmt: skip
    return token_ids, lengths


def count_truncated(preprocessor, texts: list[str], lengths: np.ndarray) -> int:
    """How many of `texts` the preprocessor truncated.

    Only texts that fill the whole sequence can have been cut; those few are tokenized again
    without the limit (`[CLS]` and `[SEP]` take two places).
    """
    full = np.flatnonzero(lengths >= preprocessor.sequence_length)
    if not len(full):
        return 0
    pieces = preprocessor.tokenizer([texts[i] for i in full])
    counts = [len(keras.ops.convert_to_numpy(p)) for p in pieces]
    return int(sum(n > preprocessor.sequence_length - 2 for n in counts))


class BucketedBatches(keras.utils.PyDataset):
    """Batches of `{"token_ids", "padding_mask"}` (and one-hot labels) cut to their bucket length.

    With `shuffle=True` the batches are rebuilt every epoch from a permutation drawn from
    `seed + epoch`: rows are shuffled, grouped by bucket, chunked into full batches, leftovers
    pooled by length, and the batch order shuffled. With `shuffle=False` rows are ordered by
    length once; `restore_order` puts per-row outputs back in the input order.

    Args:
        token_ids: int `(N, max_len)` padded token ids from `tokenize`.
        lengths: int `(N,)` real lengths.
        labels: optional int `(N,)` class ids; yielded one-hot when `num_classes` is given.
        num_classes: number of classes for the one-hot targets.
        batch_size: rows per batch.
        shuffle: reshuffle every epoch.
        seed: base seed for the shuffles.
        bucket_width: bucket lengths are multiples of this.
    """

    def __init__(
        self,
        token_ids: np.ndarray,
        lengths: np.ndarray,
        labels: np.ndarray | None = None,
        num_classes: int | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        bucket_width: int = 8,
    ):
        super().__init__()
        self.token_ids, self.lengths = token_ids, lengths
        self.targets = None
        if labels is not None:
            self.targets = np.eye(num_classes, dtype="float32")[labels]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        max_len = token_ids.shape[1]
        self.bucket_len = np.minimum(
            np.ceil(np.maximum(lengths, 1) / bucket_width).astype(int) * bucket_width, max_len
        )
        self.epoch = 0
        self.batches = self._make_batches()

    def _make_batches(self) -> list[np.ndarray]:
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return self._lead_with_distinct_shapes([order[i : i + bs] for i in range(0, n, bs)])
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(n)
        batches, leftovers = [], []
        for length in np.unique(self.bucket_len):
            rows = perm[self.bucket_len[perm] == length]
            full = len(rows) // bs * bs
            batches += [rows[i : i + bs] for i in range(0, full, bs)]
            leftovers.append(rows[full:])
        rest = np.concatenate(leftovers)
        rest = rest[np.argsort(self.lengths[rest], kind="stable")]
        batches += [rest[i : i + bs] for i in range(0, len(rest), bs)]
        return self._lead_with_distinct_shapes([batches[i] for i in rng.permutation(len(batches))])

    def _lead_with_distinct_shapes(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Moves a short batch first and a batch of another length second.

        On TensorFlow, Keras infers the `PyDataset` signature from the first two batches and
        keeps only the dimensions that differ there as `None`; if both were `(32, 16)`, a later
        `(32, 24)` or `(7, 16)` batch would be rejected. Other backends do not care.
        """
        sizes = [len(b) for b in batches]
        short = [i for i, size in enumerate(sizes) if size != sizes[0]] or [0]
        batches.insert(0, batches.pop(short[-1]))
        first_len = self.bucket_len[batches[0]].max()
        other = [i for i, b in enumerate(batches[1:], 1) if self.bucket_len[b].max() != first_len]
        if other:
            batches.insert(1, batches.pop(other[0]))
        return batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        rows = self.batches[index]
        length = int(self.bucket_len[rows].max())
        x = {
            "token_ids": self.token_ids[rows, :length],
            "padding_mask": (np.arange(length)[None, :] < self.lengths[rows, None]).astype("int32"),
        }
        if self.targets is None:
            return (x,)
        return x, self.targets[rows]

    def on_epoch_end(self):
        if self.shuffle:
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Rebuilds the batches of epoch `epoch` (resuming a run where it stopped)."""
        if self.shuffle:
            self.epoch = epoch
            self.batches = self._make_batches()

    def restore_order(self, outputs: np.ndarray) -> np.ndarray:
        """Reorders per-row outputs of an unshuffled pass back to the input order."""
        order = np.concatenate(self.batches)
        restored = np.empty_like(outputs)
        restored[order] = outputs
        return restored

    @property
    def num_shapes(self) -> int:
        """Distinct `(batch, length)` shapes this epoch (what a compiled backend traces)."""
        return len({(len(b), int(self.bucket_len[b].max())) for b in self.batches})
