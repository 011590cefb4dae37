"""The Markdown report of `kerasft.benchmarks.train_speed`: one row per engine, ratios to
Trainer, and where a kerasft step's time goes."""

from __future__ import annotations


def render(report: dict) -> str:
    """The markdown report."""
    m, s = report["machine"], report["settings"]
    lines = [
        "# Training speed: kerasft stage 2 vs Hugging Face Trainer",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; commit {report['commit']}  ",
        f"CPU: {m['cpu']}, {m['cores']} cores, ISA: {', '.join(m['isa']) or 'none found'}; "
        f"{m['threads']} threads per engine; nominal fp32 peak "
        + (f"{m['peak_gflops']:.0f} GFLOP/s ({m['peak_formula']})" if m["peak_gflops"] else "n/a")
        + "  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items())),
        "",
        f"Method: the reference training split ({s['training_rows']:,} rows), batch "
        f"{s['batch_size']}, learning rate {s['learning_rate']:g} with linear decay, preset "
        f"`{s['preset']}`. Each engine in its own process; {s['rounds']} rounds of "
        f"{s['steps']} timed steps, engines alternated (order rotated each round). Excluded: "
        f"loading, compilation (kerasft: a warm-up `fit` over every timed batch shape) and "
        f"{s['warmup_steps']} more warm-up steps. A step runs from the previous step's end to its "
        "own (loss read back), host-side batching included. samples/s: median over rounds; "
        "page faults/step: the engine process's minor page faults over the timed steps, per "
        "step (memory the kernel mapped in; kerasft keeps freed blocks, "
        "`kerasft.devices.allocator`); "
        "ratios: of those medians. FLOP/s: matrix FLOPs a step computes (3 x forward: 2 per "
        "encoder parameter and computed token, padding included where it is computed, plus "
        "attention's 4 x padded length x hidden per token; kerasft's last layer at [CLS] only "
        "but for its keys and values; kerasft on PyTorch packs a batch's real tokens, "
        "`kerasft.model.encoder`), "
        "over the median step (bfloat16 engines too, against the float32 peak). Precision: "
        "kerasft's engines in the recipe's default unless named (`auto`: bfloat16 where the "
        "backend measured faster in it on this CPU class, "
        "`kerasft.training.precision.AUTO_BF16`), "
        "Trainer at its defaults (float32) and, where the CPU computes bfloat16, with "
        "`bf16=True`"
        + (
            "."
            if "trainer:bf16" in report["results"]
            else " (not run here: without native bfloat16 it is emulated and slower than float32)."
        ),
        "",
        "| engine | ms/step p50 (p10-p90) | samples/s | vs Trainer | vs Trainer bf16 | "
        "tokens/row padded (computed) | GFLOP/s | share of peak | stage-1 feature pass rows/s | "
        "optimizer | page faults/step | compile s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]

    def ratio(r, key):
        return f"{r[key]:.2f}x" if key in r else "-"

    for r in sorted(report["results"].values(), key=lambda r: -r["samples_per_second"]):
        share = "" if r["share_of_peak"] is None else f"{r['share_of_peak']:.0%}"
        feature = r["feature_rows_per_second"]
        lines.append(
            f"| {r['engine']} | {r['ms_per_step_p50']:.0f} ({r['ms_per_step_p10']:.0f}-"
            f"{r['ms_per_step_p90']:.0f}) | {r['samples_per_second']:.1f} | "
            f"{ratio(r, 'vs_trainer')} | {ratio(r, 'vs_trainer_bf16')} | "
            f"{r['padded_tokens_per_row']:.1f} "
            f"({r.get('computed_tokens_per_row', r['padded_tokens_per_row']):.1f}) | "
            f"{r['gflops']:.0f} | {share} | {'-' if feature is None else f'{feature:.0f}'} | "
            f"{r['optimizer']} | {r['page_faults_per_step']:,.0f} | {r['compile_seconds']:.0f} |"
        )
    lines += _breakdown_lines(report)
    lines += [
        "",
        "Per round, samples/s: "
        + "; ".join(
            f"{r['engine']} " + ", ".join(f"{x:.1f}" for x in r["samples_per_second_rounds"])
            for r in report["results"].values()
        ),
        "",
        f"Total {report['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _breakdown_lines(report: dict) -> list[str]:
    """The report's table of where a kerasft step's time goes (none when not measured)."""
    broken = [r for r in report["results"].values() if r.get("breakdown")]
    if not broken:
        return []
    lines = [
        "",
        "Where a kerasft step's time goes, on one batch of the most common timed length after"
        " compilation (median of 5 calls; batching: of 20): host-side batching, the forward "
        "pass alone (inference, `predict_on_batch`), the whole training step "
        "(`train_on_batch`: forward with dropout, backward, optimizer); on PyTorch also the "
        "step's profile (self CPU time by kind of op, `torch.profiler`, 3 steps) and the "
        "matrix products one step ran through oneDNN, by kernel (its verbose log; float32 "
        "products go to another GEMM library and are not listed).",
        "",
        "| engine | batch | batching ms | forward ms | step ms | backward + optimizer ms | "
        "profile (torch) | oneDNN matmul kernels (torch) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in broken:
        b = r["breakdown"]
        profile = ", ".join(f"{k} {v:.0%}" for k, v in b.get("torch_profile", {}).items())
        kernels = b.get("onednn_matmul")
        kernels = "-" if kernels is None else (
            ", ".join(f"`{k}` x{n}" for k, n in sorted(kernels.items())) or "none"
        )  # fmt: skip
        lines.append(
            f"| {r['engine']} | {b['shape'][0]} x {b['shape'][1]} | {b['batching_ms']:.2f} | "
            f"{b['forward_ms']:.0f} | {b['step_ms']:.0f} | "
            f"{b['step_ms'] - b['forward_ms']:.0f} | {profile or '-'} | {kernels} |"
        )
    return lines
