"""Tokens: KerasHub's WordPiece without TensorFlow (`wordpiece`) and length-bucketed batches of
token ids (`batching`).

May import: `kerasft.util`.
"""
