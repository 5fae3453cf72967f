"""AUC tables from the prediction table (SPEC §5): per fold, and the fold mean per class.

``auc_by_fold``: one row per (dataset, split, train strategy, test strategy, class, fold) with the
AUC, its DeLong CI, the counts of positives and negatives, and the reason when the AUC is undefined.
``auc_matrix``: the mean (and standard deviation) over the folds that have an AUC — the
study's 5x5 matrix per class, rows training strategy, columns test strategy — with the DeLong CI
of the mean (the folds' models score the same hold-out images: their AUCs are correlated, and
the CI says so; see :func:`maskaudit.stats.mean_auc_ci`), and ``n_pos``/``n_neg``: the distinct
labelled images the mean rests on (the hold-out set's for ``test``; every fold's validation images
together for ``val``, whose per-fold counts are in ``auc_by_fold``).
``delong_table``: DeLong's paired test of every cell against ``full→full`` of the same fold, on
the same images.
``training_table``: per trained model and class, whether the model ever learnt the class on its own
validation images during training, and whether the weights it kept had.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from maskaudit.rundir import read_json
from maskaudit.stats import auc_ci, delong_test, mean_auc_ci, mean_difference, z_critical

KEYS = ["dataset", "split", "train_strategy", "test_strategy", "class"]

#: The dataset name of the run's own data in the prediction table; external datasets carry their own.
MAIN = "main"


def _sets(group: pd.DataFrame) -> list[pd.DataFrame]:
    return [g[["image_id", "label", "probability"]] for _, g in group.groupby("fold", sort=True)]


def auc_by_fold(predictions: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    rows = []
    for key, group in predictions.groupby([*KEYS, "fold"], sort=False):
        est = auc_ci(group["label"].to_numpy(dtype=float), group["probability"].to_numpy(dtype=float), level)
        rows.append({**dict(zip([*KEYS, "fold"], key, strict=True)), "auc": est.auc, "ci_low": est.ci_low,
                     "ci_high": est.ci_high, "n_pos": est.n_pos, "n_neg": est.n_neg, "reason": est.reason})
    return pd.DataFrame(rows, columns=[*KEYS, "fold", "auc", "ci_low", "ci_high", "n_pos", "n_neg", "reason"])


def auc_matrix(predictions: pd.DataFrame, by_fold: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Fold mean and std of the AUC per (dataset, split, train, test, class), with the DeLong CI of the mean.

    ``by_fold`` is :func:`auc_by_fold` of the same predictions (the standard deviation is taken from it).
    """
    fold_aucs = by_fold.groupby(KEYS, sort=False)["auc"]
    rows = []
    for key, group in predictions.groupby(KEYS, sort=False):
        est = mean_auc_ci(_sets(group), level)
        defined = fold_aucs.get_group(key).dropna()
        rows.append({
            **dict(zip(KEYS, key, strict=True)),
            "auc_mean": est.auc,
            "auc_std": float(np.std(defined, ddof=1)) if len(defined) > 1 else np.nan,
            "ci_low": est.ci_low,
            "ci_high": est.ci_high,
            "n_folds": est.n_sets,
            "n_folds_missing": est.n_sets_missing,
            "n_pos": est.n_pos,
            "n_neg": est.n_neg,
            "reason": est.missing_reason or est.reason,
        })
    return pd.DataFrame(rows, columns=[*KEYS, "auc_mean", "auc_std", "ci_low", "ci_high", "n_folds",
                                       "n_folds_missing", "n_pos", "n_neg", "reason"])


def _wide(group: pd.DataFrame, where: str) -> tuple[pd.DataFrame, np.ndarray]:
    """One class's probabilities by image id (rows) and (train, test, fold) (columns), and each image's label."""
    labels = group.groupby("image_id", sort=True)["label"]
    if (labels.nunique() > 1).any():
        raise ValueError(f"{where}: an image has different labels in the prediction table")
    try:
        wide = group.pivot(index="image_id", columns=["train_strategy", "test_strategy", "fold"], values="probability")
    except ValueError:
        raise ValueError(f"{where}: an image occurs twice for one model and strategy") from None
    return wide.sort_index(), labels.first().reindex(wide.index).to_numpy(dtype=float)


