"""Metadata baseline (SPEC §6.1): how far metadata alone goes, and whether image models go further.

For every class and fold, a logistic regression is fitted on the fold's training images from
their metadata alone and scored on the hold-out images. Features: a numeric column is min-max
scaled with the training rows' minimum and maximum (a constant column becomes 0); any other
column is one-hot encoded over the categories seen in training (an unseen category is all
zeros). The study coded sex as M = 0, else 1, projection as AP* = 0, PA = 1 and Chákṣu's camera
as one ordinal integer; one-hot indicators contain those codings (the regression can weigh
AP and AP_horizontal alike) and do not invent an order between cameras. Rows with a missing
value in a used column are dropped and counted, in training and in the hold-out. The regression
is scikit-learn's L2-penalised ``LogisticRegression`` (C = 1, lbfgs).

Its AUC gets a DeLong CI, and DeLong's paired test compares it with chosen image models (the
study: ``no_roi_bbox`` trained and tested) on the same hold-out images, matched by image id.

**The scale factor** (issue 16, part 4). Each image is divided by its own maximum before it is masked
(SPEC §1, the study's order; ``scale: before_masking``), so a bright object outside the ROI (burned-in
text, a laterality letter, a marker) lowers every pixel inside it, and a model shown the ROI alone can
find a class that lives outside it. Beside the metadata baseline, a second predictor, ``image_max``,
scores each hold-out image by that maximum alone (the store's ``image_max`` column, recorded at
preparation), oriented per fold on the fold's training images (the sign whose training AUC is at least
0.5; no other fitting), so that its fold-mean AUC, CI and DeLong tests against the image models read
like the metadata baseline's. The verdict reads it (:mod:`maskaudit.analyses.verdict`); with
``scale: after_masking`` the masked images are rescaled by the pixels they keep and the predictor is
still reported, but no longer read.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from maskaudit.errors import MaskauditError
from maskaudit.metrics import MAIN, prediction_sets
from maskaudit.stats import auc_ci, mean_auc_ci, mean_difference_test, paired_test

#: The ``train_strategy`` (and ``test_strategy``) of the baseline's rows in its prediction table.
METADATA = "metadata"
#: The same for the scale-factor predictor (the image's own maximum; the store's column of that name).
IMAGE_MAX = "image_max"


def metadata_columns(available: list[str], wanted: list[str] | None) -> list[str]:
    """The columns the baseline uses: ``wanted`` (checked against ``available``) or all of them."""
    if wanted is None:
        return list(available)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise MaskauditError(f"analyses.baseline.columns: no metadata column {', '.join(map(repr, unknown))}; "
                             f"this data has {', '.join(available) or 'none'}")
    return list(wanted)


def _numeric(values: pd.Series) -> pd.Series | None:
    """The column as floats when every present value is a number, else None (categorical)."""
    present = values.dropna()
    converted = pd.to_numeric(present, errors="coerce")
    if converted.isna().any():
        return None
    return pd.to_numeric(values, errors="coerce").astype(float)


def _missing(frame: pd.DataFrame) -> np.ndarray:
    blank = frame.apply(lambda c: c.isna() | (c.astype(str).str.strip() == ""))
    return blank.any(axis=1).to_numpy()


def encode(frame: pd.DataFrame, train_rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Features (n, F) of complete rows of ``frame``, scaled and encoded from ``train_rows`` only.

    Parameters
    ----------
    frame : DataFrame of shape (n, n_columns)
        Metadata, without missing values.
    train_rows : bool array of shape (n,)
        The rows the scaling and categories are learnt from.

    Returns
    -------
    (features, names)
    """
    blocks, names = [], []
    for column in frame.columns:
        numeric = _numeric(frame[column])
        if numeric is not None:
            train = numeric[train_rows]
            low, high = float(train.min()), float(train.max())
            span = high - low
            blocks.append(((numeric - low) / span if span > 0 else numeric * 0.0).to_numpy()[:, None])
            names.append(column)
        else:
            text = frame[column].astype(str)
            for category in sorted(set(text[train_rows])):
                blocks.append((text == category).to_numpy(dtype=float)[:, None])
                names.append(f"{column}={category}")
    return np.hstack(blocks) if blocks else np.zeros((len(frame), 0)), names


