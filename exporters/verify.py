"""The shared verification step: every export is run by its own runtime against the Keras model.

fp32 exports must reproduce the Keras logits. Reduced-precision exports (INT8, or OpenVINO in
bfloat16) are judged on what users get: label agreement with the fp32 Keras model and the
accuracy drop, both on the held-out splits of the run (validation and test; the training texts
are reported, never counted), with a 95% confidence interval for the drop, at every serving
batch size (batch 1 and the runtime's default batch, `SERVING_BATCHES`), gated on the worst.
The report also counts the texts whose label changes with the batch size (0 for recipes whose
output for a text does not depend on the rest of its batch).
"""

from __future__ import annotations

import math

import numpy as np

FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99
# `--int8 auto` is the INT8 users get without choosing: it is held to what
# benchmarks/results/exports.md shows of it, 99.3% agreement at every serving batch size.
AUTO_MIN_AGREEMENT = 0.993
INT8_MAX_ACCURACY_DROP = 0.005
HELD_OUT = ("validation", "test")
# Batch 1 and the runtime's default batch (`ExportedClassifier.predict(batch_size=32)`), each
# batch padded to its longest text, as users serve.
SERVING_BATCHES = (1, 32)


class VerificationError(RuntimeError):
    """An artifact disagrees with its source model; the message says by how much."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def accuracy_drop(labels: np.ndarray, reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Accuracy of two classifiers on the same labelled texts, and the drop with its 95% CI.

    The two predictions are paired (same texts), so the drop's uncertainty comes only from the
    texts on which exactly one of them is right: with `b` texts only the reference gets right and
    `c` only the candidate, drop = (b - c) / n and its standard error is
    sqrt(b + c - (b - c)^2 / n) / n (the normal approximation behind McNemar's test).

    Args:
        labels: true class ids, `(n,)`.
        reference: the reference model's predicted ids (fp32 Keras).
        candidate: the export's predicted ids.

    Returns:
        `{"texts", "reference", "export", "drop", "drop_ci95", "only_reference_right",
        "only_export_right"}`; accuracies and the drop as fractions (0.01 = 1 point).
    """
    n = len(labels)
    ref_ok, cand_ok = reference == labels, candidate == labels
    b, c = int(np.sum(ref_ok & ~cand_ok)), int(np.sum(~ref_ok & cand_ok))
    drop = (b - c) / n if n else 0.0
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n if n else 0.0
    return {
        "texts": n,
        "reference": float(ref_ok.mean()) if n else None,
        "export": float(cand_ok.mean()) if n else None,
        "drop": drop,
        "drop_ci95": [drop - 1.96 * se, drop + 1.96 * se],
        "only_reference_right": b,
        "only_export_right": c,
    }


