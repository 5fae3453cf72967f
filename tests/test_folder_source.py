"""The folder source: CSV rows to records and rejections, built in tmp_path from real X-rays."""

from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskaudit.config import FolderData
from maskaudit.data.imaging import read_image, read_mask
from maskaudit.data.sources.base import Record, Rejected
from maskaudit.data.sources.folder import FolderSource
from maskaudit.errors import MaskauditError

HEADER = ["image", "mask", "image_id", "patient_id", "covid", "sex", "age", "split"]


def copy_xrays(cxr_dir: Path, root: Path, count: int) -> list[str]:
    """Copy the first ``count`` real X-rays and masks under ``root``; returns their ids."""
    labels = pd.read_csv(cxr_dir / "labels.csv").head(count)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id in labels["image_id"]:
        for sub in ("images", "masks"):
            shutil.copy(cxr_dir / sub / f"{image_id}.png", root / sub / f"{image_id}.png")
    return list(labels["image_id"])


def write_csv(path: Path, rows: list[list[object]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def awkward(cxr_dir: Path, tmp_path: Path) -> Path:
    """A labels CSV whose rows 2-3 and 11 are good and rows 4-10 are each wrong in one way."""
    root = tmp_path / "data"
    ids = copy_xrays(cxr_dir, root, 4)
    Image.open(root / "images" / f"{ids[0]}.png").save(tmp_path / "outside.png")
    a, b, c, d = ids
    rows: list[list[object]] = [
        [f"images/{a}.png", f"masks/{a}.png", "A", "p1", 1, "M", 56, "Train"],  # row 2
        [f"images/{b}.png", f"masks/{b}.png", "B", "p2", 0, "", "", "TEST"],  # row 3
        ["images/absent.png", f"masks/{c}.png", "C", "p3", 1, "F", 40, ""],  # row 4: image missing
        [f"images/{c}.png", "masks/absent.png", "C2", "p3", 1, "F", 40, ""],  # row 5: mask missing
        [f"images/{c}.png", f"masks/{c}.png", "C3", "p3", 2, "F", 40, ""],  # row 6: label 2
        [f"images/{d}.png", f"masks/{d}.png", "D", "", 1, "F", 40, ""],  # row 7: no patient
        [f"images/{d}.png", f"masks/{d}.png", "A", "p4", 1, "F", 40, ""],  # row 8: repeats id A
        ["../outside.png", f"masks/{d}.png", "E", "p5", 0, "F", 40, ""],  # row 9: leaves the folder
        ["", f"masks/{d}.png", "F", "p6", 0, "F", 40, ""],  # row 10: empty path
        [f"images/{d}.png", f"masks/{d}.png", "G", "p7", "", "F", 40, ""],  # row 11: label missing
        [f"images/{d}.png", f"masks/{d}.png", "H", "p8", "1.0", "F", 33, "test"],  # row 12: good
    ]
    return write_csv(root / "labels.csv", rows)


def folder_config(csv_path: Path, **changes: object) -> FolderData:
    settings: dict[str, object] = {
        "source": "folder",
        "labels_csv": csv_path,
        "id_column": "image_id",
        "patient_column": "patient_id",
        "classes": ["covid"],
        "metadata_columns": ["sex", "age"],
        "split_column": "split",
    }
    settings.update(changes)
    return FolderData.model_validate(settings)


def test_awkward_rows_are_rejected_with_their_row_numbers(awkward: Path) -> None:
    items = list(FolderSource(folder_config(awkward)).records())
    assert len(items) == 11  # every data row, kept or rejected
    kept = [item for item in items if isinstance(item, Record)]
    assert [r.image_id for r in kept] == ["A", "B", "H"]
    rejected = {item.row: item for item in items if isinstance(item, Rejected)}
    expected = {
        4: "image file not found: images/absent.png",
        5: "mask file not found: masks/absent.png",
        6: "label 'covid' not 0/1: '2'",
        7: "missing patient id",
        8: "duplicate image id: 'A' (first on row 2)",
        9: "image path leaves the data folder",
        10: "empty image path",
        11: "label 'covid' not 0/1: missing",
    }
    assert sorted(rejected) == sorted(expected)
    for row, text in expected.items():
        assert rejected[row].reason.startswith(text), rejected[row].reason
        assert rejected[row].reason.endswith(f"(labels.csv row {row})")


def test_record_fields(awkward: Path) -> None:
    kept = [item for item in FolderSource(folder_config(awkward)).records() if isinstance(item, Record)]
    first, second, last = kept
    assert (first.patient_id, first.labels, first.split) == ("p1", {"covid": 1}, "train")
    assert first.metadata == {"sex": "M", "age": 56.0}
    assert second.metadata == {"sex": None, "age": None} and second.split == "test"
    assert last.labels == {"covid": 1} and last.split == "test"
    assert first.source_path.startswith("images/") and first.key.row == 2


def test_ids_default_to_the_file_stem(awkward: Path) -> None:
    source = FolderSource(folder_config(awkward, id_column=None, patient_column=None))
    kept = [item for item in source.records() if isinstance(item, Record)]
    for record in kept:
        assert record.image_id == Path(record.source_path).stem and record.patient_id == record.image_id
    reasons = [item.reason for item in source.records() if isinstance(item, Rejected)]
    assert any(reason.startswith("duplicate image id") for reason in reasons)


def test_missing_columns_are_listed_at_once(awkward: Path) -> None:
    config = folder_config(
        awkward, classes=["covid", "pneumonia"], patient_column="patient", split_column=None
    )
    with pytest.raises(MaskauditError) as info:
        FolderSource(config)
    message = str(info.value)
    assert str(awkward) in message and "'pneumonia'" in message and "'patient'" in message


def test_load_reads_image_and_masks(awkward: Path) -> None:
    source = FolderSource(folder_config(awkward))
    record = next(item for item in source.records() if isinstance(item, Record))
    loaded = source.load(record)
    np.testing.assert_array_equal(loaded.image, read_image(Path(record.key.image)))
    assert list(loaded.rois) == ["roi"] and loaded.rois["roi"].dtype == bool
    assert source.rois == ("roi",) and source.channels == 1
    again = pickle.loads(pickle.dumps(source))  # workers receive the source pickled
    np.testing.assert_array_equal(again.load(record).rois["roi"], loaded.rois["roi"])


def test_mask_size_mismatch_is_refused_when_loading(awkward: Path) -> None:
    rows = list(csv.reader(awkward.open()))
    mask = awkward.parent / rows[2][1]  # row 3's mask, a different size from row 2's image
    rows[1][1] = str(mask.relative_to(awkward.parent))
    write_csv(awkward, rows[1:], rows[0])
    source = FolderSource(folder_config(awkward))
    record = next(item for item in source.records() if isinstance(item, Record))
    with pytest.raises(MaskauditError, match=r"mask size mismatch: .*masks/.* row 2") as raised:
        source.load(record)
    assert source.header_problem(record) == str(raised.value)  # `maskaudit check` finds it from the headers
    others = [item for item in source.records() if isinstance(item, Record)][1:]
    assert others and all(source.header_problem(item) == "" for item in others)


def test_fundus_rgb_with_two_named_rois(fundus_dir: Path) -> None:
    config = FolderData(
        source="folder",
        labels_csv=fundus_dir / "labels.csv",
        id_column="image_id",
        classes=["glaucoma"],
        mask_columns={"cup": "mask_cup"},
        metadata_columns=["notching"],
        split_column="split",
        color="rgb",
    )
    source = FolderSource(config)
    assert source.rois == ("roi", "cup") and source.channels == 3
    items = list(source.records())
    assert len(items) == 101 and all(isinstance(item, Record) for item in items)
    assert sum(item.split == "test" for item in items) == 51
    loaded = source.load(items[0])
    assert loaded.image.shape[2] == 3 and loaded.image.dtype == np.uint8
    assert set(loaded.rois) == {"roi", "cup"}
    assert not np.any(loaded.rois["cup"] & ~loaded.rois["roi"])  # the cup lies inside the disc
    np.testing.assert_array_equal(loaded.rois["cup"], read_mask(fundus_dir / items[0].key.masks[1][1]))


def test_no_mask_column_means_no_roi(awkward: Path) -> None:
    source = FolderSource(folder_config(awkward, mask_column=None))
    assert source.rois == ()
    record = next(item for item in source.records() if isinstance(item, Record))
    assert source.load(record).rois == {}
