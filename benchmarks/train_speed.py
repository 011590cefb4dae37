"""Training speed side by side: kerasft's stage 2 on each backend vs Hugging Face Trainer.

    python -m kerasft.benchmarks.train_speed --data ../shared/data/sarcasm_headlines_v1.jsonl \\
        --out benchmarks/results/train_speed.md

One run, one machine, the reference training split. Every engine trains in its own process
(started one after another, so loading and compilation never share the cores), then the
parent alternates the engines over `--rounds` rounds of `--steps` steps, the order rotated each
round, while the other processes wait idle:

- `kerasft <backend>`: the recipe's stage 2 exactly as `TwoStageFineTuner` runs it
  (`kerasft.training.recipe.prepare_stage` with the recipe's stage-2 options: the preprocessor-free
  classifier, Adam at 1e-4 with linear decay, length-bucketed batches of 32) inside one
  `model.fit`. Compilation is excluded: a
  warm-up `fit` first runs one batch of every batch shape the timed steps use (the timed steps
  are full batches: the one short batch per epoch is left out).
- `trainer`: Hugging Face `Trainer` (transformers + torch) with its defaults for the same job:
  batch 32, learning rate 1e-4, linear schedule, `DataCollatorWithPadding` (random batches
  padded to their longest text), the same initial weights converted to a transformers
  DistilBERT (`kerasft.benchmarks.models.to_transformers`). Its first steps are warm-up too.
  `trainer:bf16` is the same with `bf16=True` (torch autocast to bfloat16), the best a Trainer
  user gets on a CPU that computes bfloat16.

A kerasft engine trains as the recipe's defaults say (`RecipeConfig().stage_options`: the
precision, `mixed_precision="auto"`, is bfloat16 where `kerasft.training.precision.AUTO_BF16` says
the backend trains faster in it on this CPU class, else float32; the bucket width; whether the word
embeddings train) but for what its name overrides:
`torch@1` a bucket width, `torch:fp32` / `torch:bf16` the precision, `torch+frozen` /
`torch-frozen` the word embeddings; `torch+padded` computes each batch with its padding,
as kerasft did before it packed a batch's real tokens (`kerasft.model.encoder`); `torch+jit`
compiles the step with `torch.compile` (Keras' `jit_compile=True`; JAX and TensorFlow compile theirs
with XLA already), whose cost shows in the "compile s" column. Trainer trains in
float32 (its default) unless `trainer:bf16`. Ratios are to `trainer` (its defaults) and,
where it ran, to `trainer:bf16`.

A step is timed from the end of the previous step to the end of this one (the loss is read
back, which synchronises), so it includes the host-side batching of the step. Reported per
engine: median ms/step and its spread (p10-p90), samples/s (median over rounds), the ratio to
Trainer, the tokens per row (padded, and those the dense layers compute: kerasft on PyTorch
packs the real ones), the FLOP/s that makes, as a share of
the CPU's nominal peak (`kerasft.util.machine.peak_fp32_gflops`), and, for kerasft, stage 1's
cached feature pass (frozen backbone, inference) in rows/s. `--quick` (about 2 minutes of
timing) is for choosing a backend on another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("torch", "jax", "tensorflow", "trainer")
PRECISIONS = {"fp32": None, "bf16": "bfloat16"}  # an engine's `:PRECISION` -> mixed_precision
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
SEED = 30
WARMUP_STEPS = 3  # untimed steps after compilation (allocator and thread-pool warm-up)
FEATURE_ROWS = 4096  # rows of the timed stage-1 feature pass (--quick: 1,024)
DEFAULT_OUT = Path("benchmarks/results/train_speed.md")


def default_engines() -> list[str]:
    """kerasft on every backend and Trainer at its defaults; Trainer with `bf16=True` too where
    the CPU computes bfloat16 (`kerasft.util.machine.computes_bf16`): elsewhere bfloat16 is
    emulated, far slower than float32, and not what a Trainer user would pick."""
    from kerasft.util.machine import computes_bf16

    return [*ENGINES, *(["trainer:bf16"] if computes_bf16() else [])]


# --- workers (one engine per process) ----------------------------------------------------------


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
            command = _read()
            self.stop = command["op"] != "round"
            self.faults = _minor_faults()
            self.last = time.perf_counter()  # the wait for the parent is not a step


def _minor_faults() -> int:
    """The process's minor page faults so far (pages the kernel mapped in, zeroed if fresh)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_PROTOCOL = sys.stdout  # the parent's pipe; a worker sends everything else to stderr


