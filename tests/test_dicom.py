"""DICOM input, on the real DICOM files that pydicom ships in its package (never downloaded).

Every expected array comes from pydicom's own decode (``pixel_array``, ``apply_modality_lut``,
``apply_voi_lut``, ``convert_color_space``) followed by the conversions that
:mod:`maskaudit.data.dicom` documents, not from numbers written here.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space, get_decoder

from maskaudit.config import DicomOptions, FolderData, config_from_dict
from maskaudit.data.imaging import ImageHeader, image_header, read_image, read_mask, resize_pad
from maskaudit.data.pixels import wide_to_uint16
from maskaudit.data.sources.base import Record, Rejected
from maskaudit.data.sources.folder import FolderSource
from maskaudit.data.store import prepare_store, to_pixels
from maskaudit.errors import MaskauditError

NONE = DicomOptions(window="none")
AUTO = DicomOptions(window="auto")


def shipped(name: str) -> Path:
    """A DICOM file of pydicom's own package (skips if this pydicom does not ship it)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    local = {Path(p).resolve() for p in get_testdata_files(f"**/{name}")}
    assert Path(path).resolve() in local, f"{name} must come from the installed package"
    return Path(path)


def dataset(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(shipped(name))


def decodable(path: Path) -> bool:
    """Whether an installed pydicom plugin decodes ``path`` (what pydicom itself manages)."""
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018
    except Exception:  # any decoder failure: we then expect maskaudit's error instead
        return False
    return True


def write_copy(name: str, dest: Path, **changes: object) -> Path:
    """A real shipped file written again with pydicom, with some tags changed (None deletes)."""
    ds = dataset(name)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)
    return dest


def one_line_error(excinfo: pytest.ExceptionInfo[MaskauditError], path: Path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --------------------------------------------------------------------------------- gray images


def test_mr_without_window_keeps_the_stored_values_exactly() -> None:
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and "RescaleSlope" not in ds
    out = read_image(path, "gray", dicom=NONE)
    assert out.dtype == np.uint16 and out.shape == (64, 64)
    np.testing.assert_array_equal(out, ds.pixel_array)  # 127..2145: integral, in range, kept


def test_mr_window_auto_applies_the_files_window() -> None:
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" in ds and "WindowWidth" in ds
    expected = wide_to_uint16(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds))
    out = read_image(path, "gray", dicom=AUTO)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(read_image(path), out)  # auto is the default
    assert not np.array_equal(out, read_image(path, dicom=NONE))


def test_window_auto_without_a_window_is_none(tmp_path: Path) -> None:
    path = write_copy("MR_small.dcm", tmp_path / "nowindow.dcm", WindowCenter=None, WindowWidth=None)
    np.testing.assert_array_equal(read_image(path, dicom=AUTO), read_image(path, dicom=NONE))
    np.testing.assert_array_equal(read_image(path, dicom=AUTO), pydicom.dcmread(path).pixel_array)


def test_ct_rescale_is_applied_before_the_window() -> None:
    ct_small = shipped("CT_small.dcm")
    ds = pydicom.dcmread(ct_small)
    assert float(ds.RescaleIntercept) != 0 and "WindowCenter" not in ds
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert hu.min() < 0  # Hounsfield units: negative, so mapped linearly onto 0..65535
    np.testing.assert_array_equal(read_image(ct_small, dicom=AUTO), wide_to_uint16(hu))
    # a CT slice with rescale and window: the window is in rescaled (HU) units
    path = shipped("17106")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024 and "WindowCenter" in ds
    expected = wide_to_uint16(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds))
    out = read_image(path, dicom=AUTO)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, wide_to_uint16(apply_voi_lut(ds.pixel_array.astype(float), ds)))


def test_rescale_with_integral_results_is_kept_exactly(tmp_path: Path) -> None:
    path = write_copy("MR_small.dcm", tmp_path / "rescaled.dcm", RescaleSlope=1, RescaleIntercept=100)
    stored = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(read_image(path, dicom=NONE), stored.astype(np.int64) + 100)


def test_monochrome1_cr_is_inverted() -> None:
    path = shipped("6154")  # a real CR: MONOCHROME1, 12 bits stored, rescale and window
    ds = pydicom.dcmread(path)
    assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsStored) == ("CR", "MONOCHROME1", 12)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    top = (2**12 - 1) * slope + intercept  # max of the stored range after rescale
    rescaled = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(read_image(path, dicom=NONE), wide_to_uint16(top - rescaled))
    windowed = apply_voi_lut(rescaled, ds)  # pydicom maps the window onto the same range
    np.testing.assert_array_equal(read_image(path, dicom=AUTO), wide_to_uint16(top - windowed))


