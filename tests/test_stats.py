"""DeLong statistics: AUCs against scikit-learn, covariance against the O(m·n) definition, the paired test,
CI coverage on binormal data, the mean AUC of K sets, and NaN with a reason where an AUC is undefined."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from maskaudit.stats import auc_ci, class_auc, delong_covariance, delong_test, mean_auc_ci, paired_test


def _data(seed: int, n: int, k: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) with both values, and k correlated predictors (k, n); ``ties`` rounds scores to 1 decimal."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2], labels[2:4] = 0, 1
    shared = rng.normal(size=n)
    scores = labels * rng.uniform(0.3, 1.5, (k, 1)) + shared + rng.normal(scale=0.8, size=(k, n))
    return labels, np.round(scores, 1) if ties else scores


def _brute_force(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong, DeLong & Clarke-Pearson 1988 as written: psi over all (positive, negative) pairs, O(k·m·n)."""
    x, y = scores[:, labels == 1], scores[:, labels == 0]  # (k, m), (k, n)
    psi = (x[:, :, None] > y[:, None, :]) + 0.5 * (x[:, :, None] == y[:, None, :])  # (k, m, n)
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)  # (k, m), (k, n)
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return psi.mean(axis=(1, 2)), s10 / x.shape[1] + s01 / y.shape[1]


def _frame(ids, labels, probs) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(ids), "label": np.asarray(labels, float), "probability": probs})


# 1. AUCs equal scikit-learn's ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_aucs_equal_sklearn(k, ties):
    for seed in range(5):
        labels, scores = _data(seed, 150, k, ties)
        aucs, covariance = delong_covariance(labels, scores)
        assert aucs.shape == (k,) and covariance.shape == (k, k)
        expected = [roc_auc_score(labels, row) for row in scores]
        np.testing.assert_allclose(aucs, expected, rtol=0, atol=1e-12)
        assert auc_ci(labels, scores[0]).auc == pytest.approx(expected[0], abs=1e-12)


def test_one_dimensional_scores_are_one_predictor():
    labels, scores = _data(0, 40, 1, ties=True)
    aucs, covariance = delong_covariance(labels, scores[0])
    assert aucs.shape == (1,) and covariance.shape == (1, 1)


# 2. Covariance equals the O(m·n) definition ----------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_covariance_equals_brute_force(k, ties):
    for seed in range(5):
        labels, scores = _data(100 + seed, 120, k, ties)
        aucs, covariance = delong_covariance(labels, scores)
        expected_aucs, expected_cov = _brute_force(labels, scores)
        np.testing.assert_allclose(aucs, expected_aucs, rtol=0, atol=1e-12)
        np.testing.assert_allclose(covariance, expected_cov, rtol=0, atol=1e-12)


def test_heavy_ties_equal_brute_force():
    rng = np.random.default_rng(7)
    labels = np.r_[np.zeros(30), np.ones(25)]
    scores = rng.integers(0, 4, (3, 55)).astype(float)  # four score values only
    for got, want in zip(delong_covariance(labels, scores), _brute_force(labels, scores), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_paired_test_variance_is_the_contrast_of_the_covariance():
    labels, scores = _data(3, 200, 2, ties=True)
    aucs, cov = delong_covariance(labels, scores)
    result = delong_test(labels, scores[0], scores[1])
    contrast = np.array([1.0, -1.0])
    assert result.z == pytest.approx((aucs[0] - aucs[1]) / math.sqrt(contrast @ cov @ contrast), rel=1e-10)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(result.z)), rel=1e-10)


# 3. An independent implementation from PyPI (MLstatkit, a fast DeLong after Sun & Xu) ----------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_agrees_with_mlstatkit(ties):
    mlstatkit = pytest.importorskip("MLstatkit")
    for seed in range(3):
        labels, scores = _data(200 + seed, 180, 2, ties)
        z, p, ci_a, ci_b, auc_a, auc_b, info = mlstatkit.Delong_test(labels, scores[0], scores[1])
        assert info["method"] == "delong"
        ours = delong_test(labels, scores[0], scores[1])
        assert (ours.auc_a, ours.auc_b) == pytest.approx((auc_a, auc_b), abs=1e-12)
        assert ours.z == pytest.approx(-z, rel=1e-9)  # MLstatkit's z is (B - A) / SE
        assert ours.p_value == pytest.approx(p, rel=1e-9)
        for row, ci in ((scores[0], ci_a), (scores[1], ci_b)):
            estimate = auc_ci(labels, row)
            assert (estimate.ci_low, estimate.ci_high) == pytest.approx(ci, abs=1e-12)


