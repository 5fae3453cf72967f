"""Dilation sweep (SPEC §6.4): AUC as the ROI grows, for models scored on ``only_roi`` and ``no_roi``.

A model (by default the full-image one, every fold) scores the hold-out images with the ROI
dilated by each spread of the study (0 … 500 pixels at S = 512, scaled to the run's image size
with :func:`maskaudit.masking.scale_spread`). Under ``only_roi`` a growing ROI gives back the
surroundings; under ``no_roi`` it takes them away. Each spread is one comparison on the taxicab
distance to the ROI (``dist <= spread``, computed per batch from the mask: ``Batch.at_spread``), never an
iterated dilation, and each batch of images is read once for all spreads and for all the models loaded
together (``predict.models``, grouped as the predict stage groups them). Spreads that round to the same
number of pixels at the run's size are scored once and reported under each requested spread.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from maskaudit.config import AuditConfig
from maskaudit.data.store import Store
from maskaudit.loader import batches
from maskaudit.masking import scale_spread
from maskaudit.metrics import MAIN
from maskaudit.predict import probabilities
from maskaudit.progress import active
from maskaudit.report.figures import plt
from maskaudit.stats import class_auc
from maskaudit.strategies import MaskSpec

KEYS = ["train_strategy", "test_strategy", "spread", "spread_px", "class"]


def sweep_pixels(config: AuditConfig, store: Store) -> dict[int, int]:
    """Each spread of ``analyses.sweep`` (at 512 px) → its pixels at the run's image size."""
    return {s: scale_spread(s, store.image_size) for s in config.analyses.sweep.spreads}


def sweep_steps(config: AuditConfig, store: Store, n_images: int, n_models: int) -> None:
    """The stage display's count for ``n_models`` models' sweeps of ``n_images`` images: images×spreads×models."""
    sweep = config.analyses.sweep
    spreads = len(set(sweep_pixels(config, store).values()))
    active().steps(n_images * spreads * n_models, "images×spreads×models",
                   note=f"{n_models} model{'s' if n_models != 1 else ''}, {spreads} spreads, each under "
                        f"{len(sweep.test_strategies)} maskings")


def sweep_predictions(models: Sequence[torch.nn.Module], jobs: Sequence[tuple[str, int]], store: Store,
                      indices: np.ndarray, spec: MaskSpec, config: AuditConfig,
                      device: torch.device) -> list[pd.DataFrame]:
    """Each model's probabilities on ``indices`` at every spread and test strategy of ``analyses.sweep``.

    ``jobs`` are the models' (train strategy, fold). Each batch is read once, grown once per spread and masked once
    per test strategy for all the models (so a model's rows are those it would have alone: the same tensors).

    Returns
    -------
    list of DataFrame
        Per model, one row per (test strategy, spread, image, class): ``dataset``, ``split``,
        ``train_strategy``, ``fold``, ``test_strategy``, ``spread`` (at 512 px), ``spread_px``
        (at the run's size), ``image_id``, ``class``, ``label``, ``probability``.
    """
    sweep = config.analyses.sweep
    pixels = sweep_pixels(config, store)
    unique_px = sorted(set(pixels.values()))
    out = [{(t, px): [] for t in sweep.test_strategies for px in unique_px} for _ in models]
    for model in models:
        model.eval()
    shown = active()  # the stage's display counts images × spreads × models (sweep_steps)
    with torch.no_grad():
        for batch in batches(store, indices, spec, config.predict.batch_size, device,
                             num_workers=config.train.num_workers):
            for px in unique_px:
                grown = batch.at_spread(px)
                for test_strategy in sweep.test_strategies:
                    x = grown.masked(test_strategy, spec)
                    for scores, model in zip(out, models, strict=True):
                        scores[test_strategy, px].append(probabilities(model, x).cpu().numpy())
                shown.step(len(batch.index) * len(models))
    image_ids = store.kept["image_id"].to_numpy()[indices]
    tables = []
    for scores, (train_strategy, fold) in zip(out, jobs, strict=True):
        frames = []
        for test_strategy in sweep.test_strategies:
            for spread, px in pixels.items():
                probs = np.concatenate(scores[test_strategy, px])
                for k, name in enumerate(store.classes):
                    frames.append(pd.DataFrame({
                        "dataset": MAIN, "split": "test", "train_strategy": train_strategy, "fold": fold,
                        "test_strategy": test_strategy, "spread": spread, "spread_px": px, "image_id": image_ids,
                        "class": name, "label": store.labels[indices, k], "probability": probs[:, k],
                    }))
        table = pd.concat(frames, ignore_index=True)
        table["probability"] = table["probability"].astype("float32")
        tables.append(table)
    return tables


def sweep_aucs(predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AUC per (model, test strategy, spread, class, fold), and their mean ± std over folds."""
    rows = []
    for key, group in predictions.groupby([*KEYS, "fold"], sort=False):
        auc, reason = class_auc(group["label"].to_numpy(float), group["probability"].to_numpy(float))
        rows.append({**dict(zip([*KEYS, "fold"], key, strict=True)), "auc": auc, "reason": reason})
    by_fold = pd.DataFrame(rows, columns=[*KEYS, "fold", "auc", "reason"])
    summary = (by_fold.groupby(KEYS, sort=False)["auc"]
               .agg(auc_mean="mean", auc_std=lambda a: a.std(ddof=1), n_folds="count").reset_index())
    return by_fold, summary


def sweep_figure(summary: pd.DataFrame, train_strategy: str, image_size: int):
    """One panel per test strategy: AUC (mean ± std over folds) against spread, one curve per class."""
    part = summary[summary["train_strategy"] == train_strategy]
    tests = list(dict.fromkeys(part["test_strategy"]))
    fig, axes = plt.subplots(1, len(tests), figsize=(3.4 * len(tests), 2.9), dpi=150, sharey=True, squeeze=False)
    for ax, test_strategy in zip(axes[0], tests, strict=True):
        for name, curve in part[part["test_strategy"] == test_strategy].groupby("class", sort=False):
            curve = curve.sort_values("spread")
            x, y, s = curve["spread"].to_numpy(), curve["auc_mean"].to_numpy(), curve["auc_std"].fillna(0).to_numpy()
            line, = ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, label=name)
            ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{train_strategy.replace('_', ' ')} model on {test_strategy.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel(f"ROI dilation (pixels at 512 px; ×{image_size / 512:.3g} here)", fontsize=8)
        ax.set_ylim(0.0, 1.02)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("AUC (mean ± std over folds)", fontsize=8)
    axes[0][-1].legend(fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig
