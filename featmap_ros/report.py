"""Tables and plots of results: markdown tables, accuracy curves, error over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written headless, on robots and CI alike
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats get 1 decimal when they look like percentages, else 3 digits."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if not np.isfinite(v) else f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def tile_grid(tiles: Sequence[np.ndarray], cols: int = 8, pad: int = 2) -> np.ndarray:
    """Lay equal-size HxWx3 uint8 tiles out in rows of `cols` on a white sheet (contact sheets)."""
    if not tiles:
        raise ValueError("tile_grid needs at least one tile")
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * (h + pad), min(cols, len(tiles)) * (w + pad), 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = tile
    return sheet


def _save(fig: plt.Figure, ax: plt.Axes, path: Path, title: str, legend: bool, grid_axis: str = "both") -> Path:
    """Grid, title, optional legend, tight layout, PNG, close: the ending every plot here shares."""
    ax.grid(alpha=0.3, axis=grid_axis)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_curves(path: Path, curves: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
                ylabel: str = "accuracy", title: str = "", vline: float | None = None) -> Path:
    """One plot of several named (x, y) curves, saved as PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, lw=1.6)
    if vline is not None:
        ax.axvline(vline, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, path, title, legend=True)


def plot_series(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], ylabel: str,
                title: str = "") -> Path:
    """Values over time, one named (t seconds, values) line each (e.g. error per frame of a bag), as PNG."""
    fig, ax = plt.subplots(figsize=(7, 3), dpi=110)
    for name, (t, y) in series.items():
        ax.plot(t, y, ".-", ms=3, lw=0.8, label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    return _save(fig, ax, path, title, legend=len(series) > 1)


def plot_bars(path: Path, labels: Sequence[str], groups: dict[str, Sequence[float]], ylabel: str,
              title: str = "") -> Path:
    """Grouped bars (methods side by side per label), saved as PNG."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) * max(1, len(groups)) / 2), 3.6), dpi=110)
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(groups.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    return _save(fig, ax, path, title, legend=True, grid_axis="y")