def verify(
    runtime,
    texts: list[str],
    keras_ids: np.ndarray,
    keras_logits: np.ndarray,
    quantized: bool,
    labels: np.ndarray | None = None,
    splits: list[str] | None = None,
    min_agreement: float = INT8_MIN_AGREEMENT,
    max_accuracy_drop: float = INT8_MAX_ACCURACY_DROP,
    batch_size: int = 32,
    batch_dependent: bool = False,
) -> dict:
    """Compares an export (through `kerasft.exporters.runtime`) with the Keras model on `texts`.

    Checks, in order: the export's `tokenizer.json` gives the KerasHub preprocessor's token ids;
    then fp32 exports must match the Keras logits to `FP32_TOLERANCE` with identical labels.
    Quantized exports, served at every size of `SERVING_BATCHES`, must agree with the fp32 Keras
    labels on at least `min_agreement` of the held-out texts and, where labels are known, lose at
    most `max_accuracy_drop` accuracy on them (held out: the validation and test splits; every
    text when `splits` is None).

    Args:
        runtime: an `kerasft.exporters.runtime.ExportedClassifier` opened on the new export.
        texts: real texts.
        keras_ids: KerasHub token ids for `texts`, `(N, L)`, 0-padded.
        keras_logits: the Keras model's logits for `texts`, `(N, K)`.
        quantized: whether the export is a reduced-precision variant.
        labels: true class ids of `texts` (model ids), or None when unknown.
        splits: the split of each text (`"train"`, `"validation"`, `"test"`), or None.
        min_agreement: the agreement gate for quantized exports.
        max_accuracy_drop: the accuracy-drop gate for quantized exports (0.01 = 1 point).
        batch_size: texts per runtime call.
        batch_dependent: the export's output for a text depends on its batch (recorded in the
            report as `batch_independent`). Quantized exports are run at every size of
            `SERVING_BATCHES` either way; the report's agreement and accuracy are the worst over
            those sizes, and `per_batch_size` gives each.

    Returns:
        The verification report (also written to the manifest).

    Raises:
        VerificationError: if a check fails, with the measured numbers.
    """
    token_mismatch = _token_mismatches(runtime.encode(texts)["token_ids"], keras_ids)
    reference = keras_logits.argmax(-1)
    sizes = [batch_size]
    if quantized:
        sizes += [b for b in SERVING_BATCHES if b != batch_size]
    per_batch, served = {}, {}
    for size in sizes:
        logits = runtime.predict(texts, batch_size=size).logits
        served[size] = logits.argmax(-1)
        per_batch[size] = _label_report(logits, keras_logits, reference, labels, splits)
    # the worst serving batch size decides (one size unless the recipe is batch-dependent)
    report = _worst(per_batch)
    max_diff, agreement = report["max_abs_logit_diff"], report["label_agreement_all_splits"]
    report = {"texts": len(texts), "tokenizer_mismatches": token_mismatch, **report}
    report["agreement_scope"] = "held-out texts" if splits is not None else "texts"
    if splits is not None:
        names, counts = np.unique(np.asarray(splits), return_counts=True)
        report["texts_per_split"] = {str(k): int(v) for k, v in zip(names, counts, strict=True)}
    if quantized:  # does the recipe take activation ranges over the whole batch?
        report["batch_independent"] = not batch_dependent
        first = served[sizes[0]]
        report["labels_changed_by_batch_size"] = int(
            np.sum(np.any([first != other for other in served.values()], axis=0))
        )
    if len(per_batch) > 1:
        report["per_batch_size"] = _per_batch_size(per_batch)
    report["criterion"] = _criterion(
        quantized, splits is not None, "accuracy" in report, sorted(per_batch), min_agreement,
        max_accuracy_drop,
    )  # fmt: skip
    _raise_if_failed(report, quantized, min_agreement, max_accuracy_drop, max_diff, agreement)
    report["passed"] = True
    return report


def _worst(per_batch: dict) -> dict:
    """The report at the worst serving batch size: least agreement, largest accuracy drop and
    largest logit difference, each over the sizes."""
    report = min(per_batch.values(), key=lambda r: r["label_agreement"]).copy()
    if "accuracy" in report:
        worst = max(per_batch.values(), key=lambda r: r["accuracy"]["drop"])
        report.update({k: worst[k] for k in ("accuracy", "accuracy_per_split") if k in worst})
    report["max_abs_logit_diff"] = max(r["max_abs_logit_diff"] for r in per_batch.values())
    return report


def _criterion(quantized, held_out, accuracy, sizes, min_agreement, max_accuracy_drop) -> str:
    """The check the report was judged by, in words."""
    if not quantized:
        return f"max_abs_logit_diff <= {FP32_TOLERANCE} and label_agreement == 1"
    return (
        f"label_agreement{' on held-out texts' if held_out else ''} >= {min_agreement}"
        + (f" and accuracy drop on held-out texts <= {max_accuracy_drop}" if accuracy else "")
        + (f" at batch sizes {sizes}" if len(sizes) > 1 else "")
    )


def _per_batch_size(per_batch: dict) -> dict:
    """The report's `per_batch_size`: agreement (and accuracy drop) at each serving size."""
    return {
        str(size): {
            "label_agreement": r["label_agreement"],
            "disagreements": r["disagreements"],
            "label_agreement_all_splits": r["label_agreement_all_splits"],
            **({"accuracy_drop": r["accuracy"]["drop"]} if "accuracy" in r else {}),
        }
        for size, r in sorted(per_batch.items())
    }


