"""Decoding DICOM files (hospital exports) for :mod:`maskaudit.data.imaging`.

:func:`maskaudit.data.imaging.read_image`, :func:`~maskaudit.data.imaging.read_mask` and
:func:`~maskaudit.data.imaging.image_header` hand a file here when its name ends in ``.dcm``
(any case) or when it carries the ``DICM`` marker at byte 128, whatever its suffix. Only
single-frame images are read; every problem is a one-line :class:`~maskaudit.errors.MaskauditError`
that names the file.

Where each rule comes from
--------------------------
* **Recognising a file**: the 128-byte preamble followed by the four bytes ``DICM``
  (DICOM PS3.10 §7.1, "DICOM File Meta Information"). A ``.dcm`` file without them (a bare
  data set) is read with pydicom's ``dcmread(..., force=True)``; its transfer syntax is then
  taken from the encoding pydicom detected.
* **Stored pixels** come from pydicom's own decoders (pydicom ≥ 3: ``pydicom.pixels``
  ``get_decoder(uid).as_array(ds)``, the backend behind ``Dataset.pixel_array``; pydicom 2.4:
  ``Dataset.pixel_array``). Compressed transfer syntaxes need a plugin: pydicom guide
  "Handling of compressed pixel data" (pydicom.github.io/pydicom/stable/guides/user/
  image_data_handlers.html) and its plugin table (…/guides/plugin_table.html): pylibjpeg with
  pylibjpeg-libjpeg (JPEG, JPEG-LS) and pylibjpeg-openjpeg (JPEG 2000, HTJ2K), GDCM, Pillow
  (JPEG baseline, JPEG 2000), pyjpegls (JPEG-LS); RLE Lossless and Deflate need none. When no
  installed plugin can decode the file's transfer syntax the error names it (name and UID)
  and says what to ``pip install`` (``maskaudit[dicom]`` installs the three pylibjpeg packages).
* **Multi-frame** files (*Number of Frames* (0028,0008) > 1, PS3.3 §C.7.6.6) are refused: a
  multi-frame file is a volume or a cine loop, not one image of a classifier's input.
* **Modality LUT / rescale** (gray images only): ``apply_modality_lut`` (pydicom page
  reference/generated/pydicom.pixels.processing.apply_modality_lut.html; PS3.3 §C.11.1):
  ``v * RescaleSlope + RescaleIntercept``, or the *Modality LUT Sequence* when present.
* **VOI LUT / window** (gray images only, ``dicom.window: auto``; never with ``none``):
  ``apply_voi_lut`` (page …/pydicom.pixels.processing.apply_voi_lut.html; PS3.3 §C.11.2 and
  §C.8.11.3.1.5): the *VOI LUT Sequence* when present, else *Window Center* / *Window Width*
  (first view) with its *VOI LUT Function*; applied after the modality LUT, as pydicom's page
  and PS3.4 §N.2.1.1 require. Its output spans the same range as its input: pydicom's
  ``apply_windowing`` maps onto [y_min, y_max], the stored range after rescale, and a VOI LUT
  onto [0, 2**bits − 1] of its *LUT Descriptor*.
* **MONOCHROME1** (PS3.3 §C.7.6.3.1.2: "the minimum sample value is intended to be displayed
  as white after any VOI gray scale transformations have been performed"): after the modality
  and VOI steps, ``v → max − v`` where [min, max] is the nominal range of those values (the
  stored range, ``BitsStored`` and ``PixelRepresentation``, after rescale; or the VOI output
  range above), so the result spans [0, max − min] with black = 0 as in MONOCHROME2. pydicom
  itself never inverts (``pixel_array`` returns the stored values).
* **Gray output**: uint8 when that nominal range lies inside [0, 255] (8-bit files); otherwise
  uint16 through :func:`maskaudit.data.pixels.wide_to_uint16`, which keeps integral values in
  [0, 65535] exactly and maps anything else (negatives, floats from rescale or windowing,
  32-bit ranges) linearly from the image's [min, max] onto [0, 65535].
* **Colour**: *RGB* as decoded; *YBR_FULL* / *YBR_FULL_422* converted to RGB with pydicom's
  ``convert_color_space`` (page …/pydicom.pixels.processing.convert_color_space.html; PS3.3
  §C.7.6.3.1.2), which pydicom ≥ 3 already applies while decoding (``pixel_array_options``:
  "YBR_FULL or YBR_FULL_422 will be converted to RGB"); *YBR_RCT* / *YBR_ICT* (JPEG 2000) come
  out of the codec as RGB; *PALETTE COLOR* through ``apply_color_lut`` (PS3.3 §C.7.9). Samples
  wider than 8 bits are narrowed as ``round(v * 255 / (2**BitsStored - 1))`` (for 16 bits this
  is the ``round(v / 257)`` of 16-bit PNGs). Other photometric interpretations (YBR_PARTIAL_*,
  …) are refused. ``color="gray"`` of a colour file: Pillow's ``convert("L")``, ITU-R 601-2
  luma, as for PNG; ``color="rgb"`` of a gray file: the gray image copied to three channels,
  as for PNG, narrowed to uint8 as ``round(v * 255 / white)`` where white is 65535 when the
  gray values were stretched onto [0, 65535] (the ``round(v / 257)`` of 16-bit PNGs) and the
  nominal maximum when they were kept exactly (a 12-bit file without window: 4095), so that a
  12-bit image does not end up in the darkest 16 levels.
* **Masks**: a pixel is in the mask when its decoded stored value is > 0 (no rescale, no
  window, no MONOCHROME1 inversion); colour masks: any channel > 0, as for PNG masks.

pydicom's ``UserWarning`` s about slightly non-conformant files are silenced while reading: a
file either decodes by the rules above or fails with a :class:`MaskauditError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from maskaudit.data.pixels import Color, multi_frame, wide_to_uint16
from maskaudit.errors import MaskauditError

try:  # pydicom >= 3
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
    from pydicom.pixels import get_decoder as _get_decoder
except ImportError:  # pragma: no cover - pydicom 2.4
    from pydicom.pixel_data_handlers.util import (  # type: ignore[no-redef]
        apply_color_lut,
        apply_modality_lut,
        apply_voi_lut,
        convert_color_space,
    )

    _get_decoder = None  # type: ignore[assignment]

Window = Literal["auto", "none"]

#: The ``DICM`` prefix and where it sits (after the 128-byte preamble, PS3.10 §7.1).
MAGIC = b"DICM"
MAGIC_OFFSET = 128

#: What to install for the compressed transfer syntaxes pydicom cannot decode by itself.
PIP_HINT = "pip install 'maskaudit[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_YBR_FULL = ("YBR_FULL", "YBR_FULL_422")
_RGB_LIKE = ("RGB", "YBR_RCT", "YBR_ICT")  # JPEG 2000 codecs undo the RCT/ICT themselves


def has_magic(head: bytes) -> bool:
    """Whether the first bytes of a file carry the ``DICM`` marker at byte 128."""
    return head[MAGIC_OFFSET : MAGIC_OFFSET + len(MAGIC)] == MAGIC


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _quiet(call: Callable[[], Any]) -> Any:
    """Run a pydicom call with its UserWarnings (non-conformant values) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return call()


