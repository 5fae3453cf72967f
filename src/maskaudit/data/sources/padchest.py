"""PadChest with CheXmask lungs and heart: the study's chest X-ray data (SPEC §1).

PadChest: A. Bustos, A. Pertusa, J.-M. Salinas, M. de la Iglesia-Vayá, "PadChest: A large chest
x-ray image dataset with multi-label annotated reports", Medical Image Analysis 66, 101797
(2020); download: https://bimcv.cipf.es/bimcv-projects/padchest/.
CheXmask (``Padchest.csv``): see :mod:`maskaudit.data.sources.chexmask`.

Published quirks, and where each is known from:

- The labels CSV ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (also shipped as
  ``.csv.gz``, which pandas reads as it is) has a leading unnamed index column; images lie at
  ``<ImageDir>/<ImageID>`` once the archives ``0.zip`` … ``54.zip`` are unpacked into one
  folder (BIMCV's PadChest page; SPEC §1).
- ``Labels`` is a Python-literal list with stray spaces and repeats (``[' cardiomegaly',
  'pleural effusion']``); the study strips, lower-cases and de-duplicates, and writes
  ``effusion`` for PadChest's ``pleural effusion`` (SPEC §1). ``PatientBirth`` is a float year
  (``1930.0``), empty for some rows.
- Some published PNGs are truncated or broken (torchxrayvision's ``PC_Dataset`` lists 21 by
  name: "OSError: image file is truncated", "broken PNG file"): they are found when decoded,
  so ``maskaudit check`` (headers only) passes them and ``prepare`` rejects them as
  ``unreadable image or mask``.
- CheXmask covers only part of PadChest and rates each mask (``Dice RCA (Mean)``); a row
  without a usable mask is kept by the source without masks (see the rules below).
"""

from __future__ import annotations

import ast
import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from maskaudit.config import PadChestData
from maskaudit.data.imaging import image_header, read_image
from maskaudit.data.sources.base import Loaded, Record, Rejected, Source, require_columns
from maskaudit.data.sources.chexmask import ChexmaskTable, MaskRow, check_size, file_stamp, size_mismatch
from maskaudit.errors import MaskauditError

