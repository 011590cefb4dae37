"""The model card (`README.md`) every export directory carries.

An artifact that travels alone still says what it is and how good it is: the task and labels,
the run it came from (preset, backend, recipe, test metrics), the format and quantization, the
verification numbers and the latency measured on the exporting machine. The layout follows the
Hugging Face model card: YAML front matter with a `model-index` of metrics, then Markdown.
"""

from __future__ import annotations

import json
from pathlib import Path

from kerasft.exporters import exportdir
from kerasft.exporters.formats import MODULES
from kerasft.runs import rundir


def _yaml(value, indent: int = 0) -> str:
    """A small YAML writer for the front matter (dicts, lists, scalars); JSON-quoted strings."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return "\n".join(lines)
    lines = []
    for item in value:
        if isinstance(item, dict) and item:
            first, *rest = _yaml(item, indent + 1).split("\n")
            lines.append(f"{pad}- {first.strip()}")
            lines += rest
        else:
            lines.append(f"{pad}- {_scalar(item)}")
    return "\n".join(lines)


def _scalar(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(round(value, 6)) if isinstance(value, float) else str(value)
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(str(value))


def _run_info(run_dir: Path | None) -> tuple[dict, dict]:
    if run_dir is None or not (Path(run_dir) / rundir.CONFIG_FILE).is_file():
        return {}, {}  # an in-memory model (saved to a scratch directory): no run reports
    metrics_path = Path(run_dir) / rundir.METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return metrics, rundir.read_config(run_dir)


def write_model_card(export_dir: Path, manifest: dict, run_dir: Path | None) -> Path:
    """Writes `export_dir / "README.md"` from the manifest and the source run's reports.

    Args:
        export_dir: the (temporary) export directory.
        manifest: the export's manifest, with `verification` and `latency`.
        run_dir: the `kerasft fit` run directory, or None for an in-memory model.

    Returns:
        The card's path.
    """
    metrics, config = _run_info(run_dir)
    variant = exportdir.variant(manifest)
    preset = metrics.get("preset") or config.get("recipe", {}).get("preset") or "model"
    name = f"kerasft-{Path(str(preset)).name}-{manifest['format']}-{variant}"
    module = MODULES[manifest["format"]]
    library, usage = getattr(module, "CARD_LIBRARY", "kerasft"), getattr(module, "CARD_USE", ())
    front = {
        "library_name": library,
        "pipeline_tag": "text-classification",
        "tags": ["kerasft", "keras-hub", "distilbert", manifest["format"], variant],
        "model-index": [{"name": name, "results": _results(manifest, metrics, config)}],
    }
    lines = [
        "---",
        _yaml(front),
        "---",
        "",
        f"# {name}",
        "",
        f"A {len(manifest['label_names'])}-class text classifier (labels: "
        + ", ".join(f"`{n}`" for n in manifest["label_names"])
        + f") exported by kerasft as **{manifest['format']} {variant}**.",
        *_source_lines(manifest, metrics, config),
        *_export_lines(manifest),
        *_verification_lines(manifest["verification"]),
        *_latency_lines(manifest.get("latency", {})),
        "",
        "## Use",
        "",
        "```python",
        *usage,
        *(["", "# or, with kerasft's runtime:"] if usage else []),
        "from kerasft.exporters.runtime import load",
        'model = load("path/to/this/dir", manifest_sha256="<sha256 printed by kerasft export>")',
        'model.predict(["some text"]).labels',
        "```",
        "",
        "Every file's sha256 is in `manifest.json` and is checked before loading.",
        "",
    ]
    path = export_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _results(manifest: dict, metrics: dict, config: dict) -> list[dict]:
    """The `model-index` results: the run's Keras test metrics and the export's accuracy."""
    data = config.get("data")
    dataset = Path(data["path"]).name if isinstance(data, dict) else "data"
    check, variant = manifest["verification"], exportdir.variant(manifest)
    task = {"type": "text-classification", "name": "Text Classification"}
    results = []
    test = metrics.get("test")
    if test:
        results.append({
            "task": task,
            "dataset": {"name": dataset, "type": "custom", "split": "test"},
            "metrics": [{"type": k, "value": float(test[k]), "name": f"Keras fp32 {k}"}
                        for k in ("accuracy", "f1", "precision", "recall") if k in test],
        })  # fmt: skip
    acc = check.get("accuracy")
    if acc:
        results.append({
            "task": task,
            "dataset": {"name": dataset, "type": "custom",
                        "split": "+".join(acc["texts_from"]) if isinstance(acc["texts_from"], list)
                        else "verification"},
            "metrics": [
                {"type": "accuracy", "value": acc["export"], "name": f"{variant} export accuracy"},
                {"type": "accuracy_drop", "value": acc["drop"],
                 "name": "accuracy drop vs Keras fp32"},
                {"type": "label_agreement", "value": check["label_agreement"],
                 "name": "label agreement with Keras fp32"},
            ],
        })  # fmt: skip
    return results


def _source_lines(manifest: dict, metrics: dict, config: dict) -> list[str]:
    recipe, test = config.get("recipe", {}), metrics.get("test")
    lines = [
        "",
        "## Source run",
        "",
        f"- preset: `{metrics.get('preset') or recipe.get('preset', 'unknown')}`; trained on the "
        f"`{manifest.get('source_backend') or 'unknown'}` backend",
    ]
    if recipe:
        lines.append(
            f"- recipe: {recipe.get('warmup_epochs')} warm-up epochs at "
            f"{recipe.get('warmup_learning_rate')}, {recipe.get('finetune_epochs')} fine-tune "
            f"epochs at {recipe.get('finetune_learning_rate')} ({recipe.get('finetune_schedule')}),"
            f" batch {recipe.get('batch_size')}, sequence length {recipe.get('sequence_length')}"
        )
    if test:
        lines.append(
            f"- Keras fp32 test metrics ({metrics.get('rows', {}).get('test', '?')} rows): "
            f"accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f}, precision "
            f"{test['precision']:.4f}, recall {test['recall']:.4f}"
        )
    return lines


def _export_lines(manifest: dict) -> list[str]:
    lines = [
        "",
        "## This export",
        "",
        f"- model file: `{manifest['model_file']}` ({manifest['size_bytes'] / 1e6:.1f} MB with "
        "the tokenizer files)",
        f"- quantization recipe: {manifest.get('quantization_recipe') or 'none (fp32)'}",
    ]
    if manifest.get("inference_precision"):
        lines.append(f"- OpenVINO inference precision: `{manifest['inference_precision']}`")
    if manifest.get("graph_source"):
        lines.append(f"- traced under the {manifest['graph_source']} backend")
    auto = manifest.get("int8_auto")
    if auto:
        timed = "; ".join(
            f"{c['recipe']} ({c['mode']}): "
            + ", ".join(f"{ms:.2f} ms at batch {size}" for size, ms in c["p50_ms"].items())
            for c in auto["candidates"]
        )
        lines += [
            f"- `--int8 auto` chose **{auto['chosen']['recipe']}** ({auto['chosen']['mode']}): "
            f"the fastest candidate on {auto['cpu']} ({', '.join(auto['isa'])}) that passed "
            "verification",
            f"- candidates, p50 of one call on this machine, {auto['order']}: {timed}",
        ]
    return lines


def _verification_lines(check: dict) -> list[str]:
    lines = [
        "",
        "## Verification (against the Keras fp32 model)",
        "",
        f"- {check['texts']} texts"
        + (f" ({', '.join(f'{k} {v}' for k, v in check['texts_per_split'].items())})"
           if check.get("texts_per_split") else "")
        + f"; tokenizer mismatches: {check['tokenizer_mismatches']}",
        f"- label agreement {check['label_agreement']:.4%} ({check['disagreements']} differ)"
        + (f" on {check['agreement_texts']} held-out texts, "
           f"{check['label_agreement_all_splits']:.4%} on all"
           if check.get("agreement_texts", check["texts"]) != check["texts"] else "")
        + f"; max |logit diff| {check['max_abs_logit_diff']:.3g}",
    ]  # fmt: skip
    for size, served in check.get("per_batch_size", {}).items():
        drop = served.get("accuracy_drop")
        lines.append(
            f"- served at batch size {size}: label agreement {served['label_agreement']:.4%} "
            f"({served['disagreements']} differ)"
            + ("" if drop is None else f", accuracy {0 - drop * 100:+.2f} points vs Keras")
        )
    if "batch_independent" in check:
        lines.append(
            "- the recipe takes no activation range over the batch"
            if check["batch_independent"]
            else "- the recipe takes activation ranges per call, over the whole batch, so a text's "
            "output depends on its batch"
        )
        lines.append(
            "- verified at each serving batch size, the worst decides; labels that change with "
            f"the batch size: {check.get('labels_changed_by_batch_size', 'not measured')}"
        )
    acc = check.get("accuracy")
    if acc:
        lo, hi = acc["drop_ci95"]
        lines.append(
            f"- accuracy on {acc['texts']} held-out labelled texts: Keras {acc['reference']:.4f},"
            f" this export {acc['export']:.4f}: {0 - acc['drop'] * 100:+.2f} points "
            f"(export minus Keras; 95% CI {0 - hi * 100:+.2f} to {0 - lo * 100:+.2f})"
        )
    lines.append(f"- criterion: {check['criterion']}")
    return lines


def _latency_lines(lat: dict) -> list[str]:
    if not lat:
        return []
    return [
        "",
        "## Latency on the exporting machine",
        "",
        f"- {lat['p50_ms']:.2f} ms p50 for one text of {lat['tokens']} tokens (the median of "
        f"the verification texts), tokenization included, `runtime.load(dir).predict([text])`,"
        f" {lat['calls']} calls; {lat['cpu']}, {lat['cores']} cores",
    ]
