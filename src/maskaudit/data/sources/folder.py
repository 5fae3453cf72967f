"""Any folder of images with masks and a labels CSV: the source for users' own data.

One CSV row per image. Paths in the CSV are relative to the CSV's folder and must stay inside
it. Row numbers in messages and in :attr:`Rejected.row` count the header as row 1, so the
first data row is row 2: the number a spreadsheet shows beside the row.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from maskaudit.config import FolderData
from maskaudit.data.imaging import image_header, read_image, read_mask
from maskaudit.data.pixels import multi_frame
from maskaudit.data.sources.base import (
    Loaded,
    Record,
    Rejected,
    Source,
    mask_size_mismatch,
    require_columns,
    shown_path,
)
from maskaudit.errors import MaskauditError

#: The ROI name given to ``mask_column``.
DEFAULT_ROI = "roi"


class FolderKey(NamedTuple):
    """What :meth:`FolderSource.load` needs: the CSV row number and absolute file paths."""

    row: int
    image: str
    masks: tuple[tuple[str, str], ...]


def _file_kind(mode: int) -> str:
    """What a file that is not a regular file is (a FIFO would block a reader forever)."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _plain(value: Any) -> Any:
    """A CSV cell as a plain Python value: NaN → None, numpy scalars → int/float/str/bool."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _label(value: Any) -> int | None:
    """0 or 1 from a cell such as ``1``, ``"0"``, ``1.0``; None for anything else."""
    if _blank(value):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


class FolderSource(Source):
    """Images, masks and labels listed in one CSV (SPEC §1, "a folder (any user data)").

    ROIs: ``mask_column`` gives the ROI named ``"roi"``; each ``mask_columns`` entry
    ``{name: column}`` another named ROI; the first ROI is the default ROI of a run. With no
    mask column at all the source has no ROI.

    A row is rejected (with a reason naming the CSV row) for: an empty or missing image or
    mask path, a path that leaves the CSV's folder, a missing image or mask file, a label that
    is not 0/1 (or is missing), a missing patient id (when ``patient_column`` is set), a
    missing image id (when ``id_column`` is set), and an image id seen on an earlier kept row.

    Parameters
    ----------
    config : FolderData
        The ``data`` section of the config.

    Raises
    ------
    MaskauditError
        When the CSV cannot be read, or lacks any column the config names (all listed at once).
    """

    name = "folder"
    config_type = FolderData

    def __init__(self, config: FolderData) -> None:
        self.config = config
        self.csv = Path(config.labels_csv)
        self.root = config.root
        self.color = config.color
        self.channels = 1 if config.color == "gray" else 3
        self._mask_columns: dict[str, str] = {}
        if config.mask_column is not None:
            self._mask_columns[DEFAULT_ROI] = config.mask_column
        for roi, column in config.mask_columns.items():
            if roi in self._mask_columns:
                raise MaskauditError(
                    f"{self.csv}: ROI name {roi!r} in mask_columns clashes with the ROI of mask_column "
                    f"(named {DEFAULT_ROI!r}); pick another name"
                )
            if "+" in roi:
                raise MaskauditError(f"{self.csv}: ROI name {roi!r} may not contain '+' (it joins ROIs)")
            self._mask_columns[roi] = column
        self.rois = tuple(self._mask_columns)
        header = self._read(nrows=0)
        require_columns(self.csv, header.columns, self._used_columns())
        self._csv_sha = hashlib.sha256(self.csv.read_bytes()).hexdigest()[:16]

    # ----------------------------------------------------------------------------------- metadata

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def metadata_columns(self) -> list[str]:
        return list(self.config.metadata_columns)

    def __repr__(self) -> str:
        return f"FolderSource({self.csv}, sha256={self._csv_sha}, rois={list(self.rois)}, color={self.color})"

    def describe(self) -> dict[str, Any]:
        """What the prepared store records about this source (and compares on a re-run)."""
        return {
            "name": self.name,
            "labels_csv": str(self.csv.resolve()),
            "csv_sha256": self._csv_sha,
            "config": self.config.model_dump(mode="json"),
        }

    def _used_columns(self) -> list[str]:
        cfg = self.config
        columns = [cfg.image_column, *self._mask_columns.values()]
        columns += [c for c in (cfg.patient_column, cfg.id_column, cfg.split_column) if c is not None]
        columns += [*cfg.classes, *cfg.metadata_columns]
        return list(dict.fromkeys(columns))

    def _separator(self) -> str:
        """The CSV's field separator: ``,``, or ``;`` / tab when the header line has those and no comma (a
        spreadsheet saved in a locale whose decimal mark is the comma writes ``;``)."""
        try:
            with self.csv.open(encoding="utf-8-sig", errors="replace") as handle:
                header = handle.readline()
        except OSError as exc:
            raise MaskauditError(f"{self.csv}: cannot read the labels CSV ({exc})") from None
        if "," not in header:
            for other in (";", "\t"):
                if other in header:
                    return other
        return ","

    def _read(self, nrows: int | None = None) -> pd.DataFrame:
        """The labels CSV as text columns: UTF-8 with or without a byte-order mark, its separator detected."""
        cfg = self.config
        as_text = [cfg.image_column, *self._mask_columns.values(), *cfg.classes]
        as_text += [c for c in (cfg.patient_column, cfg.id_column, cfg.split_column) if c is not None]
        try:
            return pd.read_csv(self.csv, nrows=nrows, dtype=dict.fromkeys(as_text, str), encoding="utf-8-sig",
                               sep=self._separator())
        except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:  # e.g. a ragged row
            raise MaskauditError(f"{self.csv}: cannot read the labels CSV ({' '.join(str(exc).split())})") from None

    # ------------------------------------------------------------------------------------ records

    def _resolve(self, value: Any, what: str, problems: list[str]) -> Path | None:
        """An absolute path inside the root naming a regular file, or None with the problem appended.

        What the OS says about one row's path (a symlink loop, a name too long, a NUL byte, a
        component that is a file, permission denied) is that row's problem, with the OS's reason:
        ``unreadable image: <path>: <reason>``; never an error that stops the dataset.
        """
        if _blank(value):
            problems.append(f"empty {what} path")
            return None
        text = str(value).strip()
        shown = shown_path(text)
        try:
            path = (self.root / text).resolve()
            if not path.is_relative_to(self.root):
                problems.append(f"{what} path leaves the data folder {self.root}: {shown}")
                return None
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            problems.append(f"{what} file not found: {shown}")
            return None
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: pathlib's "Symlink loop" (Python < 3.13)
            reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
            problems.append(f"unreadable {what}: {shown}: {reason}")
            return None
        if stat.S_ISDIR(mode):
            problems.append(f"unreadable {what}: {shown}: is a directory, not a file")
            return None
        if not stat.S_ISREG(mode):
            problems.append(f"unreadable {what}: {shown}: not a regular file ({_file_kind(mode)})")
            return None
        return path

    def records(self) -> Iterator[Record | Rejected]:
        """Every CSV row in file order: a :class:`Record`, or a :class:`Rejected` with its reasons.

        A row with several problems names them all, separated by ``"; "``, and ends with the
        CSV row; the text before the first ``":"``, ``";"`` or ``"("`` is the kind of the first
        problem (what the store's counts group by).
        """
        cfg = self.config
        frame = self._read()
        seen: dict[str, int] = {}
        for position, row in enumerate(frame.to_dict("records")):
            line = position + 2  # header is row 1
            problems: list[str] = []
            image_text = row[cfg.image_column]
            image_path = self._resolve(image_text, "image", problems)
            masks: list[tuple[str, str]] = []
            for roi, column in self._mask_columns.items():
                what = "mask" if roi == DEFAULT_ROI else f"mask {roi!r}"
                mask_path = self._resolve(row[column], what, problems)
                if mask_path is not None:
                    masks.append((roi, str(mask_path)))
            labels: dict[str, int] = {}
            for name in cfg.classes:
                label = _label(row[name])
                if label is None:
                    shown = "missing" if _blank(row[name]) else repr(str(row[name]).strip())
                    problems.append(f"label {name!r} not 0/1: {shown}")
                else:
                    labels[name] = label
            if cfg.id_column is not None:
                image_id = "" if _blank(row[cfg.id_column]) else str(row[cfg.id_column]).strip()
                if not image_id:
                    problems.append("missing image id")
            else:
                image_id = Path(str(image_text).strip()).stem if not _blank(image_text) else ""
            if cfg.patient_column is not None:
                patient_id = "" if _blank(row[cfg.patient_column]) else str(row[cfg.patient_column]).strip()
                if not patient_id:
                    problems.append("missing patient id")
            else:
                patient_id = image_id
            if image_id and image_id in seen and not problems:
                problems.append(f"duplicate image id: {image_id!r} (first on row {seen[image_id]})")
            source_path = "" if _blank(image_text) else str(image_text).strip()
            split = None
            if cfg.split_column is not None and not _blank(row[cfg.split_column]):
                split = str(row[cfg.split_column]).strip().lower()
            metadata = {name: _plain(row[name]) for name in cfg.metadata_columns}
            if problems:
                reason = "; ".join(problems) + f" ({self.csv.name} row {line})"
                yield Rejected(image_id=image_id, reason=reason, source_path=source_path, row=line,
                               patient_id=patient_id or None, labels=labels, metadata=metadata, split=split)
                continue
            assert image_path is not None
            seen[image_id] = line
            yield Record(
                image_id=image_id,
                patient_id=patient_id,
                labels=labels,
                metadata=metadata,
                source_path=source_path,
                split=split,
                key=FolderKey(row=line, image=str(image_path), masks=tuple(masks)),
                row=line,
            )

    # --------------------------------------------------------------------------------------- load

    def header_problem(self, record: Record) -> str:
        """What :meth:`load` would reject, from the file headers: an unreadable or multi-frame DICOM file, a mask
        whose size differs from the image's. A truncated file is only found when decoded (``prepare``)."""
        key: FolderKey = record.key
        try:
            headers = [(key.image, image_header(Path(key.image)))]
            headers += [(mask, image_header(Path(mask))) for _, mask in key.masks]
        except MaskauditError as exc:
            return f"unreadable image or mask: {exc}"
        for path, header in headers:
            if header.kind == "dicom" and header.frames > 1:
                return f"unreadable image or mask: {multi_frame(path, header.frames)}"
        image = headers[0][1]
        for mask_path, mask in headers[1:]:
            if (mask.height, mask.width) != (image.height, image.width):
                return mask_size_mismatch(mask_path, (mask.height, mask.width), key.image,
                                          (image.height, image.width), f"{self.csv.name} row {key.row}")
        return ""

    def load(self, record: Record) -> Loaded:
        """Decode the record's image and masks.

        Raises
        ------
        MaskauditError
            When a file cannot be decoded, or a mask's size differs from the image's.
        """
        key: FolderKey = record.key
        image = read_image(Path(key.image), self.color, dicom=self.config.dicom)
        rois: dict[str, np.ndarray] = {}
        for roi, mask_path in key.masks:
            mask = read_mask(Path(mask_path))
            why = mask_size_mismatch(mask_path, mask.shape, key.image, image.shape[:2],
                                     f"{self.csv.name} row {key.row}")
            if why:
                raise MaskauditError(why)
            rois[roi] = mask
        return Loaded(image=image, rois=rois)