def _reply(message: dict) -> None:
    _PROTOCOL.write(json.dumps(message) + "\n")
    _PROTOCOL.flush()


def _read() -> dict:
    line = sys.stdin.readline()
    return json.loads(line) if line else {"op": "quit"}


def _encoder_parameters(backbone) -> int:
    """Parameters of the transformer layers (what a token's matrix products touch)."""
    layers = backbone.transformer_layers
    return int(sum(np.prod(w.shape) for layer in layers for w in layer.weights))


def _kerasft_worker(spec: dict, overrides: dict) -> None:
    import keras

    from kerasft.benchmarks.worker import set_threads
    from kerasft.devices.allocator import keep_freed_memory
    from kerasft.training import recipe
    from kerasft.training.config import RecipeConfig, default_bucket_width
    from kerasft.training.dropout import rand_masks
    from kerasft.training.precision import resolve_mixed_precision

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
        if _read()["op"] != "round":
            return
        model.fit(timed, epochs=1, verbose=0, shuffle=False, callbacks=[_timer(rounds)])


def _stage_2(spec: dict, data: dict, config, mixed, width: int, padded: bool, jit: bool):
    """`(classifier, train, model)`: the classifier loaded and its head initialised as the
    recipe does, the training batches, and the compiled stage-2 model, with packing off where
    `padded` and the step compiled by `torch.compile` where `jit` (see `_parse_engine`)."""
    from kerasft.model.encoder import ClsEncoder
    from kerasft.model.presets import load_classifier
    from kerasft.training import recipe
    from kerasft.training.precision import policy_name

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
    import keras

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
    from kerasft.model.encoder import PACKED_ROWS_MULTIPLE, ClsEncoder

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
    from kerasft.tokens.batching import BucketedBatches
    from kerasft.training import recipe

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
    import keras

    from kerasft.util.timing import median_ms

    x, y = train.batch(rows)
    out = {
        "shape": list(x["token_ids"].shape),
        "batching_ms": median_ms(lambda: train.batch(rows), warmup=1, calls=20),
        "forward_ms": median_ms(lambda: model.predict_on_batch(x), warmup=1, calls=5),
        "step_ms": median_ms(lambda: model.train_on_batch(x, y), warmup=1, calls=5),
    }
    if keras.backend.backend() == "torch":
        from torch.profiler import ProfilerActivity, profile

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
    import torch

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
    hf_dir = _same_initial_weights(spec, data)
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

    args = _trainer_arguments(spec, WARMUP_STEPS + spec["rounds"] * spec["steps"] + 1, bf16)
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
    if _read()["op"] != "round":
        return
    rounds.shapes = _ShiftedShapes(shapes, 1 + WARMUP_STEPS)
    trainer.train()


def _trainer_arguments(spec: dict, need: int, bf16: bool = False):
    """Trainer's defaults (fused AdamW, linear schedule) at kerasft's batch, rate and seed;
    `bf16`: its `bf16=True` (torch autocast to bfloat16 on the CPU)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(Path(spec["work"]) / "trainer"),
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        max_steps=need + 1,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=bf16,
    )


def _same_initial_weights(spec: dict, data: dict) -> Path:
    """A transformers checkpoint of kerasft's initial classifier (same seeded head)."""
    from kerasft.benchmarks.models import to_transformers
    from kerasft.model.presets import load_classifier
    from kerasft.training import recipe

    classifier = load_classifier(spec["preset"], len(data["label_names"]), spec["sequence_length"])
    recipe.initialize_head(classifier, SEED)  # the same initial weights as kerasft's
    hf_dir = Path(spec["work"]) / "transformers"
    to_transformers(classifier, hf_dir, data["label_names"])
    return hf_dir


