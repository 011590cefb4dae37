"""The run directory: what a fit leaves behind, written, read and validated in one place.

A run directory holds:

- `model.keras` and `model.keras.json`: the classifier and its label names / recipe
  (`TwoStageFineTuner.save`);
- `config.json`: the recipe, the backend and package versions, and `data`, which rebuilds the
  exact splits: either a data file (path, sha256, size, columns, `skip_invalid`, `limit`, seeds)
  or `"splits"`, meaning the splits are stored in `splits/*.jsonl` inside the run;
- `metrics.json`: validation and test metrics, row counts, seconds (and the compiling in them),
  the kept epoch, trainable and total parameters of stage 2;
- `adapter/` (LoRA runs): the adapter alone, which `kerasft.training.tuner.load_adapter` puts
  back onto the base preset (`model.keras` is the merged model);
- `history.json` and `training_curves.png`.

`kerasft fit`, `save_run` (`TwoStageFineTuner.save_run`), the exporters and the benchmarks all
go through this module; `kerasft.training.tuner.load_tuner` loads a run's tuner. While a fit is in
progress its files live in a hidden `.<name>.partial` directory beside the target (with the
per-epoch `checkpoint/`), which is renamed into place when complete.

Example:
    >>> from kerasft.runs import rundir
    >>> config = rundir.read_config("runs/sarcasm")
    >>> train, validation, test = rundir.run_splits("runs/sarcasm")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from kerasft.data import (
    REFERENCE_SEED,
    DataError,
    TextDataset,
    align_labels,
    encode_labels,
    holdout_split,
    load_dataset,
    split_dataset,
    stratified_limit,
)
from kerasft.runs.plots import plot_history
from kerasft.util.fileio import atomic_write_text, publish_target
from kerasft.util.versions import TRAINING, package_versions

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
CURVES_FILE = "training_curves.png"
SPLITS_DIR = "splits"
CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"  # LoRA runs: the adapter alone (`kerasft.training.tuner.load_adapter`)
FIT_ARGS_FILE = "fit-args.json"  # in the partial directory: the options `--resume` reuses
SPLIT_NAMES = ("train", "validation", "test")
FORMAT_VERSION = 2


class DataChangedError(DataError):
    """The data file a run was fitted on has changed since (other rows would be used)."""


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class DataSource:
    """A data file and how a run's rows and splits were drawn from it.

    Args:
        path: the data file (absolute).
        sha256: its sha256 when the run was fitted.
        size: its size in bytes then.
        text_column: the text column (None: auto-detected).
        label_column: the label column (None: auto-detected).
        skip_invalid: rows without text or label were dropped.
        limit: stratified subsample size before the split, or None.
        limit_seed: seed of that subsample.
        split_seed: `random_state` of the 60/20/20 split (30 is the reference).
        validation_file: `{"path", "sha256", "size"}` of a separate validation file, or None.
        test_file: the same for a separate test file, or None. With both, the data file is
            used whole for training; with one, the data file is split 75/25 (stratified,
            `split_seed`) into training rows and the other evaluation set.
        encoding: the text encoding of the files.
        header: CSV/TSV: whether the first row names the columns (None: detected).
    """

    path: str
    sha256: str
    size: int
    text_column: str | None = None
    label_column: str | None = None
    skip_invalid: bool = False
    limit: int | None = None
    limit_seed: int = REFERENCE_SEED
    split_seed: int = REFERENCE_SEED
    validation_file: dict | None = None
    test_file: dict | None = None
    encoding: str = "utf-8"
    header: bool | None = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        validation: str | os.PathLike | None = None,
        test: str | os.PathLike | None = None,
        **kwargs,
    ) -> DataSource:
        """Describes `path` (and the evaluation files, if any) as they are now (hashes them).

        Raises:
            FileNotFoundError: if a path is not a file.
        """
        main = _describe(path)
        return cls(
            main["path"], main["sha256"], main["size"],
            validation_file=_describe(validation) if validation is not None else None,
            test_file=_describe(test) if test is not None else None,
            **kwargs,
        )  # fmt: skip

    def files(self) -> dict[str, dict]:
        """`{"data": ..., "validation": ..., "test": ...}` file descriptions (those in use)."""
        files = {"data": {"path": self.path, "sha256": self.sha256, "size": self.size}}
        for name, described in (("validation", self.validation_file), ("test", self.test_file)):
            if described is not None:
                files[name] = described
        return files

    def check_unchanged(self) -> None:
        """Raises `DataChangedError` if a file is gone or differs from when it was hashed."""
        for role, described in self.files().items():
            path, what = Path(described["path"]), "data" if role == "data" else f"{role} data"
            if not path.is_file():
                raise FileNotFoundError(
                    f"The run's {what} file {str(path)!r} is gone; the splits cannot be rebuilt."
                )
            size = path.stat().st_size
            if size != described["size"] or sha256_of(path) != described["sha256"]:
                raise DataChangedError(
                    f"The run's {what} file {str(path)!r} has changed since the fit (size "
                    f"{described['size']} -> {size} bytes, sha256 no longer "
                    f"{described['sha256'][:12]}...). Its splits would hold other rows; restore "
                    "the file or fit again."
                )

    def load(self, check: bool = True) -> TextDataset:
        """Loads the rows the run used (after `skip_invalid` and `limit`), in file order."""
        if check:
            self.check_unchanged()
        return self.select(self._load(self.path))

    def _load(self, path: str) -> TextDataset:
        return load_dataset(
            path, self.text_column, self.label_column, self.skip_invalid, self.encoding,
            header=self.header,
        )  # fmt: skip

    def select(self, data: TextDataset) -> TextDataset:
        """The rows of the loaded file that the run used (the `limit` subsample, or all)."""
        if self.limit is None:
            return data
        return data.subset(stratified_limit(data.labels, self.limit, seed=self.limit_seed))

    def split(self, data: TextDataset) -> tuple[TextDataset, TextDataset, TextDataset]:
        """`(train, validation, test)` from the loaded, selected data file (see `load`).

        Without evaluation files: the reference 60/20/20 split with `split_seed`. Evaluation
        files are read with the same columns and `skip_invalid`, and their labels matched to
        the data file's classes by name.

        Raises:
            DataError: a class too small to split, or an evaluation file with labels the data
                file does not have.
        """
        if self.validation_file is None and self.test_file is None:
            return split_dataset(data, self.split_seed)
        given = {
            name: align_labels(self._load(described["path"]), data.label_names)
            for name, described in self.files().items()
            if name != "data"
        }
        if len(given) == 2:
            return data, given["validation"], given["test"]
        train, held_out = holdout_split(data, self.split_seed)
        return train, given.get("validation", held_out), given.get("test", held_out)

    def splits(self, check: bool = True) -> tuple[TextDataset, TextDataset, TextDataset]:
        """The run's `(train, validation, test)` splits, rebuilt exactly."""
        return self.split(self.load(check))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> DataSource:
        return cls(**config)