def baseline_predictions(kept: pd.DataFrame, labels: np.ndarray, classes: list[str], columns: list[str],
                         train: dict[int, np.ndarray], test: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit and score the baseline for every fold and class.

    Parameters
    ----------
    kept : DataFrame
        The store's kept rows (``image_id`` and the metadata columns).
    labels : array of shape (n_images, n_classes)
    train : dict fold → store indices of the fold's training images
    test : store indices of the hold-out images

    Returns
    -------
    (predictions, fits) : the long prediction table of the baseline (``train_strategy`` =
        ``metadata``) and one row per (class, fold) with counts, features and the reason of a skip.
        Counts of labelled images: ``n_train`` fitted on, of the fold's ``n_train_all`` (what its image
        models train on); ``n_test_labelled`` scored, of the hold-out set's ``n_test_all``. ``n_test`` and
        the ``dropped_*`` columns count images with and without complete metadata, labelled or not.
    """
    complete = ~_missing(kept[columns])
    rows, fits = [], []
    for fold, train_idx in train.items():
        train_ok, test_ok = train_idx[complete[train_idx]], test[complete[test]]
        mask = np.zeros(len(kept), dtype=bool)
        mask[train_ok] = True
        features, names = encode(kept.loc[complete, columns].reset_index(drop=True), mask[complete])
        position = np.cumsum(complete) - 1  # store index → row of ``features``
        for k, name in enumerate(classes):
            fit = {"class": name, "fold": fold, "features": ", ".join(names),
                   "n_train": int(np.isfinite(labels[train_ok, k]).sum()),
                   "n_train_all": int(np.isfinite(labels[train_idx, k]).sum()),
                   "dropped_train": int(len(train_idx) - len(train_ok)),
                   "n_test": int(len(test_ok)), "dropped_test": int(len(test) - len(test_ok)),
                   "n_test_labelled": int(np.isfinite(labels[test_ok, k]).sum()),
                   "n_test_all": int(np.isfinite(labels[test, k]).sum()), "reason": ""}
            y = labels[train_ok, k]
            known = np.isfinite(y)
            if np.unique(y[known]).size < 2:
                fit["reason"] = "one label value in the training images with metadata"
                fits.append(fit)
                continue
            model = LogisticRegression(C=1.0, max_iter=1000)
            model.fit(features[position[train_ok[known]]], y[known].astype(int))
            probability = model.predict_proba(features[position[test_ok]])[:, 1]
            rows.append(pd.DataFrame({
                "dataset": MAIN, "split": "test", "train_strategy": METADATA, "fold": fold,
                "test_strategy": METADATA, "image_id": kept["image_id"].to_numpy()[test_ok], "class": name,
                "label": labels[test_ok, k], "probability": probability,
            }))
            fits.append(fit)
    predictions = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["dataset", "split", "train_strategy", "fold", "test_strategy", "image_id", "class", "label",
                 "probability"])
    return predictions, pd.DataFrame(fits)


def baseline_tables(baseline: pd.DataFrame, predictions: pd.DataFrame, classes: list[str],
                    compare: list[tuple[str, str]], level: float,
                    predictor: str = METADATA) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The baseline's AUC per class (per fold and over folds) and its paired tests against image models
    (``predictor``: the baseline's rows, :data:`METADATA`, or the scale factor's, :data:`IMAGE_MAX`).

    Returns
    -------
    (aucs, tests) : ``aucs`` has one row per (class, fold) and one per class with ``fold`` = ``mean``
        (the DeLong CI of the fold mean); ``tests`` one row per (class, fold, image model) and one per
        (class, image model) with ``fold`` = ``mean`` (the two fold means, tested jointly): both AUCs
        on the shared images, ``difference`` = baseline − model, DeLong's z and p, or the reason the
        test was not made.
    """
    aucs, tests = [], []
    trained = set(zip(predictions["train_strategy"], predictions["test_strategy"], strict=True))
    for name in classes:
        sets = prediction_sets(baseline, name, predictor, predictor)
        for fold, frame in sets.items():
            est = auc_ci(frame["label"].to_numpy(), frame["probability"].to_numpy(), level)
            aucs.append({"class": name, "fold": str(fold), **_estimate(est)})
        mean = mean_auc_ci(list(sets.values()), level) if sets else None
        aucs.append({"class": name, "fold": "mean", **(_estimate(mean) if mean else
                                                       {"reason": "no fold could fit the baseline"})})
        for train_strategy, test_strategy in compare:
            row = {"class": name, "model": f"{train_strategy}→{test_strategy}"}
            if (train_strategy, test_strategy) not in trained:
                tests.append({**row, "fold": "mean",
                              "reason": f"{train_strategy}→{test_strategy} is not in this run's grid"})
                continue
            models = prediction_sets(predictions, name, train_strategy, test_strategy)
            shared = [k for k in sets if k in models]
            for fold in shared:
                tests.append({**row, "fold": str(fold), **_test(paired_test(sets[fold], models[fold]))})
            if shared:  # the fold means, tested with the joint covariance of all their models
                both = mean_difference_test([sets[k] for k in shared], [models[k] for k in shared])
                tests.append({**row, "fold": "mean", **_test(both)})
    return pd.DataFrame(aucs), pd.DataFrame(tests)


def scale_predictions(kept: pd.DataFrame, labels: np.ndarray, classes: list[str], train: dict[int, np.ndarray],
                      test: np.ndarray) -> pd.DataFrame:
    """Per fold and class, each hold-out image scored by its own maximum before scaling (the module's docstring).

    The score is ``image_max`` or its negative, whichever ranks the fold's training images with an AUC of at least
    0.5; the prediction table has the baseline's columns, ``train_strategy`` = ``test_strategy`` =
    :data:`IMAGE_MAX`. Empty when the store has no ``image_max`` column (prepared before it was recorded).
    """
    columns = ["dataset", "split", "train_strategy", "fold", "test_strategy", "image_id", "class", "label",
               "probability"]
    if IMAGE_MAX not in kept:
        return pd.DataFrame(columns=columns)
    peak = kept[IMAGE_MAX].to_numpy(dtype=np.float64)
    rows = []
    for fold, train_idx in train.items():
        for k, name in enumerate(classes):
            sign = 1.0
            fitted = auc_ci(labels[train_idx, k], peak[train_idx])
            if np.isfinite(fitted.auc) and fitted.auc < 0.5:
                sign = -1.0
            rows.append(pd.DataFrame({
                "dataset": MAIN, "split": "test", "train_strategy": IMAGE_MAX, "fold": fold, "test_strategy": IMAGE_MAX,
                "image_id": kept["image_id"].to_numpy()[test], "class": name, "label": labels[test, k],
                "probability": sign * peak[test],
            }))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def _estimate(est) -> dict:
    return {"auc": est.auc, "ci_low": est.ci_low, "ci_high": est.ci_high, "n_pos": est.n_pos, "n_neg": est.n_neg,
            "reason": est.reason}


def _test(test) -> dict:
    return {"auc_baseline": test.auc_a, "auc_model": test.auc_b, "difference": test.difference, "z": test.z,
            "p_value": test.p_value, "n_images": test.n_images, "reason": test.reason}
