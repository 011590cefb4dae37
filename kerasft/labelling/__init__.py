"""Labelling files: texts streamed in (`textstream`), predictions written out (`labeller`).

Works with any `predict_proba(texts)`: a `TwoStageFineTuner`'s or an export runtime's, so it
needs no Keras itself.

May import: `kerasft.data`, `kerasft.model`, `kerasft.devices`, `kerasft.tokens`, `kerasft.util`.
"""