def _describe(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {str(path)!r}")
    return {"path": str(path.resolve()), "sha256": sha256_of(path), "size": path.stat().st_size}


# --- reading -----------------------------------------------------------------------------------


def read_config(run_dir: str | os.PathLike) -> dict:
    """Reads and validates a run's `config.json` (earlier layouts are converted).

    Raises:
        FileNotFoundError: `run_dir` is not a run directory (no model or config).
    """
    run_dir = Path(run_dir)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"No {name} in {str(run_dir)!r}: is it a `kerasft fit` run directory?"
            )
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    if config.get("format", 1) < 2:  # before checkpoints: data was a bare path, never hashed
        columns = config.get("columns") or {}
        config["data"] = {
            "path": config["data"],
            "sha256": None,
            "size": None,
            "text_column": columns.get("text"),
            "label_column": columns.get("label"),
            "skip_invalid": False,
            "limit": config.get("limit"),
            "limit_seed": config.get("recipe", {}).get("seed", REFERENCE_SEED),
            "split_seed": config.get("split", {}).get("random_state", REFERENCE_SEED),
        }
    return config


def data_source(run_dir: str | os.PathLike) -> DataSource | None:
    """The run's data file, or None when its splits are stored inside the run."""
    data = read_config(run_dir)["data"]
    return None if data == SPLITS_DIR else DataSource.from_dict(data)


