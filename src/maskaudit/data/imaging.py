"""Decoding image and mask files, and the resize-with-padding of SPEC §1.

Every file goes through :func:`read_image` or :func:`read_mask`, which turn Pillow's many modes
into a few array shapes and turn every decoding problem (missing, corrupt, truncated, a
decompression bomb) into a :class:`~maskaudit.errors.MaskauditError` that names the file.
Both return the image upright: an EXIF *Orientation* tag (images and masks alike) is applied
first, and :func:`image_header` reports the upright size.
:func:`resize_pad` is the one geometric transform; the prepared store applies it to images
and masks alike, so both land on the same pixel grid.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from maskaudit.data.dicom import (
    MAGIC,
    MAGIC_OFFSET,
    geometry,
    has_magic,
    header_channels,
    read_dataset,
    read_dicom_image,
    read_dicom_mask,
)
from maskaudit.data.pixels import Color, wide_to_uint16
from maskaudit.errors import MaskauditError

if TYPE_CHECKING:
    from maskaudit.config import DicomOptions

#: Bytes read to recognise a DICOM file: the 128-byte preamble and the ``DICM`` marker.
_HEAD_BYTES = MAGIC_OFFSET + len(MAGIC)

#: Pillow modes whose pixels are wider than 8 bits; decoded through numpy, never ``convert("L")``
#: (which clips 16-bit values instead of scaling them).
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")

#: The EXIF tag that says how the stored pixels are turned (1 upright; 5–8 swap width and height).
_ORIENTATION = 0x0112
#: Orientations whose upright image is the stored one turned a quarter: its width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, without decoding its pixels (see :func:`image_header`)."""

    height: int
    width: int
    channels: int
    frames: int
    kind: str


def _head(path: Path) -> bytes:
    """The first bytes of ``path`` (to recognise DICOM); MaskauditError when it is missing or unreadable."""
    if not path.is_file():
        raise MaskauditError(f"{path}: file not found")
    try:
        with path.open("rb") as handle:
            return handle.read(_HEAD_BYTES)
    except OSError as exc:
        raise MaskauditError(f"{path}: cannot read file ({type(exc).__name__}: {exc})") from None


def _is_dicom(path: Path, head: bytes) -> bool:
    """A ``.dcm`` name (any case), or the ``DICM`` marker at byte 128 whatever the name."""
    return path.suffix.lower() == ".dcm" or has_magic(head)


def _open(path: Path) -> Image.Image:
    """Open and fully decode ``path`` (first frame), as a Pillow image, upright.

    Upright: turned or flipped as the file's EXIF *Orientation* tag says (Pillow's
    ``ImageOps.exif_transpose``; a camera's JPEG is often stored sideways with tag 6), before
    anything else looks at it, so an image and its mask are compared, resized and stored as a
    viewer shows them. Pillow's decompression-bomb *warning* (more than
    ``Image.MAX_IMAGE_PIXELS`` pixels) is raised as an error here, as is its error (twice that);
    truncated and corrupt files fail while decoding, because ``load()`` is called before returning.
    """
    path = Path(path)
    if not path.is_file():
        raise MaskauditError(f"{path}: file not found")
    with _pillow(path, "decode image") as img:
        img.seek(0)
        img.load()
        upright = ImageOps.exif_transpose(img)  # a copy, turned when the file says so
        return upright if upright.mode != "P" else upright.convert("RGBA" if _has_alpha(upright) else "RGB")


def _orientation(img: Image.Image) -> int:
    """The EXIF *Orientation* of an opened, not decoded, file (1 when it has none), as ``exif_transpose`` reads it.

    PNG: the eXIf chunk (or XMP) met before the pixels; Pillow's own ``getexif`` of a PNG decodes the
    whole image to look for a chunk after them, which a header read must not do.
    """
    exif = Image.Image.getexif(img) if isinstance(img, PngImagePlugin.PngImageFile) else img.getexif()
    value = exif.get(_ORIENTATION, 1)
    return value if isinstance(value, int) else 1


