"""The prepared GPU run: `python -m kerasft.benchmarks.gpu.run` (see `run.py`) and the packing of
what it needs onto a machine without a package registry (`pack.py`)."""
