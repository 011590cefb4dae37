"""Accuracy and size of export variants of a run, on its test split, served as users serve them.

Exports the run in every format x quantization that `exporters` supports (or `--variants`),
classifies the whole test split with each export's own runtime at each serving batch size
(`--serving-batches`; the runtime sorts each 1,024-text chunk by length and pads each batch to
its longest text, as `kerasft predict` serves files), and compares
with the Keras model: accuracy, agreement with Keras' labels, predictions that differ, model
file size, and the export's own verification figures (its manifest).

    python -m kerasft.benchmarks.export_accuracy --run RUN_DIR --exports EXPORTS_DIR \\
        --variants onnx:dynamic,openvino:nncf --out benchmarks/results/int8.md

Accuracy differences are export minus Keras, in points (negative: the export is less accurate).
`--reuse` keeps an export already in EXPORTS_DIR (its manifest's checksums are verified) instead
of exporting again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from kerasft.benchmarks.report import cpu_line, header, provenance, results_parser, write_results
from kerasft.exporters import VerificationError, export
from kerasft.exporters.exportdir import is_export, read_manifest
from kerasft.exporters.formats import EXPORT_PACKAGES as EXPORT
from kerasft.exporters.formats import FORMATS, VARIANTS
from kerasft.exporters.runtime import load
from kerasft.runs.rundir import run_splits
from kerasft.util.versions import source_commit


def _model_size(export_dir: Path, manifest: dict) -> int:
    return FORMATS[manifest["format"]].model_bytes(export_dir / manifest["model_file"])


def build_parser() -> argparse.ArgumentParser:
    parser = results_parser("export_accuracy", __doc__, "where exports are written")
    parser.add_argument(
        "--formats", default=",".join(FORMATS),
        help="comma-separated formats to export (every quantization of each)",
    )  # fmt: skip
    parser.add_argument(
        "--variants",
        help="only these format:quantization pairs, e.g. onnx:dynamic,openvino:nncf,onnx:fp32",
    )
    parser.add_argument(
        "--serving-batches", default="1,32", help="batch sizes to serve the test split at"
    )
    parser.add_argument("--reuse", action="store_true", help="keep exports already there")
    return parser


def _chosen(parser, args) -> list[tuple[str, str | None]]:
    formats = args.formats.split(",")
    unknown = sorted(set(formats) - {fmt for fmt, _ in VARIANTS})
    if unknown:
        parser.error(
            f"unknown formats {unknown}; choose from {sorted({fmt for fmt, _ in VARIANTS})}"
        )
    chosen = [v for v in VARIANTS if v[0] in formats]
    if args.variants:
        wanted = {tuple(v.split(":")) for v in args.variants.split(",")}
        chosen = [(f, q) for f, q in VARIANTS if (f, q or "fp32") in wanted]
        if len(chosen) != len(wanted):
            known = ", ".join(f"{f}:{q or 'fp32'}" for f, q in VARIANTS)
            parser.error(f"unknown variants in {args.variants!r}; known: {known}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.serving_batches = [int(b) for b in args.serving_batches.split(",")]
    except ValueError:
        parser.error(f"--serving-batches: comma-separated ints. Received: {args.serving_batches}")
    if min(args.serving_batches) < 1:
        parser.error(f"--serving-batches must be >= 1. Received: {args.serving_batches}")
    chosen = _chosen(parser, args)
    # SavedModel and LiteRT trace under TensorFlow: loading the Keras model there saves them a
    # subprocess (ONNX and OpenVINO trace under PyTorch, in one).
    os.environ["KERAS_BACKEND"] = "tensorflow"
    args.command = "python -m kerasft.benchmarks.export_accuracy " + shlex.join(argv)
    report = measure(args, chosen)
    write_results(args.out, report, render(report))
    return 0


def measure(args, chosen) -> dict:
    """Scores Keras and every chosen export on the run's test split; the report."""
    import numpy as np

    # lazy: loads Keras, under the backend this process was given
    from kerasft.training.tuner import load_tuner

    source = source_commit()
    test = run_splits(args.run)[2]
    tuner = load_tuner(args.run)
    tuner.verbose = 0
    keras_ids = tuner.predict_proba(test.texts).argmax(axis=-1)  # class ids
    keras_acc = float(np.mean(keras_ids == test.labels))
    print(f"keras fp32: accuracy {keras_acc:.4f} on {len(test)} test rows", flush=True)
    rows = [_export_row(args, fmt, q, test, tuner, keras_ids) for fmt, q in chosen]
    return {
        **provenance(args.command, source, EXPORT),
        "run": str(args.run),
        "test_rows": len(test),
        "keras_accuracy": keras_acc,
        "serving_batches": args.serving_batches,
        "rows": rows,
    }