@contextmanager
def _pillow(path: Path, doing: str) -> Iterator[Image.Image]:
    """``Image.open(path)``, with Pillow's problems (in opening or in the caller's use) as one-line errors.

    Pillow's decompression-bomb *warning* is raised as an error too; ``doing`` ("decode image",
    "read image header") says in the message what failed.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise MaskauditError(
            f"{path}: refused as a possible decompression bomb ({exc}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as exc:
        raise MaskauditError(f"{path}: cannot {doing} ({type(exc).__name__}: {exc})") from None


def _has_alpha(img: Image.Image) -> bool:
    return "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"


def read_image(path: Path, color: Color = "gray", dicom: DicomOptions | None = None) -> np.ndarray:
    """Decode one image file into a gray or RGB array.

    Parameters
    ----------
    path : Path
        Any file Pillow reads (PNG, JPEG, TIFF, BMP …), 8 or 16 bit, any mode; or a
        single-frame DICOM file (a ``.dcm`` name, or the ``DICM`` marker at byte 128 whatever
        the name), decoded by :mod:`maskaudit.data.dicom` (rescale, VOI LUT / window,
        MONOCHROME1 inversion, YBR → RGB; the rules and their sources are listed there).
        A Pillow file's EXIF *Orientation* tag is applied (the array is upright, as a viewer
        shows it; tags 5–8 swap height and width).
    color : {"gray", "rgb"}
        ``"gray"``: one channel. 16-bit (and 32-bit integer / float) files keep their
        precision as uint16; 8-bit files stay uint8; colour files are converted with
        Pillow's luma transform (ITU-R 601-2); the alpha of LA/RGBA is dropped.
        ``"rgb"``: three channels as uint8; 16-bit gray files are narrowed (``round(v / 257)``)
        and copied to the three channels; alpha is dropped (not composited).
    dicom : DicomOptions, optional
        How DICOM files are decoded (``window``: ``"auto"`` applies the file's VOI LUT or
        window when it has one, ``"none"`` never does); default ``DicomOptions()``. Ignored
        for other files.

    Returns
    -------
    ndarray of shape (H, W) (uint8 or uint16) for gray, (H, W, 3) uint8 for rgb.

    Raises
    ------
    MaskauditError
        When the file is missing, not an image, truncated or corrupt, or larger than
        ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb); for DICOM also when
        it is multi-frame, has no pixel data, or uses a compressed transfer syntax that no
        installed decoder reads (the message says what to ``pip install``).
    """
    if color not in ("gray", "rgb"):
        raise ValueError(f"color must be 'gray' or 'rgb', got {color!r}")
    path = Path(path)
    head = _head(path)
    if _is_dicom(path, head):
        return read_dicom_image(path, head, color, window=dicom.window if dicom is not None else "auto")
    img = _open(path)
    if img.mode in _WIDE_MODES:
        gray16 = wide_to_uint16(np.asarray(img))
        if color == "gray":
            return np.ascontiguousarray(gray16)
        narrow = np.rint(gray16.astype(np.float32) / 257.0).astype(np.uint8)
        return np.repeat(narrow[:, :, None], 3, axis=2)
    if color == "gray":
        if img.mode in ("LA", "La"):
            return np.asarray(img)[:, :, 0].copy()
        if img.mode != "L":
            img = img.convert("L")
        return np.asarray(img).copy()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img).copy()


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask file as a bool (H, W) array: the pixels that are not black.

    Gray masks (any bit depth): ``value > 0``. Colour masks (RGB, paletted): a pixel is in the
    mask when any of its colour channels is ``> 0``, so a mask drawn in any colour works (for
    gray-looking colour files this is the same as the first channel). Alpha is ignored.
    DICOM masks: the decoded stored values ``> 0`` (no rescale, window or MONOCHROME1
    inversion), any channel for colour files. Like :func:`read_image`, the mask's own EXIF
    *Orientation* tag is applied first.

    Raises
    ------
    MaskauditError
        As :func:`read_image`.
    """
    path = Path(path)
    head = _head(path)
    if _is_dicom(path, head):
        return read_dicom_mask(path, head)
    img = _open(path)
    values = np.asarray(img)
    if values.ndim == 2:
        return values > 0
    if img.mode in ("LA", "La"):
        return values[:, :, 0] > 0
    return np.any(values[:, :, :3] > 0, axis=2)