class _ShiftedShapes:
    """`shapes[offset:]` of a list that is still growing (Trainer collates step by step)."""

    def __init__(self, shapes: list, offset: int):
        self.shapes, self.offset = shapes, offset

    def __getitem__(self, index: slice) -> list:
        return self.shapes[self.offset + index.start : self.offset + index.stop]


def _batches_class():
    import keras

    class Batches(keras.utils.PyDataset):
        """Given batches (row indices) of a `BucketedBatches`, in order."""

        def __init__(self, data, batches):
            super().__init__()
            self.data, self.batches = data, batches

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, i):
            return self.data.batch(self.batches[i])

    return Batches


def _Batches(data, batches):  # noqa: N802  (a class built once Keras is imported)
    return _batches_class()(data, batches)


def worker(engine: str, spec: dict) -> None:
    """Runs one engine's process: setup, then rounds on command (JSON lines on stdin/stdout)."""
    global _PROTOCOL
    _PROTOCOL = os.fdopen(os.dup(1), "w")  # libraries that print (Trainer does) go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    name, overrides = _parse_engine(engine)
    if name == "trainer":
        _trainer_worker(spec, overrides.get("mixed_precision") == "bfloat16")
    else:
        _kerasft_worker(spec, overrides)
    import resource

    _reply({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _parse_engine(name: str) -> tuple[str, dict]:
    """`NAME[@WIDTH][:PRECISION][+frozen|-frozen][+padded][+jit]` -> `(name, overrides)`.

    The overrides are the recipe's (`RecipeConfig` fields) but for `"padded": True`, which runs
    kerasft's view without packing a batch's real tokens (`kerasft.model.encoder`; it computes the
    padding, as before packing): for measuring what packing saves; and `"jit": True` (PyTorch
    only), the step compiled with `torch.compile`: for measuring what it saves per step and
    costs to compile. `"torch"` -> `("torch", {})`
    (the recipe's defaults); `"torch@1:fp32"` -> `("torch", {"bucket_width": 1,
    "mixed_precision": None})`; `"torch+frozen"` -> `("torch", {"freeze_word_embeddings":
    True})`; `"trainer:bf16"` -> `("trainer", {"mixed_precision": "bfloat16"})`.

    Raises:
        ValueError: an unknown engine, precision or suffix, a bad width, a repeated suffix, a
            width or a suffix for Trainer, or `+jit` for another engine than torch.
    """
    match = re.fullmatch(r"([a-z]+)(?:@(\d+))?(?::(\w+))?((?:[+-][a-z]+)*)", name)
    if match is None:
        raise ValueError(name)
    backend, width, precision, tail = match.groups()
    suffixes = re.findall(r"[+-][a-z]+", tail)
    if backend not in ENGINES or (width and int(width) < 1):
        raise ValueError(name)
    if (precision and precision not in PRECISIONS) or len(set(suffixes)) != len(suffixes):
        raise ValueError(name)
    if any(x not in ("+frozen", "-frozen", "+padded", "+jit") for x in suffixes) or (
        "+frozen" in suffixes and "-frozen" in suffixes
    ):
        raise ValueError(name)
    if backend == "trainer" and (width or suffixes):
        raise ValueError(name)
    if "+jit" in suffixes and backend != "torch":
        raise ValueError(name)
    overrides = {}
    if width:
        overrides["bucket_width"] = int(width)
    if precision:
        overrides["mixed_precision"] = PRECISIONS[precision]
    for suffix in suffixes:
        if suffix.endswith("frozen"):
            overrides["freeze_word_embeddings"] = suffix == "+frozen"
        else:
            overrides[suffix[1:]] = True  # padded, jit
    return backend, overrides


# --- the parent ----------------------------------------------------------------------------------


class _Engine:
    def __init__(self, engine: str, spec: dict, log_dir: Path):
        env = dict(os.environ)
        backend = _parse_engine(engine)[0]
        env["KERAS_BACKEND"] = "torch" if backend == "trainer" else backend
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if backend == "trainer":  # transformers' TensorFlow side needs tf-keras, not Keras 3
            env["USE_TF"] = "0"
        self.name = engine
        self.log = open(log_dir / f"{engine}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kerasft.benchmarks.train_speed", "--worker", engine,
             "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.flush()
            tail = Path(self.log.name).read_text()[-3000:]
            raise RuntimeError(f"{self.name} worker exited ({self.process.returncode}):\n{tail}")
        return json.loads(line)

    def send(self, op: str) -> None:
        self.process.stdin.write(json.dumps({"op": op}) + "\n")
        self.process.stdin.flush()

    def close(self) -> dict:
        self.send("quit")
        stats = self.read()
        self.process.wait(timeout=120)
        self.log.close()
        return stats


def _training_rows(path: str, limit: int | None) -> dict:
    from kerasft.data import load_dataset, reference_split, stratified_limit

    data = load_dataset(path)
    train, _, _ = reference_split(data.labels)
    if limit is not None and limit < len(train):
        train = train[stratified_limit(data.labels[train], limit)]
    return {
        "texts": [data.texts[i] for i in train],
        "labels": [int(data.labels[i]) for i in train],
        "label_names": list(data.label_names),
    }


def measure(args, progress=print) -> dict:
    """Runs every engine and returns the results (see the module docstring)."""
    from kerasft.util.machine import describe, peak_fp32_gflops
    from kerasft.util.versions import package_versions, source_commit

    started = time.perf_counter()
    source = source_commit()  # the code measured (later edits to the tree do not count)
    with tempfile.TemporaryDirectory(prefix="kerasft-train-speed-") as tmp:
        work = Path(tmp)
        data_file = work / "train.json"
        rows = _training_rows(args.data, args.limit)
        data_file.write_text(json.dumps(rows))
        spec = {
            "data": str(data_file), "preset": args.preset, "threads": args.threads,
            "rounds": args.rounds, "steps": args.steps, "work": str(work),
            "feature_rows": args.feature_rows, "sequence_length": args.sequence_length,
        }  # fmt: skip
        names, setup, steps, shapes, stats = _run_engines(args, spec, work, progress)
    peak, peak_formula = peak_fp32_gflops(args.threads)
    results = {
        name: _engine_result(setup[name], steps[name], shapes[name], stats[name], peak)
        for name in names
    }
    for key, base_name in (("vs_trainer", "trainer"), ("vs_trainer_bf16", "trainer:bf16")):
        if base_name in results:
            base = results[base_name]["samples_per_second"]
            for result in results.values():
                result[key] = result["samples_per_second"] / base
    return {
        "command": args.command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": source,
        "machine": {
            **describe(),
            "threads": args.threads,
            "peak_gflops": peak,
            "peak_formula": peak_formula,
        },  # fmt: skip
        "versions": package_versions(
            (
                "keras",
                "keras-hub",
                "jax",
                "tensorflow",
                "torch",
                "transformers",
                "accelerate",
                "numpy",
            )
        ),  # fmt: skip
        "settings": {
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup_steps": WARMUP_STEPS,
            "training_rows": len(rows["texts"]),
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "preset": args.preset,
        },  # fmt: skip
        "results": results,
        "seconds": time.perf_counter() - started,
    }


def _run_engines(args, spec: dict, work: Path, progress):
    """Starts the engines one at a time, then runs the rounds, the order rotated each round."""
    engines, setup = {}, {}
    try:
        for name in args.engines:  # one at a time: setup and compilation do not overlap
            progress(f"starting {name} ...")
            engines[name] = _Engine(name, spec, work)
            setup[name] = engines[name].read()
            progress(f"  {name}: ready ({setup[name]['load_seconds']:.0f} s loading, "
                     f"{setup[name]['compile_seconds']:.0f} s compiling)")  # fmt: skip
        steps = {name: [] for name in engines}
        shapes = {name: [] for name in engines}
        faults = dict.fromkeys(engines, 0)
        names = list(engines)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                engines[name].send("round")
                reply = engines[name].read()
                steps[name].append(reply["seconds"])
                faults[name] += reply["minor_faults"]
                shapes[name] += [tuple(s) for s in reply["shapes"]]
            progress(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {np.median(steps[n][-1]) * 1e3:.0f} ms/step" for n in order
            ))  # fmt: skip
        stats = {name: {**engines.pop(name).close(), "minor_faults": faults[name]}
                 for name in names}  # fmt: skip
    finally:
        for engine in engines.values():
            engine.process.kill()
    return names, setup, steps, shapes, stats


def _engine_result(info: dict, per_round: list, shapes: list, stats: dict, peak) -> dict:
    """One engine's figures from its per-round step seconds and batch shapes."""
    flat = np.concatenate(per_round)
    rows_per_step = np.array([s[0] for s in shapes], dtype=float)
    lengths = np.array([s[1] for s in shapes], dtype=float)
    # tokens per row through the dense layers: packed (real) ones, else the padded length
    tokens = np.array([s[2] if len(s) > 2 else s[1] for s in shapes], dtype=float)
    # Matrix FLOPs of a training step (forward + backward = 3x forward): 2 per parameter
    # and token in the encoder layers, plus attention's two products (4 L d per token, over
    # the padded length).
    layers, hidden = info["layers"], info["hidden"]
    per_layer = info["encoder_parameters"] / layers
    if info.get("last_layer_at_cls"):  # every token's keys and values, the rest at [CLS] only
        layers -= 1
        kv = 2 * hidden**2
        last = tokens * 2 * kv + 2 * (per_layer - kv) + 4 * lengths * hidden
    else:
        last = 0.0
    flops = (
        3
        * rows_per_step
        * (tokens * 2 * per_layer * layers + 4 * layers * lengths**2 * hidden + last)
    )
    round_rates = [BATCH_SIZE * len(s) / float(np.sum(s)) for s in per_round]
    gflops = float(np.sum(flops) / np.sum(flat) / 1e9)
    return {
        **info,
        "ms_per_step_p50": float(np.median(flat) * 1e3),
        "ms_per_step_p10": float(np.percentile(flat, 10) * 1e3),
        "ms_per_step_p90": float(np.percentile(flat, 90) * 1e3),
        "samples_per_second": float(np.median(round_rates)),
        "samples_per_second_rounds": round_rates,
        "timed_steps": len(flat),
        "padded_tokens_per_row": float(np.mean(lengths)),
        "computed_tokens_per_row": float(np.mean(tokens)),
        "gflops": gflops,
        "share_of_peak": None if peak is None else gflops / peak,
        "peak_rss_mb": stats["peak_rss_mb"],
        "page_faults_per_step": stats["minor_faults"] / len(flat),
    }


def render(report: dict) -> str:
    """The markdown report."""
    m, s = report["machine"], report["settings"]
    lines = [
        "# Training speed: kerasft stage 2 vs Hugging Face Trainer",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; commit {report['commit']}  ",
        f"CPU: {m['cpu']}, {m['cores']} cores, ISA: {', '.join(m['isa']) or 'none found'}; "
        f"{m['threads']} threads per engine; nominal fp32 peak "
        + (f"{m['peak_gflops']:.0f} GFLOP/s ({m['peak_formula']})" if m["peak_gflops"] else "n/a")
        + "  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items())),
        "",
        f"Method: the reference training split ({s['training_rows']:,} rows), batch "
        f"{s['batch_size']}, learning rate {s['learning_rate']:g} with linear decay, preset "
        f"`{s['preset']}`. Each engine in its own process; {s['rounds']} rounds of "
        f"{s['steps']} timed steps, engines alternated (order rotated each round). Excluded: "
        f"loading, compilation (kerasft: a warm-up `fit` over every timed batch shape) and "
        f"{s['warmup_steps']} more warm-up steps. A step runs from the previous step's end to its "
        "own (loss read back), host-side batching included. samples/s: median over rounds; "
        "page faults/step: the engine process's minor page faults over the timed steps, per "
        "step (memory the kernel mapped in; kerasft keeps freed blocks, "
        "`kerasft.devices.allocator`); "
        "ratios: of those medians. FLOP/s: matrix FLOPs a step computes (3 x forward: 2 per "
        "encoder parameter and computed token, padding included where it is computed, plus "
        "attention's 4 x padded length x hidden per token; kerasft's last layer at [CLS] only "
        "but for its keys and values; kerasft on PyTorch packs a batch's real tokens, "
        "`kerasft.model.encoder`), "
        "over the median step (bfloat16 engines too, against the float32 peak). Precision: "
        "kerasft's engines in the recipe's default unless named (`auto`: bfloat16 where the "
        "backend measured faster in it on this CPU class, "
        "`kerasft.training.precision.AUTO_BF16`), "
        "Trainer at its defaults (float32) and, where the CPU computes bfloat16, with "
        "`bf16=True`"
        + (
            "."
            if "trainer:bf16" in report["results"]
            else " (not run here: without native bfloat16 it is emulated and slower than float32)."
        ),
        "",
        "| engine | ms/step p50 (p10-p90) | samples/s | vs Trainer | vs Trainer bf16 | "
        "tokens/row padded (computed) | GFLOP/s | share of peak | stage-1 feature pass rows/s | "
        "optimizer | page faults/step | compile s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]

    def ratio(r, key):
        return f"{r[key]:.2f}x" if key in r else "-"

    for r in sorted(report["results"].values(), key=lambda r: -r["samples_per_second"]):
        share = "" if r["share_of_peak"] is None else f"{r['share_of_peak']:.0%}"
        feature = r["feature_rows_per_second"]
        lines.append(
            f"| {r['engine']} | {r['ms_per_step_p50']:.0f} ({r['ms_per_step_p10']:.0f}-"
            f"{r['ms_per_step_p90']:.0f}) | {r['samples_per_second']:.1f} | "
            f"{ratio(r, 'vs_trainer')} | {ratio(r, 'vs_trainer_bf16')} | "
            f"{r['padded_tokens_per_row']:.1f} "
            f"({r.get('computed_tokens_per_row', r['padded_tokens_per_row']):.1f}) | "
            f"{r['gflops']:.0f} | {share} | {'-' if feature is None else f'{feature:.0f}'} | "
            f"{r['optimizer']} | {r['page_faults_per_step']:,.0f} | {r['compile_seconds']:.0f} |"
        )
    lines += _breakdown_lines(report)
    lines += [
        "",
        "Per round, samples/s: "
        + "; ".join(
            f"{r['engine']} " + ", ".join(f"{x:.1f}" for x in r["samples_per_second_rounds"])
            for r in report["results"].values()
        ),
        "",
        f"Total {report['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _breakdown_lines(report: dict) -> list[str]:
    """The report's table of where a kerasft step's time goes (none when not measured)."""
    broken = [r for r in report["results"].values() if r.get("breakdown")]
    if not broken:
        return []
    lines = [
        "",
        "Where a kerasft step's time goes, on one batch of the most common timed length after"
        " compilation (median of 5 calls; batching: of 20): host-side batching, the forward "
        "pass alone (inference, `predict_on_batch`), the whole training step "
        "(`train_on_batch`: forward with dropout, backward, optimizer); on PyTorch also the "
        "step's profile (self CPU time by kind of op, `torch.profiler`, 3 steps) and the "
        "matrix products one step ran through oneDNN, by kernel (its verbose log; float32 "
        "products go to another GEMM library and are not listed).",
        "",
        "| engine | batch | batching ms | forward ms | step ms | backward + optimizer ms | "
        "profile (torch) | oneDNN matmul kernels (torch) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in broken:
        b = r["breakdown"]
        profile = ", ".join(f"{k} {v:.0%}" for k, v in b.get("torch_profile", {}).items())
        kernels = b.get("onednn_matmul")
        kernels = "-" if kernels is None else (
            ", ".join(f"`{k}` x{n}" for k, n in sorted(kernels.items())) or "none"
        )  # fmt: skip
        lines.append(
            f"| {r['engine']} | {b['shape'][0]} x {b['shape'][1]} | {b['batching_ms']:.2f} | "
            f"{b['forward_ms']:.0f} | {b['step_ms']:.0f} | "
            f"{b['step_ms'] - b['forward_ms']:.0f} | {profile or '-'} | {kernels} |"
        )
    return lines


def build_parser(prog: str = "python -m kerasft.benchmarks.train_speed") -> argparse.ArgumentParser:
    from kerasft.data import DATA_ENV
    from kerasft.model.presets import OFFLINE_PRESET

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=os.environ.get(DATA_ENV), help=f"the reference data file (or ${DATA_ENV})"
    )
    parser.add_argument("--preset", default=OFFLINE_PRESET, help=f"default {OFFLINE_PRESET}")
    parser.add_argument(
        "--sequence-length", type=int, default=128, help="maximum tokens per text (default 128)"
    )
    parser.add_argument(
        "--engines",
        help=f"comma-separated, from {','.join(ENGINES)}, each "
        "NAME[@W][:fp32|bf16][+frozen|-frozen][+padded][+jit] (default: torch,jax,tensorflow,"
        "trainer, and trainer:bf16 on CPUs with AVX512_BF16 or AMX-BF16); a kerasft engine is "
        "the recipe's stage 2 with its defaults but for: @W, the bucket width (e.g. torch@1); "
        "+frozen / -frozen, word embeddings frozen or trained; :fp32 or :bf16, the precision "
        "(Trainer: fp32 unless :bf16); +padded, batches computed with their padding (PyTorch "
        "packs the real tokens otherwise); +jit (torch), the step compiled by torch.compile",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per round (default 25)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="threads per engine (default: cores)"
    )
    parser.add_argument("--limit", type=int, help="train on a stratified subset of N training rows")
    parser.add_argument(
        "--quick", action="store_true",
        help="3 rounds of 6 steps on 3,200 rows: about 2 minutes of timing, to choose a backend",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"markdown report (default {DEFAULT_OUT}); the JSON goes beside it",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    from kerasft.benchmarks.report import require_data, write_results

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], json.loads(argv[3]))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.limit = 3, 6, args.limit or 3200
    args.feature_rows = 1024 if args.quick else FEATURE_ROWS
    engines = args.engines if args.engines is not None else ",".join(default_engines())
    args.engines = [e.strip() for e in engines.split(",") if e.strip()]
    bad = []
    for engine in args.engines:
        try:
            _parse_engine(engine)
        except ValueError:
            bad.append(engine)
    if bad or not args.engines:
        parser.error(
            f"unknown engines {bad}. Choose from {list(ENGINES)}; a kerasft backend may name a "
            "bucket width and +frozen/-frozen word embeddings, e.g. torch@1+frozen, and any "
            "engine a precision, e.g. trainer:bf16."
        )
    for name, value, low in (("rounds", args.rounds, 1), ("steps", args.steps, 2),
                             ("threads", args.threads, 1)):  # fmt: skip
        if value < low:
            parser.error(f"--{name} must be >= {low}. Received: {value}")
    require_data(parser, args.data)
    args.command = "python -m kerasft.benchmarks.train_speed " + shlex.join(argv)
    report = measure(args, progress=lambda text: print(text, flush=True))
    write_results(args.out, report, render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
