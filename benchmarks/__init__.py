"""Benchmarks and reports, installed as `kerasft.benchmarks`.

`python -m kerasft.benchmarks.export_accuracy`: exports' accuracy and size.
"""
