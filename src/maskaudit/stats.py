"""AUC with its reasons for being undefined (later: DeLong variance, CIs and paired tests)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def class_auc(labels: np.ndarray, probs: np.ndarray) -> tuple[float, str]:
    """ROC AUC of one class, or NaN and the reason it is undefined (never 0.5, never a crash).

    Parameters
    ----------
    labels : array-like of shape (n_images,), 0/1 (NaN rows are ignored)
    probs : array-like of shape (n_images,)

    Returns
    -------
    (auc, reason) : ``reason`` is empty when the AUC is defined.
    """
    labels = np.asarray(labels, dtype=float)
    probs = np.asarray(probs, dtype=float)
    if labels.shape != probs.shape:
        raise ValueError(f"{labels.shape[0]} labels but {probs.shape[0]} probabilities")
    if labels.size == 0:
        return math.nan, "no images"
    known = ~np.isnan(labels)
    if not known.any():
        return math.nan, "class not labelled in this data"
    labels, probs = labels[known], probs[known]
    if not np.isfinite(probs).all():
        return math.nan, "non-finite probabilities"
    values = np.unique(labels)
    if values.size < 2:
        return math.nan, f"only label {int(values[0])} present ({labels.size} images)"
    return float(roc_auc_score(labels, probs)), ""