def read_dataset(path: Path, head: bytes, header_only: bool = False) -> Dataset:
    """``dcmread`` of ``path`` (without the pixels when ``header_only``), errors as MaskauditError."""
    forced = not has_magic(head)
    try:
        ds = _quiet(lambda: pydicom.dcmread(path, force=forced, stop_before_pixels=header_only))
    except Exception as exc:  # pydicom raises many types on broken or non-DICOM input
        what = "not a DICOM file (no 'DICM' marker at byte 128)" if forced else "cannot read the DICOM file"
        raise MaskauditError(f"{path}: {what} ({_one_line(exc)})") from None
    if forced and "Rows" not in ds:
        raise MaskauditError(f"{path}: not a DICOM image (no 'DICM' marker at byte 128, no Rows/Columns)")
    return ds


def _int_tag(ds: Dataset, keyword: str, path: Path, default: int | None = None) -> int:
    value = _quiet(lambda: ds.get(keyword, None))
    if value is None or value == "":
        if default is None:
            raise MaskauditError(f"{path}: DICOM file lacks {keyword} (not an image?)")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MaskauditError(f"{path}: invalid DICOM {keyword} {value!r}") from None


def geometry(ds: Dataset, path: Path) -> tuple[int, int, int, int]:
    """``(rows, columns, samples per pixel, frames)`` from the header."""
    rows = _int_tag(ds, "Rows", path)
    columns = _int_tag(ds, "Columns", path)
    samples = _int_tag(ds, "SamplesPerPixel", path, default=1)
    frames = _int_tag(ds, "NumberOfFrames", path, default=1)
    return rows, columns, samples, frames


