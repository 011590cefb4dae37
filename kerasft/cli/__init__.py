"""The `kerasft` command line: `fit`, `export`, `predict`, `evaluate`, `bench`.

`entry` parses (`parser`), chooses the backend before Keras is imported (`--backend`, else
`KERAS_BACKEND`, else PyTorch) and runs the command: `fit`'s run lifecycle in `fit`, the others
in `commands`; `bench` is the latency harness's own parser. The default backend is PyTorch: it
runs a whole short `kerasft fit` fastest on the machines measured
(benchmarks/results/backends_limit4000.md) and its stage-2 steps are the fastest of the three
(benchmarks/results/train_speed.md).

The top layer: the only one that may import `kerasft.exporters` and `kerasft.benchmarks`, and
any layer below it.
"""

from kerasft.cli.entry import main

__all__ = ["main"]
