"""The engines of `kerasft.benchmarks.train_speed`, one process each: kerasft's stage 2 on a
Keras backend, or Hugging Face Trainer.

    python -m kerasft.benchmarks.train_workers ENGINE SPEC_JSON

The parent (`train_speed`) starts one per engine and drives it through `kerasft.benchmarks.pipe`:
the worker sets up (load, encode, compile every timed shape), replies with what it set up, then
times `steps` steps per round on the parent's word, so that the engines alternate on the cores.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import keras  # under the engine's backend: the parent sets KERAS_BACKEND
import numpy as np

from kerasft.benchmarks.pipe import child_pipe, next_command, reply
from kerasft.benchmarks.train_speed import (
    BATCH_SIZE,
    LEARNING_RATE,
    SEED,
    WARMUP_STEPS,
    parse_engine,
)
from kerasft.benchmarks.trainer_run import initial_checkpoint, trainer_arguments
from kerasft.benchmarks.worker import set_threads
from kerasft.devices.allocator import keep_freed_memory
from kerasft.model.encoder import PACKED_ROWS_MULTIPLE, ClsEncoder
from kerasft.model.presets import load_classifier
from kerasft.tokens.batching import BucketedBatches
from kerasft.training import recipe
from kerasft.training.config import RecipeConfig, default_bucket_width
from kerasft.training.dropout import rand_masks
from kerasft.training.precision import policy_name, resolve_mixed_precision
from kerasft.util.timing import median_ms

_PIPE: TextIO = sys.stdout  # the parent's pipe (`main` sets it); everything else goes to stderr


def _reply(message: dict) -> None:
    reply(_PIPE, message)


class _Rounds:
    """Times steps; after every `steps` of them reports to the parent and waits for its word."""

    def __init__(self, steps: int, shapes: list[tuple[int, int]]):
        # shapes[i]: (rows, padded length[, tokens per row computed]) of step i
        self.steps, self.shapes = steps, shapes
        self.done_steps = 0
        self.times: list[float] = []
        self.last = None
        self.stop = False

    def step_done(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        else:
            self.faults = _minor_faults()
        self.last = now
        if len(self.times) == self.steps:
            first = self.done_steps
            shapes = self.shapes[first : first + self.steps]
            faults = _minor_faults() - self.faults
            _reply({"seconds": self.times, "shapes": shapes, "minor_faults": faults})
            self.done_steps += self.steps
            self.times = []
            command = next_command()
            self.stop = command["op"] != "round"
            self.faults = _minor_faults()
            self.last = time.perf_counter()  # the wait for the parent is not a step


def _minor_faults() -> int:
    """The process's minor page faults so far (pages the kernel mapped in, zeroed if fresh)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _encoder_parameters(backbone) -> int:
    """Parameters of the transformer layers (what a token's matrix products touch)."""
    layers = backbone.transformer_layers
    return int(sum(np.prod(w.shape) for layer in layers for w in layer.weights))


