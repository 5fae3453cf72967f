"""ChestX-ray14 + CheXmask ChestX-Ray8.csv: published file formats, built from the real X-rays in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from published import chexmask_row

from maskaudit.config import config_from_dict
from maskaudit.data.imaging import read_image, read_mask
from maskaudit.data.sources import make_source
from maskaudit.data.sources.base import Record, Rejected
from maskaudit.data.sources.chestxray14 import ChestXray14Source


def build(cxr_dir: Path, root: Path) -> dict:
    table = pd.read_csv(cxr_dir / "labels.csv").head(8)
    entries, masks = [], []
    findings = ["Effusion|Cardiomegaly", "No Finding", "Pneumonia|Infiltration", "Pleural_Thickening|Atelectasis",
                "Pneumothorax", "", "Effusion", "Mass"]  # fmt: skip
    for i, src in table.iterrows():
        name = f"{i:08d}_000.png"
        folder = root / f"images_{1 + i % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if i != 7:  # row 7: image file missing
            Image_save(read_image(cxr_dir / src["image"], "gray"), folder / name)
        lungs = read_mask(cxr_dir / src["mask"])
        h, w = lungs.shape
        entries.append({
            "Image Index": name, "Finding Labels": findings[i], "Follow-up #": 0, "Patient ID": i // 2,
            "Patient Age": f"{40 + i:03d}Y" if i == 0 else 40 + i, "Patient Gender": "MF"[i % 2],
            "View Position": "PA", "OriginalImage[Width": w, "Height]": h,
            "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143, "Unnamed: 11": "",
        })  # fmt: skip
        if i != 4:  # row 4: no CheXmask row
            left = lungs.copy()
            left[:, : w // 2] = False
            masks.append(chexmask_row("Image Index", name, left, lungs & ~left, lungs[::-1],
                                      dice=0.5 if i == 6 else 0.85))
    pd.DataFrame(entries).to_csv(root / "Data_Entry_2017.csv", index=False)
    pd.DataFrame(masks).to_csv(root / "ChestX-Ray8.csv", index=False)
    return {"root": root, "table": table}


def Image_save(gray: np.ndarray, path: Path) -> None:  # noqa: N802
    from PIL import Image

    Image.fromarray(gray).save(path)


def test_chestxray14(cxr_dir: Path, tmp_path: Path):
    tree = build(cxr_dir, tmp_path)
    config = config_from_dict({"data": {"source": "chestxray14", "root": str(tmp_path),
                                        "labels_csv": str(tmp_path / "Data_Entry_2017.csv"),
                                        "chexmask_csv": str(tmp_path / "ChestX-Ray8.csv")}})  # fmt: skip
    source = make_source(config)
    assert isinstance(source, ChestXray14Source) and source.rois == ("lungs", "heart")
    items = list(source.records())
    kept = {r.image_id: r for r in items if isinstance(r, Record)}
    rejected = {r.image_id: r.reason for r in items if isinstance(r, Rejected)}
    # rows 4 and 6 lack a usable CheXmask row: offered without masks (scored under `full` as an external set)
    assert set(kept) == {f"{i:08d}_000.png" for i in (0, 1, 2, 3, 4, 6)}
    assert rejected["00000005_000.png"].startswith("no labels")
    assert kept["00000004_000.png"].no_masks.startswith("no CheXmask mask")
    assert kept["00000006_000.png"].no_masks.startswith("low CheXmask quality")
    assert not any(kept[f"{i:08d}_000.png"].no_masks for i in (0, 1, 2, 3))
    assert source.load(kept["00000004_000.png"]).rois == {}
    assert rejected["00000007_000.png"].startswith("image file not found")
    first = kept["00000000_000.png"]
    assert first.labels == {"cardiomegaly": 1, "pneumonia": 0, "atelectasis": 0, "pneumothorax": 0, "effusion": 1}
    assert first.metadata == {"age": 40, "sex": "M", "projection": "PA"} and first.patient_id == "0"
    assert sum(kept["00000001_000.png"].labels.values()) == 0
    assert kept["00000003_000.png"].labels["atelectasis"] == 1
    assert kept["00000003_000.png"].source_path == "images_002/images/00000003_000.png"
    loaded = source.load(first)
    assert np.array_equal(loaded.rois["lungs"], read_mask(cxr_dir / tree["table"].iloc[0]["mask"]))


def test_external_store_keeps_images_without_masks(cxr_dir: Path, tmp_path: Path):
    """As an external set (masks optional) every labelled image is kept; only those with a CheXmask mask are masked."""
    from maskaudit.data.store import prepare_store

    build(cxr_dir, tmp_path)
    config = config_from_dict({"data": {"source": "chestxray14", "root": str(tmp_path),
                                        "labels_csv": str(tmp_path / "Data_Entry_2017.csv"),
                                        "chexmask_csv": str(tmp_path / "ChestX-Ray8.csv")}})  # fmt: skip
    source = make_source(config)
    external = prepare_store(source, tmp_path / "external", 32, workers=1, progress=False, masks="optional")
    assert external.n == 6 and int(external.masked.sum()) == 4
    without = external.kept.loc[~external.masked, "image_id"].tolist()
    assert without == ["00000004_000.png", "00000006_000.png"]
    assert external.kept.loc[~external.masked, "no_masks"].str.startswith(("no CheXmask mask", "low CheXmask")).all()
    assert not external.masks("lungs")[~external.masked].any()  # an image without masks: never inside the ROI
    assert external.kept.loc[~external.masked, "roi_fraction_lungs"].isna().all()
    training = prepare_store(source, tmp_path / "training", 32, workers=1, progress=False)
    assert training.n == 4 and training.masked.all()
    reasons = training.manifest.set_index("image_id")["reason"]
    assert reasons["00000004_000.png"].startswith("no CheXmask mask: '00000004_000.png' not in ChestX-Ray8.csv")
