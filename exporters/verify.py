"""The shared verification step: every export is run by its own runtime against the Keras model."""

from __future__ import annotations

import numpy as np

FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99


class VerificationError(RuntimeError):
    """An artifact disagrees with its source model; the message says by how much."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def verify(
    runtime,
    texts: list[str],
    keras_ids: np.ndarray,
    keras_logits: np.ndarray,
    quantized: bool,
    batch_size: int = 32,
) -> dict:
    """Compares an export (through `exporters.runtime`) with the Keras model on `texts`.

    Checks, in order: the export's `tokenizer.json` gives the KerasHub preprocessor's token ids;
    then fp32 exports must match the Keras logits to `FP32_TOLERANCE` with identical labels, and
    INT8 exports must agree with the fp32 Keras labels on at least `INT8_MIN_AGREEMENT` of texts.

    Args:
        runtime: an `exporters.runtime.ExportedClassifier` opened on the new export.
        texts: real texts.
        keras_ids: KerasHub token ids for `texts`, `(N, L)`, 0-padded.
        keras_logits: the Keras model's logits for `texts`, `(N, K)`.
        quantized: whether the export is an INT8 variant.
        batch_size: texts per runtime call.

    Returns:
        The verification report (also written to the manifest).

    Raises:
        VerificationError: if a check fails, with the measured numbers.
    """
    encoded = runtime.encode(texts)
    width = max(encoded["token_ids"].shape[1], keras_ids.shape[1])
    ids_a = np.pad(encoded["token_ids"], ((0, 0), (0, width - encoded["token_ids"].shape[1])))
    ids_b = np.pad(keras_ids, ((0, 0), (0, width - keras_ids.shape[1])))
    token_mismatch = int(np.sum(np.any(ids_a != ids_b, axis=1)))
    logits = runtime.predict(texts, batch_size=batch_size).logits
    max_diff = float(np.max(np.abs(logits - keras_logits)))
    agreement = float(np.mean(logits.argmax(-1) == keras_logits.argmax(-1)))
    report = {
        "texts": len(texts),
        "tokenizer_mismatches": token_mismatch,
        "max_abs_logit_diff": max_diff,
        "label_agreement": agreement,
        "criterion": (
            f"label_agreement >= {INT8_MIN_AGREEMENT}"
            if quantized
            else f"max_abs_logit_diff <= {FP32_TOLERANCE} and label_agreement == 1"
        ),
    }
    if token_mismatch:
        raise VerificationError(
            f"tokenizer.json disagrees with the KerasHub preprocessor on {token_mismatch} of "
            f"{len(texts)} texts.",
            report,
        )
    if quantized and agreement < INT8_MIN_AGREEMENT:
        raise VerificationError(
            f"INT8 export agrees with the fp32 model on {agreement:.2%} of {len(texts)} texts; "
            f"at least {INT8_MIN_AGREEMENT:.0%} is required.",
            report,
        )
    if not quantized and (max_diff > FP32_TOLERANCE or agreement < 1.0):
        raise VerificationError(
            f"fp32 export differs from the Keras model: max |logit diff| = {max_diff:.3g} "
            f"(allowed {FP32_TOLERANCE}), label agreement {agreement:.2%} (required 100%).",
            report,
        )
    report["passed"] = True
    return report