# 4. Paired test ---------------------------------------------------------------------------------------------------


def test_identical_predictors_give_p_one(recwarn):
    labels, scores = _data(1, 100, 1, ties=True)
    result = delong_test(labels, scores[0], scores[0].copy())
    assert (result.difference, result.z, result.p_value, result.reason) == (0.0, 0.0, 1.0, "")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_perfect_beats_random():
    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(100), np.ones(100)]
    perfect = labels + rng.uniform(0, 0.5, 200)
    random = rng.uniform(0, 1, 200)
    result = delong_test(labels, perfect, random)
    assert result.auc_a == 1.0 and result.difference > 0.3 and result.z > 0
    assert result.p_value < 1e-6
    assert (result.n_images, result.n_pos, result.n_neg, result.reason) == (200, 100, 100, "")


def test_paired_test_aligns_by_image_id_not_row_order():
    labels, scores = _data(11, 150, 2, ties=True)
    ids = [f"img{i:03d}" for i in range(150)]
    a, b = _frame(ids, labels, scores[0]), _frame(ids, labels, scores[1])
    expected = paired_test(a, b)
    assert expected == delong_test(labels, scores[0], scores[1])
    shuffled = b.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert not shuffled["image_id"].equals(b["image_id"])
    assert paired_test(a, shuffled) == expected
    assert paired_test(a.sample(frac=1.0, random_state=1), shuffled) == expected


def test_paired_test_uses_the_shared_images_only():
    labels, scores = _data(12, 120, 2, ties=False)
    ids = np.array([f"i{i}" for i in range(120)])
    a = _frame(ids[:100], labels[:100], scores[0, :100])
    b = _frame(ids[20:], labels[20:], scores[1, 20:])
    result = paired_test(a, b)
    assert result == delong_test(labels[20:100], scores[0, 20:100], scores[1, 20:100])
    assert result.n_images == 80


def test_paired_test_without_shared_images():
    result = paired_test(_frame(["a", "b"], [0, 1], [0.1, 0.9]), _frame(["c", "d"], [0, 1], [0.2, 0.8]))
    assert result.reason == "no shared images" and result.n_images == 0
    assert math.isnan(result.auc_a) and math.isnan(result.p_value)


