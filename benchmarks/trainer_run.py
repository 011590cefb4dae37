"""A whole Hugging Face Trainer run on the rows and initial weights of a `kerasft fit` run: the
peer of `kerasft.benchmarks.training_runs --trainer`.

    python -m kerasft.benchmarks.trainer_run --data FILE --limit 8000 --epochs 1 [--bf16] \\
        --out result.json

The same rows as `kerasft fit --data FILE --limit N` (its stratified subsample and reference
60/20/20 split), the same initial weights (the offline preset with the head kerasft initialises,
converted by the exporter's mapping), Trainer's defaults for the rest: batch 32, learning rate
1e-4 with linear decay (kerasft's stage 2), `DataCollatorWithPadding`, fused AdamW, evaluation
on the validation rows after every epoch (kerasft validates every epoch too), no checkpoint
(Trainer saves every 500 steps by default). Samples/s: training rows x epochs over the seconds
of `trainer.train()`, evaluation included, as kerasft's fine-tune samples/s include its
validation. Runs under PyTorch with TensorFlow kept out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kerasft.benchmarks.models import to_transformers
from kerasft.benchmarks.train_speed import BATCH_SIZE, LEARNING_RATE, SEED
from kerasft.data import load_dataset
from kerasft.devices.backends import keep_to_backend
from kerasft.model.presets import OFFLINE_PRESET, load_classifier
from kerasft.runs.rundir import DataSource


def splits(data: str, limit: int | None):
    """The `(train, validation, test)` rows `kerasft fit --data DATA --limit LIMIT` trains on."""
    source = DataSource.from_file(data, limit=limit, limit_seed=SEED, split_seed=SEED)
    return source.split(source.select(load_dataset(source.path)))


def trainer_arguments(output_dir: Path, bf16: bool = False, **schedule):
    """Trainer's defaults (fused AdamW, linear schedule) at kerasft's batch, rate and seed, no
    checkpoint, no logging; `bf16`: its `bf16=True` (torch autocast to bfloat16 on the CPU);
    `schedule`: how long (`num_train_epochs`, `max_steps`) and `eval_strategy`."""
    from transformers import TrainingArguments  # lazily: the peer's library

    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=True, seed=SEED,
        dataloader_num_workers=0, disable_tqdm=True, bf16=bf16, **schedule,
    )  # fmt: skip


def initial_checkpoint(preset: str, label_names: list[str], sequence_length: int, out: Path):
    """A transformers checkpoint of kerasft's initial classifier: the preset, with the head
    the recipe initialises (`recipe.initialize_head`, the same seed)."""
    # lazy: loads Keras, under the backend this process was given
    from kerasft.training import recipe

    classifier = load_classifier(preset, len(label_names), sequence_length)
    recipe.initialize_head(classifier, SEED)
    return to_transformers(classifier, out, label_names)


def run(args) -> dict:
    # lazily: the peer's libraries, after the backend is set (see `main`)
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        DistilBertForSequenceClassification,
        Trainer,
    )

    torch.set_num_threads(args.threads)
    train, val, test = splits(args.data, args.limit)
    work = Path(tempfile.mkdtemp(prefix="kerasft-trainer-run-"))
    hf_dir = initial_checkpoint(args.preset, train.label_names, args.sequence_length,
                                work / "transformers")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = DistilBertForSequenceClassification.from_pretrained(hf_dir)

    def rows(split):
        encoded = tokenizer(split.texts, truncation=True, max_length=args.sequence_length)
        return [
            {"input_ids": i, "attention_mask": m, "labels": int(y)}
            for i, m, y in zip(
                encoded["input_ids"], encoded["attention_mask"], split.labels, strict=True
            )
        ]

    training = trainer_arguments(work / "trainer", args.bf16, num_train_epochs=args.epochs,
                                 eval_strategy="epoch")  # fmt: skip
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=rows(train),
        eval_dataset=rows(val),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    predicted = np.asarray(trainer.predict(rows(test)).predictions).argmax(-1)
    return {
        "engine": "Hugging Face Trainer" + (" (bf16=True)" if args.bf16 else " (defaults)"),
        "precision": "bfloat16 (autocast)" if args.bf16 else "float32",
        "rows": {"train": len(train), "validation": len(val), "test": len(test)},
        "train_seconds": seconds,
        "samples_per_second": len(train) * args.epochs / seconds,
        "test_accuracy": float(np.mean(predicted == test.labels)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kerasft.benchmarks.trainer_run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", required=True, help="the data file")
    parser.add_argument("--limit", type=int, help="as kerasft fit's --limit")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--bf16", action="store_true", help="Trainer's bf16=True")
    parser.add_argument("--preset", default=OFFLINE_PRESET, help=f"default {OFFLINE_PRESET}")
    parser.add_argument("--sequence-length", type=int, default=128, help="default 128")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="default: cores")
    parser.add_argument("--out", type=Path, required=True, help="the result's JSON file")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "torch"  # the initial weights are built on Trainer's torch
    keep_to_backend("torch")
    args.out.write_text(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