def _export_row(args, fmt: str, quantize: str | None, test, tuner, keras_ids) -> dict:
    """Exports one variant (or reuses it), serves the test split through its runtime at each
    serving batch size; one report row."""
    import numpy as np

    name = f"{fmt} {quantize or 'fp32'}"
    out = args.exports / f"{fmt}-{quantize or 'fp32'}"
    reused = args.reuse and is_export(out)
    start = time.perf_counter()
    if not reused:
        try:
            export(args.run, out, format=fmt, quantize=quantize, overwrite=True)
        except VerificationError as e:  # report it with its numbers, go on with the others
            print(f"{name}: FAILED verification: {e}", flush=True)
            return {"variant": name, "failed_verification": str(e), **e.report}
    export_seconds = time.perf_counter() - start
    manifest = read_manifest(out)  # checks every file's sha256
    served = load(out)
    serving, labels = {}, []
    for batch in args.serving_batches:
        result = served.predict(test.texts, batch_size=batch)
        ids = np.array([tuner.label_names.index(label) for label in result.labels])
        labels.append(ids)
        serving[str(batch)] = {
            "accuracy": float(np.mean(ids == test.labels)),
            "agreement": float(np.mean(ids == keras_ids)),
            "differs_from_keras": int(np.sum(ids != keras_ids)),
        }
    row = {
        "variant": name,
        "reused": bool(reused),
        "serving": serving,
        # texts whose label is not the same at every serving batch size
        "labels_change_with_batch": int(np.sum(np.any([labels[0] != x for x in labels], axis=0))),
        "auto_chosen": (manifest.get("int8_auto") or {}).get("chosen"),
        "model_bytes": _model_size(out, manifest),
        "export_bytes": manifest["size_bytes"],
        "verification": manifest["verification"],
        "quantization_recipe": manifest.get("quantization_recipe"),
        "kept_fp32": manifest.get("kept_fp32"),
        "export_seconds": None if reused else round(export_seconds, 1),
    }
    figures = ", ".join(
        f"batch {b}: accuracy {s['accuracy']:.4f}, agreement {100 * s['agreement']:.2f}%"
        for b, s in serving.items()
    )
    print(f"{name}: {figures}; model {row['model_bytes'] / 1e6:.1f} MB", flush=True)
    return row


def render(report: dict) -> str:
    """The markdown report."""
    keras_acc, batches = report["keras_accuracy"], report["serving_batches"]
    machine = cpu_line(report["machine"])
    lines = [
        *header("Export variants on the test split", report, machine, report["versions"]),
        "",
        f"Run `{report['run']}`: Keras fp32 test accuracy {keras_acc:.4f} on "
        f"{report['test_rows']:,} rows. Each export classifies the whole test split with its own "
        "runtime (`kerasft.exporters.runtime`, tokenization included), each 1,024-text chunk "
        "sorted by length, each batch padded to its longest text. Agreement: share of test texts "
        "given Keras' label. Accuracy vs Keras: export minus Keras, in points (negative = less "
        "accurate). Labels changed: test texts whose label differs between the serving batch "
        "sizes. Gate: the export's own verification (`manifest.json`: agreement and accuracy drop "
        "on the held-out texts, validation + test, at batch 1 and 32, the worst shown).",
        "",
    ]
    cells = [f"batch {b}: agreement / accuracy (vs Keras)" for b in batches]
    lines += [
        "| variant | recipe | "
        + " | ".join(cells)
        + " | labels changed | gate: agreement (texts) | model MB |",
        "| --- | --- | " + " | ".join("---:" for _ in cells) + " | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        if "failed_verification" in row:
            lines.append(f"| {row['variant']} | export refused: {row['failed_verification']} |")
            continue
        served = [
            f"{100 * s['agreement']:.2f}% / {s['accuracy']:.4f} "
            f"({100 * (s['accuracy'] - keras_acc):+.2f})"
            for s in (row["serving"][str(b)] for b in batches)
        ]
        check = row["verification"]
        gate = check.get("label_agreement")
        texts = check.get("agreement_texts", check["texts"])
        gate = "-" if gate is None else f"{100 * gate:.2f}% ({texts:,})"
        recipe = row.get("quantization_recipe") or "-"
        if row.get("auto_chosen"):
            recipe = f"chose {row['auto_chosen']['mode']}: {recipe}"
        lines.append(
            f"| {row['variant']} | {recipe} | "
            + " | ".join(served)
            + f" | {row.get('labels_change_with_batch', '-')} | {gate} "
            f"| {row['model_bytes'] / 1e6:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
