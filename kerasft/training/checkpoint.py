"""Training checkpoints of a two-stage run: one per epoch, written atomically, read to resume.

Keras' `BackupAndRestore` covers one `fit` call on one model: it restores the model it is
attached to (the head alone during a cached stage 1), writes its files in place, keeps no history
or shuffling state, and deletes its backup when that `fit` ends, which is exactly the stage
boundary a two-stage run must survive. This module keeps what a resume needs across both stages:

- `epoch-NNNN-STAGE.npz`: every classifier variable (`core.weights`, in order, with their paths),
  the optimizer's variables (`Optimizer.save_own_variables`, Adam's moments and step count), the
  dropout layers' seed-generator states and the global random states;
- `state.json`: stage, epochs done, the data order's epoch counter, the history so far, the
  best validation epoch, seconds spent, and a fingerprint of the recipe and training data.

The tensors go through `numpy.savez` (Python's file I/O), not `Model.save_weights`: HDF5 that
runs out of disk space mid-write leaves its file open, and h5py's clean-up then crashes the
process (h5py#914; Keras' `save_weights` does not close the file on an error). A full disk is
then an ordinary `OSError`. Checkpoints of format 1 (`.weights.h5` + `.state.npz`) still load.

Each file is written under a temporary name and renamed; `state.json` is replaced last, so a
kill or a full disk at any instant leaves the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import keras
import numpy as np

from kerasft.devices.distribute import barrier, gather, process_rank
from kerasft.util.fileio import atomic_write_file, atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
BEST_WEIGHTS = "best.npz"
FORMAT_1_BEST = "best.weights.h5"  # a run interrupted under format 1 may hold its best epoch here
FORMAT_VERSION = 2


class CheckpointMismatchError(ValueError):
    """The checkpoint directory holds a different run (another recipe or other data)."""


def global_rng_state() -> dict:
    """The global random states a training epoch draws from, outside the model's variables.

    Keras' `PyDataset` adapter shuffles the batch order with Python's `random`; on the torch
    backend, dropout layers without an explicit seed draw from torch's global generator.
    """
    state = {"python": random.getstate()}
    if keras.backend.backend() == "torch":
        import torch

        state["torch"] = torch.get_rng_state().numpy()
        if torch.cuda.is_available():
            state["torch_cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return state


def set_global_rng_state(state: dict) -> None:
    """Restores what `global_rng_state` returned (as saved in a checkpoint)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        import torch

        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype="uint8")))
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [torch.from_numpy(np.asarray(s, dtype="uint8")) for s in state["torch_cuda"]]
            )


def seed_states(model: keras.Model) -> list:
    """The dropout seed-generator state variables of `model` (left out by `save_weights`)."""
    return [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]


def rows_sha256(texts, labels) -> str:
    """SHA-256 of rows of texts and class ids, in order."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    digest.update(np.asarray(labels, dtype="int64").tobytes())
    return digest.hexdigest()


def weights_sha256(model) -> str:
    """SHA-256 of a model's weights (values and order)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
    return digest.hexdigest()


def run_fingerprint(recipe: dict, label_names: list[str], texts, labels) -> dict:
    """What identifies a run: its recipe, classes, training rows (hashed) and backend."""
    return {
        "recipe": recipe,
        "label_names": label_names,
        "train_sha256": rows_sha256(texts, labels),
        "backend": keras.backend.backend(),
    }


