"""Figures for papers and for the report: PNG (and optionally SVG/PDF) files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.lines

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from maskaudit.rundir import atomic_path  # noqa: E402

#: The AUC colour scale: the study's diverging red–yellow–green over the whole range 0..1, centred on
#: chance. 0.5 is its neutral pale yellow; above it the study's direction (towards green: signal), below
#: it towards red: scores reversed. (The study's figures spread the same scale over 0.5..1, which paints
#: 0.24 and 0.50 the same dark red and a reversed model like one at chance.)
AUC_CMAP = "RdYlGn"
AUC_RANGE = (0.0, 1.0)
#: Ticks of the heatmaps' colour bar.
AUC_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def auc_rgba(value: float) -> tuple[float, float, float, float]:
    """The colour of one AUC on the heatmaps' scale (0.5 is the neutral centre), as an RGBA tuple in [0, 1]."""
    low, high = AUC_RANGE
    return tuple(plt.get_cmap(AUC_CMAP)(float(np.clip((value - low) / (high - low), 0, 1))))


def _text_colour(cmap: matplotlib.colors.Colormap, value: float) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour)."""
    if np.isnan(value):
        return "black"
    r, g, b, _ = auc_rgba(value)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def auc_heatmap(mean: pd.DataFrame, std: pd.DataFrame | None, title: str,
                rows: str = "training masking") -> plt.Figure:
    """The study's figure: rows training strategy (or probed model: ``rows`` names them), columns test strategy."""
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
    ax.set_ylabel(rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=AUC_TICKS)
    cbar.ax.tick_params(labelsize=7)
    cbar.set_label("AUC", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Save ``fig`` atomically as PNG (the report inlines it) and in each other format; close it."""
    written = []
    for fmt in dict.fromkeys(("png", *formats)):
        target = path.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight")
        written.append(target)
    plt.close(fig)
    return written



def auc_colour(value: float) -> tuple[str, str]:
    """One AUC's colour on the heatmaps' scale (:data:`AUC_CMAP` over :data:`AUC_RANGE`) as HTML colours.

    Parameters
    ----------
    value : float
        An AUC; NaN for a cell that was not scored.

    Returns
    -------
    tuple of str
        ``(background, text)`` as ``#rrggbb``: grey with black text for NaN.
    """
    if np.isnan(value):
        return "#d9d9d9", "#000000"
    background = matplotlib.colors.to_hex(auc_rgba(value))
    return background, "#000000" if _text_colour(plt.get_cmap(AUC_CMAP), value) == "black" else "#ffffff"


def difference_colour(value: float, limit: float = 0.25) -> tuple[str, str]:
    """A diverging colour (blue below zero, red above) for a difference of AUCs, saturating at ``limit``.

    Parameters
    ----------
    value : float
        The difference; NaN where one side lacks the cell.
    limit : float, default 0.25
        The absolute difference drawn with the darkest colour.

    Returns
    -------
    tuple of str
        ``(background, text)`` as ``#rrggbb``.
    """
    if np.isnan(value):
        return "#d9d9d9", "#000000"
    r, g, b, _ = plt.get_cmap("RdBu_r")(0.5 + 0.5 * np.clip(value / limit, -1, 1))
    text = "#000000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "#ffffff"
    return matplotlib.colors.to_hex((r, g, b)), text


def training_curves(histories: dict[str, dict[int, pd.DataFrame]]) -> plt.Figure:
    """One panel per training strategy: train (solid) and validation (dashed) loss per epoch, a colour per fold.

    Parameters
    ----------
    histories : dict
        ``{strategy: {fold: history}}``; each history has columns ``epoch``, ``train_loss``, ``val_loss``
        and optionally ``best`` (the epoch kept is marked with a dot).

    Returns
    -------
    matplotlib.figure.Figure
        Not saved; pass it to :func:`save_figure`.
    """
    n = max(len(histories), 1)
    n_cols = min(n, 3)
    n_rows = -(-n // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.4 * n_cols, 2.5 * n_rows), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (strategy, folds) in zip(axes.flat, histories.items(), strict=False):
        for fold, history in sorted(folds.items()):
            colour = colours(fold % 10)
            ax.plot(history["epoch"], history["train_loss"], color=colour, lw=1.2, label=f"fold {fold}")
            ax.plot(history["epoch"], history["val_loss"], color=colour, lw=1.2, ls="--")
            if "best" in history:
                best = history[history["best"].astype(str).str.lower() == "true"]
                if len(best):
                    ax.plot(best["epoch"].iloc[-1:], best["val_loss"].iloc[-1:], "o", color=colour, ms=4)
        ax.set_title(strategy.replace("_", " "), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(histories):]:
        ax.axis("off")
    if histories:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        handles += [matplotlib.lines.Line2D([], [], color="grey", lw=1.2),
                    matplotlib.lines.Line2D([], [], color="grey", lw=1.2, ls="--"),
                    matplotlib.lines.Line2D([], [], color="grey", marker="o", ls="none", ms=4)]
        labels += ["train loss", "validation loss", "epoch kept"]
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.07 if n_rows == 1 else 0.04, 1, 1))
    return fig
