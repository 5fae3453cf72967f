"""CheXmask's RLE tables (``Padchest.csv``, ``ChestX-Ray8.csv`` …), indexed without holding the masks in memory.

CheXmask: N. Gaggion et al., "CheXmask: a large-scale dataset of anatomical segmentation masks
for multi-center chest x-ray images", Scientific Data 11, 511 (2024);
download: https://physionet.org/content/chexmask-cxr-segmentation-data/.

What the files are, from the publisher's own code (github.com/ngaggion/CheXmask-Database):

- Columns (``Example.ipynb``): an image-id column whose name follows the original dataset's
  metadata (``ImageID`` in ``Padchest.csv``, ``Image Index`` in ``ChestX-Ray8.csv``),
  ``Dice RCA (Mean)``, ``Dice RCA (Max)``, ``Landmarks``, ``Left Lung``, ``Right Lung``,
  ``Heart``, ``Height``, ``Width``. Columns are chosen here by name, never by position.
- RLE (``DataPostprocessing/utils.py``, ``get_RLE_from_mask``): the mask flattened row-major,
  ``"start length …"`` with 1-based starts, decoded at ``Height × Width``
  (:mod:`maskaudit.data.rle`).
- ``Landmarks`` in ``OriginalResolution/`` (``DataPostprocessing/ReversePreprocessing/
  back_padchest.py``): the cell holds a numpy integer array of (x, y) points, so pandas'
  ``to_csv`` writes its printed form, quoted and spread over many lines
  (``"[[ 56 164]\\n [ 59 154]\\n …]"``); ``Preprocessed/`` files hold one comma-joined line.
  A record is therefore not a line: the index is built by a quote-aware scan of the bytes
  (:func:`record_spans`), and each image's masks are read by seeking to its record.
- ``Left Lung`` is the patient's left (the image's right); the lungs ROI is
  ``Left Lung OR Right Lung``, so the side does not matter here.
- ``back_padchest.py`` assigns ``height, width = pad_row["width"], pad_row["height"]`` from a
  padding table written as ``filename,height,width,…``: if that swap reached the published
  ``OriginalResolution/Padchest.csv``, its ``Height``/``Width`` are transposed for non-square
  images. The image's own size is never assumed: a mismatch is the ``mask size mismatch``
  rejection, which says when the sizes are each other's transpose (:func:`check_size`).
- The publisher ships ``.csv.gz`` files in places (``Example.ipynb`` reads
  ``OriginalResolution/VinDr-CXR.csv.gz``); masks are read by seeking, which a gzip stream
  cannot do cheaply, so a compressed table is refused with the command that decompresses it.

Memory stays flat in the file's size: the scan reads fixed-size blocks, and the index keeps
four small values and two offsets per row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskaudit.data.rle import decode_rle
from maskaudit.data.sources.base import require_columns
from maskaudit.errors import MaskauditError

DICE = "Dice RCA (Mean)"
LEFT, RIGHT, HEART = "Left Lung", "Right Lung", "Heart"
HEIGHT, WIDTH = "Height", "Width"

#: bytes read at a time by the scan; a record longer than this is carried over, never split
BLOCK = 1 << 22
_QUOTE, _COMMA, _NEWLINE = ord('"'), ord(","), ord("\n")


@dataclass(frozen=True, slots=True)
class MaskRow:
    """Where one image's masks are in the CheXmask file, and their quality and size."""

    offset: int  # first byte of the record
    dice: float
    height: int
    width: int
    line: int  # line of the file on which the record starts (header = 1)
    end: int = -1  # one past its last byte (before the newline); -1: read to the end of the line


