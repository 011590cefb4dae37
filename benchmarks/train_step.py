"""Seconds per training step and per forward pass of the offline preset on the current backend.

The figures README.md uses to pick the default backend (batch 32, 16/24/32 tokens):

    for b in jax tensorflow torch; do KERAS_BACKEND=$b python -m kerasft.benchmarks.train_step; done
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16,24,32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from kerasft.presets import load_classifier
    from kerasft.recipe import compile_classifier, core_model

    model = compile_classifier(core_model(load_classifier("all_minilm_l6_v2", 2, 64)), 5e-5)
    rng = np.random.default_rng(0)
    for length in map(int, args.lengths.split(",")):
        shape = (args.batch_size, length)
        x = {"token_ids": rng.integers(1000, 2000, shape).astype("int32"),
             "padding_mask": np.ones(shape, "int32")}  # fmt: skip
        y = np.eye(2, dtype="float32")[rng.integers(0, 2, args.batch_size)]
        for _ in range(2):  # warm-up: compilation excluded
            model.train_on_batch(x, y)
            model.predict_on_batch(x)
        start = time.perf_counter()
        for _ in range(args.repeats):
            model.train_on_batch(x, y)
        train = (time.perf_counter() - start) / args.repeats
        start = time.perf_counter()
        for _ in range(args.repeats):
            model.predict_on_batch(x)
        forward = (time.perf_counter() - start) / args.repeats
        print(f"{keras.backend.backend()} len {length}: train step {train:.3f} s, "
              f"forward {forward:.3f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