def _kerasft_worker(spec: dict, overrides: dict) -> None:
    # As `TwoStageFineTuner.fit` does first thing: on JAX before XLA starts its threads.
    keep_freed_memory(keras.backend.backend())
    set_threads(spec["threads"])
    # The recipe's stage 2 with its defaults, but for what the engine's name overrides.
    padded = overrides.pop("padded", False)  # not the recipe's: see `_parse_engine`
    jit = overrides.pop("jit", False)
    config = RecipeConfig(batch_size=BATCH_SIZE, finetune_learning_rate=LEARNING_RATE,
                          finetune_schedule="linear", seed=SEED, **overrides)  # fmt: skip
    mixed = resolve_mixed_precision(config.mixed_precision)
    width = config.bucket_width or default_bucket_width(keras.backend.backend())
    data = json.loads(Path(spec["data"]).read_text())
    keras.utils.set_random_seed(SEED)
    started = time.perf_counter()
    classifier, train, model = _stage_2(spec, data, config, mixed, width, padded, jit)
    with rand_masks(model) as dropout_layers:  # as the recipe's `fit` trains
        batches, lengths, first = _timed_batches(
            train, WARMUP_STEPS + spec["rounds"] * spec["steps"] + 1
        )
        timed = _Batches(train, batches)
        warm = _Batches(train, [batches[i] for i in sorted(first.values())])
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        model.fit(warm, epochs=1, verbose=0, shuffle=False)  # compiles every timed shape
        compile_seconds = time.perf_counter() - started

        feature_rows, feature_seconds = _feature_pass(classifier, train, spec["feature_rows"])
        usual = np.bincount(lengths).argmax()
        common = int(np.argmax(lengths == usual))  # a batch of the usual length
        breakdown = _breakdown(model, train, batches[common])
        # (rows, padded length, tokens per row the dense layers compute) of each timed step
        computed = [_computed_tokens(model, train, b) for b in batches]
        timed_shapes = zip(lengths[1 + WARMUP_STEPS :], computed[1 + WARMUP_STEPS :], strict=True)
        rounds = _Rounds(spec["steps"], [(BATCH_SIZE, int(n), c) for n, c in timed_shapes])
        notes = ["bf16" if mixed else "fp32", f"bucket width {width}"]
        notes += ["word embeddings frozen"] if config.freeze_word_embeddings else []
        notes += ["padding computed"] if padded else []
        notes += ["torch.compile"] if jit else []
        notes += ["16-bit dropout masks"] if dropout_layers else []
        _reply({
            "breakdown": breakdown,
            "engine": f"kerasft {keras.backend.backend()} ({', '.join(notes)})",
            "precision": mixed or "float32",
            "load_seconds": load_seconds,
            "compile_seconds": compile_seconds,
            "jit_compile": str(model.jit_compile),
            "optimizer": type(model.optimizer).__name__,
            "shapes": len(first),
            "encoder_parameters": _encoder_parameters(classifier.backbone),
            "layers": classifier.backbone.num_layers,
            "hidden": classifier.backbone.hidden_dim,
            "last_layer_at_cls": recipe.last_layer_at_cls(classifier.backbone),
            "feature_rows_per_second": feature_rows / feature_seconds,
            "padded_tokens_per_row": float(np.mean(lengths)),
        })  # fmt: skip
        if next_command()["op"] != "round":
            return
        model.fit(timed, epochs=1, verbose=0, shuffle=False, callbacks=[_timer(rounds)])


def _stage_2(spec: dict, data: dict, config, mixed, width: int, padded: bool, jit: bool):
    """`(classifier, train, model)`: the classifier loaded and its head initialised as the
    recipe does, the training batches, and the compiled stage-2 model, with packing off where
    `padded` and the step compiled by `torch.compile` where `jit` (see `_parse_engine`)."""
    classifier = load_classifier(spec["preset"], len(data["label_names"]), spec["sequence_length"],
                                 policy_name(mixed))  # fmt: skip
    recipe.initialize_head(classifier, SEED)
    train = recipe.encode(
        classifier, data["texts"], np.asarray(data["labels"]), batch_size=BATCH_SIZE,
        shuffle=True, seed=SEED, bucket_width=width,
    )  # fmt: skip
    model, _, _ = recipe.prepare_stage(
        classifier, train, epochs=1, train_base=True, verbose=0,
        **config.stage_options("finetune"),
    )  # fmt: skip
    for view in model._flatten_layers():
        if isinstance(view, ClsEncoder):
            view.skip_padding = not padded
    if jit:
        model.jit_compile = True
    return classifier, train, model


def _timer(rounds):
    """A callback that waits for each step's loss, counts the steps after warm-up into
    `rounds`, and stops training when its rounds are done."""

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(keras.ops.convert_to_numpy(logs["loss"]))  # waits for the step
            if batch >= WARMUP_STEPS:
                rounds.step_done()
                if rounds.stop:
                    self.model.stop_training = True

    return Timer()