def image_header(path: Path) -> ImageHeader:
    """Size, channels, frames and format of an image file, from its header only (no pixel decoding).

    Pillow files: ``Image.open`` without ``load()``; ``height``/``width`` of the upright image,
    as :func:`read_image` decodes it (swapped when the EXIF *Orientation* tag is 5–8, a quarter
    turn), ``channels`` the band count of the mode (a palette image counts
    as 3, or 4 with transparency: what :func:`read_image` decodes it to), ``frames`` Pillow's
    ``n_frames`` (1 when the format has none), ``kind`` Pillow's format in lower case
    (``"png"``, ``"jpeg"``, ``"tiff"`` …). DICOM files (as :func:`read_image` recognises
    them): pydicom's ``dcmread(..., stop_before_pixels=True)``; *Rows*, *Columns*, *Samples
    per Pixel* (a palette image counts as 3), *Number of Frames* (1 when absent), ``kind``
    ``"dicom"``.

    Raises
    ------
    MaskauditError
        When the file is missing or its header cannot be read (not an image, a DICOM file
        without Rows/Columns), or the image is larger than ``PIL.Image.MAX_IMAGE_PIXELS``.
    """
    path = Path(path)
    head = _head(path)
    if _is_dicom(path, head):
        ds = read_dataset(path, head, header_only=True)
        rows, columns, samples, frames = geometry(ds, path)
        return ImageHeader(rows, columns, header_channels(ds, samples), frames, "dicom")
    with _pillow(path, "read image header") as img:
        width, height = img.size
        if _orientation(img) in _QUARTER_TURNS:  # as _open turns it: upright, a quarter turn swaps the sides
            width, height = height, width
        channels = (4 if _has_alpha(img) else 3) if img.mode == "P" else len(img.getbands())
        frames = int(getattr(img, "n_frames", 1))
        kind = (img.format or "unknown").lower()
    return ImageHeader(height, width, channels, frames, kind)


def pad_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where an (height, width) array lands inside the size x size square.

    Returns ``(new_height, new_width, top, left)``: the longer side becomes ``size``, the
    other keeps the aspect ratio (rounded, at least 1), and the content is centred (the
    extra pixel of an odd padding goes to the bottom / right).
    """
    if height < 1 or width < 1:
        raise MaskauditError(f"cannot resize an empty array of shape ({height}, {width})")
    scale = size / max(height, width)
    new_h = size if height >= width else max(1, min(size, round(height * scale)))
    new_w = size if width >= height else max(1, min(size, round(width * scale)))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def resize_pad(array: np.ndarray, size: int, kind: Literal["image", "mask"] = "image",
               scaled: bool = True) -> np.ndarray:
    """Resize with padding to a square (SPEC §1), keeping the aspect ratio.

    The longer side becomes ``size``; the content is centred on a zero background.
    ``cv2.INTER_AREA`` is used when shrinking, ``cv2.INTER_LINEAR`` when enlarging, no
    interpolation when the longer side already equals ``size``.

    Parameters
    ----------
    array : ndarray of shape (H, W) or (H, W, C)
        An image (any numeric dtype) or a mask (bool or numeric, nonzero = inside).
    size : int
        Side of the square output.
    kind : {"image", "mask"}
        ``"image"``: the resized, padded image divided by its own maximum (one maximum over
        all channels, taken after resizing, so the result spans [0, 1]; an all-zero image
        stays zero). ``"mask"``: the same resize of the mask as 0/1 floats, then ``> 0``.
    scaled : bool
        ``False``: an image is not divided by its maximum (the caller keeps the maximum, then divides).

    Returns
    -------
    ndarray of shape (size, size) or (size, size, C): float32 for images, bool for masks.
    """
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    arr = np.asarray(array)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {arr.shape}")
    height, width = arr.shape[:2]
    new_h, new_w, top, left = pad_geometry(height, width, size)
    src = (arr > 0 if kind == "mask" else arr).astype(np.float32)
    if (new_h, new_w) != (height, width):
        shrinking = new_h < height or new_w < width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        resized = cv2.resize(src, (new_w, new_h), interpolation=interpolation)
        if arr.ndim == 3 and resized.ndim == 2:  # OpenCV drops a channel axis of length 1
            resized = resized[:, :, None]
    else:
        resized = src
    out = np.zeros((size, size, *arr.shape[2:]), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = resized
    if kind == "mask":
        return out > 0
    np.clip(out, 0.0, None, out=out)  # INTER_LINEAR never overshoots, but stay safe for negative input
    peak = float(out.max())
    if scaled and peak > 0:
        out /= peak
    return out