def delong_table(predictions: pd.DataFrame, reference: tuple[str, str] = ("full", "full")) -> pd.DataFrame:
    """DeLong's paired test of each (train, test) cell against ``reference`` on the same images.

    One row per fold (the two models of that fold, on the images both scored) and, where the folds'
    models score the same images (hold-out, external), one row with ``fold`` = ``mean``: the
    difference of the two fold means, tested with the joint covariance of all the models
    (:func:`maskaudit.stats.mean_difference`). Images are matched by id: the table is pivoted to
    one row per image before any test.
    """
    columns = [*KEYS, "fold", "reference", "auc", "auc_reference", "difference", "z", "p_value", "n_images",
               "reason"]
    rows = []
    for (dataset, split, name), group in predictions.groupby(["dataset", "split", "class"], sort=False):
        wide, labels = _wide(group, f"{dataset}/{split}/{name}")
        cells = dict.fromkeys((t, s) for t, s, _ in wide.columns)
        ref_folds = {k for t, s, k in wide.columns if (t, s) == reference}
        if not ref_folds:
            continue
        for train, test in cells:
            if (train, test) == reference:
                continue
            folds = sorted(k for t, s, k in wide.columns if (t, s) == (train, test) and k in ref_folds)
            results = {}
            for k in folds:
                a, b = wide[(train, test, k)].to_numpy(), wide[(*reference, k)].to_numpy()
                both = ~np.isnan(a) & ~np.isnan(b)
                results[str(k)] = delong_test(labels[both], a[both], b[both])
            if split != "val" and folds:
                a = wide[[(train, test, k) for k in folds]].to_numpy().T
                b = wide[[(*reference, k) for k in folds]].to_numpy().T
                every = ~np.isnan(a).any(axis=0) & ~np.isnan(b).any(axis=0)
                results["mean"] = mean_difference(labels[every], a[:, every], b[:, every])
            for fold, r in results.items():
                rows.append({"dataset": dataset, "split": split, "train_strategy": train, "test_strategy": test,
                             "class": name, "fold": fold, "reference": "→".join(reference), "auc": r.auc_a,
                             "auc_reference": r.auc_b, "difference": r.difference, "z": r.z, "p_value": r.p_value,
                             "n_images": r.n_images, "reason": r.reason})
    return pd.DataFrame(rows, columns=columns)


def matrix_of(table: pd.DataFrame, class_name: str, split: str, strategies: list[str],
              test_strategies: list[str], value: str = "auc_mean", dataset: str = MAIN) -> pd.DataFrame:
    """One class's matrix: rows training strategy, columns test strategy (NaN where not scored)."""
    part = table[(table["class"] == class_name) & (table["split"] == split) & (table["dataset"] == dataset)]
    grid = part.pivot(index="train_strategy", columns="test_strategy", values=value)
    scored = set(table.loc[table["dataset"] == dataset, "test_strategy"])  # without masks: `full` alone
    return grid.reindex(index=strategies, columns=[s for s in test_strategies if s in scored])


def prediction_sets(predictions: pd.DataFrame, class_name: str, train_strategy: str, test_strategy: str,
                    split: str = "test", dataset: str = MAIN) -> dict[int, pd.DataFrame]:
    """Per fold, one model's predictions of one class: frames of ``image_id``, ``label``, ``probability``."""
    part = predictions[(predictions["class"] == class_name) & (predictions["train_strategy"] == train_strategy)
                       & (predictions["test_strategy"] == test_strategy) & (predictions["split"] == split)
                       & (predictions["dataset"] == dataset)]
    return {int(fold): group[["image_id", "label", "probability"]].reset_index(drop=True)
            for fold, group in part.groupby("fold", sort=True)}


#: the config section a model's training settings come from, unless the audit says another (:func:`training_table`)
TRAIN_SETTINGS = "train"
#: The columns of :func:`training_table`.
TRAINING_COLUMNS = ["train_strategy", "fold", "class", "epochs_run", "stopped_early", "monitor", "kept_epoch",
                    "kept_auc", "kept_ci_low", "kept_ci_high", "best_auc", "best_epoch", "best_ci_low",
                    "first_learnt_epoch", "learnt", "kept_learnt", "settings"]


