"""Chákṣu: the published Train/Test folder tree, built from the real fundus images in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskaudit.config import config_from_dict
from maskaudit.data.imaging import read_image, read_mask
from maskaudit.data.sources import make_source
from maskaudit.data.sources.base import Record, Rejected
from maskaudit.data.sources.chaksu import ChaksuSource, name_key, patient_of
from maskaudit.data.store import prepare_store
from maskaudit.errors import MaskauditError

# camera -> (image name pattern, image extension, extension the decision CSV gives the image)
# (the study's make_dataset.py maps the CSV's jpg -> JPG for Bosch, jpg -> png for Forus, tif -> JPG for Remidio)
CAMERAS = {"Bosch": ("P{p}_{i}", ".JPG", ".jpg"), "Forus": ("{n}", ".png", ".jpg"),
           "Remidio": ("IMG_{n}", ".JPG", ".tif")}  # fmt: skip


def build(fundus_dir: Path, root: Path) -> dict:
    """Chákṣu's published tree (Readme and dataset card): TIF fusion masks under ``4.0_OD_CO_Fusion_Images/<camera>/
    STAPLE`` with the Test tree's ``Remedio`` misspelling, per-expert masks beside them, the decision CSVs with their
    two names of the decision column, the extra Test-folder decision tables, and one ``GLAUCOMA  SUSUPECT``."""
    table = pd.read_csv(fundus_dir / "labels.csv")
    fusion = "4.0_OD_CO_Fusion_Images"
    k = 0
    for split in ("Train", "Test"):
        for camera, (pattern, ext, csv_ext) in CAMERAS.items():
            rows = []
            for j in range(3):
                src = table.iloc[k % len(table)]
                k += 1
                stem = pattern.format(p=j // 2 + (10 if split == "Test" else 1), i=j, n=100 + k)
                image_dir = root / split / "1.0_Original_Fundus_Images" / camera
                image_dir.mkdir(parents=True, exist_ok=True)
                rgb = read_image(fundus_dir / src["image"], "rgb")
                Image.fromarray(rgb).save(image_dir / f"{stem}{ext}", format="PNG" if ext == ".png" else "JPEG")
                disc, cup = read_mask(fundus_dir / src["mask"]), read_mask(fundus_dir / src["mask_cup"])
                fused = np.where(cup, 255, np.where(disc, 127, 0)).astype(np.uint8)  # disc ~127, cup ~255
                folder = "Remedio" if (split, camera) == ("Test", "Remidio") else camera
                mask_dir = root / split / fusion / folder / "STAPLE"
                mask_dir.mkdir(parents=True, exist_ok=True)
                if not (split == "Train" and camera == "Forus" and j == 2):  # one image without a mask
                    Image.fromarray(fused).save(mask_dir / f"{stem}.tif", format="TIFF")
                for other in ("Expert 1", f"{folder}/Majority"):  # other annotations: never the STAPLE fusion
                    (root / split / fusion / other).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.full_like(fused, 255)).save(root / split / fusion / other / f"{stem}.tif")
                decision = "GLAUCOMA SUSPECT" if src["glaucoma"] == 1 else "NORMAL"
                rows.append({"Images": f"{stem}{csv_ext}-{stem}-1{csv_ext}", "Expert.1": decision,
                             "Majority Decision" if camera == "Bosch" else "Glaucoma Decision": decision})
            column = "Majority Decision" if camera == "Bosch" else "Glaucoma Decision"
            if split == "Test" and camera == "Remidio":
                rows.append({"Images": "IMG_999.tif-IMG_999-1.tif", "Expert.1": "NORMAL", column: "NORMAL"})
                rows[0][column] = "MAYBE"
            if split == "Test" and camera == "Forus":
                rows[1][column] = "GLAUCOMA  SUSUPECT"  # the published misspelling
            decisions = root / split / "6.0_Glaucoma_Decision"
            (decisions / "Majority").mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(decisions / f"Glaucoma_Decision_Comparison_{camera}_majority.csv", index=False)
            if split == "Test":  # tables beside it that also say "majority" and the camera: not the decisions
                wrong = [{**r, column: "NORMAL"} for r in rows]
                pd.DataFrame(wrong).to_csv(decisions / f"Glaucoma_Decision_Majority_{camera}.csv", index=False)
                pd.DataFrame(wrong).rename(columns={column: "Glaucoma Decision"}).to_csv(
                    decisions / "Majority" / f"{camera}.csv", index=False)
    return {"root": root}


def test_naming_rules():
    assert name_key("Image101.JPG-Image101-1.tif") == "image101" and name_key("a/b/1.png") == "1"
    assert patient_of("Bosch", "P10_2") == "Bosch/P10" and patient_of("Remidio", "IMG_2431") == "Remidio/IMG_2431"
    assert patient_of("Forus", "P10_2") == "Forus/P10_2"


def test_chaksu(fundus_dir: Path, tmp_path: Path):
    build(fundus_dir, tmp_path / "chaksu")
    config = config_from_dict({"data": {"source": "chaksu", "root": str(tmp_path / "chaksu")}})
    source = make_source(config)
    assert isinstance(source, ChaksuSource) and source.rois == ("disc", "cup") and source.channels == 3
    items = list(source.records())
    kept = [r for r in items if isinstance(r, Record)]
    rejected = {r.image_id: r.reason for r in items if isinstance(r, Rejected)}
    assert len(kept) == 16
    # the Test tree's Remidio masks are found under the misspelt Remedio/STAPLE: no camera is lost
    test_remidio = [r for r in kept if r.image_id.startswith("Test/Remidio/")]
    assert len(test_remidio) == 2 and all("/Remedio/STAPLE/" in r.key.mask for r in test_remidio)
    assert all("/STAPLE/" in r.key.mask for r in kept)
    assert rejected["Train/Forus/106"].startswith("no STAPLE mask")
    assert rejected["Test/Remidio/img_999"].startswith("image file not found")
    assert rejected["Test/Remidio/img_116"].startswith("unknown decision")
    assert {r.split for r in kept if r.image_id.startswith("Test/")} == {"test"}
    assert {r.split for r in kept if r.image_id.startswith("Train/")} == {"train"}
    bosch = [r for r in kept if r.metadata == {"camera": "Bosch"}]
    train_patients = sorted(r.patient_id for r in bosch if r.image_id.startswith("Train/"))
    assert train_patients == ["Bosch/P1", "Bosch/P1", "Bosch/P2"]
    store = prepare_store(source, tmp_path / "prepared", 32, workers=1, progress=False)
    assert store.n == 16 and store.channels == 3 and store.rois == ["disc", "cup"]
    labels = pd.read_csv(fundus_dir / "labels.csv")
    truth = labels["glaucoma"].to_numpy().copy()
    truth[13] = 1  # Test/Forus's second row reads GLAUCOMA  SUSUPECT: a suspect
    assert store.labels.sum() == truth[[0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17]].sum()
    typo = store.kept.set_index("image_id").loc["Test/Forus/114", "glaucoma"]
    assert typo == 1
    assert all(source.header_problem(r) == "" for r in kept)
    record = kept[0]
    loaded = source.load(record)
    assert loaded.image.shape[2] == 3 and loaded.rois["cup"].sum() < loaded.rois["disc"].sum()
    assert not (loaded.rois["cup"] & ~loaded.rois["disc"]).any()


def test_missing_root(tmp_path: Path):
    with pytest.raises(MaskauditError, match="root.*folder not found"):
        config_from_dict({"data": {"source": "chaksu", "root": str(tmp_path / "none")}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskauditError, match="no Train/ or Test/"):
        make_source(config_from_dict({"data": {"source": "chaksu", "root": str(tmp_path / "empty")}}))


def test_masks_by_stem_within_the_split(fundus_dir: Path, tmp_path: Path):
    """A mask is found by the image's stem in its split; the camera folder, compared loosely, only breaks a tie."""
    from maskaudit.data.sources.chaksu import same_camera

    assert same_camera("Remedio", "Remidio") and same_camera("bosch", "Bosch") and not same_camera("Forus", "Bosch")
    root = tmp_path / "chaksu"
    build(fundus_dir, root)
    staple = root / "Train" / "4.0_OD_CO_Fusion_Images"
    # the same stem under another camera's STAPLE folder: the image's own camera wins
    (staple / "Forus" / "STAPLE" / "P1_0.tif").write_bytes((staple / "Bosch" / "STAPLE" / "P1_1.tif").read_bytes())
    # a camera folder under another name: the mask is still found by its stem
    (staple / "Remidio").rename(staple / "REMIDIO camera")
    source = make_source(config_from_dict({"data": {"source": "chaksu", "root": str(root)}}))
    kept = {r.image_id: r for r in source.records() if isinstance(r, Record)}
    assert kept["Train/Bosch/p1_0"].key.mask.endswith("Bosch/STAPLE/P1_0.tif")
    assert all("REMIDIO camera/STAPLE" in r.key.mask for i, r in kept.items() if i.startswith("Train/Remidio/"))
    assert len(kept) == 16


