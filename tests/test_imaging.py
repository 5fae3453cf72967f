"""Decoding and resize-with-padding (SPEC §1), on hand arrays and on real files in tmp_path."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from maskaudit.data.imaging import pad_geometry, read_image, read_mask, resize_pad
from maskaudit.errors import MaskauditError


@pytest.fixture(scope="module")
def xray(cxr_dir: Path) -> tuple[Path, Path]:
    """A real X-ray (8-bit gray PNG, wider than tall) and its lung mask."""
    name = "1-s2.0-S0140673620303706-fx1_lrg.png"
    return cxr_dir / "images" / name, cxr_dir / "masks" / name


# ------------------------------------------------------------------------------------ resize_pad


def test_wide_image_is_centred_vertically() -> None:
    out = resize_pad(np.ones((20, 40), np.uint8), 10)
    assert out.shape == (10, 10) and out.dtype == np.float32
    assert np.all(out[2:7] == 1.0)  # 5 rows of content, (10 - 5) // 2 = 2 rows above
    assert np.all(out[:2] == 0) and np.all(out[7:] == 0)


def test_tall_image_is_centred_horizontally() -> None:
    out = resize_pad(np.ones((40, 20), np.uint8), 10)
    assert np.all(out[:, 2:7] == 1.0)
    assert np.all(out[:, :2] == 0) and np.all(out[:, 7:] == 0)


def test_odd_padding_puts_the_extra_pixel_after() -> None:
    out = resize_pad(np.full((10, 7), 3, np.uint16), 10)  # no resize, 3 columns of padding
    assert np.all(out[:, 1:8] == 1.0)
    assert np.all(out[:, :1] == 0) and np.all(out[:, 8:] == 0)
    assert pad_geometry(10, 7, 10) == (10, 7, 0, 1)


@pytest.mark.parametrize("shape", [(333, 517), (517, 333), (64, 64), (1, 300), (300, 1), (17, 5)])
def test_output_is_exactly_square_and_keeps_the_aspect(shape: tuple[int, int]) -> None:
    out = resize_pad(np.ones(shape, np.uint8), 64)
    assert out.shape == (64, 64)
    rows, cols = np.nonzero(out)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    long_side, short_side = max(shape), min(shape)
    assert max(height, width) == 64
    assert min(height, width) == max(1, round(short_side * 64 / long_side))
    assert (height >= width) == (shape[0] >= shape[1])


def test_enlarging_uses_linear_interpolation_and_scales_by_the_maximum() -> None:
    image = np.array([[0, 100], [100, 200]], np.uint8)
    out = resize_pad(image, 8)
    expected = cv2.resize(image.astype(np.float32), (8, 8), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(out, expected / expected.max(), rtol=1e-6)
    assert out.max() == 1.0


def test_all_zero_image_stays_zero() -> None:
    out = resize_pad(np.zeros((30, 50), np.uint8), 16)
    assert out.shape == (16, 16) and not out.any()


def test_rgb_uses_one_maximum_over_all_channels() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0], image[..., 1] = 50, 200
    out = resize_pad(image, 4)
    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[0, 0], [0.25, 1.0, 0.0])


def test_shrinking_a_real_xray_matches_opencv_area(xray: tuple[Path, Path]) -> None:
    image = read_image(xray[0])
    out = resize_pad(image, 128)
    new_h, new_w, top, left = pad_geometry(*image.shape, 128)
    direct = cv2.resize(image.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(out[top : top + new_h, left : left + new_w], direct / direct.max(), rtol=1e-6)
    assert not out[:top].any() and not out[top + new_h :].any()


def test_mask_resize_is_the_same_geometry_then_positive() -> None:
    mask = np.zeros((100, 200), bool)
    mask[40, 100] = True  # one pixel survives shrinking as one pixel
    out = resize_pad(mask, 20, "mask")
    assert out.dtype == bool and out.shape == (20, 20)
    assert out.sum() == 1 and out[5 + 4, 10]  # 10 rows of content start at row 5
    blob = np.zeros((100, 200), np.uint8)
    blob[20:70, 30:150] = 255
    np.testing.assert_array_equal(resize_pad(blob, 20, "mask"), resize_pad(blob, 20, "image") > 0)


def test_sixteen_bit_precision_survives_the_resize() -> None:
    image = np.full((8, 8), 40000, np.uint16)
    image[:, 4:] = 40001  # differs from its neighbour only below 8 bits
    out = resize_pad(image, 8)
    assert out[0, 0] == pytest.approx(40000 / 40001, abs=1e-7) and out[0, 0] < out[0, 7]


# ------------------------------------------------------------------------------------- decoding


def test_eight_bit_gray_png(xray: tuple[Path, Path]) -> None:
    image = read_image(xray[0])
    assert image.dtype == np.uint8 and image.shape == (229, 512)
    np.testing.assert_array_equal(image, np.asarray(Image.open(xray[0])))


def test_sixteen_bit_png_keeps_its_precision(xray: tuple[Path, Path], tmp_path: Path) -> None:
    base = read_image(xray[0]).astype(np.uint16)
    wide = base * 257 + (np.arange(base.size, dtype=np.uint16) % 7).reshape(base.shape)
    path = tmp_path / "x16.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode == "I;16"
    image = read_image(path, "gray")
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, wide)
    rgb = read_image(path, "rgb")
    assert rgb.dtype == np.uint8 and rgb.shape == (*wide.shape, 3)
    np.testing.assert_array_equal(rgb[..., 1], np.rint(wide / 257).astype(np.uint8))


def test_32_bit_integer_tiff(tmp_path: Path) -> None:
    inside = np.arange(12, dtype=np.int32).reshape(3, 4) * 5000  # within uint16: kept exactly
    Image.fromarray(inside).save(tmp_path / "i.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "i.tif"), inside.astype(np.uint16))
    beyond = inside * 100  # beyond uint16: mapped linearly onto 0 .. 65535
    Image.fromarray(beyond).save(tmp_path / "j.tif")
    out = read_image(tmp_path / "j.tif")
    assert out.dtype == np.uint16 and out.min() == 0 and out.max() == 65535


def test_rgb_fundus_jpeg(fundus_dir: Path) -> None:
    path = fundus_dir / "images" / "drishtiGS_002.jpg"
    rgb = read_image(path, "rgb")
    assert rgb.dtype == np.uint8 and rgb.shape == (439, 512, 3)
    gray = read_image(path, "gray")
    np.testing.assert_array_equal(gray, np.asarray(Image.open(path).convert("L")))


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "RGB", "1"])
def test_other_modes_become_gray(xray: tuple[Path, Path], tmp_path: Path, mode: str) -> None:
    source = Image.open(xray[0]).convert(mode)
    path = tmp_path / f"x_{mode}.png"
    source.save(path)
    image = read_image(path, "gray")
    assert image.dtype == np.uint8 and image.shape == (229, 512)
    expected = np.asarray(source.convert("L")) if mode not in ("LA",) else np.asarray(source)[..., 0]
    np.testing.assert_array_equal(image, expected)
    assert read_image(path, "rgb").shape == (229, 512, 3)


def test_masks_are_the_pixels_that_are_not_black(xray: tuple[Path, Path], tmp_path: Path) -> None:
    mask = read_mask(xray[1])
    assert mask.dtype == bool and mask.shape == (229, 512)
    np.testing.assert_array_equal(mask, np.asarray(Image.open(xray[1])) > 0)
    green = np.zeros((*mask.shape, 3), np.uint8)
    green[mask, 1] = 255
    Image.fromarray(green).save(tmp_path / "green.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "green.png"), mask)
    Image.fromarray(mask.astype(np.uint16) * 3).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m16.png"), mask)


def test_truncated_and_corrupt_files_name_the_file(xray: tuple[Path, Path], tmp_path: Path) -> None:
    data = xray[0].read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskauditError, match="truncated.png"):
        read_image(truncated)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(MaskauditError, match="garbage.png: cannot decode"):
        read_mask(garbage)
    with pytest.raises(MaskauditError, match="absent.png: file not found"):
        read_image(tmp_path / "absent.png")


@pytest.mark.parametrize("limit_factor", [0.9, 0.2])  # the warning zone, and PIL's own error zone
def test_decompression_bombs_are_refused(
    xray: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, limit_factor: float
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(229 * 512 * limit_factor))
    with pytest.raises(MaskauditError, match="decompression bomb"):
        read_image(xray[0])