def test_monochrome1_is_max_minus_v_and_mirrors_monochrome2(tmp_path: Path) -> None:
    plain = write_copy("6154", tmp_path / "plain.dcm", RescaleSlope=None, RescaleIntercept=None)
    stored = pydicom.dcmread(plain).pixel_array
    np.testing.assert_array_equal(read_image(plain, dicom=NONE), 4095 - stored.astype(np.int64))
    # the same real file, only PhotometricInterpretation changed: the mirror image
    mono2 = write_copy("6154", tmp_path / "mono2.dcm", PhotometricInterpretation="MONOCHROME2")
    for window in (NONE, AUTO):
        one = read_image(shipped("6154"), dicom=window).astype(np.int64)
        two = read_image(mono2, dicom=window).astype(np.int64)
        assert np.abs(one + two - 65535).max() <= 1
        assert np.corrcoef(one.ravel(), two.ravel())[0, 1] < -0.999


def test_eight_bit_gray_stays_uint8() -> None:
    path = shipped("image_dfl.dcm")  # 8-bit MONOCHROME2, Deflated Explicit VR Little Endian
    out = read_image(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pydicom.dcmread(path).pixel_array)


def test_gray_file_as_rgb_is_three_copies() -> None:
    path = shipped("MR_small.dcm")
    gray, rgb = read_image(path, "gray"), read_image(path, "rgb")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, :, 0], rgb[:, :, 2])
    np.testing.assert_array_equal(rgb[:, :, 0], np.rint(gray / 257.0).astype(np.uint8))  # window: full range
    path = shipped("image_dfl.dcm")
    np.testing.assert_array_equal(read_image(path, "rgb"), np.repeat(read_image(path)[:, :, None], 3, axis=2))


def test_twelve_bit_gray_as_rgb_uses_its_own_range(tmp_path: Path) -> None:
    plain = write_copy("6154", tmp_path / "plain.dcm", RescaleSlope=None, RescaleIntercept=None)
    gray = read_image(plain, "gray", dicom=NONE)  # 0..4095 kept exactly
    rgb = read_image(plain, "rgb", dicom=NONE)
    np.testing.assert_array_equal(rgb[:, :, 1], np.rint(gray * (255.0 / 4095.0)).astype(np.uint8))


# --------------------------------------------------------------------------------- colour images


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_rgb_and_ybr_files_decode_to_rgb(name: str) -> None:
    path = shipped(name)
    ds = pydicom.dcmread(path)
    out = read_image(path, "rgb")
    assert out.dtype == np.uint8 and out.shape == (ds.Rows, ds.Columns, 3)
    np.testing.assert_array_equal(out, ds.pixel_array)
    if ds.PhotometricInterpretation != "RGB":  # YCbCr: pydicom's convert_color_space of the raw samples
        raw = pydicom.dcmread(path)
        raw.pixel_array_options(raw=True)
        np.testing.assert_array_equal(out, convert_color_space(raw.pixel_array, ds.PhotometricInterpretation, "RGB"))


def test_rgb_file_as_gray_is_pillow_luma() -> None:
    path = shipped("examples_rgb_color.dcm")
    rgb = read_image(path, "rgb")
    gray = read_image(path, "gray")
    assert gray.dtype == np.uint8 and gray.shape == rgb.shape[:2]
    np.testing.assert_array_equal(gray, np.asarray(Image.fromarray(rgb, "RGB").convert("L")))
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    assert np.abs(gray - luma).max() <= 1


def test_sixteen_bit_rgb_is_narrowed() -> None:
    path = shipped("SC_rgb_rle_16bit.dcm")  # RLE Lossless, decoded by pydicom itself
    stored = pydicom.dcmread(path).pixel_array
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(read_image(path, "rgb"), np.rint(stored / 257.0).astype(np.uint8))


