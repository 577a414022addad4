"""Where safety lives: how a mask's selected weights spread over layers, components and experts.

Two numbers per group: ``share`` (fraction of all selected weights that fall in the group) and
``density`` (fraction of the group's own weights that are selected; 1% everywhere would mean no
preference). Big groups (MLPs) collect a large share by size alone, so the heatmap shows density.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from lit_safety.esi.mask import SafetyMask, _numel
from lit_safety.io import atomic_file, save_figure, write_json
from lit_safety.models.naming import parse_param_name

COMPONENT_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "expert_gate", "expert_up",
                   "expert_gate_up", "expert_down", "shared_gate", "shared_up", "shared_down", "lm_head", "other")


def summarize_mask(mask: SafetyMask) -> dict[str, Any]:
    """Counts per (layer, component) and per expert, plus totals and the untouched experts."""
    groups: dict[tuple[Any, str], list[int]] = defaultdict(lambda: [0, 0])  # [selected, total]
    experts: dict[tuple[int | None, int], list[int]] = defaultdict(lambda: [0, 0])
    for name, shape in mask.shapes.items():
        loc = parse_param_name(name)
        numel = _numel(shape)
        idx = mask.indices.get(name)
        selected = int(idx.numel()) if idx is not None else 0
        key = (loc.layer, loc.component)
        groups[key][0] += selected
        groups[key][1] += numel
        if loc.is_expert_stack and len(shape) == 3:
            per = numel // shape[0]
            counts = [0] * shape[0]
            if idx is not None and idx.numel():
                for e, c in zip(*(idx // per).unique(return_counts=True)):
                    counts[int(e)] = int(c)
            for e in range(shape[0]):
                experts[(loc.layer, e)][0] += counts[e]
                experts[(loc.layer, e)][1] += per
        elif loc.expert is not None:
            experts[(loc.layer, loc.expert)][0] += selected
            experts[(loc.layer, loc.expert)][1] += numel
    k = max(1, mask.k)
    rows = [
        {"layer": layer, "component": comp, "selected": sel, "total": tot, "share": sel / k, "density": sel / tot}
        for (layer, comp), (sel, tot) in sorted(groups.items(), key=lambda kv: (_layer_key(kv[0][0]), _comp_key(kv[0][1])))
    ]
    expert_rows = [
        {"layer": layer, "expert": e, "selected": sel, "total": tot, "share": sel / k, "density": sel / tot}
        for (layer, e), (sel, tot) in sorted(experts.items(), key=lambda kv: (_layer_key(kv[0][0]), kv[0][1]))
    ]
    by_component = _marginal(rows, "component", k)
    by_layer = _marginal(rows, "layer", k)
    return {
        "k": mask.k, "n": mask.n, "ratio": mask.ratio, "metadata": mask.metadata,
        "by_layer_component": rows, "by_component": by_component, "by_layer": by_layer, "by_expert": expert_rows,
        "experts_without_selection": [(r["layer"], r["expert"]) for r in expert_rows if r["selected"] == 0],
    }


def _marginal(rows, key: str, k: int) -> list[dict[str, Any]]:
    acc: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        acc[r[key]][0] += r["selected"]
        acc[r[key]][1] += r["total"]
    order = sorted(acc, key=_layer_key if key == "layer" else _comp_key)
    return [{key: g, "selected": acc[g][0], "total": acc[g][1], "share": acc[g][0] / k, "density": acc[g][0] / acc[g][1]}
            for g in order]


def _layer_key(layer: Any) -> float:
    return float("inf") if layer is None else float(layer)


def _comp_key(comp: str) -> int:
    return COMPONENT_ORDER.index(comp) if comp in COMPONENT_ORDER else len(COMPONENT_ORDER)


def text_summary(summary: dict[str, Any], top: int = 5) -> str:
    """A few lines for the terminal: where the selected weights concentrate."""
    lines = [f"selected {summary['k']:,} of {summary['n']:,} weights ({summary['ratio']:.3%})"]
    share = summary["metadata"].get("score_share")
    if share is not None:
        lines[0] += f", holding {share:.1%} of the summed scores"
    comps = sorted(summary["by_component"], key=lambda r: -r["density"])
    lines.append("by component (density = share of that component's weights selected): " + ", ".join(
        f"{r['component']} {r['density']:.2%} ({r['share']:.0%} of k)" for r in comps))
    layers = [r for r in summary["by_layer"] if r["layer"] is not None]
    lines.append("by layer: " + ", ".join(f"L{r['layer']} {r['density']:.2%}" for r in layers))
    hot = sorted(summary["by_layer_component"], key=lambda r: -r["density"])[:top]
    lines.append("densest groups: " + ", ".join(f"L{r['layer']}.{r['component']} {r['density']:.2%}" for r in hot))
    if summary["by_expert"]:
        lines.append(f"experts with no selected weight: {len(summary['experts_without_selection'])} of {len(summary['by_expert'])}")
    return "\n".join(lines)


def write_report(mask: SafetyMask, out_dir: str | Path, *, title: str | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report_layers.csv``, ``report_experts.csv`` (MoE), ``heatmap.png`` and
    ``experts.png`` (MoE) into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_mask(mask)
    paths = {"json": out_dir / "report.json", "csv": out_dir / "report_layers.csv"}
    write_json(paths["json"], summary)
    _write_csv(paths["csv"], summary["by_layer_component"])
    if summary["by_expert"]:
        paths["experts_csv"] = out_dir / "report_experts.csv"
        _write_csv(paths["experts_csv"], summary["by_expert"])
    title = title or str(mask.metadata.get("model", ""))
    paths["heatmap"] = plot_heatmap(summary, out_dir / "heatmap.png", title=title)
    if summary["by_expert"]:
        paths["experts_png"] = plot_experts(summary, out_dir / "experts.png", title=title)
    return paths


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def _matrix(summary, value: str = "density"):
    import numpy as np

    rows = [r for r in summary["by_layer_component"] if r["layer"] is not None]
    layers = sorted({r["layer"] for r in rows})
    comps = sorted({r["component"] for r in rows}, key=_comp_key)
    grid = np.full((len(layers), len(comps)), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), comps.index(r["component"])] = r[value]
    return grid, layers, comps


def plot_heatmap(summary: dict[str, Any], path: Path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid, layers, comps = _matrix(summary)
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(comps), max(2.8, 1.4 + 0.4 * len(layers))))
    image = ax.imshow(grid * 100, aspect="auto", cmap="magma", origin="lower")
    ax.set_xticks(range(len(comps)), comps, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v * 100:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if v < np.nanmax(grid) * 0.6 else "black")
    fig.colorbar(image, ax=ax, label="% selected")
    ax.set_title(f"Safety-critical weights by layer x component\n{title} ({summary['ratio']:.2%} selected)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_experts(summary: dict[str, Any], path: Path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = summary["by_expert"]
    layers = sorted({r["layer"] for r in rows})
    experts = sorted({r["expert"] for r in rows})
    grid = np.zeros((len(layers), len(experts)))
    for r in rows:
        grid[layers.index(r["layer"]), experts.index(r["expert"])] = r["density"] * 100
    fig, ax = plt.subplots(figsize=(2.0 + 0.8 * len(experts), max(2.8, 1.4 + 0.4 * len(layers))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(experts)), [f"E{e}" for e in experts])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "none" if v == 0 else f"{v:.1f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax, label="% selected")
    ax.set_title(f"Safety-critical weights per expert\n{title}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