def test_paired_test_refuses_disagreeing_labels():
    a = _frame(["a", "b", "c", "d"], [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    b = _frame(["a", "b", "c", "d"], [0, 1, 1, 1], [0.1, 0.9, 0.2, 0.8])
    with pytest.raises(ValueError, match=r"1 shared image\(s\) have different labels \(e.g. c\)"):
        paired_test(a, b)
    with pytest.raises(ValueError, match="different labels"):  # labelled in one set, unlabelled in the other
        paired_test(a, _frame(["a", "b", "c", "d"], [0, 1, np.nan, 1], [0.1, 0.9, 0.2, 0.8]))


def test_paired_test_refuses_duplicated_ids():
    a = _frame(["a", "b", "c", "d"], [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    b = _frame(["a", "b", "b", "d"], [0, 1, 1, 1], [0.1, 0.9, 0.3, 0.8])
    with pytest.raises(ValueError, match=r"set b: 1 image_id\(s\) occur more than once \(e.g. b\)"):
        paired_test(a, b)


def test_paired_test_refuses_a_missing_column():
    a = _frame(["a", "b"], [0, 1], [0.1, 0.9]).rename(columns={"probability": "prob"})
    with pytest.raises(ValueError, match="set a: missing column.*probability"):
        paired_test(a, a)


def test_paired_test_with_one_positive_has_aucs_but_no_p():
    result = delong_test([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9], [0.1, 0.3, 0.2, 0.4])
    assert result.auc_a == 1.0 and result.auc_b == 1.0
    assert math.isnan(result.p_value) and "needs at least 2 of each" in result.reason


# 5. CI coverage ---------------------------------------------------------------------------------------------------


def test_ci_coverage_on_binormal_data():
    true_auc = norm.cdf(1 / math.sqrt(2))  # positives N(1, 1), negatives N(0, 1)
    rng = np.random.default_rng(2014)
    labels = np.r_[np.ones(100), np.zeros(100)]
    covered = 0
    draws = 400
    for _ in range(draws):
        scores = np.r_[rng.normal(1.0, 1.0, 100), rng.normal(0.0, 1.0, 100)]
        estimate = auc_ci(labels, scores)
        covered += estimate.ci_low <= true_auc <= estimate.ci_high
    assert 0.92 <= covered / draws <= 0.975


def test_ci_is_the_clipped_normal_interval():
    labels, scores = _data(21, 60, 1, ties=True)
    estimate = auc_ci(labels, scores[0], level=0.9)
    half = norm.ppf(0.95) * math.sqrt(estimate.variance)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((estimate.auc - half, estimate.auc + half))
    perfect = auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert (perfect.auc, perfect.variance, perfect.ci_low, perfect.ci_high) == (1.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1"):
        auc_ci(labels, scores[0], level=95)


def test_nan_labels_are_ignored():
    labels, scores = _data(22, 80, 1, ties=True)
    with_nan = labels.astype(float)
    with_nan[::7] = np.nan
    keep = ~np.isnan(with_nan)
    assert auc_ci(with_nan, scores[0]) == auc_ci(labels[keep], scores[0, keep])


# 6. Mean AUC of K sets --------------------------------------------------------------------------------------------


def test_mean_of_identical_copies_has_the_single_variance():
    labels, scores = _data(31, 150, 1, ties=True)
    ids = [f"img{i}" for i in range(150)]
    single = auc_ci(labels, scores[0])
    frames = [_frame(ids, labels, scores[0]).sample(frac=1.0, random_state=k) for k in range(5)]
    mean = mean_auc_ci(frames)
    assert mean.auc == pytest.approx(single.auc, abs=1e-12)
    assert mean.variance == pytest.approx(single.variance, rel=1e-12)  # perfectly correlated: not var / K
    assert (mean.ci_low, mean.ci_high) == pytest.approx((single.ci_low, single.ci_high), abs=1e-12)
    assert (mean.n_pos, mean.n_neg, mean.n_sets, mean.n_sets_missing, mean.reason) == (
        single.n_pos, single.n_neg, 5, 0, "")


def test_mean_on_the_same_images_uses_the_joint_covariance():
    labels, scores = _data(32, 150, 3, ties=False)
    ids = [f"img{i}" for i in range(150)]
    _, covariance = delong_covariance(labels, scores)
    mean = mean_auc_ci([_frame(ids, labels, row) for row in scores])
    assert mean.variance == pytest.approx(covariance.sum() / 9, rel=1e-12)


def test_mean_of_disjoint_sets_is_independent():
    frames, variances, aucs = [], [], []
    for k in range(4):
        labels, scores = _data(40 + k, 60, 1, ties=True)
        frames.append(_frame([f"fold{k}_img{i}" for i in range(60)], labels, scores[0]))
        estimate = auc_ci(labels, scores[0])
        variances.append(estimate.variance)
        aucs.append(estimate.auc)
    mean = mean_auc_ci(frames)
    assert mean.auc == pytest.approx(np.mean(aucs), abs=1e-12)
    assert mean.variance == pytest.approx(sum(variances) / 16, rel=1e-12)
    assert mean.n_pos + mean.n_neg == 240


def test_mean_leaves_out_undefined_sets_and_counts_them():
    labels, scores = _data(50, 80, 2, ties=True)
    good = [_frame([f"a{i}" for i in range(80)], labels, scores[0]),
            _frame([f"b{i}" for i in range(80)], labels, scores[1])]
    one_label = _frame(["c0", "c1", "c2"], [1, 1, 1], [0.2, 0.5, 0.9])
    mean = mean_auc_ci([good[0], one_label, good[1]])
    assert mean == replace(mean_auc_ci(good), n_sets_missing=1, missing_reason="only label 1 present (3 images)")
    assert (mean.n_sets, mean.reason) == (2, "")


def test_mean_refuses_labels_that_disagree_between_sets():
    a = _frame(["a", "b", "c", "d"], [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    with pytest.raises(ValueError, match="different labels"):
        mean_auc_ci([a, a.assign(label=[0, 1, 1, 1])])


# 7. Undefined cases: NaN and a reason, never 0.5 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "reason"),
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "only label 1 present (3 images)"),
        ([0, 0], [0.2, 0.5], "only label 0 present (2 images)"),
        ([], [], "no images"),
        ([np.nan, np.nan, np.nan], [0.2, 0.5, 0.9], "class not labelled in this data"),
        ([0, 1, 1], [0.2, np.nan, 0.9], "non-finite probabilities"),
    ],
)
def test_undefined_auc_is_nan_with_class_aucs_reason(labels, scores, reason):
    estimate = auc_ci(labels, scores)
    assert estimate.reason == reason == class_auc(np.array(labels, float), np.array(scores, float))[1]
    assert all(math.isnan(v) for v in (estimate.auc, estimate.variance, estimate.ci_low, estimate.ci_high))
    result = delong_test(labels, scores, scores)
    assert result.reason == reason and math.isnan(result.auc_a) and math.isnan(result.p_value)
    ids = [f"i{i}" for i in range(len(labels))]
    mean = mean_auc_ci([_frame(ids, labels, scores)])
    assert math.isnan(mean.auc) and reason in mean.reason and mean.n_sets == 0 and mean.n_sets_missing == 1


def test_one_positive_has_an_auc_but_no_variance(recwarn):
    estimate = auc_ci([0, 0, 0, 1], [0.1, 0.5, 0.3, 0.4])
    assert estimate.auc == pytest.approx(2 / 3)
    assert math.isnan(estimate.variance) and math.isnan(estimate.ci_low)
    assert estimate.reason == "1 positive and 3 negative images: the DeLong variance needs at least 2 of each"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_no_sets():
    mean = mean_auc_ci([])
    assert math.isnan(mean.auc) and mean.reason == "no prediction sets"


def test_delong_covariance_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="both labels are needed"):
        delong_covariance([1, 1], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="labels must be 0, 1 or NaN; got values \\[0.0, 2.0\\]"):
        delong_covariance([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"got labels \(3,\) and scores \(2, 2\)"):
        delong_covariance([0, 1, 1], [[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match="labels are NaN"):
        delong_covariance([0, 1, np.nan], [0.1, 0.2, 0.3])


def test_mean_difference_test_is_the_paired_test_for_one_set_each_and_a_contrast_of_the_joint_covariance():
    from maskaudit.stats import delong_covariance, mean_difference_test

    rng = np.random.default_rng(11)
    n = 120
    labels = rng.integers(0, 2, n).astype(float)
    ids = [f"img{i:03d}" for i in range(n)]
    scores = [labels * s + rng.normal(size=n) for s in (1.0, 0.8, 0.3, 0.2)]
    frames = [pd.DataFrame({"image_id": ids, "label": labels, "probability": x}).sample(frac=1, random_state=k)
              for k, x in enumerate(scores)]
    one = mean_difference_test(frames[:1], frames[2:3])
    pair = paired_test(frames[0], frames[2])
    assert one.z == pytest.approx(pair.z, rel=1e-12) and one.p_value == pytest.approx(pair.p_value, rel=1e-12)
    both = mean_difference_test(frames[:2], frames[2:])
    aucs, cov = delong_covariance(labels, np.vstack(scores))
    c = np.array([0.5, 0.5, -0.5, -0.5])
    assert both.difference == pytest.approx(c @ aucs, abs=1e-12)
    assert both.z == pytest.approx((c @ aucs) / np.sqrt(c @ cov @ c), rel=1e-9)
    same = mean_difference_test(frames[:2], frames[:2])
    assert same.difference == 0.0 and same.p_value == 1.0
