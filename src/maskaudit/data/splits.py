"""Patient-grouped hold-out test set and cross-validation folds (SPEC §3).

No patient is ever on two sides: the hold-out set and every fold are sets of patients, and
images follow their patient. Splits are computed once, saved as ``splits.json`` by patient
id (and image id), and read by every later stage.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from maskaudit.errors import MaskauditError
from maskaudit.rundir import read_json, write_json

#: Candidate hold-out draws examined when stratifying the hold-out set.
HOLDOUT_CANDIDATES = 64


@dataclass(frozen=True)
class Splits:
    """Image indices (into the store) of the hold-out test set and of each fold's validation part."""

    test: np.ndarray
    folds: list[np.ndarray]
    method: str

    def val(self, fold: int) -> np.ndarray:
        return self.folds[fold]

    def train(self, fold: int) -> np.ndarray:
        others = [part for k, part in enumerate(self.folds) if k != fold]
        return np.sort(np.concatenate(others))


def _label_key(labels: np.ndarray) -> np.ndarray:
    """One stratum per label combination (multi-label), as a string per image."""
    return np.array(["".join(str(int(v)) for v in row) for row in labels])


def _prevalence_gap(labels: np.ndarray, test_mask: np.ndarray) -> float:
    if labels.shape[1] == 0 or test_mask.all() or not test_mask.any():
        return 0.0
    return float(np.abs(labels[test_mask].mean(0) - labels[~test_mask].mean(0)).max())


