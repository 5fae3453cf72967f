import math

import numpy as np
import pandas as pd

from maskaudit.metrics import auc_by_fold, auc_matrix, delong_table, matrix_of
from maskaudit.stats import class_auc


def test_single_label_has_no_auc_and_a_reason():
    auc, reason = class_auc(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9]))
    assert math.isnan(auc) and "only label 1" in reason


def test_auc_matches_hand_value():
    auc, reason = class_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert reason == "" and auc == 0.75


def _predictions() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 30)  # one label per image, as in every real table
    rows = []
    for train in ("full", "no_roi"):
        for test in ("full", "no_roi"):
            for fold in range(3):
                for i, y in enumerate(labels):
                    score = float(y * 0.5 + rng.random() * 0.6)
                    rows.append(("main", "test", train, fold, test, f"i{i}", "a", float(y), score))
                    rows.append(("main", "test", train, fold, test, f"i{i}", "b", 0.0, rng.random()))
    columns = ["dataset", "split", "train_strategy", "fold", "test_strategy", "image_id", "class", "label",
               "probability"]
    return pd.DataFrame(rows, columns=columns)


def test_by_fold_and_matrix():
    by_fold = auc_by_fold(_predictions())
    assert len(by_fold) == 2 * 2 * 3 * 2
    assert by_fold.loc[by_fold["class"] == "b", "auc"].isna().all()
    assert (by_fold.loc[by_fold["class"] == "b", "reason"].str.contains("only label 0")).all()
    assert (by_fold.loc[by_fold["class"] == "a", "ci_low"] <= by_fold.loc[by_fold["class"] == "a", "auc"]).all()
    matrix = auc_matrix(_predictions(), by_fold)
    a = matrix_of(matrix, "a", "test", ["full", "no_roi"], ["full", "no_roi"])
    assert a.shape == (2, 2) and a.notna().all().all()
    expected = by_fold[(by_fold["class"] == "a") & (by_fold.train_strategy == "full")
                       & (by_fold.test_strategy == "no_roi")]["auc"].mean()
    assert a.loc["full", "no_roi"] == expected
    b = matrix[matrix["class"] == "b"]
    assert b["auc_mean"].isna().all() and (b["n_folds_missing"] == 3).all()


def test_matrix_ci_is_that_of_the_fold_mean_on_shared_images():
    """The folds' models score the same hold-out images: the CI of their mean comes from the joint covariance."""
    from maskaudit.stats import mean_auc_ci

    predictions = _predictions()
    matrix = auc_matrix(predictions, auc_by_fold(predictions))
    matrix = matrix.set_index(["class", "train_strategy", "test_strategy"])
    part = predictions[(predictions["class"] == "a") & (predictions["train_strategy"] == "full")
                       & (predictions["test_strategy"] == "no_roi")]
    expected = mean_auc_ci([g[["image_id", "label", "probability"]] for _, g in part.groupby("fold")])
    row = matrix.loc["a", "full", "no_roi"]
    assert row["ci_low"] == expected.ci_low and row["ci_high"] == expected.ci_high
    assert row["ci_low"] < row["auc_mean"] < row["ci_high"]


def test_delong_table_tests_every_cell_against_full_on_the_same_fold():
    table = delong_table(_predictions())
    a = table[table["class"] == "a"]
    assert len(a) == 3 * (3 + 1)  # three cells besides full→full: three folds and their mean
    assert ((a["p_value"] >= 0) & (a["p_value"] <= 1)).all() and (a["reference"] == "full→full").all()
    assert table.loc[table["class"] == "b", "p_value"].isna().all()  # no AUC, no test
