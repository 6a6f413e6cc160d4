"""``megatron-hybrid plan show``: a plan artifact as a table, and as a layers x kinds heatmap."""

from __future__ import annotations

from pathlib import Path

from megatron_hybrid.peft.naming import CANDIDATE_KINDS
from megatron_hybrid.scoring.plan_io import PlanArtifact

__all__ = ["plan_heatmap", "plan_table"]


def _layer(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def plan_table(artifact: PlanArtifact) -> str:
    """Plain-text table: module, shape, params, the deciding score (and the others), decision."""
    method = artifact.score.get("method", "")
    others = sorted({k for m in artifact.modules for k in m.scores} - {method})
    header = ["module", "shape", "params", method or "score", *others, "decision"]
    rows = [header]
    for m in artifact.modules:
        rows.append(
            [
                m.name,
                "x".join(map(str, m.shape)),
                f"{m.params:,}",
                f"{m.scores.get(method, float('nan')):.4g}",
                *(f"{m.scores.get(k, float('nan')):.4g}" for k in others),
                m.decision.upper() if m.decision == "fft" else f"{m.decision} r={m.rank}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    fft = artifact.fft_names()
    total = sum(m.params for m in artifact.modules)
    fft_params = sum(m.params for m in artifact.modules if m.decision == "fft")
    lines.append(
        f"{len(fft)} of {len(artifact.modules)} modules FFT ({fft_params:,} of {total:,} candidate parameters); "
        f"score {method}, solver {artifact.score.get('solver')}, budget {artifact.budget.get('budget')} "
        f"of {artifact.budget.get('budget_unit')}"
    )
    return "\n".join(lines)


def plan_heatmap(artifact: PlanArtifact, path: str | Path) -> Path:
    """PNG heatmap: rows = layers, columns = module kinds, colour = deciding score; FFT boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    method = artifact.score.get("method", "")
    layers = sorted({lay for m in artifact.modules if (lay := _layer(m.name)) is not None})
    if not layers:
        raise ValueError("the plan has no per-layer modules to draw")
    grid = np.full((len(layers), len(CANDIDATE_KINDS)), np.nan)
    fft = []
    for m in artifact.modules:
        lay, kind = _layer(m.name), m.kind
        if lay is None or kind not in CANDIDATE_KINDS:
            continue
        r, c = layers.index(lay), CANDIDATE_KINDS.index(kind)
        grid[r, c] = m.scores.get(method, np.nan)
        if m.decision == "fft":
            fft.append((r, c))
    fig, ax = plt.subplots(figsize=(1.6 * len(CANDIDATE_KINDS) + 1.5, 0.45 * len(layers) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for r, c in fft:
        ax.add_patch(
            plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5)
        )
        ax.text(c, r, "FFT", ha="center", va="center", color="white", fontsize=8, fontweight="bold")
    ax.set_xticks(range(len(CANDIDATE_KINDS)), CANDIDATE_KINDS)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("layer")
    ax.set_title(f"Hybrid-LoRA score ({method}); red boxes: full fine-tuning")
    fig.colorbar(im, ax=ax, label=method)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