def _timed_batches(train, need: int) -> tuple[list, np.ndarray, dict]:
    """The timed steps: `need` full batches of as many epochs as needed, in training order;
    their padded lengths; and `{length: index of its first batch}` (what warm-up compiles)."""
    batches = []
    while len(batches) < need:
        batches += [b for b in train.batches if len(b) == BATCH_SIZE]
        train.set_epoch(train.epoch + 1)
    batches = batches[:need]
    lengths = np.array([int(train.bucket_len[b].max()) for b in batches])
    # TensorFlow infers the dataset's signature from its first batches: two lengths first.
    other = next((i for i, n in enumerate(lengths) if n != lengths[0]), None)
    if other is not None:
        batches.insert(1, batches.pop(other))
        lengths = np.insert(np.delete(lengths, other), 1, lengths[other])
    first = {}
    for i, n in enumerate(lengths):
        first.setdefault(n, i)
    return batches, lengths, first


def _computed_tokens(model, train, rows) -> float:
    """Tokens per row the encoder's dense layers compute for batch `rows`: its real tokens
    filled up to `PACKED_ROWS_MULTIPLE` where the view packs them (`kerasft.model.encoder`,
    PyTorch), else its padded length."""
    view = next((x for x in model._flatten_layers() if isinstance(x, ClsEncoder)), None)
    length = float(train.bucket_len[rows].max())
    if view is None or not view.packs():
        return length
    real = int(np.minimum(np.maximum(train.lengths[rows], 1), length).sum())
    packed = -(-real // PACKED_ROWS_MULTIPLE) * PACKED_ROWS_MULTIPLE
    return min(length, packed / len(rows))


def _feature_pass(classifier, train, feature_rows: int) -> tuple[int, float]:
    """Stage 1's cached pass: rows and seconds of the frozen backbone's first pass over
    `feature_rows` rows, its compilation included, as `fit` runs it."""
    rows = np.arange(min(feature_rows, len(train.lengths)))
    subset = BucketedBatches(train.token_ids.padded(rows), train.lengths[rows],
                             bucket_width=train.bucket_width)  # fmt: skip
    started = time.perf_counter()
    recipe.extract_features(classifier, subset, verbose=0)
    return len(rows), time.perf_counter() - started


# torch ops by what they do, for the step's profile (self CPU time).
_TORCH_KINDS = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul"),
    "optimizer": ("aten::_fused_adam_", "aten::_foreach_"),
    "dropout RNG": ("aten::bernoulli_", "aten::uniform_", "aten::random_"),
    "embedding gradient": ("aten::embedding_dense_backward", "aten::index_add_",
                           "aten::index_fill_", "aten::fill_", "aten::zero_"),
}  # fmt: skip


def _breakdown(model, train, rows) -> dict:
    """Where one step's time goes, on one batch after compilation (see the report)."""
    x, y = train.batch(rows)
    out = {
        "shape": list(x["token_ids"].shape),
        "batching_ms": median_ms(lambda: train.batch(rows), warmup=1, calls=20),
        "forward_ms": median_ms(lambda: model.predict_on_batch(x), warmup=1, calls=5),
        "step_ms": median_ms(lambda: model.train_on_batch(x, y), warmup=1, calls=5),
    }
    if keras.backend.backend() == "torch":
        from torch.profiler import ProfilerActivity, profile  # lazy: the torch engine only

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model.train_on_batch(x, y)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares = dict.fromkeys(_TORCH_KINDS, 0.0)
        for e in events:
            kind = next((k for k, names in _TORCH_KINDS.items()
                         if any(e.key.startswith(n) for n in names)), None)  # fmt: skip
            if kind is not None:
                shares[kind] += e.self_cpu_time_total / total
        shares["everything else"] = 1.0 - sum(shares.values())
        out["torch_profile"] = shares
        out["onednn_matmul"] = _onednn_matmul_kernels(lambda: model.train_on_batch(x, y))
    return out


def _onednn_matmul_kernels(step) -> dict[str, int]:
    """`{oneDNN implementation: calls}` of the matrix products one PyTorch `step()` ran through
    oneDNN (its verbose log, which the library writes to file descriptor 1): e.g.
    `brg_matmul:avx512_core_bf16` shows the bfloat16 kernels really run. Products computed
    elsewhere (float32 goes to MKL/OpenBLAS GEMM) are not listed."""
    import torch  # lazy: the torch engine only

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                step()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        kernels: dict[str, int] = {}
        for line in log:  # onednn_verbose,v1,primitive,exec,cpu,matmul,IMPLEMENTATION,...
            fields = line.split(",")
            at = fields.index("exec") if "exec" in fields[:4] else -1
            if at >= 0 and fields[at + 1 : at + 3] == ["cpu", "matmul"]:
                kernels[fields[at + 3]] = kernels.get(fields[at + 3], 0) + 1
    return kernels


