"""Embeddings (SPEC §6.3): how far masking moves an image in the full-image model's feature space.

The model (by default ``full``, fold 0) embeds the same images (by default fold 0's validation
images, as the study) under every test strategy: the penultimate features, i.e. the flattened
input of the last Linear layer (1024-d for DenseNet-121). Two summaries:

* the cosine similarity between each image's ``full`` embedding and its embedding under each
  other strategy: mean ± std over all images, and over each class's positives;
* a t-SNE (scikit-learn, perplexity 10 as the study, seeded, PCA initialisation) of all
  embeddings together, coloured by strategy, with marginal histograms of both axes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.manifold import TSNE

from maskaudit.config import AuditConfig
from maskaudit.data.store import Store
from maskaudit.loader import batches
from maskaudit.report.figures import plt
from maskaudit.strategies import MaskSpec


def embed_images(model: torch.nn.Module, store: Store, indices: np.ndarray, strategies: list[str], spec: MaskSpec,
                 config: AuditConfig, device: torch.device) -> dict[str, np.ndarray]:
    """Penultimate features (n_images, F) of ``indices`` under each strategy."""
    out: dict[str, list[np.ndarray]] = {s: [] for s in strategies}
    model.eval()
    with torch.no_grad():
        for batch in batches(store, indices, spec, config.predict.batch_size, device,
                             num_workers=config.train.num_workers):
            for strategy in strategies:
                out[strategy].append(model.embed(batch.masked(strategy, spec)).float().cpu().numpy())
    return {s: np.concatenate(parts) for s, parts in out.items()}


def cosine_table(embeddings: dict[str, np.ndarray], labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Cosine similarity of each image's ``full`` embedding with each other strategy's.

    Returns
    -------
    DataFrame
        One row per (strategy, group): ``group`` is ``all images`` or a class name (its
        positives), with ``mean``, ``std`` and ``n`` images. A zero-norm embedding has no
        direction: its similarity is NaN and it is left out of ``n``.
    """
    full = embeddings["full"]
    rows = []
    for strategy, other in embeddings.items():
        if strategy == "full":
            continue
        norms = np.linalg.norm(full, axis=1) * np.linalg.norm(other, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.where(norms > 0, (full * other).sum(axis=1) / norms, np.nan)
        groups = {"all images": np.ones(len(full), dtype=bool)}
        groups |= {name: labels[:, k] == 1 for k, name in enumerate(classes)}
        for group, rows_in in groups.items():
            values = cosine[rows_in & np.isfinite(cosine)]
            rows.append({"strategy": strategy, "group": group, "mean": float(values.mean()) if len(values) else np.nan,
                         "std": float(values.std(ddof=1)) if len(values) > 1 else np.nan, "n": int(len(values))})
    return pd.DataFrame(rows, columns=["strategy", "group", "mean", "std", "n"])


def tsne_points(embeddings: dict[str, np.ndarray], perplexity: float, seed: int) -> tuple[np.ndarray, float]:
    """2-D t-SNE of all strategies' embeddings stacked in order; the perplexity actually used.

    scikit-learn needs ``perplexity < n_points``; a smaller set gets ``(n_points - 1) / 3``.
    """
    stacked = np.concatenate(list(embeddings.values())).astype(np.float64)
    used = float(min(perplexity, max(1.0, (len(stacked) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=used, init="pca", random_state=seed, max_iter=1000)
    return tsne.fit_transform(stacked), used


def tsne_figure(points: pd.DataFrame, title: str):
    """Scatter of ``x``, ``y`` coloured by ``strategy``, with each strategy's marginal histograms."""
    fig = plt.figure(figsize=(5.6, 5.2), dpi=150)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    x_bins = np.linspace(points["x"].min(), points["x"].max(), 31)
    y_bins = np.linspace(points["y"].min(), points["y"].max(), 31)
    for strategy, part in points.groupby("strategy", sort=False):
        dots = ax.scatter(part["x"], part["y"], s=7, alpha=0.7, linewidths=0, label=strategy.replace("_", " "))
        colour = dots.get_facecolor()[0]
        top.hist(part["x"], bins=x_bins, histtype="step", color=colour, linewidth=1.1)
        right.hist(part["y"], bins=y_bins, histtype="step", color=colour, linewidth=1.1, orientation="horizontal")
    top.tick_params(labelbottom=False, labelsize=6)
    right.tick_params(labelleft=False, labelsize=6)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("t-SNE 1", fontsize=8)
    ax.set_ylabel("t-SNE 2", fontsize=8)
    ax.legend(fontsize=7, markerscale=2, frameon=False, loc="best")
    top.set_title(title, fontsize=9)
    return fig