def test_palette_colour_goes_through_the_lut() -> None:
    from pydicom.pixels import apply_color_lut

    path = shipped("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    lut = apply_color_lut(ds.pixel_array, ds)
    expected = lut if lut.dtype == np.uint8 else np.rint(lut / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(read_image(path, "rgb"), expected[:, :, :3])
    assert image_header(path).channels == 3


# ---------------------------------------------------------------------------------- compressed


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_compressed_files_decode_like_pydicom(name: str) -> None:
    path = shipped(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    if not decodable(path):
        with pytest.raises(MaskauditError) as excinfo:
            read_image(path)
        assert ds.file_meta.TransferSyntaxUID in one_line_error(excinfo, path)
        return
    if ds.SamplesPerPixel == 3:
        np.testing.assert_array_equal(read_image(path, "rgb"), ds.pixel_array)
    else:
        np.testing.assert_array_equal(read_image(path, dicom=NONE), wide_to_uint16(ds.pixel_array))


def test_no_installed_decoder_names_the_syntax_and_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    path = shipped("SC_rgb_jpeg_dcmtk.dcm")
    uid = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    decoder = get_decoder(uid)
    monkeypatch.setattr(decoder, "_available", {})  # as if pylibjpeg, gdcm and Pillow were not installed
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    with pytest.raises(MaskauditError) as excinfo:
        read_image(path, "rgb")
    message = one_line_error(excinfo, path)
    assert f"{uid.name} ({uid})" in message and "JPEG Baseline" in message and "1.2.840.10008.1.2.4.50" in message
    assert "pip install 'maskaudit[dicom]'" in message and "pylibjpeg-libjpeg" in message


def test_a_file_no_installed_decoder_manages_fails_clearly() -> None:
    path = shipped("JPEG-lossy.dcm")  # 12-bit JPEG Extended that libjpeg rejects; GDCM reads it
    if decodable(path):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(read_image(path, dicom=NONE), wide_to_uint16(ds.pixel_array))
        return
    with pytest.raises(MaskauditError) as excinfo:
        read_image(path)
    message = one_line_error(excinfo, path)
    assert "JPEG Extended" in message and "1.2.840.10008.1.2.4.51" in message


# ------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("name", "frames"), [("rtdose.dcm", 15), ("SC_rgb_rle_2frame.dcm", 2)])
def test_multi_frame_is_refused(name: str, frames: int) -> None:
    path = shipped(name)
    for read in (lambda: read_image(path), lambda: read_mask(path)):
        with pytest.raises(MaskauditError, match=f"multi-frame DICOM \\({frames} frames\\)") as excinfo:
            read()
        one_line_error(excinfo, path)
    assert image_header(path).frames == frames  # the header still reads


def test_broken_and_non_image_files_fail_in_one_line(tmp_path: Path, cxr_dir: Path) -> None:
    png_named_dcm = tmp_path / "xray.dcm"
    shutil.copy(next((cxr_dir / "images").glob("*.png")), png_named_dcm)
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(shipped("CT_small.dcm").read_bytes()[:20000])
    cut_at_magic = tmp_path / "cut_early"  # no suffix: recognised by the DICM marker, truncated in the meta
    cut_at_magic.write_bytes(shipped("CT_small.dcm").read_bytes()[:140])
    cases = {
        png_named_dcm: "not a DICOM",
        noise: "not a DICOM",
        cut: "cannot decode",
        cut_at_magic: "no pixel data",
        shipped("MR_truncated.dcm"): "less than expected",
        shipped("rtplan.dcm"): "no pixel data",
        tmp_path / "absent.dcm": "file not found",
    }
    for path, text in cases.items():
        for read in (read_image, read_mask):
            with pytest.raises(MaskauditError, match=text) as excinfo:
                read(path)
            one_line_error(excinfo, path)


def test_huge_dicom_is_refused_like_a_decompression_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    path = shipped("CT_small.dcm")  # 128 x 128 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 128 * 128 - 1)
    with pytest.raises(MaskauditError, match="decompression bomb") as excinfo:
        read_image(path)
    one_line_error(excinfo, path)


def test_dicm_marker_is_recognised_whatever_the_suffix(tmp_path: Path) -> None:
    original = shipped("MR_small.dcm")
    for name in ("scan.IMA", "scan", "scan.png"):
        copy = tmp_path / name
        shutil.copy(original, copy)
        np.testing.assert_array_equal(read_image(copy), read_image(original))
        assert image_header(copy).kind == "dicom"


def test_bare_dataset_with_dcm_suffix_is_read(tmp_path: Path) -> None:
    ds = dataset("MR_small.dcm")
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    pydicom.dcmwrite(bare, ds, implicit_vr=False, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(bare, dicom=NONE), dataset("MR_small.dcm").pixel_array)


# ----------------------------------------------------------------------------------------- masks


def test_dicom_mask_is_stored_values_above_zero(tmp_path: Path) -> None:
    seg = shipped("liver_1frame.dcm")  # a real 1-bit SEG frame
    np.testing.assert_array_equal(read_mask(seg), pydicom.dcmread(seg).pixel_array > 0)
    # a 16-bit mask with a window and a rescale: neither is applied to masks
    ds = dataset("MR_small.dcm")
    drawn = np.zeros((64, 64), np.int16)
    cv2.circle(drawn, (30, 34), 12, 1, -1)
    ds.PixelData = drawn.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    path = tmp_path / "mask.dcm"
    ds.save_as(path)
    np.testing.assert_array_equal(read_mask(path), drawn > 0)
    rgb = shipped("examples_rgb_color.dcm")
    np.testing.assert_array_equal(read_mask(rgb), np.any(pydicom.dcmread(rgb).pixel_array > 0, axis=2))


# ---------------------------------------------------------------------------------------- header


def test_image_header_of_dicom_files() -> None:
    assert image_header(shipped("MR_small.dcm")) == ImageHeader(64, 64, 1, 1, "dicom")
    assert image_header(shipped("examples_rgb_color.dcm")) == ImageHeader(240, 320, 3, 1, "dicom")
    assert image_header(shipped("JPEG2000.dcm")) == ImageHeader(1024, 256, 1, 1, "dicom")
    # header only: a file whose pixel data is truncated still has a readable header
    assert image_header(shipped("MR_truncated.dcm")) == ImageHeader(64, 64, 1, 1, "dicom")
    for name in ("rtplan.dcm",):
        with pytest.raises(MaskauditError, match="Rows"):
            image_header(shipped(name))


def test_image_header_of_pillow_files(tmp_path: Path, cxr_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = next((cxr_dir / "images").glob("*.png"))
    gray = np.asarray(Image.open(png).convert("L"))
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.jpg")
    Image.fromarray(gray).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(gray).save(tmp_path / "two.tif", save_all=True, append_images=[Image.fromarray(gray)])
    (tmp_path / "text.png").write_text("not an image")
    Image.init()  # Pillow's plugins build images of their own when first imported
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("image_header decoded pixels"))
    h, w = gray.shape
    assert image_header(png) == ImageHeader(h, w, 1, 1, "png")
    assert image_header(tmp_path / "rgb.jpg") == ImageHeader(h, w, 3, 1, "jpeg")
    assert image_header(tmp_path / "rgba.png") == ImageHeader(h, w, 4, 1, "png")
    assert image_header(tmp_path / "palette.png") == ImageHeader(h, w, 3, 1, "png")
    assert image_header(tmp_path / "two.tif") == ImageHeader(h, w, 1, 2, "tiff")
    for bad, text in ((tmp_path / "text.png", "cannot read image header"), (tmp_path / "no.png", "not found")):
        with pytest.raises(MaskauditError, match=text) as excinfo:
            image_header(bad)
        one_line_error(excinfo, bad)


# ---------------------------------------------------------------------------------------- config


def test_dicom_window_config(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image,mask,a\n")
    data = {"source": "folder", "labels_csv": str(tmp_path / "labels.csv"), "classes": ["a"]}
    assert FolderData.model_validate(data).dicom.window == "auto"
    assert config_from_dict({"data": {**data, "dicom": {"window": "none"}}}).data.dicom.window == "none"
    with pytest.raises(MaskauditError, match="dicom.window: Input should be 'auto' or 'none'"):
        config_from_dict({"data": {**data, "dicom": {"window": "soft"}}})
    with pytest.raises(MaskauditError, match="unknown key 'data[.a-z]*dicom.level'"):
        config_from_dict({"data": {**data, "dicom": {"level": 40}}})


# ------------------------------------------------------------------------------------ end to end

#: Shipped 2-D gray files copied into the folder (name in the folder, shipped name).
E2E = [
    ("ct_small.dcm", "CT_small.dcm"),
    ("mr_small.dcm", "MR_small.dcm"),
    ("mr_rle.dcm", "MR_small_RLE.dcm"),
    ("overlay.dcm", "examples_overlay.dcm"),
    ("nm_j2k.dcm", "JPEG2000.dcm"),
    ("cr1.dcm", "6154"),
    ("cr2.IMA", "6247"),
    ("cr3", "6278"),
    ("ct2.dcm", "17106"),
    ("ct3.dcm", "17136"),
    ("mr1.dcm", "15820"),
    ("deflated.dcm", "image_dfl.dcm"),
]


def build_dicom_folder(root: Path) -> Path:
    """A labels CSV listing 12 DICOM images (PNG masks, two DICOM masks) and one multi-frame file."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows: list[list[object]] = []
    for i, (name, source) in enumerate(E2E):
        ds = dataset(source)
        if ds.file_meta.TransferSyntaxUID.is_compressed and not decodable(shipped(source)):
            pytest.skip(f"no installed decoder for {source}")
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(root / "images" / name)
        drawn = np.zeros((ds.Rows, ds.Columns), np.uint8)
        cv2.ellipse(drawn, (ds.Columns // 2, ds.Rows // 2), (max(1, ds.Columns // 3), max(1, ds.Rows // 4)),
                    0, 0, 360, 255, -1)  # fmt: skip
        if source in ("MR_small.dcm", "MR_small_RLE.dcm"):  # DICOM masks, written on a real data set
            mask_ds = dataset("MR_small.dcm")
            mask_ds.PixelData = (drawn > 0).astype(np.int16).tobytes()
            mask_name = f"masks/{Path(name).stem}_mask.dcm"
            mask_ds.save_as(root / mask_name)
        else:
            mask_name = f"masks/{Path(name).stem}.png"
            Image.fromarray(drawn).save(root / mask_name)
        rows.append([f"images/{name}", mask_name, i % 2])
    shutil.copy(shipped("rtdose.dcm"), root / "images" / "dose.dcm")
    cv2.imwrite(str(root / "masks" / "dose.png"), np.full((10, 10), 255, np.uint8))
    rows.append(["images/dose.dcm", "masks/dose.png", 1])
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "finding"])
        writer.writerows(rows)
    return root / "labels.csv"


def test_folder_of_dicom_images_to_prepared_store(tmp_path: Path) -> None:
    labels = build_dicom_folder(tmp_path / "data")
    source = FolderSource(FolderData.model_validate({"source": "folder", "labels_csv": labels, "classes": ["finding"]}))
    assert all(isinstance(item, Record) for item in source.records())
    store = prepare_store(source, tmp_path / "prepared", image_size=32, workers=1, progress=False, bits=16)
    assert store.n == 12 and store.images.dtype == np.uint16 and store.images.shape == (12, 1, 32, 32)
    rejected = store.manifest[store.manifest["status"] == "rejected"]
    assert list(rejected["source_path"]) == ["images/dose.dcm"]
    assert "multi-frame DICOM (15 frames)" in rejected["reason"].iloc[0]
    with labels.open() as handle:
        masks = {row["image"]: row["mask"] for row in csv.DictReader(handle)}
    for i, row in store.kept.iterrows():
        path = tmp_path / "data" / row["source_path"]
        image = read_image(path, "gray")
        pixels = to_pixels(resize_pad(image, 32), 255 if image.dtype == np.uint8 else 65535)
        if image.dtype == np.uint8:
            pixels = pixels.astype(np.uint16) * 257  # the store widens 8-bit images among 16-bit ones
        np.testing.assert_array_equal(store.images[i, 0], pixels, err_msg=row["source_path"])
        mask_file = tmp_path / "data" / masks[row["source_path"]]
        assert row["roi_fraction_roi"] == pytest.approx(read_mask(mask_file).mean())


def test_folder_source_passes_the_window_option(tmp_path: Path) -> None:
    labels = build_dicom_folder(tmp_path / "data")
    settings = {"source": "folder", "labels_csv": labels, "classes": ["finding"]}
    loaded = {}
    for window in ("auto", "none"):
        source = FolderSource(FolderData.model_validate({**settings, "dicom": {"window": window}}))
        record = next(r for r in source.records() if isinstance(r, Record) and r.image_id == "mr_small")
        loaded[window] = source.load(record).image
    ds = dataset("MR_small.dcm")
    np.testing.assert_array_equal(loaded["none"], ds.pixel_array)
    np.testing.assert_array_equal(loaded["auto"], wide_to_uint16(apply_voi_lut(ds.pixel_array, ds)))
    assert not any(isinstance(item, Rejected) for item in source.records())


@pytest.mark.slow
def test_dicom_folder_audits_end_to_end(tmp_path: Path) -> None:
    """`maskaudit check` then the whole audit (`Audit.run_all`) on the folder of real DICOM files."""
    import pandas as pd
    import yaml
    from typer.testing import CliRunner

    from maskaudit.cli import app
    from maskaudit.pipeline import Audit

    labels = build_dicom_folder(tmp_path / "data")
    raw = {
        "data": {"source": "folder", "labels_csv": str(labels), "classes": ["finding"]},
        "image_size": 32, "strategies": ["full", "no_roi", "only_roi"], "folds": 2, "seed": 3,
        "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
        "train": {"epochs": 1, "batch_size": 4}, "workers": 1, "analyses": {"run": []},
    }  # fmt: skip
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["check", str(tmp_path / "audit.yaml")])
    assert result.exit_code == 0, result.output
    assert "1 of 13 rows rejected" in result.output and "multi-frame DICOM (15 frames)" in result.output
    Audit.create(tmp_path / "run", config_from_dict(raw)).run_all()
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert set(predictions["test_strategy"]) == {"full", "no_roi", "only_roi"}
    assert predictions["probability"].between(0, 1).all() and (tmp_path / "run" / "report.html").is_file()
