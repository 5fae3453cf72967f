"""NIH ChestX-ray14 with CheXmask lungs and heart: the study's external chest X-ray test set (SPEC §1).

ChestX-ray14: X. Wang et al., "ChestX-ray8: Hospital-scale chest X-ray database and benchmarks on
weakly-supervised classification and localization of common thorax diseases", CVPR 2017;
download: https://nihcc.app.box.com/v/ChestXray-NIHCC. CheXmask (``ChestX-Ray8.csv``): see
:mod:`maskaudit.data.sources.chexmask`.

Published quirks, and where each is known from:

- The images come as twelve archives that unpack to ``images_001/images/`` …
  ``images_012/images/`` (NIH's box folder), so files are found anywhere under ``root`` by name.
- ``Data_Entry_2017.csv`` gives ages as ``058Y`` in its first release and as plain years in
  ``Data_Entry_2017_v2020.csv`` (the file torchxrayvision ships); both are read. Its header
  splits ``OriginalImage[Width,Height]`` over two columns, which are not used.
- CheXmask's id column in ``ChestX-Ray8.csv`` is ``Image Index``, the NIH column's name
  (CheXmask-Database ``Example.ipynb``: "the column name changes across dataset").
- The study scored every ChestX-ray14 image unmasked and the masked strategies where
  CheXmask has a mask (SPEC §5); here an image without a usable CheXmask row is kept without
  masks (:attr:`Record.no_masks`), never dropped from the external set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from maskaudit.config import ChestXray14Data
from maskaudit.data.sources.base import Loaded, Record, Rejected, Source, require_columns
from maskaudit.data.sources.chexmask import ChexmaskTable, file_stamp
from maskaudit.data.sources.padchest import ChexmaskKey, blank, chexmask_header_problem, load_chexmask
from maskaudit.errors import MaskauditError

ID, LABELS, PATIENT = "Image Index", "Finding Labels", "Patient ID"
AGE, SEX, VIEW = "Patient Age", "Patient Gender", "View Position"
COLUMNS = [ID, LABELS, PATIENT, AGE, SEX, VIEW]


class ChestXray14Source(Source):
    """ChestX-ray14 PNGs (found anywhere under ``root`` by file name) with CheXmask ``lungs`` and ``heart``.

    Cite Wang et al. 2017 and CheXmask (Gaggion et al. 2024); downloads at
    https://nihcc.app.box.com/v/ChestXray-NIHCC and
    https://physionet.org/content/chexmask-cxr-segmentation-data/.

    ``Finding Labels`` is split on ``|``; each finding is normalised (stripped, lower-cased,
    ``_`` → space, then ``label_aliases``), so ``Effusion`` is the study's ``effusion``;
    ``No Finding`` is negative for every class. A row is dropped for: a missing or repeated
    ``Image Index``, an empty ``Finding Labels``, an image file not found under ``root`` (or
    found twice). A row with no CheXmask row (or one listed twice, or ``Dice RCA (Mean)`` at or
    below ``min_dice_rca``) is offered without masks (``Record.no_masks``): as the study's
    external test set it is still scored under ``full`` (the study scored every image
    unmasked), under masked strategies only where a mask exists; as a training set it is
    rejected. Metadata: ``age`` (years), ``sex``, ``projection`` (``View Position``).
    """

    name = "chestxray14"
    config_type = ChestXray14Data
    rois = ("lungs", "heart")
    channels = 1
    #: the only place ChestX-ray14's spelling is known: normalised NIH finding → study class
    label_aliases = {"pleural effusion": "effusion", "no finding": ""}

    def __init__(self, config: ChestXray14Data) -> None:
        self.config = config
        self.root = Path(config.root).resolve()
        self.labels_csv = Path(config.labels_csv)
        aliased = [c for c in config.classes if self.label_aliases.get(c, c) != c]
        if aliased:
            raise MaskauditError(f"data.classes: {', '.join(map(repr, aliased))} is not a study class name")
        try:
            header = pd.read_csv(self.labels_csv, nrows=0)
        except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise MaskauditError(f"{self.labels_csv}: cannot read the ChestX-ray14 CSV ({exc})") from None
        require_columns(self.labels_csv, header.columns, COLUMNS)
        self.chexmask = ChexmaskTable(Path(config.chexmask_csv), id_column=ID)

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def metadata_columns(self) -> list[str]:
        return ["age", "sex", "projection"]

    def __repr__(self) -> str:
        return f"ChestXray14Source({self.labels_csv.name}, {len(self.chexmask.rows)} CheXmask rows)"

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": self.name,
            "config": cfg.model_dump(mode="json"),
            "files": [file_stamp(p) for p in (cfg.labels_csv, cfg.chexmask_csv)],
        }

    @classmethod
    def normalise_label(cls, label: str) -> str:
        text = label.strip().lower().replace("_", " ")
        return cls.label_aliases.get(text, text)

    def _image_index(self) -> tuple[dict[str, Path], set[str]]:
        """Every image file under ``root`` by name (the NIH archives unpack to ``images_NNN/images/``)."""
        found: dict[str, Path] = {}
        twice: set[str] = set()
        for path in self.root.rglob("*"):
            if path.suffix.lower() == ".png" and path.is_file():
                if path.name in found:
                    twice.add(path.name)
                found.setdefault(path.name, path)
        return found, twice

    def records(self) -> Iterator[Record | Rejected]:
        cfg = self.config
        try:
            frame = pd.read_csv(self.labels_csv, usecols=COLUMNS, dtype=str, keep_default_na=False, na_values=[""])
        except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise MaskauditError(f"{self.labels_csv}: cannot read the ChestX-ray14 CSV ({exc})") from None
        files, twice = self._image_index()
        seen: dict[str, int] = {}
        name = self.labels_csv.name
        for position, row in enumerate(frame.to_dict("records")):
            line = position + 2
            image_id = "" if blank(row[ID]) else str(row[ID]).strip()
            patient = "" if blank(row[PATIENT]) else str(row[PATIENT]).strip()
            metadata = {
                "age": _age(row[AGE]),
                "sex": None if blank(row[SEX]) else str(row[SEX]).strip(),
                "projection": None if blank(row[VIEW]) else str(row[VIEW]).strip(),
            }
            findings = {self.normalise_label(x) for x in str(row[LABELS]).split("|")} - {""}
            labels = {} if blank(row[LABELS]) else {c: int(c in findings) for c in cfg.classes}

            def reject(reason: str, image_id: str = image_id, line: int = line, patient: str = patient,
                       metadata: dict = metadata, labels: dict = labels) -> Rejected:
                return Rejected(image_id=image_id, reason=f"{reason} ({name} row {line})", source_path=image_id,
                                row=line, patient_id=patient or None, labels=labels, metadata=metadata)

            if not image_id:
                yield reject("missing image id")
                continue
            if image_id in seen:
                yield reject(f"duplicate image id: {image_id!r} (first on row {seen[image_id]})")
                continue
            seen[image_id] = line
            if not labels:
                yield reject("no labels: the Finding Labels cell is empty")
                continue
            if image_id in twice:
                yield reject(f"image file found twice under {self.root}: {image_id}")
                continue
            path = files.get(image_id)
            if path is None:
                yield reject(f"image file not found: {image_id} under {self.root}")
                continue
            if not patient:
                yield reject("missing patient id")
                continue
            no_masks = self.chexmask.reason(image_id, cfg.min_dice_rca)
            if no_masks:
                no_masks = f"{no_masks} ({name} row {line})"
            yield Record(
                image_id=image_id,
                patient_id=patient,
                labels=labels,
                metadata=metadata,
                source_path=str(path.relative_to(self.root)),
                key=ChexmaskKey(row=line, image=str(path), mask=None if no_masks else self.chexmask.rows[image_id]),
                row=line,
                no_masks=no_masks,
            )

    def load(self, record: Record) -> Loaded:
        """The image and its CheXmask ``lungs`` and ``heart``; a size other than CheXmask's is an error."""
        return load_chexmask(self, record)

    def header_problem(self, record: Record) -> str:
        return chexmask_header_problem(self, record)


def _age(value: Any) -> int | None:
    """Years from ``58`` or the older release's ``058Y``; None when missing or in months/days."""
    if blank(value):
        return None
    match = re.fullmatch(r"0*(\d+)\s*([YyMmDd]?)", str(value).strip())
    if not match or match.group(2).upper() in ("M", "D"):
        return None
    return int(match.group(1))