def training_table(jobs: dict[tuple[str, int], Path], classes: list[str], level: float = 0.95,
                   settings: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per trained model (``(strategy, fold) → job folder``) and class: did it learn the class, and did it keep it?

    From the job's ``history.csv`` (each epoch's validation AUC of each class and its DeLong variance, recorded by
    :func:`maskaudit.train.train_job`) and ``job.json`` (the epoch whose weights were kept). An epoch *shows* the class
    when its validation AUC's CI lower bound (at ``level``, the plain normal interval of
    :func:`maskaudit.stats.auc_ci`) is above 0.5. ``kept_learnt``: the kept epoch shows it (1.0 or 0.0).
    ``learnt``: some epoch shows it at the level Bonferroni-corrected for the epochs looked at (``1 - (1 - level) /
    epochs``: the best of many epochs on the same validation images would otherwise often clear 0.5 by chance on a
    small validation set); ``best_ci_low`` is the highest such corrected lower bound, ``first_learnt_epoch`` the
    first epoch above 0.5 (-1: none). Both are NaN (unknown) for a history without variances (a run from before
    they were recorded); a job without a history (a probe's models) has no row.

    ``settings``: the config section whose keys a strategy's jobs trained with (``adapt`` for a probe's adapted
    copies, ``adapt.shape`` for its shape control; ``train``, the default, for the rest): the section the advice
    names (:func:`maskaudit.analyses.evidence.undertraining_advice`).
    """
    settings = settings or {}
    z = z_critical(level)
    rows = []
    for (strategy, fold), job_dir in jobs.items():
        history_path, meta_path = job_dir / "history.csv", job_dir / "job.json"
        if not history_path.is_file() or not meta_path.is_file():
            continue
        history, meta = pd.read_csv(history_path), read_json(meta_path)
        kept = meta.get("best_epoch", -1)
        kept_row = history[history["epoch"] == kept]
        for name in classes:
            if f"val_auc_{name}" not in history:  # a class the job was not trained for
                continue
            auc = pd.to_numeric(history[f"val_auc_{name}"], errors="coerce")
            variance = pd.to_numeric(history.get(f"val_auc_variance_{name}", np.nan), errors="coerce")
            sd = np.sqrt(np.asarray(variance, dtype=float)) * np.ones(len(history))
            low, high = np.clip(auc - z * sd, 0, 1), np.clip(auc + z * sd, 0, 1)
            corrected = np.clip(auc - z_critical(1 - (1 - level) / len(history)) * sd, 0, 1)
            known = np.isfinite(low)
            shows = known & (corrected > 0.5)
            at = kept_row.index[0] if len(kept_row) else None
            best = int(auc.idxmax()) if auc.notna().any() else None
            rows.append({
                "train_strategy": strategy, "fold": int(fold), "class": name, "epochs_run": int(len(history)),
                "stopped_early": bool(meta.get("stopped_early", False)), "monitor": meta.get("monitor", "val_loss"),
                "kept_epoch": int(kept),
                "kept_auc": float(auc[at]) if at is not None else np.nan,
                "kept_ci_low": float(low[at]) if at is not None else np.nan,
                "kept_ci_high": float(high[at]) if at is not None else np.nan,
                "best_auc": float(auc[best]) if best is not None else np.nan,
                "best_epoch": int(history["epoch"][best]) if best is not None else -1,
                "best_ci_low": float(np.nanmax(corrected)) if known.any() else np.nan,
                "first_learnt_epoch": int(history["epoch"][np.flatnonzero(shows)[0]]) if shows.any() else -1,
                "learnt": float(shows.any()) if known.any() else np.nan,
                "kept_learnt": float(low[at] > 0.5) if at is not None and known[at] else np.nan,
                "settings": settings.get(strategy, TRAIN_SETTINGS),
            })
    return pd.DataFrame(rows, columns=TRAINING_COLUMNS)