class CheckpointDir:
    """The checkpoints of one run in `directory`.

    Args:
        directory: where checkpoints go (created on first write).
        fingerprint: what identifies the run (recipe, data hash); a checkpoint written with a
            different fingerprint is refused on `load`.
        writer: whether this process writes them. In a multi-process PyTorch run process 0
            writes (every process's random state included) and every process reads, after
            waiting for the others (`kerasft.devices.distribute.barrier`).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, writer: bool = True):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.writer = writer  # False: another process of the run writes, this one reads
        self.seconds = 0.0  # spent writing checkpoints in this process

    def load(self) -> dict | None:
        """Returns the last complete checkpoint's state, or None when there is none.

        Raises:
            CheckpointMismatchError: the checkpoint belongs to another recipe or other data.
        """
        barrier()  # process 0 has prepared the directory (cleared it, or kept it to resume)
        path = self.directory / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        theirs = state.get("fingerprint", {})
        ours = self.fingerprint
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if diff:
            details = ", ".join(
                f"{k}: checkpoint {theirs.get(k)!r} vs now {self.fingerprint.get(k)!r}"
                for k in diff[:4]
            )
            same = "recipe and data"
            if "processes" in diff:  # a multi-process run resumes with as many processes
                same = f"process count (--devices {theirs.get('processes') or 1})"
            raise CheckpointMismatchError(
                f"The checkpoint in {str(self.directory)!r} was written by a different run "
                f"({details}). Resume with the same {same}, or delete that directory."
            )
        return state

    def save(self, state: dict, classifier_core: keras.Model, optimizer=None) -> None:
        """Writes one checkpoint: the tensors' `.npz`, then `state.json`.

        Raises:
            OSError: the file system refused a write (a full disk, say); the previous complete
                checkpoint stays the last one and no temporary file is left.
        """
        rng = global_rng_state()
        ranks = gather(rng.get("torch"))  # each process's dropout stream (every process calls)
        if not self.writer:
            return
        start = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = f"epoch-{state['epochs_done']:04d}-{state['stage']}"
        arrays = _weight_arrays(classifier_core)
        store = {}
        if optimizer is not None and optimizer.built:
            optimizer.save_own_variables(store)
        arrays.update((f"optimizer/{k}", np.asarray(v)) for k, v in store.items())
        for i, v in enumerate(seed_states(classifier_core)):
            arrays[f"seed/{i}"] = keras.ops.convert_to_numpy(v)
        arrays["rng/torch"] = rng.get("torch", np.zeros(0, "uint8"))
        for rank, value in enumerate(ranks or []):
            arrays[f"rng/torch_rank/{rank}"] = value
        for i, cuda in enumerate(rng.get("torch_cuda", [])):
            arrays[f"rng/torch_cuda/{i}"] = cuda
        _write_npz(self.directory / f"{tag}.npz", arrays)
        state = {
            **state,
            "format": FORMAT_VERSION,
            "arrays": f"{tag}.npz",
            "fingerprint": self.fingerprint,
            "python_random": rng["python"],
        }
        atomic_write_text(self.directory / STATE_FILE, json.dumps(state, indent=1))
        keep = {STATE_FILE, state["arrays"], BEST_WEIGHTS, FORMAT_1_BEST}
        for path in self.directory.iterdir():
            if path.name not in keep:
                path.unlink()
        self.seconds += time.perf_counter() - start

    def restore(self, state: dict, classifier_core: keras.Model) -> tuple[dict, dict]:
        """Loads the checkpoint's weights and seed states.

        Returns:
            `(optimizer_store, rng_state)`: the optimizer variables for `restore_optimizer`
            and the global random state for `set_global_rng_state`, both to be applied right
            before training continues.

        Raises:
            CheckpointMismatchError: the checkpoint's variables are not the model's.
        """
        if state.get("format", 1) == 1:  # kerasft 0.1's layout: Keras' .weights.h5 + .state.npz
            classifier_core.load_weights(self.directory / state["weights"])
            name = state["extra"]
        else:
            name = state["arrays"]
        with np.load(self.directory / name) as arrays:
            if "weights/paths" in arrays.files:
                _assign_weights(classifier_core, arrays, self.directory / name)
            for i, v in enumerate(seed_states(classifier_core)):
                v.assign(arrays[f"seed/{i}"])
            files = arrays.files
            optimizer = {k.split("/", 1)[1]: arrays[k] for k in files if k.startswith("optimizer/")}
            rng = {"python": state["python_random"]}
            if arrays["rng/torch"].size:
                own = f"rng/torch_rank/{process_rank()}"
                rng["torch"] = arrays[own] if own in files else arrays["rng/torch"]
                cuda = sorted((k for k in files if k.startswith("rng/torch_cuda/")),
                              key=lambda k: int(k.rsplit("/", 1)[1]))  # fmt: skip
                if cuda:
                    rng["torch_cuda"] = [arrays[k] for k in cuda]
        return optimizer, rng

    def save_best(self, classifier_core: keras.Model) -> None:
        """Keeps the classifier's weights of the best epoch so far (atomically)."""
        if not self.writer:
            return
        start = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_npz(self.directory / BEST_WEIGHTS, _weight_arrays(classifier_core))
        self.seconds += time.perf_counter() - start

    def restore_best(self, classifier_core: keras.Model) -> None:
        barrier()  # the writing process has saved the last best epoch
        path = self.directory / BEST_WEIGHTS
        if not path.is_file() and (self.directory / FORMAT_1_BEST).is_file():
            classifier_core.load_weights(self.directory / FORMAT_1_BEST)
            return
        with np.load(path) as arrays:
            _assign_weights(classifier_core, arrays, path)


def _weight_arrays(model: keras.Model) -> dict[str, np.ndarray]:
    """`model.weights` as `.npz` entries: `weights/I` in order, and their paths."""
    arrays = {f"weights/{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
    arrays["weights/paths"] = np.array([v.path for v in model.weights])
    return arrays


def _assign_weights(model: keras.Model, arrays, path: Path) -> None:
    saved, ours = [str(p) for p in arrays["weights/paths"]], [v.path for v in model.weights]
    if saved != ours:
        differ = sorted(set(saved) ^ set(ours))[:3] or "their order"
        raise CheckpointMismatchError(
            f"{str(path)!r} holds {len(saved)} variables that are not the model's {len(ours)} "
            f"(they differ in {differ})."
        )
    for i, v in enumerate(model.weights):
        v.assign(arrays[f"weights/{i}"])


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write_file(path, lambda tmp: np.savez(tmp, **arrays))


def restore_optimizer(model: keras.Model, store: dict) -> None:
    """Builds `model`'s optimizer and loads the variables a checkpoint saved."""
    if not store:
        return
    model.optimizer.build(model.trainable_variables)
    model.optimizer.load_own_variables(store)
