"""Benchmarks and reports (`python -m benchmarks.export_accuracy`: exports accuracy/size)."""
