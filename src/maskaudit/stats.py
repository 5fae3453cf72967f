r"""AUC, its DeLong variance and confidence interval, DeLong's paired test, and the CI of a mean AUC (SPEC §5).

Notation. For one class, the ``m`` positive images have scores :math:`X_1 \dots X_m` and the ``n``
negative images :math:`Y_1 \dots Y_n`; unlabelled images (label NaN) are left out before anything else.

AUC as a Mann-Whitney statistic
    :math:`\hat A = \frac{1}{mn} \sum_i \sum_j \psi(X_i, Y_j)`, with :math:`\psi(x, y) = 1` if
    :math:`x > y`, :math:`1/2` if :math:`x = y` and :math:`0` otherwise. This is the area under the
    empirical ROC curve with ties counted half, the value of ``sklearn.metrics.roc_auc_score``.

Structural components (DeLong, DeLong & Clarke-Pearson 1988)
    :math:`V_{10}(X_i) = \frac{1}{n} \sum_j \psi(X_i, Y_j)` for each positive and
    :math:`V_{01}(Y_j) = \frac{1}{m} \sum_i \psi(X_i, Y_j)` for each negative; both average to
    :math:`\hat A`.

Variance and covariance
    For ``k`` predictors scored on the same images, with :math:`S_{10}` and :math:`S_{01}` the
    ``k x k`` unbiased sample covariances of the components over the positives and over the negatives,
    the covariance of the ``k`` AUCs is :math:`S = S_{10}/m + S_{01}/n`. It needs at least two images
    of each label; with fewer it is NaN (the AUC itself stays defined).

Fast computation (Sun & Xu 2014)
    With :math:`T_z` the midranks of a predictor's scores over all ``m + n`` images, :math:`T_x` over
    the positives alone and :math:`T_y` over the negatives alone,
    :math:`V_{10}(X_i) = (T_z(X_i) - T_x(X_i)) / n`, :math:`V_{01}(Y_j) = 1 - (T_z(Y_j) - T_y(Y_j)) / m`
    and :math:`\hat A = (\sum_i T_z(X_i) - m(m+1)/2) / (mn)`: three sorts, :math:`O(k\,N \log N)`
    instead of :math:`O(k\,mn)`. Midranks give ties exactly the half credit of :math:`\psi`.

Confidence interval
    The plain normal interval :math:`\hat A \pm z_{1-\alpha/2} \sqrt{S}`, clipped to [0, 1] (not a
    logit-scale interval). At an AUC of exactly 0 or 1 every component is constant, the variance is 0
    and the interval collapses to that point: a known limit of DeLong's estimate, not a certainty.

Paired test (DeLong 1988)
    Two predictors A and B on the same images:
    :math:`z = (\hat A_A - \hat A_B) / \sqrt{\operatorname{Var}(\hat A_A - \hat A_B)}` with
    :math:`\operatorname{Var}(\hat A_A - \hat A_B) = (1, -1)\, S\, (1, -1)^\top`, computed as the
    variance of the differences of the components (the same number, but never negative by rounding,
    and exactly 0 for identical predictors, for which the test reports z = 0 and p = 1). Two-sided
    :math:`p = 2\,(1 - \Phi(|z|))`.

Mean AUC of ``K`` models (e.g. the ``K`` folds' models)
    :math:`\operatorname{Var}(\bar A) = \mathbf 1^\top S\, \mathbf 1 / K^2`. When the models score the
    same images (hold-out, external test), ``S`` is the joint DeLong covariance of the ``K`` predictors,
    aligned by image id. When their images are disjoint (each fold's own validation split), the AUCs are
    independent and ``S`` is diagonal: :math:`\sum_k \operatorname{Var}(\hat A_k) / K^2`. A partial
    overlap is also treated as independent, which understates the variance when the shared images make
    the AUCs positively correlated.

References
    E. R. DeLong, D. M. DeLong, D. L. Clarke-Pearson (1988). Comparing the areas under two or more
    correlated receiver operating characteristic curves: a nonparametric approach. Biometrics 44(3), 837-845.

    X. Sun, W. Xu (2014). Fast implementation of DeLong's algorithm for comparing the areas under
    correlated receiver operating characteristic curves. IEEE Signal Processing Letters 21(11), 1389-1393.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

#: The columns of one prediction set given to :func:`paired_test` and :func:`mean_auc_ci`.
PREDICTION_COLUMNS = ("image_id", "label", "probability")


# ---------------------------------------------------------------------------------------------------------------------
# Which images count, and why an AUC is undefined


def _screen(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Drop unlabelled images; say why the AUC is undefined ("" when it is defined).

    ``labels`` has shape (n_images,) and ``scores`` (n_predictors, n_images), already checked against each
    other. Returns the labelled rows of both (empty when there are none) and the reason.
    """
    if labels.size == 0:
        return labels, scores, "no images"
    known = ~np.isnan(labels)
    labels, scores = labels[known], scores[:, known]
    if labels.size == 0:
        return labels, scores, "class not labelled in this data"
    if np.isnan(scores).all():
        return labels, scores, "class not predicted by the model"
    if not np.isfinite(scores).all():
        return labels, scores, "non-finite probabilities"
    values = np.unique(labels)
    if values.size < 2:
        return labels, scores, f"only label {int(values[0])} present ({labels.size} images)"
    return labels, scores, ""


