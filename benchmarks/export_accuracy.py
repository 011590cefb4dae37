"""Accuracy and size of every export variant of a run, on its reference test split.

Exports the run in every format x quantization that `exporters` supports, classifies the whole
test split with each export's own runtime, and compares with the Keras model: accuracy, number of
predictions that differ from Keras, model file size and total export size.

    python -m kerasft.benchmarks.export_accuracy --run RUN_DIR --exports EXPORTS_DIR \
        --out report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kerasft.exporters.exportdir import read_manifest


def _model_size(export_dir: Path, manifest: dict) -> int:
    path = export_dir / manifest["model_file"]
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    weights = path.with_suffix(".bin") if manifest["format"] == "openvino" else None
    return path.stat().st_size + (weights.stat().st_size if weights else 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--exports", required=True, type=Path, help="where exports are written")
    parser.add_argument("--out", required=True, type=Path, help="report JSON")
    parser.add_argument(
        "--formats",
        default="onnx,openvino,saved_model,litert",
        help="comma-separated formats to export",
    )
    parser.add_argument(
        "--variants",
        help="only these format:quantization pairs, e.g. onnx:dynamic,openvino:nncf,onnx:fp32",
    )
    args = parser.parse_args(argv)
    # Exports are traced under TensorFlow; loading the Keras model there avoids a subprocess.
    os.environ["KERAS_BACKEND"] = "tensorflow"

    import numpy as np

    from kerasft.exporters.formats import VARIANTS
    from kerasft.rundir import run_splits
    from kerasft.tuner import load_tuner

    test = run_splits(args.run)[2]
    tuner = load_tuner(args.run)
    tuner.verbose = 0
    keras_pred = tuner.predict_proba(test.texts).argmax(axis=-1)  # class ids
    keras_acc = float(np.mean(keras_pred == test.labels))
    rows = [{"variant": "keras fp32", "accuracy": keras_acc, "differs_from_keras": 0}]
    print(f"keras fp32: accuracy {keras_acc:.4f} on {len(test)} test rows", flush=True)
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
            parser.error(f"unknown variants in {args.variants!r}; known: {VARIANTS}")
    for fmt, quantize in chosen:
        rows.append(_export_row(args, fmt, quantize, test, tuner, keras_pred))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"run": str(args.run), "test_rows": len(test), "rows": rows}, indent=2) + "\n"
    )
    _print_table(rows, keras_acc)
    return 0


def _export_row(args, fmt: str, quantize: str | None, test, tuner, keras_pred) -> dict:
    """Exports one variant, scores it on the test split through its runtime; one report row."""
    import numpy as np

    from kerasft.exporters import VerificationError, export
    from kerasft.exporters.runtime import load

    name = f"{fmt} {quantize or 'fp32'}"
    out = args.exports / f"{fmt}-{quantize or 'fp32'}"
    start = time.perf_counter()
    try:
        export(args.run, out, format=fmt, quantize=quantize, overwrite=True)
    except VerificationError as e:  # report it with its numbers, go on with the others
        print(f"{name}: FAILED verification: {e}", flush=True)
        return {"variant": name, "failed_verification": str(e), **e.report}
    export_seconds = time.perf_counter() - start
    manifest = read_manifest(out)
    start = time.perf_counter()
    result = load(out).predict(test.texts)
    predict_seconds = time.perf_counter() - start
    ids = np.array([tuner.label_names.index(label) for label in result.labels])
    row = {
        "variant": name,
        "accuracy": float(np.mean(ids == test.labels)),
        "differs_from_keras": int(np.sum(ids != keras_pred)),
        "model_bytes": _model_size(out, manifest),
        "export_bytes": manifest["size_bytes"],
        "verification": manifest["verification"],
        "quantization_recipe": manifest.get("quantization_recipe"),
        "fusions": manifest.get("fusions"),
        "export_seconds": round(export_seconds, 1),
        "test_split_seconds": round(predict_seconds, 1),
    }
    print(
        f"{name}: accuracy {row['accuracy']:.4f}, differs {row['differs_from_keras']}, "
        f"model {row['model_bytes'] / 1e6:.1f} MB",
        flush=True,
    )
    return row


def _print_table(rows: list[dict], keras_acc: float) -> None:
    print("\n| variant | test accuracy | vs Keras (pts) | differs from Keras | model MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        if "failed_verification" in row:
            print(f"| {row['variant']} | export refused: {row['failed_verification']} | | | |")
            continue
        size = f"{row['model_bytes'] / 1e6:.1f}" if "model_bytes" in row else ""
        print(
            f"| {row['variant']} | {row['accuracy']:.4f} | "
            f"{100 * (row['accuracy'] - keras_acc):+.2f} | {row['differs_from_keras']} | {size} |"
        )


if __name__ == "__main__":
    sys.exit(main())