COLUMNS = ["ImageID", "ImageDir", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection", "Labels"]


class ChexmaskKey(NamedTuple):
    """What :meth:`load` needs: the labels-CSV row, the image file and the CheXmask row (None: no usable mask)."""

    row: int
    image: str
    mask: MaskRow | None


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def load_chexmask(source: Any, record: Record) -> Loaded:
    """Image and CheXmask ROIs of a record whose key is a :class:`ChexmaskKey` (PadChest, ChestX-ray14).

    A record without a usable CheXmask row (``record.no_masks``) gets its image and no ROI.
    """
    key: ChexmaskKey = record.key
    image = read_image(Path(key.image), "gray")
    if key.mask is None:
        return Loaded(image=image, rois={})
    check_size(image, key.mask, key.image, source.chexmask.path)
    return Loaded(image=image, rois=source.chexmask.masks(key.mask))


def chexmask_header_problem(source: Any, record: Record) -> str:
    """What :func:`load_chexmask` would reject, from the image's header: unreadable, or not CheXmask's size."""
    key: ChexmaskKey = record.key
    try:
        header = image_header(Path(key.image))
    except MaskauditError as exc:
        return f"unreadable image or mask: {exc}"
    if key.mask is None:
        return ""
    return size_mismatch(header.height, header.width, key.mask, key.image, source.chexmask.path)


class PadChestSource(Source):
    """PadChest images (16-bit PNG, ``<root>/<ImageDir>/<ImageID>``) with CheXmask ``lungs`` and ``heart``.

    Cite PadChest (Bustos et al. 2020) and CheXmask (Gaggion et al. 2024); downloads at
    https://bimcv.cipf.es/bimcv-projects/padchest/ and
    https://physionet.org/content/chexmask-cxr-segmentation-data/.

    Rules (SPEC §1), in the order a row is checked; the first that fails is its reason:

    1. ``duplicate image id``: an ImageID seen on an earlier row of the labels CSV;
    2. ``invalid image``: listed in the study's ``Invalid_images.csv`` (when given);
    3. ``projection not kept``: ``Projection`` not in ``projections`` (PA, AP, AP_horizontal);
    4. ``no labels``: an empty ``Labels`` cell; ``labels not a list`` when it does not parse;
    5. ``excluded label``: the raw ``Labels`` text contains an exclusion word, matched
       case-sensitively before lower-casing as the study did (``Unchanged`` drops, PadChest's
       ``unchanged`` does not unless ``drop_unchanged_lowercase``);
    6. ``no labels``: nothing left after stripping, lower-casing and de-duplicating;
    7. ``image path leaves the data folder`` / ``image file not found``;
    8. ``no CheXmask mask`` / ``duplicate CheXmask row`` / ``low CheXmask quality``
       (``Dice RCA (Mean) <= min_dice_rca``): the record is offered without masks
       (``Record.no_masks``), which the store rejects for a training set and scores under
       ``full`` alone in an external set.

    A kept row is multi-hot over ``classes``; ``label_aliases`` maps PadChest's spelling onto
    the study's (``pleural effusion`` → ``effusion``). Metadata: ``birth_year``, ``sex``,
    ``projection``. At load, an image whose size is not CheXmask's ``Height × Width`` is
    rejected (``mask size mismatch``).
    """

    name = "padchest"
    config_type = PadChestData
    rois = ("lungs", "heart")
    channels = 1
    #: the only place PadChest's spelling of a class is known: PadChest label → study class
    label_aliases = {"pleural effusion": "effusion"}

    def __init__(self, config: PadChestData) -> None:
        self.config = config
        self.root = Path(config.root).resolve()
        self.labels_csv = Path(config.labels_csv)
        aliased = [c for c in config.classes if c in self.label_aliases]
        if aliased:
            raise MaskauditError(
                f"data.classes: write {', '.join(repr(self.label_aliases[c]) for c in aliased)} instead of "
                f"{', '.join(map(repr, aliased))} (PadChest's spelling is mapped to the study's)"
            )
        header = self._read(nrows=0)
        require_columns(self.labels_csv, header.columns, COLUMNS)
        self.chexmask = ChexmaskTable(Path(config.chexmask_csv), id_column="ImageID")
        self.invalid = self._read_invalid(config.invalid_csv) if config.invalid_csv else set()

    # ------------------------------------------------------------------------------ description

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def metadata_columns(self) -> list[str]:
        return ["birth_year", "sex", "projection"]

    def __repr__(self) -> str:
        return (
            f"PadChestSource({self.labels_csv.name}, {len(self.chexmask.rows)} CheXmask rows, "
            f"{len(self.invalid)} invalid ids, classes={self.classes})"
        )

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": self.name,
            "config": cfg.model_dump(mode="json"),
            "files": [file_stamp(p) for p in (cfg.labels_csv, cfg.chexmask_csv, cfg.invalid_csv)],
        }

    @classmethod
    def normalise_label(cls, label: str) -> str:
        """A PadChest label in the study's vocabulary: stripped, lower-cased, aliased."""
        text = label.strip().lower()
        return cls.label_aliases.get(text, text)

    # ---------------------------------------------------------------------------------- reading

    def _read(self, nrows: int | None = None) -> pd.DataFrame:
        try:
            return pd.read_csv(
                self.labels_csv,
                nrows=nrows,
                usecols=lambda c: c in COLUMNS,
                dtype={"ImageID": str, "ImageDir": str, "PatientID": str, "Labels": str, "Projection": str},
                keep_default_na=False,
                na_values=[""],
            )
        except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise MaskauditError(f"{self.labels_csv}: cannot read the PadChest labels CSV ({exc})") from None

    @staticmethod
    def _read_invalid(path: Path) -> set[str]:
        """ImageIDs of the study's ``Invalid_images.csv``.

        The study's file has no header: each line is a rejected labels-CSV row (index, ImageID,
        …, path). A file with an ``ImageID`` header column is read by name; otherwise every
        cell naming a ``.png`` file (ImageID, or the path's last part) counts.
        """
        try:
            with Path(path).open(newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
        except (OSError, UnicodeDecodeError) as exc:
            raise MaskauditError(f"{path}: cannot read the invalid-images CSV ({exc})") from None
        if rows and "ImageID" in rows[0]:
            column = rows[0].index("ImageID")
            return {r[column].strip() for r in rows[1:] if len(r) > column and r[column].strip()}
        return {
            cell.strip().replace("\\", "/").rsplit("/", 1)[-1]
            for r in rows
            for cell in r
            if cell.strip().lower().endswith(".png")
        }

    def _clean_labels(self, raw: Any) -> tuple[list[str] | None, str]:
        """The cleaned label list, or None and the reason the row is dropped."""
        if blank(raw):
            return None, "no labels: the Labels cell is empty"
        text = str(raw)
        words = list(self.config.exclude_words)
        if self.config.drop_unchanged_lowercase:
            words.append("unchanged")
        hit = next((w for w in words if w in text), None)
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None, f"labels not a list: {text[:60]!r}"
        if not isinstance(parsed, list | tuple) or not all(isinstance(x, str) for x in parsed):
            return None, f"labels not a list: {text[:60]!r}"
        if hit is not None:
            return None, f"excluded label: {hit!r} in {text[:80]}"
        labels = list(dict.fromkeys(self.normalise_label(x) for x in parsed if x.strip()))
        if not labels:
            return None, f"no labels: {text[:60]}"
        return labels, ""

    # ---------------------------------------------------------------------------------- records

    def records(self) -> Iterator[Record | Rejected]:
        cfg = self.config
        frame = self._read()
        seen: dict[str, int] = {}
        name = self.labels_csv.name
        for position, row in enumerate(frame.to_dict("records")):
            line = position + 2  # header is row 1
            image_id = "" if blank(row["ImageID"]) else str(row["ImageID"]).strip()
            image_dir = "" if blank(row["ImageDir"]) else str(row["ImageDir"]).strip()
            source_path = f"{image_dir}/{image_id}" if image_dir else image_id
            patient = "" if blank(row["PatientID"]) else str(row["PatientID"]).strip()
            projection = "" if blank(row["Projection"]) else str(row["Projection"]).strip()
            birth = row["PatientBirth"]
            metadata = {
                "birth_year": None if blank(birth) else _year(birth),
                "sex": None if blank(row["PatientSex_DICOM"]) else str(row["PatientSex_DICOM"]).strip(),
                "projection": projection or None,
            }
            context = {"patient_id": patient or None, "metadata": metadata}

            def reject(reason: str, image_id: str = image_id, path: str = source_path, line: int = line,
                       context: dict = context, labels: list[str] | None = None) -> Rejected:
                known = {} if labels is None else {c: int(c in labels) for c in cfg.classes}
                return Rejected(image_id=image_id, reason=f"{reason} ({name} row {line})", source_path=path, row=line,
                                labels=known, **context)

            if not image_id:
                yield reject("missing image id")
                continue
            if image_id in seen:
                yield reject(f"duplicate image id: {image_id!r} (first on row {seen[image_id]})")
                continue
            seen[image_id] = line
            if image_id in self.invalid:
                yield reject(f"invalid image: listed in {Path(cfg.invalid_csv or '').name}")
                continue
            if projection not in cfg.projections:
                yield reject(f"projection not kept: {projection or '(empty)'!r} not in {cfg.projections}")
                continue
            labels, why = self._clean_labels(row["Labels"])
            if labels is None:
                yield reject(why)
                continue
            path = (self.root / image_dir / image_id).resolve()
            if not path.is_relative_to(self.root):
                yield reject(f"image path leaves the data folder {self.root}: {source_path}", labels=labels)
                continue
            if not path.is_file():
                yield reject(f"image file not found: {source_path}", labels=labels)
                continue
            if not patient:
                yield reject("missing patient id", labels=labels)
                continue
            no_masks = self.chexmask.reason(image_id, cfg.min_dice_rca)
            if no_masks:
                no_masks = f"{no_masks} ({name} row {line})"
            yield Record(
                image_id=image_id,
                patient_id=patient,
                labels={c: int(c in labels) for c in cfg.classes},
                metadata=metadata,
                source_path=source_path,
                key=ChexmaskKey(row=line, image=str(path), mask=None if no_masks else self.chexmask.rows[image_id]),
                row=line,
                no_masks=no_masks,
            )

    def load(self, record: Record) -> Loaded:
        """The 16-bit image and its CheXmask ``lungs`` (left OR right) and ``heart`` at native size.

        Raises
        ------
        MaskauditError
            For an unreadable image or RLE, or an image whose size is not CheXmask's.
        """
        return load_chexmask(self, record)

    def header_problem(self, record: Record) -> str:
        return chexmask_header_problem(self, record)

    def totals(self) -> dict[str, int]:
        """Positives per class among the kept rows (reads the labels CSV)."""
        counts = dict.fromkeys(self.classes, 0)
        for item in self.records():
            if isinstance(item, Record):
                for c, v in item.labels.items():
                    counts[c] += v
        return counts


def _year(value: Any) -> int | None:
    try:
        return int(float(str(value).strip()))
    except ValueError:
        return None