def header_channels(ds: Dataset, samples: int) -> int:
    """Channels of the decoded image: a palette image decodes to RGB(A)."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        return 4 if "AlphaPaletteColorLookupTableData" in ds else 3
    return samples


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax; for a bare data set (no file meta), the encoding it was read in."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID", None) if meta is not None else None
    if uid is not None:
        return UID(str(uid))
    encoding = getattr(ds, "original_encoding", None)  # pydicom >= 3: (is_implicit_VR, is_little_endian)
    implicit, little = encoding if encoding is not None else (ds.is_implicit_VR, ds.is_little_endian)
    uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def _no_decoder(path: Path, ts: UID, missing: list[str]) -> MaskauditError:
    others = f"; pydicom's other plugins for it: {', '.join(missing)}" if missing else ""
    return MaskauditError(
        f"{path}: no installed pixel data decoder can read transfer syntax {ts.name} ({ts}); {PIP_HINT}{others}"
    )


def _check_size(path: Path, rows: int, columns: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and rows * columns > limit:
        raise MaskauditError(
            f"{path}: refused as a possible decompression bomb ({rows}x{columns} pixels > {limit}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        )


def decode(path: Path, head: bytes) -> tuple[Dataset, np.ndarray, str]:
    """Read ``path`` and decode its only frame.

    Returns the data set, the stored pixel values ((H, W) or (H, W, samples), colour already in
    RGB where pydicom converts it) and the photometric interpretation those values are in.
    """
    ds = read_dataset(path, head)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        kind = ds.get("Modality", None) or getattr(ds.get("SOPClassUID", None), "name", None) or "unknown"
        raise MaskauditError(f"{path}: DICOM file has no pixel data (modality/SOP class: {kind})")
    rows, columns, samples, frames = geometry(ds, path)
    if frames > 1:
        raise MaskauditError(multi_frame(path, frames))
    _check_size(path, rows, columns)
    ts = _transfer_syntax(ds)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if _get_decoder is not None:
        try:
            decoder = _get_decoder(ts)
        except NotImplementedError:
            raise MaskauditError(
                f"{path}: pydicom has no pixel data decoder for transfer syntax {ts.name} ({ts}); "
                "convert the file to an uncompressed transfer syntax first"
            ) from None
        if not decoder.is_available:
            raise _no_decoder(path, ts, decoder.missing_dependencies)
        try:
            arr, properties = _quiet(lambda: decoder.as_array(ds))
        except Exception as exc:
            others = decoder.missing_dependencies
            hint = f"; other plugins might decode it: {', '.join(others)}" if others else ""
            raise MaskauditError(
                f"{path}: cannot decode the {ts.name} ({ts}) pixel data ({_one_line(exc)}){hint}"
            ) from None
        pi = str(properties.get("photometric_interpretation", pi))
    else:  # pragma: no cover - pydicom 2.4
        try:
            arr = _quiet(lambda: ds.pixel_array)
        except Exception as exc:  # the 2.4 handlers do not tell "none installed" from "failed"
            hint = f"; if no installed handler supports it: {PIP_HINT}" if ts.is_compressed else ""
            raise MaskauditError(
                f"{path}: cannot decode the {ts.name} ({ts}) pixel data ({_one_line(exc)}){hint}"
            ) from None
        pi = str(ds.PhotometricInterpretation).strip()  # the 2.4 handlers set RGB when they convert
    if arr.ndim == 3 and samples == 1 and arr.shape[0] == 1:  # a single frame kept as (1, H, W)
        arr = arr[0]
    if pi in _YBR_FULL:
        arr = convert_color_space(arr, pi, "RGB")
        pi = "RGB"
    return ds, np.asarray(arr), pi


def _stored_range(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """The nominal [min, max] of the stored values (BitsStored, PixelRepresentation)."""
    bits = ds.get("BitsStored", None)
    if bits is None or values.dtype.kind == "f":  # float pixel data has no BitsStored
        return float(values.min()), float(values.max())
    bits = int(bits)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _modality_range(ds: Dataset, low: float, high: float) -> tuple[float, float]:
    """The nominal range after ``apply_modality_lut`` (as pydicom's ``apply_windowing`` computes it)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        ends = sorted((low * slope + intercept, high * slope + intercept))
        return ends[0], ends[1]
    return low, high


def has_voi(ds: Dataset) -> bool:
    """Whether the file has a VOI LUT Sequence or both Window Center and Window Width."""
    windowing = ds.get("WindowCenter", None) not in (None, "") and ds.get("WindowWidth", None) not in (None, "")
    return bool(ds.get("VOILUTSequence")) or windowing


def _gray(ds: Dataset, stored: np.ndarray, window: Window, path: Path) -> tuple[np.ndarray, int]:
    """Modality LUT, VOI (when asked for and present), MONOCHROME1 inversion; uint8 or uint16.

    Also returns the value that white has in the result: 255 for uint8; for uint16 the nominal
    maximum when the values were kept exactly (a 12-bit file: 4095), else 65535.
    """
    low, high = _modality_range(ds, *_stored_range(ds, stored))
    try:
        values = apply_modality_lut(stored, ds)
        if window == "auto" and has_voi(ds):
            values = _quiet(lambda: apply_voi_lut(values, ds, index=0))
            if ds.get("VOILUTSequence"):
                low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError) as exc:
        raise MaskauditError(
            f"{path}: cannot apply the file's modality LUT / VOI LUT / window ({_one_line(exc)}); "
            "set data.dicom.window: none to skip the window"
        ) from None
    values = np.asarray(values)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        if values.dtype.kind in "iu" and float(high).is_integer():
            values = int(high) - values.astype(np.int64)
        else:
            values = high - values.astype(np.float64)
        low, high = 0.0, high - low
    if low >= 0 and high <= 255:
        if values.dtype == np.uint8:
            return np.ascontiguousarray(values), 255
        return np.clip(np.rint(values), 0, 255).astype(np.uint8), 255
    wide = np.ascontiguousarray(wide_to_uint16(values))
    kept = values.dtype == np.uint16 or bool(np.array_equal(wide, values))
    top = int(min(max(high, 1.0), 65535.0)) if kept else 65535
    return wide, top


