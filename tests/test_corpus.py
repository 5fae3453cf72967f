"""A corpus of bad and awkward input, each kind with its exact outcome: kept (and stored right), or rejected with
its reason in the manifest, or a one-line error for the whole table. Built on the real X-rays in ../shared/data.

The rows go through the folder source and ``prepare_store`` (two workers, as a user runs it), then
``maskaudit check``'s summary of the manifest; the table-level kinds (a byte-order mark, ``;`` separators,
CRLF line ends, a ragged row) are read as whole files.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from maskaudit.config import AuditConfig, FolderData
from maskaudit.data.check import check_store
from maskaudit.data.imaging import read_image, read_mask
from maskaudit.data.sources.folder import FolderSource
from maskaudit.data.store import prepare_store
from maskaudit.errors import MaskauditError

# kind → what becomes of its row: "kept", or the start of its rejection reason
EXPECTED = {
    "png8": "kept", "png16": "kept", "rgba": "kept", "palette": "kept", "cmyk_jpeg": "kept",
    "exif_rotated": "kept", "coloured_mask": "kept", "unicode name": "kept", "all_ones_mask": "kept",
    "tiny_mask": "kept",
    "corrupt": "unreadable image or mask", "truncated": "unreadable image or mask",
    "empty_file": "unreadable image or mask", "bomb": "unreadable image or mask",
    "all_zero_image": "image all zero", "mask_mismatch": "mask size mismatch",
    "empty_mask": "empty ROI mask", "same_file": "duplicate image file: same image file as 'png8'",
    "label_missing": "label 'covid' not 0/1: missing", "label_two": "label 'covid' not 0/1: '2'",
    "label_minus_one": "label 'covid' not 0/1: '-1'", "label_yes": "label 'covid' not 0/1: 'yes'",
    "duplicate_id": "duplicate image id", "no_patient": "missing patient id",
    "escape": "image path leaves the data folder", "symlink_out": "image path leaves the data folder",
    "symlink_loop": "unreadable image", "too_long": "unreadable image", "nul_byte": "unreadable image",
    "directory": "unreadable image", "fifo": "unreadable image", "missing_image": "image file not found",
    "missing_mask": "mask file not found", "empty_path": "empty image path",
}  # fmt: skip


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` × ``height`` (a decompression bomb's header; one row of data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def corpus(cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("corpus") / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    table = pd.read_csv(cxr_dir / "labels.csv")
    gray, mask = read_image(cxr_dir / table.loc[0, "image"]), read_mask(cxr_dir / table.loc[0, "mask"])
    h, w = gray.shape
    rows, kinds, n = [], [], 0

    def variant(k: int) -> np.ndarray:
        """Image ``k``: the real X-ray, brightened differently, so that no two rows share a file."""
        return np.clip(gray.astype(int) * (90 - k) // 100 + k, 1, 255).astype(np.uint8)

    def row(kind: str, image: str | None = None, mask_name: str = "masks/m.png", label: str = "1",
            patient: str | None = None, image_id: str | None = None) -> None:
        nonlocal n
        n += 1
        kinds.append(kind)
        rows.append({"image": f"images/{kind}.png" if image is None else image, "mask": mask_name,
                     "image_id": kind if image_id is None else image_id,
                     "patient_id": f"p{n}" if patient is None else patient, "covid": label})

    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / "m.png")
    Image.fromarray(gray).save(root / "images" / "png8.png")
    row("png8")
    Image.fromarray(variant(1).astype(np.uint16) * 257).save(root / "images" / "png16.png")
    row("png16")
    Image.fromarray(variant(2)).convert("RGBA").save(root / "images" / "rgba.png")
    row("rgba")
    Image.fromarray(variant(3)).convert("P").save(root / "images" / "palette.png")
    row("palette")
    Image.fromarray(variant(4)).convert("CMYK").save(root / "images" / "cmyk_jpeg.jpg", quality=95)
    row("cmyk_jpeg", "images/cmyk_jpeg.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    Image.fromarray(np.ascontiguousarray(np.rot90(gray, 1))).save(root / "images" / "exif_rotated.jpg", exif=exif,
                                                                   quality=95)
    row("exif_rotated", "images/exif_rotated.jpg")
    coloured = np.zeros((h, w, 3), np.uint8)
    coloured[mask] = (255, 0, 0)
    Image.fromarray(coloured).save(root / "masks" / "coloured.png")
    Image.fromarray(variant(5)).save(root / "images" / "coloured_mask.png")
    row("coloured_mask", mask_name="masks/coloured.png")
    Image.fromarray(variant(6)).save(root / "images" / "ünï cöde.png")
    row("unicode name", "images/ünï cöde.png")
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(root / "masks" / "ones.png")
    Image.fromarray(variant(7)).save(root / "images" / "all_ones_mask.png")
    row("all_ones_mask", mask_name="masks/ones.png")
    tiny = np.zeros((h, w), np.uint8)
    tiny[h // 2, w // 2] = 255
    Image.fromarray(tiny).save(root / "masks" / "tiny.png")
    Image.fromarray(variant(8)).save(root / "images" / "tiny_mask.png")
    row("tiny_mask", mask_name="masks/tiny.png")

    (root / "images" / "corrupt.png").write_bytes(os.urandom(2048))
    row("corrupt")
    whole = (root / "images" / "png8.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    row("truncated")
    (root / "images" / "empty_file.png").write_bytes(b"")
    row("empty_file")
    _png_claiming(root / "images" / "bomb.png", 60000, 60000)
    row("bomb")
    Image.fromarray(np.zeros((h, w), np.uint8)).save(root / "images" / "all_zero_image.png")
    row("all_zero_image")
    Image.fromarray(gray[: h // 2]).save(root / "images" / "mask_mismatch.png")
    row("mask_mismatch")
    Image.fromarray(np.zeros((h, w), np.uint8)).save(root / "masks" / "zero.png")
    Image.fromarray(variant(9)).save(root / "images" / "empty_mask.png")
    row("empty_mask", mask_name="masks/zero.png")
    row("same_file", "images/png8.png", patient="someone else")

    for kind, label in (("label_missing", ""), ("label_two", "2"), ("label_minus_one", "-1"), ("label_yes", "yes")):
        row(kind, "images/png8.png", label=label)
    row("duplicate_id", "images/png16.png", image_id="png8")
    row("no_patient", "images/png16.png", patient="")
    row("escape", "../outside.png")
    (root.parent / "outside.png").write_bytes(whole)
    (root / "images" / "symlink_out.png").symlink_to(root.parent / "outside.png")
    row("symlink_out")
    (root / "images" / "symlink_loop.png").symlink_to(root / "images" / "symlink_loop.png")
    row("symlink_loop")
    row("too_long", "images/" + "x" * 5000 + ".png")
    row("nul_byte", "images/nul\x00byte.png")
    (root / "images" / "directory.png").mkdir()
    row("directory")
    os.mkfifo(root / "images" / "fifo.png")
    row("fifo")
    row("missing_image")
    row("missing_mask", "images/png16.png", "masks/none.png")
    row("empty_path", "")
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "labels.csv", index=False)
    config = FolderData(source="folder", labels_csv=root / "labels.csv", patient_column="patient_id",
                        id_column="image_id", classes=["covid"])
    source = FolderSource(config)
    store = prepare_store(source, root.parent / "prepared", 32, workers=2, progress=False, bits=16)
    return {"root": root, "kinds": kinds, "store": store, "config": config}


def test_the_corpus_has_every_kind(corpus: dict):
    assert len(EXPECTED) >= 30 and sorted(corpus["kinds"]) == sorted(EXPECTED)
    assert len(corpus["store"].manifest) == len(corpus["kinds"])  # one manifest row per input row, none dropped


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_kind_has_its_exact_outcome(corpus: dict, kind: str):
    entry = corpus["store"].manifest.iloc[corpus["kinds"].index(kind)]  # the manifest keeps the input order
    expected = EXPECTED[kind]
    if expected == "kept":
        assert entry["status"] == "kept", (kind, entry["reason"])
    else:
        assert entry["status"] == "rejected" and entry["reason"].startswith(expected), (kind, entry["reason"])
        assert "\n" not in entry["reason"]


def test_kept_kinds_are_stored_right(corpus: dict):
    store, root = corpus["store"], corpus["root"]
    kept = store.kept.set_index("image_id")
    assert store.dtype == np.uint16  # a 16-bit image among 8-bit ones widens the store, losslessly
    upright = store.images[kept.loc["exif_rotated", "index"], 0].astype(float)
    plain = store.images[kept.loc["png8", "index"], 0].astype(float)
    assert np.corrcoef(upright.ravel(), plain.ravel())[0, 1] > 0.98  # the EXIF-rotated JPEG is stored upright
    assert kept.loc["coloured_mask", "roi_fraction_roi"] == pytest.approx(kept.loc["png8", "roi_fraction_roi"])
    assert read_image(root / "images" / "rgba.png").ndim == 2  # alpha dropped, gray kept


def test_odd_masks_warn_in_the_data_check(corpus: dict):
    check = check_store(corpus["store"], AuditConfig(data=corpus["config"]))
    warnings = " ".join(check.warnings)
    assert "covers more than 95 %" in warnings and "covers less than 0.1 %" in warnings


TABLE = "image,mask,patient_id,covid\nimages/png8.png,masks/m.png,p1,1\nimages/png16.png,masks/m.png,p2,0\n"


@pytest.mark.parametrize("kind, text", [
    ("byte-order mark", "\ufeff" + TABLE),
    ("semicolons", TABLE.replace(",", ";")),
    ("tabs", TABLE.replace(",", "\t")),
    ("CRLF line ends", TABLE.replace("\n", "\r\n")),
])
def test_tables_as_spreadsheets_save_them_are_read(corpus: dict, kind: str, text: str):
    path = corpus["root"] / f"{kind}.csv"
    path.write_text(text, encoding="utf-8")
    source = FolderSource(FolderData(source="folder", labels_csv=path, patient_column="patient_id", classes=["covid"]))
    records = list(source.records())
    assert [r.patient_id for r in records] == ["p1", "p2"] and [r.labels["covid"] for r in records] == [1, 0], kind


def test_a_ragged_row_is_a_one_line_error(corpus: dict):
    path = corpus["root"] / "ragged.csv"
    path.write_text(TABLE + "images/png8.png,masks/m.png,p3,1,extra\n")
    source = FolderSource(FolderData(source="folder", labels_csv=path, patient_column="patient_id", classes=["covid"]))
    with pytest.raises(MaskauditError) as caught:
        list(source.records())
    assert str(caught.value).startswith(f"{path}: cannot read the labels CSV") and "\n" not in str(caught.value)
    assert "line 4" in str(caught.value)
