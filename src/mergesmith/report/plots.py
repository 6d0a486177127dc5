"""The report's figures, drawn with matplotlib (Agg, no display) into PNG bytes.

Each function returns a `Plot` holding the PNG and the array it drew, so tests (and callers) can check what a
figure shows without reading pixels. Undefined values (None in the analysis) are drawn as blank cells.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Plot:
    title: str
    png: bytes
    data: np.ndarray  # rows = layers; columns = model pairs (heat maps) or models (profiles)
    rows: list[str]
    columns: list[str]


def short_names(analysis: dict[str, Any]) -> list[str]:
    """Model labels for axes: the folder name, made unique with its index when two coincide."""
    names = [Path(m["name"].rstrip("/")).name or m["name"] for m in analysis["models"]]
    return [f"{n} [{i}]" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def pairwise_heatmap(analysis: dict[str, Any], key: str, title: str, *, vmin: float, vmax: float, cmap: str) -> Plot | None:
    """Layers × model pairs heat map of a pairwise statistic ('cosine', 'sign_conflict', 'jaccard')."""
    names = short_names(analysis)
    pairs = _pairs(len(names))
    layers = analysis["layers"]
    if not pairs or not layers:
        return None
    data = np.array([[_num(layer[key][i][j]) for i, j in pairs] for layer in layers], dtype=float)
    rows = [layer["name"] for layer in layers]
    columns = [f"{names[i]} × {names[j]}" for i, j in pairs]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(pairs) + 3), max(3.0, 0.28 * len(rows) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    if data.size <= 400:
        for (r, c), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    return Plot(title, _png(fig), data, rows, columns)


def norm_profile(analysis: dict[str, Any], key: str = "norm", title: str = "task-vector norm per layer", ylabel: str = "‖δ‖") -> Plot | None:
    """One line per model over the layers of a per-model statistic ('norm', 'mass_fraction', ...)."""
    names = short_names(analysis)
    layers = analysis["layers"]
    if not layers:
        return None
    data = np.array([[_num(v) for v in layer[key]] for layer in layers], dtype=float)
    rows = [layer["name"] for layer in layers]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(rows) + 3), 3.2))
    x = np.arange(len(rows))
    for i, name in enumerate(names):
        ax.plot(x, data[:, i], marker="o", markersize=3, label=name)
    ax.set_xticks(x, rows, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return Plot(title, _png(fig), data, rows, names)


def analysis_plots(analysis: dict[str, Any]) -> list[Plot]:
    """Every figure of the analysis section, in display order (heat maps need two or more models)."""
    plots = [
        pairwise_heatmap(analysis, "cosine", "cosine similarity of task vectors, per layer", vmin=-1, vmax=1, cmap="RdBu_r"),
        pairwise_heatmap(analysis, "sign_conflict", "sign conflict among overlapping top-k entries, per layer", vmin=0, vmax=1, cmap="Reds"),
        pairwise_heatmap(analysis, "jaccard", "overlap (Jaccard) of top-k masks, per layer", vmin=0, vmax=1, cmap="Greens"),
        norm_profile(analysis),
        norm_profile(analysis, "mass_fraction", "share of entries carrying 90 % of the squared mass, per layer", "mass fraction"),
    ]
    return [p for p in plots if p is not None]


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)
