"""Run directories: what a fit leaves behind (`rundir`) and its training-curve plots (`plots`).

The one home of the run directory's layout: its file names, `metrics.json`, the data source
record and the partial directory a fit builds in.

May import: `kerasft.data`, `kerasft.model`, `kerasft.devices`, `kerasft.tokens`, `kerasft.util`.
"""
