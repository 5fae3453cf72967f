import numpy as np
import pandas as pd
import pytest

from maskaudit.data.splits import load_splits, make_splits, save_splits
from maskaudit.errors import MaskauditError


def _kept(n_patients: int = 40, seed: int = 0, split: list | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_patients)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], per)
    n = len(patients)
    return pd.DataFrame({
        "index": np.arange(n),
        "image_id": [f"img{i}" for i in range(n)],
        "patient_id": patients,
        "a": rng.integers(0, 2, n),
        "b": (rng.random(n) < 0.2).astype(int),
        "split": split if split is not None else [None] * n,
    })


def _patients(kept: pd.DataFrame, idx: np.ndarray) -> set:
    return set(kept.set_index("index").loc[idx, "patient_id"])


def test_no_patient_crosses_train_val_test():
    kept = _kept()
    splits = make_splits(kept, ["a", "b"], test_fraction=0.2, folds=5, seed=1907)
    test = _patients(kept, splits.test)
    for k in range(5):
        train, val = _patients(kept, splits.train(k)), _patients(kept, splits.val(k))
        assert not (train & val) and not (train & test) and not (val & test)
    # every image in exactly one of test / a fold
    everything = np.concatenate([splits.test, *splits.folds])
    assert sorted(everything) == list(range(len(kept)))


def test_holdout_is_a_fifth_of_patients_and_deterministic():
    kept = _kept(50)
    first = make_splits(kept, ["a", "b"], 0.2, 5, seed=3)
    again = make_splits(kept, ["a", "b"], 0.2, 5, seed=3)
    assert len(_patients(kept, first.test)) == 10
    assert np.array_equal(first.test, again.test)
    assert all(np.array_equal(x, y) for x, y in zip(first.folds, again.folds, strict=True))
    other = make_splits(kept, ["a", "b"], 0.2, 5, seed=4)
    assert not np.array_equal(first.test, other.test)


def test_official_split_is_used_as_holdout():
    kept = _kept(20)
    official = ["test" if p in {"p000", "p001", "p002"} else "train" for p in kept["patient_id"]]
    kept["split"] = official
    splits = make_splits(kept, ["a"], 0.2, 3, seed=0)
    assert _patients(kept, splits.test) == {"p000", "p001", "p002"}


def test_official_split_crossing_patients_is_an_error():
    kept = _kept(10)
    kept["split"] = ["test"] + ["train"] * (len(kept) - 1)
    kept.loc[1, "patient_id"] = kept.loc[0, "patient_id"]
    with pytest.raises(MaskauditError, match="both test and train"):
        make_splits(kept, ["a"], 0.2, 3, seed=0)


def test_too_many_folds_names_the_numbers():
    kept = _kept(5)
    with pytest.raises(MaskauditError, match="folds=5 but only 4 patients"):
        make_splits(kept, ["a"], 0.2, 5, seed=0)


def test_roundtrip_through_json(tmp_path):
    kept = _kept(30)
    splits = make_splits(kept, ["a", "b"], 0.2, 4, seed=1)
    save_splits(tmp_path / "splits.json", splits, kept)
    back = load_splits(tmp_path / "splits.json", kept)
    assert np.array_equal(back.test, splits.test)
    assert all(np.array_equal(x, y) for x, y in zip(back.folds, splits.folds, strict=True))


def test_labels_too_rare_to_stratify_are_a_one_line_error():
    """Every combination of 8 labels is unique among 20 patients: sklearn cannot stratify 3 folds; say so plainly."""
    from maskaudit.data.splits import patient_folds

    labels = np.random.default_rng(0).integers(0, 2, size=(20, 8)).astype(float)
    with pytest.raises(MaskauditError, match=r"could not stratify 20 patients into 3 folds by their labels .*"
                                             r"lower `folds`, or audit fewer classes"):
        patient_folds(np.arange(20), labels, 3, 0)