def _raise_if_failed(report, quantized, min_agreement, max_accuracy_drop, max_diff, agreement):
    """Raises `VerificationError` with the measured numbers when a check failed."""
    if report["tokenizer_mismatches"]:
        raise VerificationError(
            f"tokenizer.json disagrees with the KerasHub preprocessor on "
            f"{report['tokenizer_mismatches']} of {report['texts']} texts.",
            report,
        )
    if quantized:
        problems = _gate_problems(report, min_agreement, max_accuracy_drop)
        if problems:
            raise VerificationError("Quantized export " + "; ".join(problems) + ".", report)
    elif max_diff > FP32_TOLERANCE or agreement < 1.0:
        raise VerificationError(
            f"fp32 export differs from the Keras model: max |logit diff| = {max_diff:.3g} "
            f"(allowed {FP32_TOLERANCE}), label agreement {agreement:.2%} (required 100%).",
            report,
        )


def _label_report(logits, keras_logits, reference, labels, splits) -> dict:
    """Logit difference, label agreement (held-out texts; all texts too) and, with labels, the
    accuracy drop of one serving."""
    ours = logits.argmax(-1)
    held_out = np.isin(np.asarray(splits), HELD_OUT) if splits is not None else slice(None)
    report = {
        "max_abs_logit_diff": float(np.max(np.abs(logits - keras_logits))),
        "label_agreement": float(np.mean(ours[held_out] == reference[held_out])),
        "disagreements": int(np.sum(ours[held_out] != reference[held_out])),
        "label_agreement_all_splits": float(np.mean(ours == reference)),
        "agreement_texts": int(np.size(ours[held_out])),
    }
    if labels is not None:
        report.update(_accuracy_report(np.asarray(labels), splits, reference, ours))
    return report


def _accuracy_report(labels: np.ndarray, splits, reference: np.ndarray, ours: np.ndarray) -> dict:
    """The accuracy drop on the held-out texts (all, without `splits`) and per held-out split."""
    held_out = np.isin(np.asarray(splits), HELD_OUT) if splits is not None else slice(None)
    report = {"accuracy": accuracy_drop(labels[held_out], reference[held_out], ours[held_out])}
    report["accuracy"]["texts_from"] = list(HELD_OUT) if splits is not None else "all"
    if splits is not None:
        report["accuracy_per_split"] = {
            name: accuracy_drop(labels[mask], reference[mask], ours[mask])
            for name in HELD_OUT
            if (mask := np.asarray(splits) == name).any()
        }
    return report


def _gate_problems(report: dict, min_agreement: float, max_accuracy_drop: float) -> list[str]:
    """What a quantized export misses of the gate, in words (empty when it passes)."""
    problems, agreement = [], report["label_agreement"]
    per_batch = report.get("per_batch_size", {})
    if agreement < min_agreement:
        worst = [size for size, r in per_batch.items() if r["label_agreement"] < min_agreement]
        where = f" served at batch size{'s' * (len(worst) > 1)} {', '.join(worst)}" if worst else ""
        problems.append(
            f"agrees with the fp32 model on {agreement:.2%} of {report['agreement_texts']} "
            f"{report.get('agreement_scope', 'texts')} "
            f"({report['disagreements']} differ){where}; at least {min_agreement:.2%} is required"
        )
    acc = report.get("accuracy")
    if acc and acc["drop"] > max_accuracy_drop:
        problems.append(
            f"loses {acc['drop'] * 100:.2f} accuracy points on {acc['texts']} held-out "
            f"labelled texts (95% CI {acc['drop_ci95'][0] * 100:.2f} to "
            f"{acc['drop_ci95'][1] * 100:.2f}); at most {max_accuracy_drop * 100:.2f} allowed"
        )
    return problems


def _token_mismatches(ids: np.ndarray, keras_ids: np.ndarray) -> int:
    """Rows whose token ids differ (both 0-padded to the wider of the two)."""
    width = max(ids.shape[1], keras_ids.shape[1])
    a = np.pad(ids, ((0, 0), (0, width - ids.shape[1])))
    b = np.pad(keras_ids, ((0, 0), (0, width - keras_ids.shape[1])))
    return int(np.sum(np.any(a != b, axis=1)))
