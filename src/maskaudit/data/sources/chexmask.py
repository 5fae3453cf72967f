"""CheXmask's RLE tables (``Padchest.csv``, ``ChestX-Ray8.csv`` …), read without holding the masks in memory.

CheXmask: N. Gaggion et al., "CheXmask: a large-scale dataset of anatomical segmentation masks
for multi-center chest x-ray images", Scientific Data 11, 511 (2024);
download: https://physionet.org/content/chexmask-cxr-segmentation-data/.

The files are large (the RLE of every mask of every image), so the table is read twice: once
by pandas for the few small columns (id, ``Dice RCA (Mean)``, ``Height``, ``Width``), once as
bytes for the offset of every line. :meth:`ChexmaskTable.masks` then reads one line for one
image. Columns are chosen by name, never by position. ``Left Lung`` is the patient's left (the
image's right); the lungs ROI is ``Left Lung OR Right Lung``, so the side does not matter here.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from maskaudit.data.rle import decode_rle
from maskaudit.data.sources.base import require_columns
from maskaudit.errors import MaskauditError

DICE = "Dice RCA (Mean)"
LEFT, RIGHT, HEART = "Left Lung", "Right Lung", "Heart"
HEIGHT, WIDTH = "Height", "Width"


@dataclass(frozen=True)
class MaskRow:
    """Where one image's masks are in the CheXmask file, and their quality and size."""

    offset: int
    dice: float
    height: int
    width: int
    line: int  # line number in the CheXmask file (header = 1)


class ChexmaskTable:
    """The index of a CheXmask CSV: image id → :class:`MaskRow`; ids listed twice are kept apart.

    Raises
    ------
    MaskauditError
        When the file cannot be read, or lacks a needed column (all listed, with the file's own).
    """

    def __init__(self, path: Path, id_column: str) -> None:
        self.path = Path(path)
        self.id_column = id_column
        needed = [id_column, DICE, LEFT, RIGHT, HEART, HEIGHT, WIDTH]
        try:
            with self.path.open(newline="", encoding="utf-8") as handle:
                self.header = next(csv.reader(io.StringIO(handle.readline())), [])
        except (OSError, UnicodeDecodeError) as exc:
            raise MaskauditError(f"{self.path}: cannot read the CheXmask CSV ({exc})") from None
        require_columns(self.path, self.header, needed, kind="CheXmask")
        self.columns = {name: self.header.index(name) for name in needed}
        try:
            small = pd.read_csv(self.path, usecols=[id_column, DICE, HEIGHT, WIDTH], dtype={id_column: str})
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise MaskauditError(f"{self.path}: cannot read the CheXmask CSV ({exc})") from None
        offsets = self._line_offsets()
        if len(offsets) != len(small) + 1:
            raise MaskauditError(
                f"{self.path}: {len(offsets) - 1} lines but {len(small)} CSV rows "
                "(a field spans lines?); expected one mask row per line"
            )
        self.rows: dict[str, MaskRow] = {}
        self.repeated: dict[str, int] = {}  # id → first line, for ids listed more than once
        ids = small[id_column].fillna("").str.strip().tolist()
        dice = pd.to_numeric(small[DICE], errors="coerce").to_numpy(dtype=float)
        heights = pd.to_numeric(small[HEIGHT], errors="coerce").to_numpy(dtype=float)
        widths = pd.to_numeric(small[WIDTH], errors="coerce").to_numpy(dtype=float)
        for i, image_id in enumerate(ids):
            if not image_id:
                continue
            if image_id in self.rows:
                self.repeated.setdefault(image_id, self.rows[image_id].line)
                continue
            h, w = heights[i], widths[i]
            self.rows[image_id] = MaskRow(
                offset=offsets[i + 1],
                dice=float(dice[i]),
                height=int(h) if math.isfinite(h) else 0,
                width=int(w) if math.isfinite(w) else 0,
                line=i + 2,
            )

    def _line_offsets(self) -> list[int]:
        offsets, position = [], 0
        with self.path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    offsets.append(position)
                position += len(line)
        return offsets

    def reason(self, image_id: str, min_dice: float) -> str:
        """Why an image's mask cannot be used (empty when it can): missing, repeated, size, quality."""
        if image_id in self.repeated:
            return f"duplicate CheXmask row: {image_id!r} on {self.path.name} lines {self.repeated[image_id]} and later"
        row = self.rows.get(image_id)
        if row is None:
            return f"no CheXmask mask: {image_id!r} not in {self.path.name}"
        if row.height < 1 or row.width < 1:
            return f"no CheXmask mask size: Height/Width missing ({self.path.name} line {row.line})"
        if not math.isfinite(row.dice):
            return f"no CheXmask quality: {DICE} missing ({self.path.name} line {row.line})"
        if row.dice <= min_dice:
            return f"low CheXmask quality: {DICE} {row.dice:.3f} <= {min_dice} ({self.path.name} line {row.line})"
        return ""

    def masks(self, row: MaskRow) -> dict[str, np.ndarray]:
        """Decode one row's masks at CheXmask's ``Height × Width``: ``lungs`` (left OR right) and ``heart``.

        Raises
        ------
        MaskauditError
            When the line cannot be read or an RLE string is malformed.
        """
        try:
            with self.path.open("rb") as handle:
                handle.seek(row.offset)
                text = handle.readline().decode("utf-8")
            fields = next(csv.reader(io.StringIO(text)))
            rle = {name: fields[self.columns[name]] for name in (LEFT, RIGHT, HEART)}
            left = decode_rle(rle[LEFT], row.height, row.width)
            right = decode_rle(rle[RIGHT], row.height, row.width)
            heart = decode_rle(rle[HEART], row.height, row.width)
        except (OSError, UnicodeDecodeError, StopIteration, IndexError, ValueError) as exc:
            raise MaskauditError(f"{self.path} line {row.line}: cannot decode the CheXmask RLE ({exc})") from None
        return {"lungs": left | right, "heart": heart}


def check_size(image: np.ndarray, row: MaskRow, image_path: str, table: Path) -> None:
    """Raise the store's ``mask size mismatch`` error when the image is not CheXmask's Height × Width."""
    height, width = image.shape[:2]
    if (height, width) != (row.height, row.width):
        raise MaskauditError(
            f"mask size mismatch: {image_path} is {width}x{height} but CheXmask ({Path(table).name} line "
            f"{row.line}) gives Width x Height {row.width}x{row.height}"
        )


def file_stamp(path: Path | None) -> dict[str, object] | None:
    """Size and modification time of a file: a cheap fingerprint of a large input."""
    if path is None:
        return None
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
