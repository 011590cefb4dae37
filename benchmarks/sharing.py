"""The sharing exports of a run, as their ecosystems load them, against kerasft's own exports.

    python -m kerasft.benchmarks.sharing --run RUN_DIR --exports EXPORTS_DIR \\
        --out benchmarks/results/sharing.md

Exports the run as a KerasHub preset, a transformers checkpoint and kerasft's ONNX fp32 (or
reuses them with `--reuse`, their checksums verified), then labels the whole test split:
- Optimum's ONNX export of the transformers checkpoint, as its documentation shows it:
  `ORTModelForSequenceClassification.from_pretrained(DIR, export=True)` with the checkpoint's own
  `AutoTokenizer`, against kerasft's ONNX fp32 export through `kerasft.exporters.runtime`;
- `pipeline("text-classification", model=DIR)` on the checkpoint, against the run's Keras model;
- the KerasHub preset, `TextClassifier.from_preset(DIR)` through kerasft's runtime (KerasHub's
  own string preprocessing needs TensorFlow), against the run's Keras model.
Agreement: the share of test texts given the same label. The exports' own verification figures
(`manifest.json`) stand beside them.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from kerasft.benchmarks.report import cpu_line, header, provenance, results_parser, write_results
from kerasft.devices.backends import keep_to_backend
from kerasft.exporters.dispatch import export
from kerasft.exporters.exportdir import is_export, read_manifest
from kerasft.exporters.formats import EXPORT_PACKAGES
from kerasft.exporters.runtime import load
from kerasft.runs.rundir import run_splits
from kerasft.util.versions import source_commit

FORMATS = ("keras_hub", "transformers", "onnx")
PACKAGES = (*EXPORT_PACKAGES, "transformers", "optimum", "optimum-onnx")
BATCH = 32


def build_parser():
    parser = results_parser("sharing", __doc__, "where the exports are written")
    parser.add_argument("--reuse", action="store_true", help="keep exports already there")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # every format here is written under PyTorch, and Keras is loaded there too (no subprocess);
    # no TensorFlow, as `kerasft` keeps it out of a PyTorch run (transformers would try it)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keep_to_backend(os.environ["KERAS_BACKEND"])
    args.command = "python -m kerasft.benchmarks.sharing " + shlex.join(argv)
    report = measure(args)
    write_results(args.out, report, render(report))
    return 0


def _exported(args, fmt: str) -> tuple[Path, dict]:
    out = args.exports / fmt
    if not (args.reuse and is_export(out)):
        started = time.perf_counter()
        export(args.run, out, format=fmt, overwrite=True)
        print(f"exported {fmt} in {time.perf_counter() - started:.0f} s", flush=True)
    return out, read_manifest(out)  # every file's sha256 checked


def measure(args) -> dict:
    """Exports (or reuses) the three formats and labels the test split every way; the report."""
    source = source_commit()
    test = run_splits(args.run)[2]
    exports = {fmt: _exported(args, fmt) for fmt in FORMATS}
    names = exports["onnx"][1]["label_names"]
    truth = [names[i] for i in test.labels]
    keras = _keras_labels(args.run, test.texts)
    served = {fmt: load(path).predict(test.texts).labels for fmt, (path, _) in exports.items()}
    hf_dir = exports["transformers"][0]
    optimum = _optimum_labels(hf_dir, test.texts)
    pipeline = _pipeline_labels(hf_dir, test.texts)
    comparisons = [
        ("Optimum ORT export of the transformers checkpoint", optimum, "kerasft ONNX fp32",
         served["onnx"]),
        ("pipeline() on the transformers checkpoint", pipeline, "Keras (the run)", keras),
        ("transformers checkpoint (kerasft runtime)", served["transformers"], "Keras (the run)",
         keras),
        ("KerasHub preset (kerasft runtime)", served["keras_hub"], "Keras (the run)", keras),
        ("kerasft ONNX fp32", served["onnx"], "Keras (the run)", keras),
    ]  # fmt: skip
    rows = [_compare(a, labels_a, b, labels_b, truth) for a, labels_a, b, labels_b in comparisons]
    for row in rows:
        print(f"{row['served']} vs {row['against']}: {100 * row['agreement']:.3f}% "
              f"({row['differ']} differ)", flush=True)  # fmt: skip
    return {
        **provenance(args.command, source, PACKAGES),
        "run": str(args.run),
        "test_rows": len(test),
        "rows": rows,
        "verification": {fmt: m["verification"] for fmt, (_, m) in exports.items()},
    }


def _compare(a: str, labels_a: list, b: str, labels_b: list, truth: list) -> dict:
    x, y, t = np.asarray(labels_a), np.asarray(labels_b), np.asarray(truth)
    return {
        "served": a,
        "against": b,
        "agreement": float(np.mean(x == y)),
        "differ": int(np.sum(x != y)),
        "accuracy": float(np.mean(x == t)),
        "against_accuracy": float(np.mean(y == t)),
    }


def _keras_labels(run: Path, texts: list[str]) -> list[str]:
    # lazy: loads Keras, under the backend this process was given
    from kerasft.training.tuner import load_tuner

    tuner = load_tuner(run)
    tuner.verbose = 0
    return [tuner.label_names[i] for i in tuner.predict_proba(texts).argmax(-1)]


def _optimum_labels(hf_dir: Path, texts: list[str]) -> list[str]:
    """Optimum's documented path: export the checkpoint to ONNX, run it on onnxruntime."""
    # lazily: the peers' libraries (the `bench` extra)
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    model = ORTModelForSequenceClassification.from_pretrained(str(hf_dir), export=True)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    out = []
    for i in range(0, len(texts), BATCH):
        feed = tokenizer(texts[i : i + BATCH], padding=True, truncation=True, return_tensors="np")
        logits = model(**feed).logits
        out += [model.config.id2label[int(k)] for k in np.asarray(logits).argmax(-1)]
    return out


def _pipeline_labels(hf_dir: Path, texts: list[str]) -> list[str]:
    from transformers import pipeline  # lazily: the peers' library

    classify = pipeline("text-classification", model=str(hf_dir), device="cpu")
    return [r["label"] for r in classify(texts, batch_size=BATCH, truncation=True)]


def render(report: dict) -> str:
    machine = cpu_line(report["machine"])
    lines = [
        *header(
            "Sharing exports, loaded as their ecosystems load them",
            report,
            machine,
            report["versions"],
        ),  # fmt: skip
        "",
        f"Run `{report['run']}`, its whole test split ({report['test_rows']:,} texts). Each row "
        "labels it one way and compares with another: agreement is the share of texts given the "
        "same label; accuracy against the test labels beside it.",
        "",
        "| served | against | agreement | labels that differ | accuracy | against: accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['served']} | {r['against']} | {100 * r['agreement']:.3f}% | {r['differ']} | "
            f"{r['accuracy']:.4f} | {r['against_accuracy']:.4f} |"
        )
    lines += ["", "Each export's own verification (`manifest.json`):", "",
              "| export | texts | max abs logit diff vs Keras | label agreement | notes |",
              "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for fmt, check in report["verification"].items():
        notes = []
        if "transformers_tokenizer_mismatches" in check:
            notes.append(
                f"{check['transformers_tokenizer_mismatches']} texts tokenized otherwise by "
                "AutoTokenizer"
            )
        lines.append(
            f"| {fmt} | {check['texts']:,} | {check['max_abs_logit_diff']:.2g} | "
            f"{100 * check['label_agreement']:.2f}% | {'; '.join(notes) or '-'} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