def _variance_reason(n_pos: int, n_neg: int) -> str:
    """Why the DeLong variance is undefined although the AUC is ("" when it is defined)."""
    if n_pos >= 2 and n_neg >= 2:
        return ""
    return f"{n_pos} positive and {n_neg} negative images: the DeLong variance needs at least 2 of each"


def _as_labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` as floats of shape (n_images,), ``scores`` as floats of shape (n_predictors, n_images)."""
    labels = np.asarray(labels, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if scores.ndim == 1:
        scores = scores[np.newaxis, :]
    if labels.ndim != 1 or scores.ndim != 2 or scores.shape[1] != labels.shape[0]:
        raise ValueError(
            f"expected labels of shape (n_images,) and scores of shape (n_images,) or (n_predictors, n_images); "
            f"got labels {labels.shape} and scores {scores.shape}"
        )
    known = labels[~np.isnan(labels)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0, 1 or NaN; got values {np.unique(known).tolist()}")
    return labels, scores


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
    labels, probs, reason = _screen(labels.ravel(), probs.reshape(1, -1))
    if reason:
        return math.nan, reason
    return float(roc_auc_score(labels, probs[0])), ""


# ---------------------------------------------------------------------------------------------------------------------
# Fast DeLong (Sun & Xu 2014)


def _components(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (k,), structural components V10 (k, m) over the positives and V01 (k, n) over the negatives."""
    m, n = int(positive.sum()), int((~positive).sum())
    t_z = rankdata(scores, method="average", axis=1)
    t_x = rankdata(scores[:, positive], method="average", axis=1)
    t_y = rankdata(scores[:, ~positive], method="average", axis=1)
    v10 = (t_z[:, positive] - t_x) / n
    v01 = 1.0 - (t_z[:, ~positive] - t_y) / m
    aucs = (t_z[:, positive].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    return aucs, v10, v01


def _sample_covariance(components: np.ndarray) -> np.ndarray:
    """Unbiased (k, k) covariance of components (k, size); NaN, without a warning, when size < 2."""
    k, size = components.shape
    if size < 2:
        return np.full((k, k), np.nan)
    centred = components - components.mean(axis=1, keepdims=True)
    return centred @ centred.T / (size - 1)


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of ``k`` predictors scored on the same images and their DeLong covariance (fast DeLong).

    Parameters
    ----------
    labels : array-like of shape (n_images,)
        0/1, with both values present and no NaN (:func:`auc_ci` and :func:`delong_test` screen their input
        and give a reason instead).
    scores : array-like of shape (n_predictors, n_images) or (n_images,)
        One row per predictor; a single row may be given as a 1-D array.

    Returns
    -------
    aucs : ndarray of shape (n_predictors,)
        Mann-Whitney AUCs, ties counted half (equal to ``sklearn.metrics.roc_auc_score``).
    covariance : ndarray of shape (n_predictors, n_predictors)
        :math:`S_{10}/m + S_{01}/n`; NaN when there are fewer than 2 positives or 2 negatives.

    Raises
    ------
    ValueError
        When the shapes disagree, a label is not 0 or 1, only one label is present, or a score is not finite.

    Examples
    --------
    >>> aucs, cov = delong_covariance([0, 0, 1, 1], [[0.1, 0.4, 0.35, 0.8], [0.1, 0.2, 0.3, 0.4]])
    >>> aucs.tolist()
    [0.75, 1.0]
    """
    labels, scores = _as_labels_and_scores(labels, scores)
    if np.isnan(labels).any():
        raise ValueError(f"{int(np.isnan(labels).sum())} labels are NaN; drop unlabelled images first or use auc_ci")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        raise ValueError(f"both labels are needed for an AUC; got {m} positive and {n} negative images")
    aucs, v10, v01 = _components(positive, scores)
    return aucs, _sample_covariance(v10) / m + _sample_covariance(v01) / n


# ---------------------------------------------------------------------------------------------------------------------
# One AUC with its CI


@dataclass(frozen=True)
class AucEstimate:
    """An AUC with its DeLong variance and confidence interval.

    ``reason`` is "" when everything is defined. Otherwise it says what is not: the AUC (then every number
    is NaN), or only the variance (then ``auc`` keeps its value and ``variance``, ``ci_low``, ``ci_high``
    are NaN). ``n_pos`` and ``n_neg`` count the labelled images. For a mean over sets (:func:`mean_auc_ci`),
    ``n_sets`` sets were averaged and ``n_sets_missing`` left out for the reasons in ``missing_reason``;
    a single AUC is one set.
    """

    auc: float
    variance: float
    ci_low: float
    ci_high: float
    n_pos: int
    n_neg: int
    reason: str
    n_sets: int = 1
    n_sets_missing: int = 0
    missing_reason: str = ""


def z_critical(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1; got level={level!r}")
    return float(norm.ppf(0.5 + level / 2.0))


def _estimate(auc: float, variance: float, level: float, n_pos: int, n_neg: int, reason: str, **sets) -> AucEstimate:
    """Fill in the clipped normal CI; NaN where the variance is NaN."""
    half = z_critical(level) * math.sqrt(variance) if math.isfinite(variance) else math.nan
    low = max(0.0, auc - half) if math.isfinite(half) else math.nan
    high = min(1.0, auc + half) if math.isfinite(half) else math.nan
    return AucEstimate(auc, variance, low, high, n_pos, n_neg, reason, **sets)


def auc_ci(labels, scores, level: float = 0.95) -> AucEstimate:
    """AUC of one predictor with its DeLong variance and a normal confidence interval.

    The interval is the plain normal one, ``auc ± z * sqrt(variance)`` with ``z`` the ``(1 + level) / 2``
    normal quantile, clipped to [0, 1]; it is not computed on the logit scale.

    Parameters
    ----------
    labels : array-like of shape (n_images,)
        0/1; NaN rows (image not labelled for this class) are ignored.
    scores : array-like of shape (n_images,)
        The predictor's probabilities.
    level : float, default=0.95
        Confidence level of the interval.

    Returns
    -------
    AucEstimate
        NaNs and the reason (the same as :func:`class_auc`'s) when the AUC is undefined; the AUC with NaN
        variance and CI, and a reason, when there are fewer than 2 positives or 2 negatives.

    Raises
    ------
    ValueError
        When the shapes disagree, a label is not 0, 1 or NaN, or ``level`` is not in (0, 1).

    Examples
    --------
    >>> est = auc_ci([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> est.auc, est.reason
    (0.75, '')
    """
    labels, scores = _as_labels_and_scores(labels, scores)
    if scores.shape[0] != 1:
        raise ValueError(f"auc_ci scores one predictor; got scores of shape {scores.shape} (use delong_covariance)")
    z_critical(level)
    labels, scores, reason = _screen(labels, scores)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if reason:
        return AucEstimate(math.nan, math.nan, math.nan, math.nan, n_pos, n_neg, reason)
    aucs, covariance = delong_covariance(labels, scores)
    return _estimate(float(aucs[0]), float(covariance[0, 0]), level, n_pos, n_neg, _variance_reason(n_pos, n_neg))


# ---------------------------------------------------------------------------------------------------------------------
# DeLong's paired test


@dataclass(frozen=True)
class PairedTest:
    """DeLong's paired test of two predictors on the same images.

    ``difference`` is ``auc_a - auc_b`` and ``z`` its DeLong z statistic (positive when A is better);
    ``p_value`` is two-sided. ``n_images`` counts the labelled images the test used (``n_pos + n_neg``).
    ``reason`` is "" when the test is defined; otherwise it says why ``z`` and ``p_value`` (and the AUCs,
    when they are undefined too) are NaN.
    """

    auc_a: float
    auc_b: float
    difference: float
    z: float
    p_value: float
    n_images: int
    n_pos: int
    n_neg: int
    reason: str


def delong_test(labels, scores_a, scores_b) -> PairedTest:
    """DeLong's test of the difference between two correlated AUCs (same images, two-sided).

    Parameters
    ----------
    labels : array-like of shape (n_images,)
        0/1; NaN rows are ignored.
    scores_a, scores_b : array-like of shape (n_images,)
        The two predictors' probabilities for the same images, in the same order.

    Returns
    -------
    PairedTest
        For identical predictors the difference and its variance are exactly 0: ``z = 0`` and ``p = 1``.
        NaN and a reason when an AUC is undefined, when there are fewer than 2 positives or 2 negatives,
        or when the variance of the difference is 0 although the AUCs differ.

    Raises
    ------
    ValueError
        When the shapes disagree or a label is not 0, 1 or NaN.
    """
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"scores_a has shape {a.shape} but scores_b has shape {b.shape}")
    if a.ndim != 1:
        raise ValueError(f"expected scores of shape (n_images,); got {a.shape}")
    return mean_difference(labels, a[None], b[None])


def mean_difference(labels, scores_a: np.ndarray, scores_b: np.ndarray) -> PairedTest:
    """DeLong's test of ``mean(AUC of scores_a) - mean(AUC of scores_b)``, all predictors on the same images.

    Parameters
    ----------
    labels : array-like of shape (n_images,)
    scores_a, scores_b : arrays of shape (k_a, n_images) and (k_b, n_images)
        Aligned with ``labels``; one row per predictor (e.g. per fold's model).

    Returns
    -------
    PairedTest
        The variance of the contrast is that of the contrast of the components (>= 0, and exactly 0
        when both sides are the same predictors); ``auc_a``/``auc_b`` are the two means.
    """
    scores_a, scores_b = np.atleast_2d(np.asarray(scores_a, float)), np.atleast_2d(np.asarray(scores_b, float))
    weights_a, weights_b = np.full(len(scores_a), 1.0 / len(scores_a)), np.full(len(scores_b), 1.0 / len(scores_b))
    scores = np.vstack([scores_a, scores_b])
    labels, scores = _as_labels_and_scores(labels, scores)
    labels, scores, reason = _screen(labels, scores)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if reason:
        return PairedTest(math.nan, math.nan, math.nan, math.nan, math.nan, n_pos + n_neg, n_pos, n_neg, reason)
    positive = labels == 1
    aucs, v10, v01 = _components(positive, scores)
    weights = np.concatenate([weights_a, -weights_b])
    auc_a, auc_b = float(weights_a @ aucs[: len(weights_a)]), float(weights_b @ aucs[len(weights_a):])
    difference = auc_a - auc_b
    reason = _variance_reason(n_pos, n_neg)
    if reason:
        return PairedTest(auc_a, auc_b, difference, math.nan, math.nan, n_pos + n_neg, n_pos, n_neg, reason)
    s10, s01 = _sample_covariance((weights @ v10)[None]), _sample_covariance((weights @ v01)[None])
    variance = float(s10[0, 0] / n_pos + s01[0, 0] / n_neg)
    if variance == 0.0:
        if difference == 0.0:
            return PairedTest(auc_a, auc_b, 0.0, 0.0, 1.0, n_pos + n_neg, n_pos, n_neg, "")
        reason = "the DeLong variance of the difference is 0 although the AUCs differ: test undefined"
        return PairedTest(auc_a, auc_b, difference, math.nan, math.nan, n_pos + n_neg, n_pos, n_neg, reason)
    z = difference / math.sqrt(variance)
    return PairedTest(auc_a, auc_b, difference, z, float(2.0 * norm.sf(abs(z))), n_pos + n_neg, n_pos, n_neg, "")


# ---------------------------------------------------------------------------------------------------------------------
# Prediction sets given as frames: aligned by image id, never by row order


def _check_set(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """The set's three columns, sorted by image id; refuses missing columns and duplicated image ids."""
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{name}: missing column(s) {', '.join(missing)}; expected {', '.join(PREDICTION_COLUMNS)}; "
            f"got {', '.join(map(str, frame.columns))}"
        )
    duplicated = frame["image_id"][frame["image_id"].duplicated()].unique()
    if duplicated.size:
        shown = ", ".join(map(str, duplicated[:5]))
        raise ValueError(
            f"{name}: {duplicated.size} image_id(s) occur more than once (e.g. {shown}); a prediction set holds one "
            "row per image: select one class, fold and strategy first"
        )
    return frame.loc[:, list(PREDICTION_COLUMNS)].sort_values("image_id", kind="mergesort").reset_index(drop=True)


def _check_labels_agree(sets: list[pd.DataFrame], names: list[str]) -> None:
    """Refuse an image whose label differs between sets (NaN in both counts as agreement)."""
    stacked = pd.concat([s.assign(_set=name) for s, name in zip(sets, names, strict=True)], ignore_index=True)
    labels = stacked["label"].astype(float).fillna(-1.0)  # NaN vs NaN agrees; NaN vs 0 does not
    disagree = labels.groupby(stacked["image_id"]).nunique() > 1
    if disagree.any():
        ids = disagree.index[disagree.to_numpy()]
        shown = ", ".join(map(str, ids[:5]))
        raise ValueError(
            f"{', '.join(names)}: {len(ids)} shared image(s) have different labels (e.g. {shown}); "
            "the sets must come from the same label table"
        )


def paired_test(a: pd.DataFrame, b: pd.DataFrame) -> PairedTest:
    """DeLong's paired test of two prediction sets, aligned by ``image_id`` (inner join, never by row order).

    Parameters
    ----------
    a, b : DataFrame with columns image_id, label, probability
        One row per image, e.g. two models' predictions of one class on the same test set.

    Returns
    -------
    PairedTest
        :func:`delong_test` on the images both sets score (A is ``a``); NaN and the reason "no shared images"
        when they share none.

    Raises
    ------
    ValueError
        When a column is missing, an image_id occurs twice within a set, or a shared image has different labels.
    """
    a, b = _check_set(a, "set a"), _check_set(b, "set b")
    _check_labels_agree([a, b], ["set a", "set b"])
    joined = a.merge(b, on="image_id", how="inner", suffixes=("_a", "_b"), validate="one_to_one")
    if joined.empty:
        return PairedTest(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, "no shared images")
    joined = joined.sort_values("image_id", kind="mergesort")
    return delong_test(
        joined["label_a"].to_numpy(dtype=float),
        joined["probability_a"].to_numpy(dtype=float),
        joined["probability_b"].to_numpy(dtype=float),
    )


def mean_auc_ci(sets: list[pd.DataFrame], level: float = 0.95) -> AucEstimate:
    """The mean AUC of ``K`` prediction sets (e.g. the ``K`` folds' models) with a DeLong CI.

    The sets' images decide the variance (module docstring): all sets score the same labelled images →
    joint DeLong covariance, ``1ᵀ S 1 / K²`` (correlated AUCs); pairwise disjoint images → ``Σ var_k / K²``
    (independent AUCs); partial overlap → also ``Σ var_k / K²``, which understates the variance when the
    shared images correlate the AUCs. The interval is the clipped normal one of :func:`auc_ci`.

    Parameters
    ----------
    sets : list of DataFrame with columns image_id, label, probability
        One row per image in each set.
    level : float, default=0.95
        Confidence level of the interval.

    Returns
    -------
    AucEstimate
        Sets whose AUC is undefined are left out of the mean, as in the fold mean of the AUC matrix, and
        counted in ``n_sets_missing`` with their reasons in ``missing_reason``; ``n_sets`` sets are averaged.
        ``n_pos`` and ``n_neg`` count the distinct labelled images of the averaged sets (of all sets when none
        has an AUC). NaN and a reason when no set has an AUC; NaN variance and CI with a reason when a set
        has fewer than 2 positives or 2 negatives.

    Raises
    ------
    ValueError
        When a column is missing, an image_id occurs twice within a set, or an image has different labels in
        two sets.
    ValueError
        When ``level`` is not in (0, 1).
    """
    z_critical(level)
    names = [f"set {k}" for k in range(len(sets))]
    sets = [_check_set(s, name) for s, name in zip(sets, names, strict=True)]
    if not sets:
        return AucEstimate(math.nan, math.nan, math.nan, math.nan, 0, 0, "no prediction sets", n_sets=0)
    _check_labels_agree(sets, names)
    estimates = [auc_ci(s["label"].to_numpy(dtype=float), s["probability"].to_numpy(dtype=float), level) for s in sets]
    used = [s for s, e in zip(sets, estimates, strict=True) if not math.isnan(e.auc)]
    kept = [e for e in estimates if not math.isnan(e.auc)]
    missing_reason = "; ".join(sorted({e.reason for e in estimates if math.isnan(e.auc)}))
    counted = pd.concat(used or sets, ignore_index=True).drop_duplicates("image_id")
    n_pos, n_neg = int((counted["label"] == 1).sum()), int((counted["label"] == 0).sum())
    sets_info = {"n_sets": len(kept), "n_sets_missing": len(sets) - len(kept), "missing_reason": missing_reason}
    if not kept:
        reason = f"no set has an AUC ({missing_reason})"
        return AucEstimate(math.nan, math.nan, math.nan, math.nan, n_pos, n_neg, reason, **sets_info)

    k = len(kept)
    mean = float(np.mean([e.auc for e in kept]))
    labelled = [frozenset(s.loc[s["label"].notna(), "image_id"]) for s in used]
    variance_reasons = sorted({e.reason for e in kept if e.reason})
    if variance_reasons:
        return _estimate(mean, math.nan, level, n_pos, n_neg, "; ".join(variance_reasons), **sets_info)
    if all(ids == labelled[0] for ids in labelled[1:]):  # the same images: correlated AUCs
        wide = pd.concat(
            [s.loc[s["label"].notna()].set_index("image_id")["probability"].rename(i) for i, s in enumerate(used)],
            axis=1,
            join="inner",
        ).sort_index()
        labels = used[0].loc[used[0]["label"].notna()].set_index("image_id")["label"].reindex(wide.index)
        _, covariance = delong_covariance(labels.to_numpy(dtype=float), wide.to_numpy(dtype=float).T)
        variance = float(covariance.sum()) / k**2
    else:  # disjoint (independent) or partly shared (treated as independent)
        variance = float(sum(e.variance for e in kept)) / k**2
    return _estimate(mean, variance, level, n_pos, n_neg, "", **sets_info)


def mean_difference_test(sets_a: list[pd.DataFrame], sets_b: list[pd.DataFrame]) -> PairedTest:
    """DeLong's test of the difference between two mean AUCs, e.g. two strategies' K fold models.

    Every set is aligned by ``image_id`` on the images all of them score (inner join); the contrast
    ``mean(AUC_a) - mean(AUC_b)`` gets its variance from the joint DeLong covariance of all the
    predictors, so the correlation between models scored on the same images is accounted for.
    ``auc_a`` and ``auc_b`` are the two means on those shared images. With one set on each side this
    is :func:`paired_test`.

    Raises
    ------
    ValueError
        As :func:`paired_test`, for any of the sets.
    """
    if not sets_a or not sets_b:
        return PairedTest(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, "no prediction sets")
    names = [f"set a{k}" for k in range(len(sets_a))] + [f"set b{k}" for k in range(len(sets_b))]
    sets = [_check_set(s, name) for s, name in zip([*sets_a, *sets_b], names, strict=True)]
    _check_labels_agree(sets, names)
    wide = pd.concat([s.set_index("image_id")["probability"].rename(i) for i, s in enumerate(sets)], axis=1,
                     join="inner").sort_index()
    if wide.empty:
        return PairedTest(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, "no shared images")
    labels = sets[0].set_index("image_id")["label"].reindex(wide.index).to_numpy(dtype=float)
    ka = len(sets_a)
    values = wide.to_numpy(dtype=float).T
    return mean_difference(labels, values[:ka], values[ka:])


# ---------------------------------------------------------------------------------------------------------------------
# Multiple testing: adjusted p-values over a family of tests


def _p_values(p_values) -> tuple[np.ndarray, np.ndarray]:
    """``p_values`` as a float array and the mask of its defined (non-NaN) entries; refuses values outside [0, 1]."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"expected p-values of shape (n_tests,); got {p.shape}")
    known = ~np.isnan(p)
    if ((p[known] < 0) | (p[known] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1]; got {p[known][(p[known] < 0) | (p[known] > 1)].tolist()}")
    return p, known


def holm(p_values) -> np.ndarray:
    r"""Holm's step-down adjusted p-values (family-wise error rate, any dependence between the tests).

    With the ``m`` defined p-values sorted, :math:`p_{(1)} \le \dots \le p_{(m)}`, the adjusted value of the
    ``i``-th is :math:`\max_{j \le i} \min(1, (m - j + 1)\, p_{(j)})`; rejecting where it is below ``alpha``
    keeps the chance of any false rejection at most ``alpha`` (Holm 1979), whatever the tests' dependence.

    Parameters
    ----------
    p_values : array-like of shape (n_tests,)
        In [0, 1]; NaN (an undefined test) stays NaN and does not count in ``m``.

    Returns
    -------
    ndarray of shape (n_tests,)
        The adjusted p-values, in the input order.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03, 0.005]).round(6).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    return _adjusted(p_values, lambda sorted_p, m: (m - np.arange(m)) * sorted_p, np.maximum.accumulate)


def _adjusted(p_values, scale, monotone) -> np.ndarray:
    """Adjusted p-values of a step-wise procedure: the defined p-values sorted, ``scale(sorted, m)`` capped at 1,
    made monotone by ``monotone``, and put back in the input order (NaN stays NaN)."""
    p, known = _p_values(p_values)
    out = np.full(p.shape, np.nan)
    values = p[known]
    m = values.size
    if m:
        order = np.argsort(values, kind="mergesort")
        adjusted = np.empty(m)
        adjusted[order] = monotone(np.minimum(1.0, scale(values[order], m)))
        out[known] = adjusted
    return out


def benjamini_hochberg(p_values) -> np.ndarray:
    r"""Benjamini–Hochberg adjusted p-values (false discovery rate; valid for independent or positively dependent
    tests).

    With the ``m`` defined p-values sorted, the adjusted value of the ``i``-th is
    :math:`\min_{j \ge i} \min(1, m\, p_{(j)} / j)`; rejecting where it is below ``alpha`` keeps the expected
    share of false rejections among the rejections at most ``alpha`` (Benjamini & Hochberg 1995).

    Parameters
    ----------
    p_values : array-like of shape (n_tests,)
        In [0, 1]; NaN stays NaN and does not count in ``m``.

    Returns
    -------
    ndarray of shape (n_tests,)

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.005]).round(6).tolist()
    [0.02, 0.04, 0.04, 0.02]
    """
    return _adjusted(p_values, lambda sorted_p, m: sorted_p * m / np.arange(1, m + 1),
                     lambda scaled: np.minimum.accumulate(scaled[::-1])[::-1])
