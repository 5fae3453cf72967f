"""PadChest + CheXmask: fixture trees in the published file formats, built from the real X-rays in ../shared/data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from published import chexmask_row

from maskaudit.config import config_from_dict, load_config
from maskaudit.data.imaging import read_image, read_mask
from maskaudit.data.rle import decode_rle
from maskaudit.data.sources import make_source
from maskaudit.data.sources.base import Record, Rejected
from maskaudit.data.sources.padchest import PadChestSource
from maskaudit.data.store import prepare_store
from maskaudit.errors import MaskauditError

REPO = Path(__file__).resolve().parents[1]
LABEL_CYCLE = [
    "['pleural effusion', ' cardiomegaly']",
    "['normal']",
    "['pneumonia', 'infiltrates']",
    "['atelectasis ', 'Atelectasis']",
    "['pneumothorax']",
    "['cardiomegaly', 'aortic elongation']",
    "['effusion']",
    "['COPD signs', '']",
]


def lung_masks(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left lung (patient's left = image right), right lung, and a heart box, from one lungs mask."""
    height, width = mask.shape
    left, right = mask.copy(), mask.copy()
    left[:, : width // 2] = False
    right[:, width // 2 :] = False
    heart = np.zeros_like(mask)
    heart[height // 2 : height * 4 // 5, width * 2 // 5 : width * 3 // 5] = True
    return left, right, heart


def write_image16(src: Path, dst: Path) -> np.ndarray:
    dst.parent.mkdir(parents=True, exist_ok=True)
    gray16 = read_image(src, "gray").astype(np.uint16) * 257
    Image.fromarray(gray16).save(dst)
    return gray16


def build_padchest(cxr_dir: Path, root: Path, n_good: int = 30) -> dict:
    """A PadChest tree: ``images/<ImageDir>/<ImageID>``, the labels CSV, CheXmask's Padchest.csv, Invalid_images.csv.

    ``n_good`` kept rows (one per real image, ~2/3 as many patients), then one row of every
    awkward kind; returns the expected facts.
    """
    table = pd.read_csv(cxr_dir / "labels.csv").head(n_good + 8)
    images = root / "images"
    label_rows, mask_rows, truth = [], [], {}

    def add(i: int, image_id: str, *, labels: str, projection: str = "PA", dice: float = 0.9,
            write: bool = True, mask: bool = True, size_delta: int = 0, image_dir: int | None = None) -> None:
        src = table.iloc[i]
        image_dir = i % 2 if image_dir is None else image_dir
        if write:
            gray = write_image16(cxr_dir / src["image"], images / str(image_dir) / image_id)
            lungs = read_mask(cxr_dir / src["mask"])
            assert lungs.shape == gray.shape
        else:
            lungs = read_mask(cxr_dir / src["mask"])
        left, right, heart = lung_masks(lungs)
        truth[image_id] = {"lungs": lungs, "heart": heart}
        label_rows.append({
            "ImageID": image_id, "ImageDir": image_dir, "StudyDate_DICOM": 20140101,
            "PatientID": f"pat{i % 20:02d}", "PatientBirth": 1930.0 + i if i % 7 else "",
            "PatientSex_DICOM": "MF"[i % 2], "ViewPosition_DICOM": "POSTEROANTERIOR", "Projection": projection,
            "MethodProjection": "Manual review of DICOM fields", "Labels": labels,
            "Localizations": "[]", "LabelsLocalizationsBySentence": "[['normal']]", "labelCUIS": "[]",
        })  # fmt: skip
        if mask:  # OriginalResolution's form: numpy-array Landmarks, printed over many lines
            mask_rows.append(chexmask_row("ImageID", image_id, left, right, heart, dice=dice,
                                          height=lungs.shape[0] + size_delta))

    for i in range(n_good):
        labels = LABEL_CYCLE[i % len(LABEL_CYCLE)]
        if i == 3:
            labels = "['unchanged', 'cardiomegaly']"  # PadChest's lower case: kept by default, like the study
        add(i, f"good_{i:02d}.png", labels=labels, projection=("PA", "AP", "AP_horizontal")[i % 3])
    j = n_good
    add(j, "nolabels.png", labels="")
    add(j, "emptylist.png", labels="[]")
    add(j, "subopt.png", labels="['suboptimal study', 'cardiomegaly']")
    add(j, "exclude.png", labels="['exclude']")
    add(j, "Unchanged.png", labels="['Unchanged']")
    add(j, "lateral.png", labels="['normal']", projection="L")
    add(j, "unknownproj.png", labels="['normal']", projection="UNK")
    add(j + 1, "lowdice.png", labels="['pneumonia']", dice=0.65)
    add(j + 1, "edgedice.png", labels="['pneumonia']", dice=0.7)
    add(j + 2, "nomask.png", labels="['pneumonia']", mask=False)
    add(j + 3, "missingfile.png", labels="['pneumonia']", write=False)
    add(j + 4, "invalid.png", labels="['pneumonia']")
    add(j + 5, "badsize.png", labels="['pneumonia']", size_delta=3)
    label_rows.append(dict(label_rows[0]))  # a duplicate ImageID
    root.mkdir(parents=True, exist_ok=True)
    labels_csv = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    pd.DataFrame(label_rows).to_csv(labels_csv, index=True)  # the published leading unnamed index column
    chexmask_csv = root / "Padchest.csv"
    pd.DataFrame(mask_rows).to_csv(chexmask_csv, index=False)
    invalid_csv = root / "Invalid_images.csv"
    with invalid_csv.open("w", newline="") as handle:  # the study's file: no header, index + the row + path
        row = label_rows[[r["ImageID"] for r in label_rows].index("invalid.png")]
        csv.writer(handle).writerow([0, *row.values(), f"../../purrlab/padchest/{row['ImageDir']}/invalid.png"])
    return {"root": images, "labels_csv": labels_csv, "chexmask_csv": chexmask_csv, "invalid_csv": invalid_csv,
            "truth": truth, "n_good": n_good}  # fmt: skip


@pytest.fixture(scope="module")
def padchest(cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_padchest(cxr_dir, tmp_path_factory.mktemp("padchest"))


def data_section(tree: dict, **extra) -> dict:
    return {
        "source": "padchest", "root": str(tree["root"]), "labels_csv": str(tree["labels_csv"]),
        "chexmask_csv": str(tree["chexmask_csv"]), "invalid_csv": str(tree["invalid_csv"]), **extra,
    }  # fmt: skip


def source_of(tree: dict, **extra) -> PadChestSource:
    config = config_from_dict({"data": data_section(tree, **extra)})
    source = make_source(config)
    assert isinstance(source, PadChestSource)
    return source


def test_rules_and_reasons(padchest: dict):
    items = list(padchest and source_of(padchest).records())
    kept = {r.image_id: r for r in items if isinstance(r, Record)}
    rejected = {r.image_id: r.reason for r in items if isinstance(r, Rejected)}
    # every good row is kept (including lower-case 'unchanged') and badsize, which fails only at load;
    # rows without a usable CheXmask row are offered without masks (the store decides)
    without_masks = {"lowdice.png": "low CheXmask quality", "edgedice.png": "low CheXmask quality",
                     "nomask.png": "no CheXmask mask"}  # fmt: skip
    assert set(kept) == {f"good_{i:02d}.png" for i in range(padchest["n_good"])} | {"badsize.png", *without_masks}
    assert all(kept[i].no_masks == "" for i in kept if i not in without_masks)
    for image_id, kind in without_masks.items():
        assert kept[image_id].no_masks.startswith(kind) and "row " in kept[image_id].no_masks
    expected = {
        "nolabels.png": "no labels", "emptylist.png": "no labels", "subopt.png": "excluded label",
        "exclude.png": "excluded label", "Unchanged.png": "excluded label", "lateral.png": "projection not kept",
        "unknownproj.png": "projection not kept", "missingfile.png": "image file not found",
        "invalid.png": "invalid image", "good_00.png": "duplicate image id",
    }  # fmt: skip
    for image_id, kind in expected.items():
        assert rejected[image_id].startswith(kind), (image_id, rejected[image_id])
        assert "row " in rejected[image_id]
    assert "0.700 <= 0.7" in kept["edgedice.png"].no_masks
    # label cleaning: strip, lower-case, de-duplicate, 'pleural effusion' -> 'effusion'
    assert kept["good_00.png"].labels == {"cardiomegaly": 1, "pneumonia": 0, "atelectasis": 0, "pneumothorax": 0,
                                          "effusion": 1}  # fmt: skip
    assert kept["good_06.png"].labels["effusion"] == 1
    assert kept["good_11.png"].labels["atelectasis"] == 1
    assert sum(kept["good_01.png"].labels.values()) == 0
    record = kept["good_01.png"]
    assert record.patient_id == "pat01" and record.source_path == "1/good_01.png" and record.split is None
    assert record.metadata == {"birth_year": 1931, "sex": "F", "projection": "AP"}
    assert kept["good_00.png"].metadata["birth_year"] is None  # PatientBirth empty
    assert len({r.patient_id for r in kept.values()}) == 20


def test_options(padchest: dict):
    items = list(source_of(padchest, drop_unchanged_lowercase=True, min_dice_rca=0.6).records())
    kept = {r.image_id for r in items if isinstance(r, Record) and not r.no_masks}
    assert "good_03.png" not in kept and {"lowdice.png", "edgedice.png"} <= kept
    no_invalid = data_section(padchest)
    no_invalid.pop("invalid_csv")
    kept = {r.image_id for r in make_source(config_from_dict({"data": no_invalid})).records() if isinstance(r, Record)}
    assert "invalid.png" in kept
    with pytest.raises(MaskauditError, match="'effusion' instead of 'pleural effusion'"):
        source_of(padchest, classes=["pleural effusion"])


def test_load_and_store(padchest: dict, tmp_path: Path):
    source = source_of(padchest)
    record = next(r for r in source.records() if isinstance(r, Record) and r.image_id == "good_02.png")
    loaded = source.load(record)
    truth = padchest["truth"]["good_02.png"]
    assert loaded.image.dtype == np.uint16
    assert np.array_equal(loaded.rois["lungs"], truth["lungs"]) and np.array_equal(loaded.rois["heart"], truth["heart"])
    store = prepare_store(source, tmp_path / "prepared", 32, workers=1, progress=False)
    # the 16-bit PNGs stored with 8 bits after the per-image max scaling, as the study fed them (store.bits: 8)
    assert store.n == padchest["n_good"] and store.dtype == np.uint8 and store.rois == ["lungs", "heart"]
    bad = store.manifest.set_index("image_id").loc["badsize.png"]
    assert bad["status"] == "rejected" and bad["reason"].startswith("mask size mismatch")
    # `maskaudit check` finds the same reason from the PNG header alone
    problems = {r.image_id: source.header_problem(r) for r in source.records() if isinstance(r, Record)}
    assert problems.pop("badsize.png") == bad["reason"] and set(problems.values()) == {""}
    assert "badsize.png" in bad["reason"] and "CheXmask" in bad["reason"]
    kinds = store.counts()
    counts = dict(zip(kinds["reason"], kinds["count"], strict=True))
    assert counts["no labels"] == 2 and counts["excluded label"] == 3 and counts["projection not kept"] == 2
    assert counts["low CheXmask quality"] == 2 and counts["mask size mismatch"] == 1 and counts["no CheXmask mask"] == 1
    assert not store.kept["no_masks"].any() and store.masked.all()  # a training set keeps no image without masks
    assert store.kept[["birth_year", "sex", "projection"]].notna().any().all()


def test_config_paths_and_errors(padchest: dict, tmp_path: Path):
    base = padchest["labels_csv"].parent
    config_file = base / "audit.yaml"
    relative = {k: str(Path(v).relative_to(base)) for k, v in data_section(padchest).items() if k != "source"}
    config_file.write_text(yaml.safe_dump({"data": {"source": "padchest", **relative}}))
    config = load_config(config_file)
    assert config.data.root == padchest["root"] and config.classes[-1] == "effusion"
    with pytest.raises(MaskauditError, match="root.*folder not found"):
        config_from_dict({"data": data_section(padchest, root=str(tmp_path / "nowhere"))})
    with pytest.raises(MaskauditError, match="chexmask_csv.*file not found"):
        config_from_dict({"data": data_section(padchest, chexmask_csv=str(tmp_path / "none.csv"))})
    broken = tmp_path / "Padchest.csv"
    pd.read_csv(padchest["chexmask_csv"]).drop(columns=["Heart"]).to_csv(broken, index=False)
    with pytest.raises(MaskauditError, match="missing CheXmask column.*'Heart'"):
        source_of(padchest, chexmask_csv=str(broken))


def test_rle_columns_by_name(padchest: dict, tmp_path: Path):
    """CheXmask columns in another order still decode the right masks (chosen by name)."""
    frame = pd.read_csv(padchest["chexmask_csv"])
    shuffled = tmp_path / "Padchest.csv"
    frame[list(reversed(frame.columns))].to_csv(shuffled, index=False)
    source = source_of(padchest, chexmask_csv=str(shuffled))
    record = next(r for r in source.records() if isinstance(r, Record) and r.image_id == "good_05.png")
    truth = padchest["truth"]["good_05.png"]
    assert np.array_equal(source.load(record).rois["lungs"], truth["lungs"])
    row = frame.set_index("ImageID").loc["good_05.png"]
    left = decode_rle(row["Left Lung"], int(row["Height"]), int(row["Width"]))
    assert left[:, : left.shape[1] // 2].sum() == 0  # patient's left lung lies on the image's right


@pytest.mark.slow
def test_study_config_runs_end_to_end(padchest: dict, cxr_dir: Path, tmp_path: Path):
    from maskaudit.pipeline import Audit

    raw = yaml.safe_load((REPO / "configs" / "padchest.yaml").read_text())
    assert raw["image_size"] == 512 and raw["folds"] == 5 and raw["seed"] == 1907
    assert raw["model"]["arch"] == "densenet121" and raw["data"]["source"] == "padchest"
    raw["data"].update({k: v for k, v in data_section(padchest).items() if k != "source"})
    from test_chestxray14 import build as build_chestxray14

    nih = build_chestxray14(cxr_dir, tmp_path / "nih")["root"]
    assert raw["external"][0]["data"]["source"] == "chestxray14"
    raw["external"][0]["data"].update(root=str(nih), labels_csv=str(nih / "Data_Entry_2017.csv"),
                                      chexmask_csv=str(nih / "ChestX-Ray8.csv"))
    raw.update(image_size=32, folds=2, workers=1)
    raw["model"] = {"arch": "small_cnn", "weights": "none", "freeze": "none"}
    raw["train"] = {**raw.get("train", {}), "epochs": 1, "batch_size": 8}
    config = config_from_dict(raw, origin="configs/padchest.yaml", base=REPO / "configs")
    out = Audit.create(tmp_path / "run", config).run_all()
    assert (tmp_path / "run" / "report.html").is_file() or Path(out).is_file()
    manifest = pd.read_parquet(tmp_path / "run" / "prepared" / "manifest.parquet")
    assert (manifest["status"] == "kept").sum() == padchest["n_good"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "excluded label" in html
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert set(preds["dataset"]) == {"main", "chestxray14"}
    # the external set as the study used it: every image under `full`, the masked strategies where CheXmask has a mask
    scored = preds[preds["dataset"] == "chestxray14"].groupby("test_strategy")["image_id"].nunique()
    assert scored["full"] == 6 and set(scored.drop("full")) == {4} and len(scored) == len(config.eval_strategies)
    assert "all 6 scored under <code>full</code>, the 4 with masks under the masked strategies" in html
