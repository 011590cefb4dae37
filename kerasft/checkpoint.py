"""Training checkpoints of a two-stage run: one per epoch, written atomically, read to resume.

Keras' `BackupAndRestore` covers one `fit` call on one model: it restores the model it is
attached to (the head alone during a cached stage 1), writes its files in place, keeps no history
or shuffling state, and deletes its backup when that `fit` ends, which is exactly the stage
boundary a two-stage run must survive. This module keeps what a resume needs across both stages,
using Keras' own saving for the tensors:

- `epoch-NNNN.weights.h5`: every classifier variable (`Model.save_weights` of the
  preprocessor-free classifier);
- `epoch-NNNN.state.npz`: the optimizer's variables (`Optimizer.save_own_variables`, Adam's
  moments and step count) and the dropout layers' seed-generator states, which `save_weights`
  leaves out;
- `state.json`: stage, epochs done, the data order's epoch counter, the history so far, the
  best validation epoch, seconds spent, and a fingerprint of the recipe and training data.

Each file is written under a temporary name and renamed; `state.json` is replaced last, so a
kill at any instant leaves the previous complete checkpoint or the new one.
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

from kerasft.fileio import atomic_write_text

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
BEST_WEIGHTS = "best.weights.h5"
FORMAT_VERSION = 1


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


def run_fingerprint(recipe: dict, label_names: list[str], texts, labels) -> dict:
    """What identifies a run: its recipe, classes, training rows (hashed) and backend."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    digest.update(np.asarray(labels, dtype="int64").tobytes())
    return {
        "recipe": recipe,
        "label_names": label_names,
        "train_sha256": digest.hexdigest(),
        "backend": keras.backend.backend(),
    }


class CheckpointDir:
    """The checkpoints of one run in `directory`.

    Args:
        directory: where checkpoints go (created on first write).
        fingerprint: what identifies the run (recipe, data hash); a checkpoint written with a
            different fingerprint is refused on `load`.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.seconds = 0.0  # spent writing checkpoints in this process

    def load(self) -> dict | None:
        """Returns the last complete checkpoint's state, or None when there is none.

        Raises:
            CheckpointMismatchError: the checkpoint belongs to another recipe or other data.
        """
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
            raise CheckpointMismatchError(
                f"The checkpoint in {str(self.directory)!r} was written by a different run "
                f"({details}). Resume with the same recipe and data, or delete that directory."
            )
        return state

    def save(self, state: dict, classifier_core: keras.Model, optimizer=None) -> None:
        """Writes one checkpoint: weights, optimizer and seed states, then `state.json`."""
        start = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = f"epoch-{state['epochs_done']:04d}-{state['stage']}"
        weights, extra = f"{tag}.weights.h5", f"{tag}.state.npz"
        tmp_weights = self.directory / f".tmp-{weights}"
        classifier_core.save_weights(tmp_weights)
        store = {}
        if optimizer is not None and optimizer.built:
            optimizer.save_own_variables(store)
        arrays = {f"optimizer/{k}": np.asarray(v) for k, v in store.items()}
        for i, v in enumerate(seed_states(classifier_core)):
            arrays[f"seed/{i}"] = keras.ops.convert_to_numpy(v)
        rng = global_rng_state()
        arrays["rng/torch"] = rng.get("torch", np.zeros(0, "uint8"))
        for i, cuda in enumerate(rng.get("torch_cuda", [])):
            arrays[f"rng/torch_cuda/{i}"] = cuda
        tmp_extra = self.directory / f".tmp-{tag}.state.npz"
        with open(tmp_extra, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp_weights, self.directory / weights)
        os.replace(tmp_extra, self.directory / extra)
        state = {
            **state,
            "format": FORMAT_VERSION,
            "weights": weights,
            "extra": extra,
            "fingerprint": self.fingerprint,
            "python_random": rng["python"],
        }
        atomic_write_text(self.directory / STATE_FILE, json.dumps(state, indent=1))
        keep = {STATE_FILE, weights, extra, BEST_WEIGHTS}
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
        """
        classifier_core.load_weights(self.directory / state["weights"])
        with np.load(self.directory / state["extra"]) as arrays:
            for i, v in enumerate(seed_states(classifier_core)):
                v.assign(arrays[f"seed/{i}"])
            files = arrays.files
            optimizer = {k.split("/", 1)[1]: arrays[k] for k in files if k.startswith("optimizer/")}
            rng = {"python": state["python_random"]}
            if arrays["rng/torch"].size:
                rng["torch"] = arrays["rng/torch"]
                cuda = sorted((k for k in files if k.startswith("rng/torch_cuda/")),
                              key=lambda k: int(k.rsplit("/", 1)[1]))  # fmt: skip
                if cuda:
                    rng["torch_cuda"] = [arrays[k] for k in cuda]
        return optimizer, rng

    def save_best(self, classifier_core: keras.Model) -> None:
        """Keeps the classifier's weights of the best epoch so far (atomically)."""
        start = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{BEST_WEIGHTS}"
        classifier_core.save_weights(tmp)
        os.replace(tmp, self.directory / BEST_WEIGHTS)
        self.seconds += time.perf_counter() - start

    def restore_best(self, classifier_core: keras.Model) -> None:
        classifier_core.load_weights(self.directory / BEST_WEIGHTS)


def restore_optimizer(model: keras.Model, store: dict) -> None:
    """Builds `model`'s optimizer and loads the variables a checkpoint saved."""
    if not store:
        return
    model.optimizer.build(model.trainable_variables)
    model.optimizer.load_own_variables(store)