def test_check_warns_when_a_camera_is_lost(fundus_dir: Path, tmp_path: Path):
    """`maskaudit check` on the published tree: every camera kept; without Remidio's Test masks, a warning says so."""
    import shutil

    from maskaudit.data.check import check_config

    root = tmp_path / "chaksu"
    build(fundus_dir, root)
    config = config_from_dict({"data": {"source": "chaksu", "root": str(root)}, "folds": 2})
    (check,) = check_config(config)
    cameras = {g["value"]: g for g in check.groups if g["group"] == "camera"}
    assert {c: (g["found"], g["kept"]) for c, g in cameras.items()} == {"Bosch": (6, 6), "Forus": (6, 5),
                                                                       "Remidio": (7, 5)}
    # the fixture's two bad Remidio rows (an unknown decision, a missing file) warn; no mask is missing
    assert not any("no STAPLE mask" in w for w in check.warnings if w.startswith("camera Remidio"))
    shutil.rmtree(root / "Test" / "4.0_OD_CO_Fusion_Images" / "Remedio")
    (check,) = check_config(config)
    remidio = next(g for g in check.groups if g["group"] == "camera" and g["value"] == "Remidio")
    assert (remidio["found"], remidio["kept"]) == (7, 3)
    warning = next(w for w in check.warnings if w.startswith("camera Remidio"))
    assert "4 of 7 rows rejected" in warning and "no STAPLE mask 2" in warning
    # the hold-out set has lost its Remidio images: the warning that would have caught the Remedio misspelling
    assert any(w.startswith("split / camera test / Remidio: all 4 rows rejected") and "no STAPLE mask 2" in w
               for w in check.warnings)


