"""The same image file on two rows, and masks whose ROI covers (almost) the whole image or almost none of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskaudit.config import FolderData, config_from_dict
from maskaudit.data.check import check_source, check_store, read_check
from maskaudit.data.sources.folder import FolderSource
from maskaudit.data.store import prepare_store
from maskaudit.pipeline import Audit

SIZE = 32


def _folder(cxr_dir: Path, root: Path) -> Path:
    """Five rows of real X-rays: c lists a's very file under another id and patient, d a byte copy of b's file
    under another name (same patient), e is alone. Row numbers (header = 1): a 2, b 3, c 4, d 5, e 6."""
    labels = pd.read_csv(cxr_dir / "labels.csv").head(3)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    names = []
    for item in labels.itertuples():
        shutil.copy(cxr_dir / item.image, root / "images" / f"{item.image_id}.png")
        shutil.copy(cxr_dir / item.mask, root / "masks" / f"{item.image_id}.png")
        names.append(item.image_id)
    shutil.copy(root / "images" / f"{names[1]}.png", root / "images" / "copy_of_b.png")
    rows = [("a", names[0], names[0], "p1", 1), ("b", names[1], names[1], "p2", 0),
            ("c", names[0], names[0], "p3", 0), ("d", "copy_of_b", names[1], "p2", 1),
            ("e", names[2], names[2], "p4", 1)]
    pd.DataFrame([{"image": f"images/{image}.png", "mask": f"masks/{mask}.png", "image_id": image_id,
                   "patient_id": patient, "covid": label} for image_id, image, mask, patient, label in rows]
                 ).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def _data(labels_csv: Path) -> dict:
    return {"source": "folder", "labels_csv": str(labels_csv), "id_column": "image_id",
            "patient_column": "patient_id", "classes": ["covid"]}


def _source(labels_csv: Path) -> FolderSource:
    return FolderSource(FolderData(**_data(labels_csv)))


@pytest.fixture(scope="module")
def labels_csv(cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(cxr_dir, tmp_path_factory.mktemp("duplicates"))


def test_the_later_rows_with_the_same_file_are_rejected(labels_csv: Path, tmp_path: Path) -> None:
    store = prepare_store(_source(labels_csv), tmp_path / "one", SIZE, workers=1, progress=False)
    manifest = store.manifest.set_index("image_id")
    assert manifest["status"].to_dict() == {"a": "kept", "b": "kept", "c": "rejected", "d": "rejected", "e": "kept"}
    assert manifest.loc["c", "reason"] == "duplicate image file: same image file as 'a' (row 2, patient 'p1')"
    assert manifest.loc["d", "reason"] == "duplicate image file: same image file as 'b' (row 3)"
    assert store.kept["image_id"].tolist() == ["a", "b", "e"] and store.n == 3
    assert (manifest["same_file_as"] == "").all()
    counts = store.counts()
    assert counts.loc[counts["reason"] == "duplicate image file", "count"].tolist() == [2]

    # decided in input order: three workers finishing in any order make the same store, byte for byte
    again = prepare_store(_source(labels_csv), tmp_path / "three", SIZE, workers=3, progress=False)
    pd.testing.assert_frame_equal(again.manifest, store.manifest)
    np.testing.assert_array_equal(again.images, store.images)
    assert again.fingerprint == store.fingerprint


def test_the_check_of_prepare_counts_the_rejected_duplicates(labels_csv: Path, tmp_path: Path) -> None:
    config = config_from_dict({"data": _data(labels_csv), "strategies": ["full"], "folds": 2})
    store = prepare_store(_source(labels_csv), tmp_path / "prepared", SIZE, workers=1, progress=False)
    check = check_store(store, config)
    assert check.flagged == {"rejected: same image file as an earlier row": 2}
    assert ("2 rows rejected: their image file is byte-identical to an earlier row's (duplicate image file: same "
            "image file as 'a' (row 2, patient 'p1'), …); `data_checks.duplicate_images: warn` keeps such rows"
            ) in check.warnings
    # `maskaudit check` reads headers only: it cannot know, and says nothing of it
    headers = check_source(_source(labels_csv), config)
    assert headers.kept == 5 and headers.flagged == {}


def test_duplicate_images_warn_keeps_them_and_says_so(labels_csv: Path, tmp_path: Path) -> None:
    store = prepare_store(_source(labels_csv), tmp_path / "warn", SIZE, workers=2, progress=False,
                          duplicate_images="warn")
    manifest = store.manifest.set_index("image_id")
    assert (manifest["status"] == "kept").all() and store.n == 5
    assert manifest["same_file_as"].to_dict() == {"a": "", "b": "", "c": "'a' (row 2, patient 'p1')",
                                                  "d": "'b' (row 3)", "e": ""}
    np.testing.assert_array_equal(store.images[2], store.images[0])  # c is a's image
    config = config_from_dict({"data": _data(labels_csv), "strategies": ["full"], "folds": 2,
                               "data_checks": {"duplicate_images": "warn"}})
    check = check_store(store, config)
    assert check.flagged == {"kept: same image file as an earlier row": 2}
    assert ("2 kept images are the same image file as an earlier row ('c' is the file of 'a' (row 2, patient "
            "'p1'), …; data_checks.duplicate_images: warn): the same image may be in both the hold-out set and the "
            "training images") in check.warnings


def test_the_option_reaches_prepare_through_the_config(labels_csv: Path, tmp_path: Path) -> None:
    settings = {"image_size": SIZE, "workers": 1, "strategies": ["full"], "folds": 2, "analyses": {"run": []}}
    default = Audit.create(tmp_path / "default", config_from_dict({"data": _data(labels_csv), **settings}))
    warn = Audit.create(tmp_path / "warn", config_from_dict({"data": _data(labels_csv), **settings,
                                                             "data_checks": {"duplicate_images": "warn"}}))
    assert default.fingerprint("prepare") != warn.fingerprint("prepare")
    default.prepare()
    warn.prepare()
    assert default.store().n == 3 and warn.store().n == 5
    kept = read_check(warn.run.check("main"))
    assert kept is not None and kept.flagged == {"kept: same image file as an earlier row": 2}


# ------------------------------------------------------------------------------------------ mask coverage


def _coverage_folder(cxr_dir: Path, root: Path) -> Path:
    """Three real X-rays: one with its real lung mask, one whose mask is all ones (the ROI is the whole image),
    one whose mask is a 4 x 4 square (under 0.1 % of the image)."""
    labels = pd.read_csv(cxr_dir / "labels.csv").head(3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k, item in enumerate(labels.itertuples()):
        shutil.copy(cxr_dir / item.image, root / "images" / f"{item.image_id}.png")
        mask = np.asarray(Image.open(cxr_dir / item.mask)) > 0
        if k == 1:
            mask = np.ones_like(mask)
        elif k == 2:
            mask = np.zeros_like(mask)
            mask[100:104, 100:104] = True
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{item.image_id}.png")
        rows.append({"image": f"images/{item.image_id}.png", "mask": f"masks/{item.image_id}.png",
                     "image_id": f"x{k}", "covid": k % 2})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def test_a_whole_image_roi_and_a_near_empty_one_are_kept_with_a_warning(cxr_dir: Path, tmp_path: Path) -> None:
    csv = _coverage_folder(cxr_dir, tmp_path / "data")
    data = {"source": "folder", "labels_csv": str(csv), "id_column": "image_id", "classes": ["covid"]}
    store = prepare_store(FolderSource(FolderData(**data)), tmp_path / "prepared", SIZE, workers=1, progress=False)
    assert (store.manifest["status"] == "kept").all()
    fractions = store.kept.set_index("image_id")["roi_fraction_roi"]
    assert fractions["x1"] == 1.0 and fractions["x2"] < 0.001 and 0.2 < fractions["x0"] < 0.5
    check = check_store(store, config_from_dict({"data": data, "folds": 2}))
    assert check.flagged == {"ROI roi covers more than 95 %": 1, "ROI roi covers less than 0.1 %": 1}
    assert "1 image whose ROI roi covers more than 95 % of the image: no_roi leaves it blank (x1)" in check.warnings
    assert "1 image whose ROI roi covers less than 0.1 % of the image: only_roi leaves it (almost) blank (x2)" \
        in check.warnings
    # the bounds are the config's: at 20 % and 99 % the whole image and the square still warn, the lungs do not
    wider = check_store(store, config_from_dict({"data": data, "folds": 2, "data_checks": {
        "min_roi_fraction": 0.2, "max_roi_fraction": 0.99}}))
    assert wider.flagged == {"ROI roi covers more than 99 %": 1, "ROI roi covers less than 20 %": 1}
