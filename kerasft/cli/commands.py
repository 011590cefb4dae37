"""`kerasft export`, `predict` and `evaluate`: the commands that use a run once it is fitted.

`predict` on an export serves it with its own runtime and loads no Keras.
"""

from __future__ import annotations

import json
import logging
import sys

from kerasft.data import load_dataset
from kerasft.exporters import exportdir
from kerasft.exporters.dispatch import export
from kerasft.exporters.exportdir import is_export
from kerasft.exporters.runtime import load
from kerasft.labelling.labeller import CHUNK_ROWS, label_file
from kerasft.labelling.textstream import read_texts

log = logging.getLogger("kerasft")


def _load_run(run_dir: str):
    # lazily: it imports Keras, which an export's `predict` never loads
    from kerasft.training.tuner import load_tuner

    tuner = load_tuner(run_dir)
    tuner.verbose = 0
    return tuner


def cmd_export(args) -> int:
    out = export(
        args.run_dir,
        args.out,
        format=args.format,
        quantize=args.int8,
        overwrite=args.overwrite,
        fixed_shape=(args.batch_size, args.sequence_length),
        min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop,
        precision=args.precision,
        keep_fp32=args.keep_fp32,
    )
    manifest = exportdir.read_manifest(out)
    check, variant = manifest["verification"], exportdir.variant(manifest)
    acc = check.get("accuracy")
    drop = (
        f", accuracy {0 - acc['drop'] * 100:+.2f} points vs Keras on {acc['texts']} held-out texts "
        f"(95% CI {0 - acc['drop_ci95'][1] * 100:+.2f} to {0 - acc['drop_ci95'][0] * 100:+.2f})"
        if acc
        else ""
    )
    partial = check.get("agreement_texts", check["texts"]) != check["texts"]
    held_out = " on held-out texts" if partial else ""
    per_batch = check.get("per_batch_size")
    if per_batch:  # reduced precision: each serving batch size, the worst decides
        drop += "; by serving batch size: " + ", ".join(
            f"{size}: {r['label_agreement']:.2%}" for size, r in per_batch.items()
        )
    print(
        f"{args.format} {variant}: {manifest['size_bytes'] / 1e6:.1f} MB, "
        f"verified on {check['texts']} texts (max |logit diff| {check['max_abs_logit_diff']:.2g}, "
        f"label agreement {check['label_agreement']:.2%}{held_out}{drop}) -> {out}\n"
        f"manifest sha256 {exportdir.manifest_sha256(out)} "
        "(pin it: runtime.load(dir, manifest_sha256=...))"
    )
    return 0


def cmd_predict(args) -> int:
    if args.data is not None:
        return _predict_file(args)
    if not args.texts:
        raise ValueError("Nothing to label: give texts, or --data FILE (- for standard input).")
    given = [flag for flag, dest, default in args.file_flags if getattr(args, dest) != default]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --data "
                         "FILE only, not to texts given as arguments.")  # fmt: skip
    names, predict_proba, _ = _predictor(args)
    proba = predict_proba(args.texts)
    rows = [
        {"text": text, "label": names[k], "probability": float(p[k])}
        for text, k, p in zip(args.texts, proba.argmax(axis=1), proba, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")
    return 0


def _predictor(args, file: bool = False):
    """`(label_names, predict_proba, chunk_rows)` of a run directory (Keras) or an export (its
    runtime, no Keras; for a `file`, loaded for throughput)."""
    if is_export(args.run_dir):
        model = load(args.run_dir, manifest_sha256=args.manifest_sha256, throughput=file)
        return model.label_names, lambda texts: model.predict(texts).probabilities, model.chunk_rows
    if args.manifest_sha256:
        raise ValueError(
            f"--manifest-sha256 pins an export's manifest; {args.run_dir!r} is a run directory."
        )
    tuner = _load_run(args.run_dir)
    return tuner.label_names, tuner.predict_proba, CHUNK_ROWS


def _predict_file(args) -> int:
    """`kerasft predict RUN --data FILE`: streams the file through the model into --out."""
    if args.texts:
        raise ValueError(
            f"Give texts or --data, not both. Received: --data {args.data} and "
            f"{len(args.texts)} text(s) ({args.texts[0]!r}, ...)."
        )
    if args.label_column and not args.score:
        raise ValueError("--label-column names the labels to score: add --score.")
    stream = read_texts(
        args.data, text_column=args.text_column, label_column=args.label_column,
        id_column=args.id_column, encoding=args.encoding,
        header=False if args.no_header else None, input_format=args.input_format,
        labels=args.score, skip_invalid=args.skip_invalid,
    )  # fmt: skip
    names, predict_proba, chunk_rows = _predictor(args, file=True)
    summary = label_file(
        stream, predict_proba, names, out=args.out, output_format=args.output_format,
        chunk_rows=chunk_rows, overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),
    )  # fmt: skip
    if not args.quiet:
        skipped = f" ({summary['skipped']} skipped)" if summary["skipped"] else ""
        log.info("labelled %d rows%s in %.1f s (%.0f rows/s) -> %s", summary["rows"], skipped,
                 summary["seconds"], summary["rows_per_second"], args.out or "stdout")  # fmt: skip
    if "metrics" in summary:
        m = summary["metrics"]
        print(
            f"scored {m['rows']} rows: accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  "
            f"precision {m['precision']:.4f}  recall {m['recall']:.4f}  confusion "
            f"{m['confusion_matrix']} (rows = true, cols = predicted)",
            file=sys.stderr,
        )
    return 0


def cmd_evaluate(args) -> int:
    tuner = _load_run(args.run_dir)
    data = load_dataset(args.data, args.text_column, args.label_column, args.skip_invalid,
                        args.encoding, header=False if args.no_header else None)  # fmt: skip
    metrics = tuner.score(data)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key in ("rows", "accuracy", "precision", "recall", "f1"):
            print(
                f"{key:>10}: {metrics[key]:.4f}" if key != "rows" else f"{key:>10}: {metrics[key]}"
            )
        print(f"{'confusion':>10}: {metrics['confusion_matrix']} (rows = true, cols = predicted)")
    return 0