def run_splits(
    run_dir: str | os.PathLike, check: bool = True
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """Re-creates the train/validation/test splits a run was trained and scored on.

    Args:
        run_dir: a run directory.
        check: refuse a data file that changed since the fit (recommended).

    Returns:
        `(train, validation, test)` as `TextDataset`s (an empty one for a split the run had
        not).

    Raises:
        FileNotFoundError: not a run directory, or its data file is gone.
        DataChangedError: the data file has changed since the fit.

    Example:
        >>> train, val, test = run_splits("runs/sarcasm")
    """
    source = data_source(run_dir)
    if source is not None:
        if source.sha256 is None:
            log.warning("%s predates data hashing: its data file cannot be checked.", run_dir)
            check = False
        return source.splits(check)
    label_names = json.loads((Path(run_dir) / (MODEL_FILE + ".json")).read_text())["label_names"]
    return tuple(_read_split(Path(run_dir) / SPLITS_DIR, n, label_names) for n in SPLIT_NAMES)


# --- writing -----------------------------------------------------------------------------------


def partial_dir(target: str | os.PathLike) -> Path:
    """The hidden directory a run is built in before it is renamed to `target`."""
    target = Path(target)
    return target.parent / f".{target.name}.partial"


def saved_fit_args(target: str | os.PathLike) -> dict | None:
    """The options an interrupted fit of `target` was started with (`--resume` reuses them), or
    None when no fit of it was interrupted."""
    path = partial_dir(target) / FIT_ARGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_run(
    directory: str | os.PathLike,
    tuner,
    *,
    train: TextDataset | None = None,
    validation: TextDataset | None = None,
    test: TextDataset | None = None,
    source: DataSource | None = None,
    rows: dict | None = None,
    extra_config: dict | None = None,
    plot: bool = True,
    total_seconds_since: float | None = None,
) -> dict:
    """Writes a fitted tuner's run files into `directory`, the model first.

    The model is saved before anything that can fail after training (scoring, reports, the
    plot), so an error there leaves a loadable `model.keras` in `directory`.

    Args:
        directory: an existing directory (usually `partial_dir(target)`).
        tuner: a fitted `TwoStageFineTuner`.
        train: the training split (stored in the run when there is no `source`).
        validation: the validation split, scored and (without `source`) stored.
        test: the test split, scored and (without `source`) stored.
        source: the data file the splits come from, or None to store the splits.
        rows: row counts for `metrics.json` (default: the splits' sizes).
        extra_config: more keys for `config.json` (e.g. the command line).
        plot: draw `training_curves.png`.
        total_seconds_since: a `time.perf_counter()` reading; `seconds.total` in
            `metrics.json` is the time since then.

    Returns:
        The metrics written to `metrics.json`.
    """
    directory = Path(directory)
    tuner.save(directory / MODEL_FILE)
    adapter_bytes = None
    if tuner.adapter_model is not None:
        shutil.rmtree(directory / ADAPTER_DIR, ignore_errors=True)  # a resumed write
        adapter = tuner.save_adapter(directory / ADAPTER_DIR)
        adapter_bytes = sum(f.stat().st_size for f in adapter.iterdir())
    splits = {"train": train, "validation": validation, "test": test}
    config = {
        "format": FORMAT_VERSION,
        "recipe": tuner.get_config(),
        "data": source.to_dict() if source is not None else SPLITS_DIR,
        "backend": tuner.backend,
        "versions": package_versions(TRAINING),
        "command": sys.argv,
        **(extra_config or {}),
    }
    if source is None:
        (directory / SPLITS_DIR).mkdir(exist_ok=True)
        for name, split in splits.items():
            _write_split(directory / SPLITS_DIR, name, split)
    _write_json(directory / CONFIG_FILE, config)
    if tuner.history is not None:
        _write_json(directory / HISTORY_FILE, tuner.history.history)
    metrics = _score(tuner, splits, rows)
    if adapter_bytes is not None:
        metrics["adapter_bytes"] = adapter_bytes
    if total_seconds_since is not None:
        metrics["seconds"]["total"] = time.perf_counter() - total_seconds_since
    _write_json(directory / METRICS_FILE, metrics)
    if plot and tuner.history is not None:
        plot_history(
            tuner.history.history,
            directory / CURVES_FILE,
            f"{Path(str(tuner.preset)).name} ({metrics['backend']})",
        )
    return metrics


def _score(tuner, splits: dict, rows: dict | None) -> dict:
    """`metrics.json` of a fitted tuner: its validation and test scores and what it reports."""
    import keras

    metrics = {}
    for name in ("validation", "test"):
        if splits[name] is not None and len(splits[name]):
            log.info("scoring the %s split (%d rows)", name, len(splits[name]))
            metrics[name] = tuner.score(splits[name])
    metrics.update(
        backend=tuner.backend or keras.backend.backend(),
        preset=tuner.preset,
        label_names=tuner.label_names,
        rows=rows or {k: len(v) for k, v in splits.items() if v is not None},
        seconds=dict(tuner.stage_seconds),
        compile_seconds=dict(getattr(tuner, "compile_seconds", {})),
        samples_per_second=tuner.stage_samples_per_second,
        selected_epoch=tuner.selected_epoch,
        parameters=tuner.parameters,
    )
    if getattr(tuner, "data_parallel", None):
        metrics["data_parallel"] = tuner.data_parallel
    return metrics


def drop_resume_files(directory: str | os.PathLike) -> None:
    """Drops what only resuming needs (checkpoints, `fit-args.json`) from a finished run."""
    shutil.rmtree(Path(directory) / CHECKPOINT_DIR, ignore_errors=True)
    (Path(directory) / FIT_ARGS_FILE).unlink(missing_ok=True)


def save_run(
    run_dir: str | os.PathLike,
    tuner,
    *,
    train: TextDataset | None = None,
    validation: TextDataset | None = None,
    test: TextDataset | None = None,
    source: DataSource | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a fitted tuner's run directory, as `kerasft fit` does, built beside `run_dir` and
    renamed into place under a lock on it (`kerasft.util.fileio.publish_target`).

    The model is saved first, then `validation` and `test` are scored into `metrics.json`.
    Without `source`, the given splits are stored in the run (`splits/*.jsonl`) so that an
    export verifies against them; with a `DataSource`, the run records the data file (hashed)
    and rebuilds the splits from it.

    Args:
        run_dir: the run directory to create.
        tuner: a fitted `TwoStageFineTuner`.
        train: training split, stored with the run.
        validation: validation split, scored and stored.
        test: test split, scored and stored.
        source: the data file the splits were drawn from by the reference split, or None.
        overwrite: replace an existing non-empty `run_dir`.

    Returns:
        `run_dir` as a `Path`.

    Raises:
        FileExistsError: `run_dir` is not empty and `overwrite` is False.
        kerasft.util.fileio.LockError: another process is writing `run_dir`.
    """
    run_dir = Path(run_dir)
    with publish_target(run_dir, overwrite, "Run directory") as work:
        write_run(work, tuner, source=source, train=train, validation=validation, test=test)
    return run_dir


def model_path(run_dir: str | os.PathLike) -> Path:
    """The run's `model.keras`.

    Raises:
        FileNotFoundError: `run_dir` has none (not a `kerasft fit` run directory).
    """
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MODEL_FILE} in {str(run_dir)!r}: is it a `kerasft fit` run directory?"
        )
    return path


def _write_split(directory: Path, name: str, split: TextDataset | None) -> None:
    if split is None:
        return
    lines = (
        json.dumps({"text": t, "label": split.label_names[k]}) + "\n"
        for t, k in zip(split.texts, split.labels, strict=True)
    )
    (directory / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")


def _read_split(directory: Path, name: str, label_names: list[str]) -> TextDataset:
    path = directory / f"{name}.jsonl"
    if not path.is_file():
        return TextDataset([], np.zeros(0, dtype="int32"), label_names, str(path))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    labels, _ = encode_labels([r["label"] for r in rows], label_names)
    return TextDataset([r["text"] for r in rows], labels, label_names, str(path))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")