def record_spans(path: Path, block: int = BLOCK) -> Iterator[tuple[int, int, int, list[tuple[int, int]], bytes]]:
    """Every CSV record of ``path``: (line, start, end, field spans, record bytes), quote-aware.

    ``line`` is the file line on which the record starts (1 for the first); ``start``/``end``
    are file offsets of its first byte and one past its last (before the newline).

    A newline or comma inside a double-quoted field (RFC 4180; ``""`` is a quote inside one)
    belongs to the field. Field spans are (start, end) offsets relative to the record, quotes
    included. Blank records (an empty line) are skipped; a ``\\r`` before the newline is dropped.

    The scan is vectorised per block with numpy: a byte is inside quotes when an odd number
    of quotes precedes it in its record, so delimiters are the commas and newlines at even
    quote parity. Each block begins at a record start (the unfinished tail of the previous
    block is carried over), so the parity restarts at 0 and memory is bounded by the block
    size plus the longest record.
    """
    position = 0  # file offset of carry[0]
    line = 1  # file line of carry[0]
    carry = b""
    with Path(path).open("rb") as handle:
        while True:
            fresh = handle.read(block)
            data = carry + fresh
            if not data:
                return
            last = not fresh
            if last and not data.endswith(b"\n"):
                data += b"\n"
            arr = np.frombuffer(data, dtype=np.uint8)
            odd = np.cumsum(arr == _QUOTE, dtype=np.uint8) & 1  # parity after each byte; a quote is never a delimiter
            delimiters = np.flatnonzero(((arr == _COMMA) | (arr == _NEWLINE)) & (odd == 0))
            newlines = delimiters[arr[delimiters] == _NEWLINE]
            if len(newlines) == 0:
                if last:
                    return
                carry = data  # one record longer than a block: read on
                continue
            commas = delimiters[arr[delimiters] == _COMMA]
            groups = np.searchsorted(newlines, commas)  # the record (newline index) each comma belongs to
            bounds = np.searchsorted(groups, np.arange(len(newlines) + 1))
            start = 0
            for r, stop in enumerate(newlines.tolist()):
                end = stop - 1 if stop > start and data[stop - 1] == 13 else stop  # \r\n
                if end > start:
                    cuts = [start, *(commas[bounds[r] : bounds[r + 1]] + 1).tolist(), end + 1]
                    spans = [(a - start, b - 1 - start) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
                    yield line, position + start, position + end, spans, data[start:end]
                line += data.count(b"\n", start, stop + 1)
                start = stop + 1
            position += start
            carry = data[start:]
            if last:
                return


def _cell(record: bytes, span: tuple[int, int]) -> str:
    """The text of one field: surrounding quotes removed and ``""`` unescaped."""
    text = record[span[0] : span[1]].decode("utf-8").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('""', '"')
    return text.strip()


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


class ChexmaskTable:
    """The index of a CheXmask CSV: image id → :class:`MaskRow`; ids listed twice are kept apart.

    Raises
    ------
    MaskauditError
        When the file cannot be read, is gzip-compressed, lacks a needed column (all listed,
        with the file's own), or has a record whose field count differs from the header's
        (naming its line).
    """

    def __init__(self, path: Path, id_column: str) -> None:
        self.path = Path(path)
        self.id_column = id_column
        needed = [id_column, DICE, LEFT, RIGHT, HEART, HEIGHT, WIDTH]
        try:
            with self.path.open("rb") as handle:
                magic = handle.read(2)
        except OSError as exc:
            raise MaskauditError(f"{self.path}: cannot read the CheXmask CSV ({exc})") from None
        if magic == b"\x1f\x8b":
            raise MaskauditError(
                f"{self.path}: gzip-compressed; masks are read by seeking, so decompress it once "
                f"(gunzip -k {self.path}) and point the config at the .csv"
            )
        self.rows: dict[str, MaskRow] = {}
        self.repeated: dict[str, int] = {}  # id → first line, for ids listed more than once
        self.n_records = 0
        try:
            self._index(needed)
        except UnicodeDecodeError as exc:
            raise MaskauditError(f"{self.path}: cannot read the CheXmask CSV ({exc})") from None

    def _index(self, needed: list[str]) -> None:
        spans = record_spans(self.path)
        first = next(spans, None)
        if first is None:
            raise MaskauditError(f"{self.path}: empty CheXmask CSV (no header)")
        _, _, _, header_spans, header_bytes = first
        self.header = [_cell(header_bytes, s) for s in header_spans]
        require_columns(self.path, self.header, needed, kind="CheXmask")
        self.columns = {name: self.header.index(name) for name in needed}
        id_at, dice_at, h_at, w_at = (self.columns[c] for c in (self.id_column, DICE, HEIGHT, WIDTH))
        n_fields = len(self.header)
        for line, start, end, fields, record in spans:
            if len(fields) != n_fields:
                raise MaskauditError(
                    f"{self.path} line {line}: {len(fields)} fields, the header has {n_fields} "
                    "(a broken quote or a cut-off file?)"
                )
            self.n_records += 1
            image_id = _cell(record, fields[id_at])
            if not image_id:
                continue
            if image_id in self.rows:
                self.repeated.setdefault(image_id, self.rows[image_id].line)
                continue
            h, w = _number(_cell(record, fields[h_at])), _number(_cell(record, fields[w_at]))
            self.rows[image_id] = MaskRow(
                offset=start,
                dice=_number(_cell(record, fields[dice_at])),
                height=int(h) if math.isfinite(h) else 0,
                width=int(w) if math.isfinite(w) else 0,
                line=line,
                end=end,
            )

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

        Reads only that record's bytes (it may span many lines: ``Landmarks``).

        Raises
        ------
        MaskauditError
            When the record cannot be read or an RLE string is malformed.
        """
        try:
            with self.path.open("rb") as handle:
                handle.seek(row.offset)
                data = handle.read(row.end - row.offset) if row.end >= 0 else handle.readline()
            fields = next(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
            rle = {name: fields[self.columns[name]] for name in (LEFT, RIGHT, HEART)}
            left = decode_rle(rle[LEFT], row.height, row.width)
            right = decode_rle(rle[RIGHT], row.height, row.width)
            heart = decode_rle(rle[HEART], row.height, row.width)
        except (OSError, UnicodeDecodeError, StopIteration, IndexError, ValueError, csv.Error) as exc:
            raise MaskauditError(f"{self.path} line {row.line}: cannot decode the CheXmask RLE ({exc})") from None
        return {"lungs": left | right, "heart": heart}


def size_mismatch(height: int, width: int, row: MaskRow, image_path: str, table: Path) -> str:
    """The ``mask size mismatch`` reason when a ``height × width`` image is not CheXmask's size ("" if it is).

    Says so when the two sizes are each other's transpose (see the module's note on
    ``back_padchest.py``).
    """
    if (height, width) == (row.height, row.width):
        return ""
    transposed = " (the transpose of the image's size)" if (height, width) == (row.width, row.height) else ""
    return (
        f"mask size mismatch: {image_path} is {width}x{height} but CheXmask ({Path(table).name} line "
        f"{row.line}) gives Width x Height {row.width}x{row.height}{transposed}"
    )


def check_size(image: np.ndarray, row: MaskRow, image_path: str, table: Path) -> None:
    """Raise :func:`size_mismatch`'s reason as an error when the image is not CheXmask's Height × Width."""
    why = size_mismatch(image.shape[0], image.shape[1], row, image_path, table)
    if why:
        raise MaskauditError(why)


def file_stamp(path: Path | None) -> dict[str, object] | None:
    """Size and modification time of a file: a cheap fingerprint of a large input."""
    if path is None:
        return None
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
