"""Figures for papers and for the report: PNG (and optionally SVG/PDF) files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from maskaudit.rundir import atomic_path  # noqa: E402

#: The study's AUC colour scale: red (chance or worse) to green (perfect).
AUC_CMAP = "RdYlGn"
AUC_RANGE = (0.5, 1.0)


def _text_colour(cmap: matplotlib.colors.Colormap, value: float) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour)."""
    if np.isnan(value):
        return "black"
    low, high = AUC_RANGE
    r, g, b, _ = cmap(np.clip((value - low) / (high - low), 0, 1))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def auc_heatmap(mean: pd.DataFrame, std: pd.DataFrame | None, title: str) -> plt.Figure:
    """The study's figure: rows training strategy, columns test strategy, values printed."""
    values = mean.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.95 * n_cols, 0.9 + 0.75 * n_rows), dpi=150)
    cmap = plt.get_cmap(AUC_CMAP).with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=AUC_RANGE[0], vmax=AUC_RANGE[1])
    for r in range(n_rows):
        for c in range(n_cols):
            v = values[r, c]
            if np.isnan(v):
                text = "n/a"
            else:
                text = f"{v:.2f}"
                if std is not None and not np.isnan(std.iat[r, c]):
                    text += f"\n±{std.iat[r, c]:.2f}"
            ax.text(c, r, text, ha="center", va="center", fontsize=7.5, color=_text_colour(cmap, v))
    ax.set_xticks(range(n_cols), [s.replace("_", " ") for s in mean.columns], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), [s.replace("_", " ") for s in mean.index], fontsize=8)
    ax.set_xlabel("test masking", fontsize=8)
    ax.set_ylabel("training masking", fontsize=8)
    ax.set_title(title, fontsize=9)
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.ax.tick_params(labelsize=7)
    cbar.set_label("AUC", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Save ``fig`` atomically in each format (``path`` without suffix); close it."""
    written = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight")
        written.append(target)
    plt.close(fig)
    return written

