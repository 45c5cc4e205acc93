"""Plots of a managed run, drawn from the flat metrics dict and the manager's topology history.

* :func:`density_figure`: per-layer TRAIN / FREEZE / PRUNE fractions as stacked horizontal bars,
  layers top to bottom in model order;
* :func:`churn_figure`: churn (and the scheduled drop fraction) of every topology update;
* :func:`save_plots`: both as PNG files.

Figures are built on matplotlib's Agg canvas without pyplot, so no global backend or figure
registry of the caller's process is touched. Nothing here communicates: every rank may call it,
the callers choose rank 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["churn_figure", "density_figure", "layer_fractions", "save_plots"]

_COLORS = {"TRAIN": "#2e7d32", "FREEZE": "#1f77b4", "PRUNE": "#d9d9d9"}
_DENSITY = "dimred/density/"
_TRAIN = "dimred/train_fraction/"


def layer_fractions(metrics: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(layer, train, freeze, prune) fractions per managed layer, in the metrics' (model) order."""
    rows = []
    for key, density in metrics.items():
        if key.startswith(_DENSITY):
            layer = key[len(_DENSITY) :]
            train = metrics[_TRAIN + layer]
            rows.append((layer, train, max(density - train, 0.0), max(1.0 - density, 0.0)))
    return rows


def _short_names(names: list[str]) -> tuple[list[str], str]:
    """Drop the dotted prefix all names share (``transformer.``), so the labels stay readable."""
    if len(names) < 2:
        return names, ""
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    prefix = ".".join(parts[0][:k])
    return [".".join(p[k:]) for p in parts], (prefix + "." if prefix else "")


def density_figure(metrics: dict[str, float], *, title: str = "") -> Figure:
    """Stacked horizontal bars of each layer's TRAIN / FREEZE / PRUNE fractions.

    Args:
        metrics: The manager's flat metrics dict (``dimred/density/<layer>``, ``dimred/train_fraction/<layer>``).
        title: Appended to the figure's title (e.g. the step).
    """
    rows = layer_fractions(metrics)
    if not rows:
        raise ValueError("no dimred/density/<layer> keys in the metrics: nothing to plot")
    labels, prefix = _short_names([r[0] for r in rows])
    fig = Figure(figsize=(10, 2.2 + 0.3 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    left = [0.0] * len(rows)
    for i, state in enumerate(("TRAIN", "FREEZE", "PRUNE")):
        widths = [r[1 + i] for r in rows]
        ax.barh(y, widths, left=left, color=_COLORS[state], edgecolor="white", linewidth=0.5, label=state)
        left = [a + b for a, b in zip(left, widths)]
    for yi, r in zip(y, rows):
        ax.text(1.01, yi, f"{r[1] + r[2]:.3f}", va="center", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_yticks(y, labels, fontsize=8 if len(rows) <= 60 else 6)
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the layer's entries  (numbers on the right: density = TRAIN + FREEZE)")
    overall = metrics.get("dimred/density")
    head = "Per-layer density" + (f" (overall {overall:.3f})" if overall is not None else "")
    sub = f"\nlayer names without their common prefix '{prefix}'" if prefix else ""
    ax.set_title(", ".join(s for s in (head, title) if s) + sub, fontsize=10)
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)  # the bars fill the axes
    ax.grid(axis="x", alpha=0.3)
    return fig


def churn_figure(history: list[dict[str, float]], *, title: str = "") -> Figure | None:
    """Churn of every topology update against its step (None when there was no update yet)."""
    points = [h for h in history if "churn" in h]
    if not points:
        return None
    fig = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [h["step"] for h in points]
    ax.plot(steps, [h["churn"] for h in points], marker="o", color="#c62828", label="churn (fraction of mask changed)")
    if all("drop_fraction" in h for h in points):
        ax.plot(steps, [h["drop_fraction"] for h in points], linestyle="--", color="#555555",
                label="drop fraction (of each layer's active entries)")
    ax.set_xlabel("optimizer step of the topology update")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fraction")
    ax.set_ylim(bottom=0)
    ax.set_title(", ".join(s for s in ("Topology churn per update", title) if s), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def save_plots(metrics: dict[str, float], history: list[dict[str, float]], out_dir: str | os.PathLike,
               *, title: str = "") -> dict[str, Path]:
    """Write ``layer_density.png`` and (if there were updates) ``churn.png`` into ``out_dir``.

    Returns:
        Plot name (``layer_density``, ``churn``) -> path of the written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"layer_density": density_figure(metrics, title=title), "churn": churn_figure(history, title=title)}
    paths: dict[str, Path] = {}
    for name, fig in figures.items():
        if fig is not None:
            paths[name] = out / f"{name}.png"
            fig.savefig(paths[name], dpi=110)
    return paths