def _narrow_to(values: np.ndarray, top: float) -> np.ndarray:
    """``round(v * 255 / top)`` as uint8 (clipped)."""
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _narrow(values: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples as uint8: ``round(v * 255 / (2**bits - 1))``."""
    if values.dtype == np.uint8:
        return values
    return _narrow_to(values, float(2**bits - 1))


def _rgb(ds: Dataset, stored: np.ndarray, pi: str, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 from RGB-like or palette data."""
    if pi == "PALETTE COLOR":
        try:
            values = apply_color_lut(stored, ds)
        except Exception as exc:
            raise MaskauditError(f"{path}: cannot apply the palette colour LUT ({_one_line(exc)})") from None
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return np.ascontiguousarray(_narrow(values[..., :3], bits))
    if pi not in _RGB_LIKE or stored.ndim != 3 or stored.shape[2] != 3:
        raise MaskauditError(
            f"{path}: unsupported DICOM photometric interpretation {pi!r} (pixel array {stored.shape}); "
            "expected MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_FULL or YBR_FULL_422"
        )
    bits = int(ds.get("BitsStored", 8 * stored.dtype.itemsize))
    return np.ascontiguousarray(_narrow(stored, bits))


def read_dicom_image(path: Path, head: bytes, color: Color = "gray", window: Window = "auto") -> np.ndarray:
    """Decode a single-frame DICOM image as :func:`~maskaudit.data.imaging.read_image` does.

    Parameters
    ----------
    path : Path
        The file.
    head : bytes
        Its first bytes (at least 132), to tell a DICOM file with its preamble from a bare data set.
    color : {"gray", "rgb"}
        As :func:`~maskaudit.data.imaging.read_image`.
    window : {"auto", "none"}
        ``"auto"``: apply the file's VOI LUT or window when it has one; ``"none"``: never.

    Returns
    -------
    ndarray: (H, W) uint8 or uint16 for gray, (H, W, 3) uint8 for rgb.
    """
    if window not in ("auto", "none"):
        raise ValueError(f"window must be 'auto' or 'none', got {window!r}")
    ds, stored, pi = decode(path, head)
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if stored.ndim != 2:
            raise MaskauditError(f"{path}: {pi} DICOM with pixel array of shape {stored.shape}; expected (H, W)")
        gray, top = _gray(ds, stored, window, path)
        if color == "gray":
            return gray
        narrow = gray if gray.dtype == np.uint8 else _narrow_to(gray, top)
        return np.repeat(narrow[:, :, None], 3, axis=2)
    rgb = _rgb(ds, stored, pi, path)
    if color == "rgb":
        return rgb
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L")).copy()


def read_dicom_mask(path: Path, head: bytes) -> np.ndarray:
    """A DICOM mask as a bool (H, W) array: decoded stored value > 0 (any channel for colour)."""
    ds, stored, pi = decode(path, head)
    if pi == "PALETTE COLOR":
        stored = _rgb(ds, stored, pi, path)
    if stored.ndim == 2:
        return stored > 0
    return np.any(stored > 0, axis=2)
