"""EXIF orientation: a camera's JPEG stored sideways is decoded, checked and stored upright, with its upright mask."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskaudit.config import FolderData, config_from_dict
from maskaudit.data.check import check_source
from maskaudit.data.imaging import image_header, read_image, read_mask, resize_pad
from maskaudit.data.sources.folder import FolderSource
from maskaudit.data.store import prepare_store, to_pixels

NAME = "drishtiGS_002"  # a real fundus photograph, 512 x 439 (wider than high), with its optic-disc mask
SIZE = 64

#: what each EXIF orientation asks of the stored (raw) array to show it upright (Pillow's exif_transpose)
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
    8: lambda a: np.rot90(a, k=1),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _sideways(fundus_dir: Path, root: Path) -> tuple[Path, Path]:
    """The real JPEG turned a quarter to the left and saved with orientation 6 (as a camera held upright
    writes it), beside its mask stored upright; both in ``root``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    upright = Image.open(fundus_dir / "images" / f"{NAME}.jpg")
    assert upright.size == (512, 439)
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "images" / f"{NAME}.jpg", exif=_exif(6), quality=95)
    shutil.copy(fundus_dir / "masks" / "disc" / f"{NAME}.png", root / "masks" / f"{NAME}.png")
    return root / "images" / f"{NAME}.jpg", root / "masks" / f"{NAME}.png"


def _config(root: Path) -> FolderData:
    pd.DataFrame({"image": [f"images/{NAME}.jpg"], "mask": [f"masks/{NAME}.png"], "image_id": [NAME],
                  "glaucoma": [1]}).to_csv(root / "labels.csv", index=False)
    return FolderData(source="folder", labels_csv=root / "labels.csv", id_column="image_id", classes=["glaucoma"],
                      color="rgb")


def test_a_sideways_jpeg_is_read_upright_and_its_header_agrees(fundus_dir: Path, tmp_path: Path) -> None:
    image_path, mask_path = _sideways(fundus_dir, tmp_path)
    with Image.open(image_path) as raw_file:
        assert raw_file.size == (439, 512) and raw_file.getexif()[0x0112] == 6  # stored sideways, tagged 6
        raw = np.asarray(raw_file.convert("RGB"))
    image = read_image(image_path, "rgb")
    assert image.shape == (439, 512, 3)
    np.testing.assert_array_equal(image, np.rot90(raw, k=-1))  # exactly the stored pixels, turned
    original = np.asarray(Image.open(fundus_dir / "images" / f"{NAME}.jpg").convert("RGB"), dtype=float)
    assert np.abs(image - original).mean() < 1.0  # the upright photograph again (up to JPEG re-encoding)
    header = image_header(image_path)
    assert (header.height, header.width, header.channels, header.kind) == (439, 512, 3, "jpeg")
    assert read_mask(mask_path).shape == (439, 512)


def test_a_sideways_jpeg_with_an_upright_mask_is_kept(fundus_dir: Path, tmp_path: Path) -> None:
    image_path, mask_path = _sideways(fundus_dir, tmp_path)
    source = FolderSource(_config(tmp_path))
    record = next(iter(source.records()))
    assert source.header_problem(record) == ""  # `maskaudit check`: no "mask size mismatch"
    data = {"source": "folder", "labels_csv": str(tmp_path / "labels.csv"), "id_column": "image_id",
            "classes": ["glaucoma"], "color": "rgb"}
    check = check_source(source, config_from_dict({"data": data}))
    assert (check.kept, check.rejected) == (1, 0)

    store = prepare_store(source, tmp_path / "prepared", SIZE, workers=1, progress=False)
    assert store.manifest["status"].tolist() == ["kept"] and store.manifest["reason"].tolist() == [""]
    with Image.open(image_path) as raw_file:
        upright = np.rot90(np.asarray(raw_file.convert("RGB")), k=-1)
    expected = to_pixels(resize_pad(upright, SIZE, "image"), 255).transpose(2, 0, 1)
    np.testing.assert_array_equal(store.images[0], expected)
    mask = read_mask(mask_path)
    assert store.kept.loc[0, "roi_fraction_roi"] == pytest.approx(mask.mean())
    np.testing.assert_array_equal(store.masks("roi", [0])[0], resize_pad(mask, SIZE, "mask"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_is_applied_to_images_and_masks(cxr_dir: Path, tmp_path: Path, orientation: int) -> None:
    """Lossless PNGs (eXIf chunk) of a real X-ray crop, 40 x 64: each tag gives exactly the turn it names."""
    raw = np.asarray(Image.open(sorted((cxr_dir / "images").glob("*.png"))[0]).convert("L"))[:40, :64]
    Image.fromarray(raw).save(tmp_path / "image.png", exif=_exif(orientation))
    mask = raw > np.median(raw)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png", exif=_exif(orientation))
    np.testing.assert_array_equal(read_image(tmp_path / "image.png"), UPRIGHT[orientation](raw))
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), UPRIGHT[orientation](mask))
    header = image_header(tmp_path / "image.png")
    assert (header.height, header.width) == ((64, 40) if orientation >= 5 else (40, 64))