def holdout_split(
    patients: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of the hold-out images: ``test_fraction`` of the patients.

    Draws :data:`HOLDOUT_CANDIDATES` patient-grouped shuffles (scikit-learn's
    ``GroupShuffleSplit``, the study's splitter, seeded from ``seed``) and keeps the one whose
    class prevalences differ least between hold-out and the rest: grouped always, stratified
    as far as whole patients allow. The first candidate is exactly the study's split.
    """
    n_patients = np.unique(patients).size
    if n_patients < 2:
        raise MaskauditError(f"a hold-out split needs at least 2 patients, found {n_patients}")
    splitter = GroupShuffleSplit(n_splits=HOLDOUT_CANDIDATES, test_size=test_fraction, random_state=seed)
    best, best_gap = None, np.inf
    for _, test_idx in splitter.split(patients, groups=patients):
        mask = np.zeros(len(patients), dtype=bool)
        mask[test_idx] = True
        gap = _prevalence_gap(labels, mask)
        if gap < best_gap - 1e-12:
            best, best_gap = mask, gap
    assert best is not None
    return best


def patient_folds(patients: np.ndarray, labels: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """``n_folds`` patient-grouped folds, stratified on the label combination (StratifiedGroupKFold).

    Returns, per fold, the positions (into ``patients``) of its images.
    """
    n_patients = np.unique(patients).size
    if n_folds > n_patients:
        raise MaskauditError(
            f"folds={n_folds} but only {n_patients} patients remain after the hold-out split; "
            "lower `folds` or `test_fraction`"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only k members"
        try:
            folds = [val for _, val in splitter.split(patients, _label_key(labels), groups=patients)]
        except ValueError as exc:  # every combination of labels is rarer than the folds (sklearn's words follow)
            raise MaskauditError(
                f"could not stratify {n_patients} patients into {n_folds} folds by their labels ({exc}); "
                "lower `folds`, or audit fewer classes at once"
            ) from None
    if any(len(f) == 0 for f in folds):
        raise MaskauditError(f"could not make {n_folds} non-empty patient folds from {n_patients} patients")
    return folds


def make_splits(kept: pd.DataFrame, classes: list[str], test_fraction: float, folds: int, seed: int) -> Splits:
    """Split the kept images of a store (rows ordered by store index).

    An official split (the manifest's ``split`` column says ``test`` for some images, as in
    Chákṣu or Drishti-GS) is used as the hold-out set as it is; otherwise the hold-out set is
    drawn by :func:`holdout_split`.
    """
    patients = kept["patient_id"].astype(str).to_numpy()
    labels = kept[classes].to_numpy(dtype=float)
    index = kept["index"].to_numpy()
    official = kept["split"].astype("string").str.lower().eq("test").fillna(False).to_numpy(bool)
    if official.any():
        test_mask, method = official, "official hold-out, stratified patient-grouped folds"
        crossing = set(patients[official]) & set(patients[~official])
        if crossing:
            raise MaskauditError(
                f"the official split puts patient(s) {sorted(crossing)[:5]} in both test and train; "
                "fix the split column or drop `split_column`"
            )
    else:
        test_mask = holdout_split(patients, labels, test_fraction, seed)
        method = "patient-grouped hold-out (GroupShuffleSplit, least prevalence gap), stratified grouped folds"
    rest = np.flatnonzero(~test_mask)
    fold_pos = patient_folds(patients[rest], labels[rest], folds, seed)
    return Splits(
        test=np.sort(index[test_mask]),
        folds=[np.sort(index[rest[pos]]) for pos in fold_pos],
        method=method,
    )


def save_splits(path: Path, splits: Splits, kept: pd.DataFrame) -> None:
    """Write the splits by patient id and image id (readable without the store)."""
    by_index = kept.set_index("index")

    def describe(idx: np.ndarray) -> dict:
        rows = by_index.loc[idx]
        return {
            "patients": sorted(rows["patient_id"].astype(str).unique().tolist()),
            "images": rows["image_id"].astype(str).tolist(),
        }

    write_json(
        path,
        {
            "method": splits.method,
            "test": describe(splits.test),
            "folds": [describe(f) for f in splits.folds],
        },
    )


def load_splits(path: Path, kept: pd.DataFrame) -> Splits:
    """Read ``splits.json`` back into store indices; every image id must be in the store."""
    if not Path(path).is_file():
        raise MaskauditError(f"no splits at {path}; run `maskaudit split` first")
    raw = read_json(path)
    index_of = dict(zip(kept["image_id"].astype(str), kept["index"], strict=True))

    def indices(part: dict) -> np.ndarray:
        missing = [i for i in part["images"] if i not in index_of]
        if missing:
            raise MaskauditError(f"{path}: image {missing[0]!r} is not in the prepared store; rerun `split`")
        return np.sort(np.array([index_of[i] for i in part["images"]], dtype=np.int64))

    return Splits(test=indices(raw["test"]), folds=[indices(f) for f in raw["folds"]], method=raw["method"])


def split_count_table(kept: pd.DataFrame, splits: Splits, classes: list[str]) -> pd.DataFrame:
    """Per split (``hold-out test``, then ``fold 0``, ``fold 1`` …): images, patients, positives per class.

    Parameters
    ----------
    kept : DataFrame
        The store's kept rows (``index``, ``patient_id`` and the class columns).
    splits : Splits
        The hold-out set and folds, as store indices.
    classes : list of str
        The classes; one missing from ``kept`` is left out.

    Returns
    -------
    DataFrame
        Columns ``split``, ``images``, ``patients`` and ``<class> +`` per class: its positives with their
        share of the split's images, as text (``"7 (35 %)"``). ``split`` keeps it as the run's ``counts/splits``
        table (:meth:`maskaudit.rundir.RunDir.counts`), which the report reads.
    """
    parts = {"hold-out test": splits.test}
    parts.update({f"fold {k}": idx for k, idx in enumerate(splits.folds)})
    by_index = kept.set_index("index")
    rows = []
    for name, idx in parts.items():
        chosen = by_index.loc[idx]
        row = {"split": name, "images": len(idx), "patients": chosen["patient_id"].nunique()}
        for cls in (c for c in classes if c in chosen.columns):
            positives = int(np.nansum(pd.to_numeric(chosen[cls], errors="coerce").to_numpy(dtype=float)))
            row[f"{cls} +"] = f"{positives} ({100 * positives / max(len(idx), 1):.0f} %)"
        rows.append(row)
    return pd.DataFrame(rows)