def _trainer_worker(spec: dict, bf16: bool) -> None:
    # lazy: only Trainer's engine loads transformers
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        DistilBertForSequenceClassification,
        Trainer,
        TrainerCallback,
    )

    torch.set_num_threads(spec["threads"])
    data = json.loads(Path(spec["data"]).read_text())
    started = time.perf_counter()
    hf_dir = initial_checkpoint(spec["preset"], data["label_names"], spec["sequence_length"],
                                Path(spec["work"]) / "transformers")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = DistilBertForSequenceClassification.from_pretrained(hf_dir)
    encoded = tokenizer(data["texts"], truncation=True, max_length=spec["sequence_length"])
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": int(label)}
        for ids, mask, label in zip(
            encoded["input_ids"], encoded["attention_mask"], data["labels"], strict=True
        )
    ]
    collate = DataCollatorWithPadding(tokenizer)
    shapes: list[tuple[int, int]] = []

    def collator(features):
        batch = collate(features)
        shapes.append(tuple(int(n) for n in batch["input_ids"].shape))
        return batch

    need = WARMUP_STEPS + spec["rounds"] * spec["steps"] + 1
    args = trainer_arguments(Path(spec["work"]) / "trainer", bf16, max_steps=need + 1,
                             eval_strategy="no")  # fmt: skip
    rounds = _Rounds(spec["steps"], shapes)
    load_seconds = time.perf_counter() - started

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > WARMUP_STEPS:
                rounds.step_done()
                if rounds.stop:
                    control.should_training_stop = True

    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Timer()]
    )
    config = model.config
    _reply({
        "engine": "Hugging Face Trainer" + (" (bf16=True)" if bf16 else " (defaults, fp32)"),
        "precision": "bfloat16 (autocast)" if bf16 else "float32",
        "load_seconds": load_seconds,
        "compile_seconds": 0.0,
        "jit_compile": "False (eager)",
        "optimizer": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
        "shapes": None,
        "encoder_parameters": int(sum(
            p.numel() for p in model.distilbert.transformer.parameters()
        )),
        "layers": config.n_layers,
        "hidden": config.dim,
        "feature_rows_per_second": None,
        "padded_tokens_per_row": None,
    })  # fmt: skip
    if next_command()["op"] != "round":
        return
    rounds.shapes = _ShiftedShapes(shapes, 1 + WARMUP_STEPS)
    trainer.train()


class _ShiftedShapes:
    """`shapes[offset:]` of a list that is still growing (Trainer collates step by step)."""

    def __init__(self, shapes: list, offset: int):
        self.shapes, self.offset = shapes, offset

    def __getitem__(self, index: slice) -> list:
        return self.shapes[self.offset + index.start : self.offset + index.stop]


class _Batches(keras.utils.PyDataset):
    """Given batches (row indices) of a `BucketedBatches`, in order."""

    def __init__(self, data, batches):
        super().__init__()
        self.data, self.batches = data, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.data.batch(self.batches[i])


def worker(engine: str, spec: dict) -> None:
    """Runs one engine's process: setup, then rounds on the parent's word, then its peak
    memory."""
    name, overrides = parse_engine(engine)
    if name == "trainer":
        _trainer_worker(spec, overrides.get("mixed_precision") == "bfloat16")
    else:
        _kerasft_worker(spec, overrides)
    _reply({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main(argv: list[str] | None = None) -> None:
    global _PIPE
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0].startswith("-"):
        sys.exit(f"usage: python -m kerasft.benchmarks.train_workers ENGINE SPEC_JSON\n{__doc__}")
    engine, spec = argv
    _PIPE = child_pipe()  # libraries that print (Trainer does) go to stderr
    worker(engine, json.loads(spec))


if __name__ == "__main__":
    main()