@pytest.mark.slow
def test_study_config_checks_and_runs_on_the_published_tree(fundus_dir: Path, tmp_path: Path):
    """configs/chaksu.yaml with only data.root edited: `maskaudit check` passes, then the audit runs (tiny model)."""
    import yaml
    from typer.testing import CliRunner

    from maskaudit.cli import app
    from maskaudit.pipeline import Audit

    repo = Path(__file__).resolve().parents[1]
    build(fundus_dir, tmp_path / "chaksu")
    raw = yaml.safe_load((repo / "configs" / "chaksu.yaml").read_text())
    raw["data"]["root"] = str(tmp_path / "chaksu")  # the one line a user edits
    raw.update(image_size=32, folds=2, workers=1)
    raw["model"] = {"arch": "small_cnn", "weights": "none", "freeze": "none"}
    raw["train"] = {**raw["train"], "epochs": 1, "batch_size": 4}
    raw["analyses"] = {"run": []}
    (tmp_path / "chaksu.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    result = CliRunner().invoke(app, ["check", str(tmp_path / "chaksu.yaml")])
    assert result.exit_code == 0, result.output
    Audit.create(tmp_path / "run", config_from_dict(raw)).run_all()
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    test = predictions[predictions["split"] == "test"]
    assert test["image_id"].nunique() == 8  # every test image the tree offers, Remidio's too
    assert {i.split("/")[1] for i in test["image_id"].unique()} == {"Bosch", "Forus", "Remidio"}
