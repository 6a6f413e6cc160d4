"""Benchmark report: results.json, report.md (tables with paired differences) and report.png."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from megatron_hybrid.fileio import atomic_write_text

__all__ = ["paired", "summarize", "write_report"]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(runs: list[dict], stage: str, a: str, b: str) -> tuple[float, float, int]:
    """Mean and standard error of (a - b) final held-out accuracy over seeds both modes ran."""
    by = {(r["mode"], r["seed"]): r["final_heldout_accuracy"] for r in runs if r["stage"] == stage}
    diffs = [by[(a, s)] - by[(b, s)] for (m, s) in by if m == a and (b, s) in by]
    if not diffs:
        return math.nan, math.nan, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)


def _final_reward(runs: list[dict], last: int = 10) -> float:
    """Mean training reward over each run's last ``last`` steps, averaged over runs (NaN: none)."""
    per_run = [
        statistics.fmean(v for _, v in r["reward_curve"][-last:])
        for r in runs
        if r.get("reward_curve")
    ]
    return statistics.fmean(per_run) if per_run else math.nan


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """stage -> mode -> aggregated numbers."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["stage"], r["mode"])].append(r)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (stage, mode), rs in groups.items():
        acc = [r["final_heldout_accuracy"] for r in rs]
        mean, sd = _mean_sd(acc)
        out[stage][mode] = {
            "n": len(rs),
            "acc_mean": mean,
            "acc_sd": sd,
            "wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs),
            "trainable_params": statistics.fmean(r["trainable_params"] for r in rs),
            "optimizer_state_bytes": statistics.fmean(r["optimizer_state_bytes"] for r in rs),
            "peak_memory_bytes": statistics.fmean(r["peak_memory_bytes"] for r in rs),
            "training_state_bytes": statistics.fmean(r.get("training_state_bytes", 0) for r in rs),
            "final_reward": _final_reward(rs),
        }
    return out


#: The FFT - LoRA gap (in paired standard errors) below which "share closed" is not reported.
MIN_GAP_SE = 3.0


def _significant_gap(gap: float, se: float) -> bool:
    """FFT > LoRA by >= MIN_GAP_SE paired SE (NaN SE: fewer than 2 shared seeds, never significant)."""
    return not math.isnan(gap) and not math.isnan(se) and gap > 0 and gap >= MIN_GAP_SE * se


def _fmt_pair(m: float, se: float) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:+.3f}" + ("" if math.isnan(se) else f" +- {se:.3f}")


def _markdown(data: dict) -> str:
    runs = data["runs"]
    summary = summarize(runs)
    lines = ["# megatron-hybrid benchmark", ""]
    lines.append(
        f"Total wall time: {data['total_wall_time_s'] / 60:.1f} min. Seeds are shared across modes; paired "
        "differences are mean +- standard error over seeds. Training state = parameters + "
        "gradients of trainables + optimizer state; peak memory is CUDA peak allocation on GPU "
        "and the peak RSS increase on CPU (sampled every 20 ms, after earlier runs' memory is "
        "released; activations and allocator overhead included)."
    )
    starts = data.get("starts", {})
    for stage, modes in summary.items():
        lines += ["", f"## Stage: {stage}", ""]
        if stage in starts:
            st = starts[stage]
            lines += [
                f"Every run starts from the base fine-tuned (all weights) on this stage's training "
                f"split for {st['steps']} steps: greedy accuracy {st['accuracy']:.3f} on "
                f"{st['check_size']} validation prompts (target {st['target_accuracy']:g}).",
                "",
            ]
            if st["accuracy"] < st["target_accuracy"]:
                lines += [
                    f"**The start missed its target** ({st['accuracy']:.3f} < "
                    f"{st['target_accuracy']:g} after {st['steps']} steps): RL from a start that "
                    "gets (almost) nothing right has little to learn from; try another "
                    "`grpo.start.lr` or `grpo.start.seed`.",
                    "",
                ]
        lines.append(
            "| mode | held-out accuracy (mean +- sd) | vs FFT (paired) | vs LoRA (paired) | share of LoRA->FFT gap closed | reward, last 10 steps | wall time (s) | trainable params | optimizer state (MiB) | training state (MiB) | peak memory (MiB) |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        gap, gap_se, _ = paired(runs, stage, "fft", "lora")
        for mode, s in modes.items():
            vf = paired(runs, stage, mode, "fft")
            vl = paired(runs, stage, mode, "lora")
            closed = (
                f"{100 * vl[0] / gap:.0f}%"
                if mode not in ("fft", "lora") and _significant_gap(gap, gap_se)
                else "-"
            )
            lines.append(
                f"| {mode} | {s['acc_mean']:.3f} +- {s['acc_sd']:.3f} (n={s['n']}) | {_fmt_pair(vf[0], vf[1]) if mode != 'fft' else '-'} | "
                f"{_fmt_pair(vl[0], vl[1]) if mode != 'lora' else '-'} | {closed} | "
                f"{'-' if math.isnan(s['final_reward']) else format(s['final_reward'], '.3f')} | {s['wall_time_s']:.1f} | "
                f"{s['trainable_params']:,.0f} | {s['optimizer_state_bytes'] / 2**20:.2f} | {s['training_state_bytes'] / 2**20:.2f} | {s['peak_memory_bytes'] / 2**20:.1f} |"
            )
        if not math.isnan(gap):
            sig = "" if math.isnan(gap_se) or gap_se == 0 else f" = {gap / gap_se:.1f} paired SE"
            lines.append("")
            lines.append(f"FFT - LoRA gap: {_fmt_pair(gap, gap_se)}{sig}.")
            if not _significant_gap(gap, gap_se):
                lines.append(
                    f"No FFT > LoRA gap of >= {MIN_GAP_SE:g} paired SE: the share of the gap closed "
                    "is not reported."
                )
        for other in ("hybrid-random", "hybrid-gradnorm"):
            if other in modes and "hybrid" in modes:
                m, se, n = paired(runs, stage, "hybrid", other)
                same = sorted(
                    r["seed"]
                    for r in runs
                    if r["stage"] == stage
                    and r["mode"] == other
                    and r.get("shared_with") == "hybrid"
                )
                note = (
                    f" Same modules, seed and settings as hybrid for seed(s) {', '.join(map(str, same))}: "
                    "those runs were trained once and count for both modes."
                    if same
                    else ""
                )
                lines.append(f"hybrid - {other}: {_fmt_pair(m, se)} (n={n}).{note}")
    plans = data.get("plans", {})
    for stage, info in plans.items():
        table = info.get("scores", {})
        if not table:
            continue
        method = data["config"]["score"]["method"]
        top = sorted(table.items(), key=lambda kv: -kv[1].get(method, 0))[:4]
        lines += [
            "",
            f"Top modules by {method} at the {'start' if stage in starts else 'base'} ({stage} data): "
            + ", ".join(f"{n} ({v.get(method, 0):.3g})" for n, v in top),
        ]
    return "\n".join(lines) + "\n"


def _figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    stages = sorted({r["stage"] for r in runs}, key=["sft", "grpo"].index)
    panels = [(s, "accuracy_curve", "held-out accuracy") for s in stages]
    if any(r["reward_curve"] for r in runs if r["stage"] == "grpo"):
        panels.append(("grpo", "reward_curve", "rollout reward"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (stage, key, label) in zip(axes[0], panels):
        by_mode: dict[str, list[list[list[float]]]] = defaultdict(list)
        for r in runs:
            if r["stage"] == stage and r[key]:
                by_mode[r["mode"]].append(r[key])
        for mode, curves in by_mode.items():
            steps = [p[0] for p in curves[0]]
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
            ax.plot(steps[:n], mean, label=mode, marker="o" if n < 15 else None, markersize=3)
        ax.set_title(f"{stage}: {label} (mean over seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict, out: Path) -> list[Path]:
    """Write ``results.json``, ``report.md`` and ``report.png`` under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    atomic_write_text(results, json.dumps(data, indent=1, default=str) + "\n")
    md = out / "report.md"
    atomic_write_text(md, _markdown(data))
    png = out / "report.png"
    _figure(data, png)
    return [results, md, png]
