"""AUC tables from the prediction table (SPEC §5): per fold, and the fold mean per class.

``auc_by_fold``: one row per (dataset, split, train strategy, test strategy, class, fold) with the
AUC, the counts of positives and negatives, and the reason when the AUC is undefined.
``auc_matrix``: the mean (and standard deviation) over the folds that have an AUC — the
study's 5x5 matrix per class, rows training strategy, columns test strategy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from maskaudit.stats import class_auc

KEYS = ["dataset", "split", "train_strategy", "test_strategy", "class"]

#: The dataset name of the run's own data in the prediction table; external datasets carry their own.
MAIN = "main"


def auc_by_fold(predictions: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, group in predictions.groupby([*KEYS, "fold"], sort=False):
        labels = group["label"].to_numpy(dtype=float)
        auc, reason = class_auc(labels, group["probability"].to_numpy(dtype=float))
        rows.append({
            **dict(zip([*KEYS, "fold"], key, strict=True)),
            "auc": auc,
            "n_pos": int(np.nansum(labels == 1)),
            "n_neg": int(np.nansum(labels == 0)),
            "reason": reason,
        })
    return pd.DataFrame(rows, columns=[*KEYS, "fold", "auc", "n_pos", "n_neg", "reason"])


def auc_matrix(by_fold: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, group in by_fold.groupby(KEYS, sort=False):
        defined = group["auc"].dropna()
        reasons = sorted(set(group.loc[group["auc"].isna(), "reason"]))
        rows.append({
            **dict(zip(KEYS, key, strict=True)),
            "auc_mean": float(defined.mean()) if len(defined) else np.nan,
            "auc_std": float(defined.std(ddof=1)) if len(defined) > 1 else np.nan,
            "n_folds": int(len(defined)),
            "n_folds_missing": int(len(group) - len(defined)),
            "reason": "; ".join(reasons),
        })
    return pd.DataFrame(rows, columns=[*KEYS, "auc_mean", "auc_std", "n_folds", "n_folds_missing", "reason"])


def matrix_of(table: pd.DataFrame, class_name: str, split: str, strategies: list[str],
              test_strategies: list[str], value: str = "auc_mean", dataset: str = MAIN) -> pd.DataFrame:
    """One class's matrix: rows training strategy, columns test strategy (NaN where not scored)."""
    part = table[(table["class"] == class_name) & (table["split"] == split) & (table["dataset"] == dataset)]
    grid = part.pivot(index="train_strategy", columns="test_strategy", values=value)
    scored = set(table.loc[table["dataset"] == dataset, "test_strategy"])  # without masks: `full` alone
    return grid.reindex(index=strategies, columns=[s for s in test_strategies if s in scored])
