"""Chákṣu: the study's fundus data, three cameras, official Train/Test split (SPEC §1, §3).

Chákṣu: J. R. H. Kumar et al., "Chákṣu: A glaucoma specific fundus image database", Scientific
Data 10, 70 (2023); download: https://doi.org/10.6084/m9.figshare.20123135.

Layout read (folder names matched case-insensitively)::

    <root>/Train|Test/1.0_Original_Fundus_Images/<camera>/<image>.jpg|.png|.JPG
    <root>/Train|Test/4.0_OD_CO_Fusion_Images/**/STAPLE/<mask>                  (matched by file stem)
    <root>/Train|Test/6.0_Glaucoma_Decision/Glaucoma_Decision_Comparison_<camera>_majority.csv

Published quirks, and where each is known from:

- The Test tree's fusion masks of the Remidio camera lie under ``Remedio/STAPLE`` (misspelt):
  MedIMeta's Chákṣu reader (``if device == "Remidio" and split == "Test": device = "Remedio"``,
  "adapt to typo in the original data") and the dataset card's folder tree. The study's own
  code (github.com/TheoSourget/MMC_Masking_EyeFundus, ``make_dataset.py``) finds masks with
  ``<split>/4.0_OD_CO_Fusion_Images/**/STAPLE/*`` by file name, whatever the camera folder is
  called. So masks are matched here by the image's stem within its split; the camera folder
  only breaks a tie, compared loosely (:func:`same_camera`), and no camera is ever dropped.
- Masks are TIF files (dataset card: "Disc & Cup masks are in TIF format"); in ``4.0`` the
  disc is gray ≈ 127 and the cup ≈ 255 (dataset card).
- Decision CSVs: ``Glaucoma_Decision_Comparison_<camera>_majority.csv`` per split (the study's
  ``make_dataset.py``; the Test folder also holds ``Glaucoma_Decision_Majority_<camera>.csv``
  and per-fusion ``Majority/<camera>.csv`` tables, so the exact name is preferred). The
  decision column is ``Majority Decision`` in Bosch's file and ``Glaucoma Decision`` in the
  others (the study renames Bosch's; MedIMeta maps both: "inconsistent naming in source data").
- Image names in ``Images`` are transformed: ``Image101.jpg`` appears as
  ``Image101.jpg-Image101-1.jpg`` (dataset card), and the extension differs from the image
  file's (the study maps ``jpg``→``JPG`` for Bosch, ``jpg``→``png`` for Forus, ``tif``→``JPG``
  for Remidio): entries are matched by :func:`name_key`.
- A decision is misspelt ``GLAUCOMA  SUSUPECT`` in places (MedIMeta: ``"GLAUCOMA  SUSUPECT":
  "Suspect"  # typo in data``). It is read as a suspect (1) here; the study's
  ``1 if x == "GLAUCOMA SUSPECT" else 0`` made such images normal, a bug not copied.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from maskaudit.config import ChaksuData
from maskaudit.data.imaging import image_header, read_image
from maskaudit.data.sources.base import Loaded, Record, Rejected, Source, mask_size_mismatch
from maskaudit.data.sources.padchest import blank
from maskaudit.errors import MaskauditError

SPLITS = {"train": "train", "test": "test"}  # "test": the official hold-out set
IMAGES, MASKS, DECISIONS = "1.0_Original_Fundus_Images", "4.0_OD_CO_Fusion_Images", "6.0_Glaucoma_Decision"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_WITH_EXTENSION = re.compile(r"^(.*?)\.(jpe?g|png|tiff?|bmp)(?:$|[-_ .])", re.IGNORECASE)
_BOSCH_PATIENT = re.compile(r"^(P\d+)_", re.IGNORECASE)


class ChaksuKey(NamedTuple):
    image: str
    mask: str


def name_key(name: str) -> str:
    """The matching key of an image, mask or CSV entry: the file name before its image extension, lower-cased.

    ``"Image101.jpg"``, ``"image101.JPG-Image101-1.tif"`` (a decision-CSV entry naming image and
    annotation) and ``"Image101.png"`` all give ``"image101"``.
    """
    base = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    match = _WITH_EXTENSION.match(base)
    return (match.group(1) if match else Path(base).stem).lower()


def patient_of(camera: str, stem: str) -> str:
    """Bosch names ``PXX_…`` → ``PXX``, else the file stem; prefixed by the camera (SPEC §1)."""
    match = _BOSCH_PATIENT.match(stem) if camera.lower() == "bosch" else None
    return f"{camera}/{match.group(1).upper() if match else stem}"


def same_camera(folder: str, camera: str) -> bool:
    """Whether a folder name is the camera's, loosely: case aside, at most a letter off (``Remedio`` = ``Remidio``)."""
    a, b = folder.lower(), camera.lower()
    return a == b or difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def _child(folder: Path, name: str) -> Path | None:
    """The child of ``folder`` named ``name``, ignoring case."""
    if not folder.is_dir():
        return None
    return next((p for p in sorted(folder.iterdir()) if p.name.lower() == name.lower()), None)


class ChaksuSource(Source):
    """Chákṣu fundus photographs with STAPLE-fused optic ``disc`` and ``cup`` masks.

    Cite Kumar et al. 2023 (Scientific Data); download from figshare (doi 10.6084/m9.figshare.20123135).

    Labels: the camera's majority decision CSV (column ``Majority Decision`` or ``Glaucoma
    Decision``, else one with ``majority`` in its name, else the last column; image names from
    the first column with ``image`` in its name): ``GLAUCOMA SUSPECT`` (and its published
    misspelling) = 1, ``NORMAL`` = 0. Images of the ``Test`` folder get ``split = "test"`` (the
    official hold-out set), those of ``Train`` ``"train"``. Metadata: ``camera``. Matching of image, mask and CSV entry
    is by :func:`name_key`. A fusion mask is read as gray: ``disc`` = every pixel at or above
    1/4 of the maximum, ``cup`` = the brightest level (pixels at or above 3/4 of the maximum).

    An image is dropped for: no decision row, an unknown decision, an image listed twice in
    the decision CSV, no STAPLE mask with its stem in the split, several such masks none of
    which is under its camera's folder; a decision row whose image file is missing is dropped too.
    """

    name = "chaksu"
    config_type = ChaksuData
    rois = ("disc", "cup")
    channels = 3
    #: the only place Chákṣu's decision spelling is known (with its published misspelling, see the module)
    decisions = {"GLAUCOMA SUSPECT": 1, "GLAUCOMA SUSUPECT": 1, "NORMAL": 0}
    #: the decision column, by name, in order of preference
    decision_columns = ("Majority Decision", "Glaucoma Decision")

    def __init__(self, config: ChaksuData) -> None:
        self.config = config
        self.root = Path(config.root).resolve()
        found = [s for s in ("Train", "Test") if _child(self.root, s) is not None]
        if not found:
            raise MaskauditError(f"{self.root}: no Train/ or Test/ folder (expected Chákṣu's published layout)")

    @property
    def classes(self) -> list[str]:
        return ["glaucoma"]

    @property
    def metadata_columns(self) -> list[str]:
        return ["camera"]

    def __repr__(self) -> str:
        return f"ChaksuSource({self.root}, cameras={self.config.cameras})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.model_dump(mode="json")}

    # ---------------------------------------------------------------------------------- finding

    def _masks(self, split_dir: Path) -> dict[str, list[tuple[str, Path]]]:
        """Every STAPLE fusion mask of a split: name key → [(camera folder, path)], whatever the folder is called."""
        folder = _child(split_dir, MASKS)
        found: dict[str, list[tuple[str, Path]]] = {}
        if folder is None:
            return found
        for path in sorted(folder.rglob("*")):
            parts = path.relative_to(folder).parts[:-1]
            lowered = [p.lower() for p in parts]
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and "staple" in lowered:
                at = lowered.index("staple")
                camera_folder = parts[at - 1] if at > 0 else ""
                found.setdefault(name_key(path.name), []).append((camera_folder, path))
        return found

    @staticmethod
    def _mask_for(candidates: list[tuple[str, Path]], camera: str) -> tuple[Path | None, str]:
        """The image's mask among the split's masks of its stem, or None and why."""
        if len(candidates) == 1:
            return candidates[0][1], ""
        mine = [path for folder, path in candidates if same_camera(folder, camera)]
        if len(mine) == 1:
            return mine[0], ""
        where = ", ".join(str(Path(*path.parts[-3:])) for _, path in candidates)
        return None, f"ambiguous STAPLE mask: {len(candidates)} of that name ({where}), {len(mine)} under {camera}"

    def _decisions(self, split_dir: Path, camera: str) -> tuple[Path | None, list[tuple[int, str, str]]]:
        """The camera's majority CSV and its rows as (row number, image name, decision)."""
        folder = _child(split_dir, DECISIONS)
        if folder is None:
            return None, []
        exact = f"glaucoma_decision_comparison_{camera}_majority.csv".lower()
        candidates = [
            p for p in sorted(folder.rglob("*.csv"))
            if "majority" in str(p.relative_to(folder)).lower() and camera.lower() in str(p.relative_to(folder)).lower()
        ]  # fmt: skip
        candidates.sort(key=lambda p: (p.name.lower() != exact, len(p.relative_to(folder).parts), str(p)))
        if not candidates:
            return None, []
        path = candidates[0]
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise MaskauditError(f"{path}: cannot read the glaucoma decision CSV ({exc})") from None
        columns = [str(c) for c in frame.columns]
        image_col = next((c for c in columns if "image" in c.lower()), columns[0] if columns else None)
        named = [c for c in self.decision_columns if c in columns]
        decision_col = named[0] if named else next(
            (c for c in columns if "majority" in c.lower()), columns[-1] if columns else None
        )
        if image_col is None or decision_col is None or image_col == decision_col:
            raise MaskauditError(f"{path}: expected an image-name column and a decision column, got {columns}")
        rows = [(i + 2, str(r[image_col]), str(r[decision_col])) for i, r in enumerate(frame.to_dict("records"))]
        return path, rows

    # ---------------------------------------------------------------------------------- records

    def records(self) -> Iterator[Record | Rejected]:
        for split_name in ("Train", "Test"):
            split_dir = _child(self.root, split_name)
            if split_dir is None:
                continue
            split = SPLITS[split_name.lower()]
            masks = self._masks(split_dir)
            for camera in self.config.cameras:
                yield from self._camera_records(split_dir, split_name, split, camera, masks)

    def _camera_records(
        self, split_dir: Path, split_name: str, split: str | None, camera: str,
        masks: dict[str, list[tuple[str, Path]]],
    ) -> Iterator[Record | Rejected]:
        image_folder = _child(_child(split_dir, IMAGES) or split_dir / IMAGES, camera)
        images: dict[str, Path] = {}
        if image_folder is not None:
            for path in sorted(image_folder.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    images.setdefault(name_key(path.name), path)
        csv_path, rows = self._decisions(split_dir, camera)
        csv_name = csv_path.name if csv_path else f"{camera} majority CSV"

        def reject(image_id: str, reason: str, source_path: str = "", line: int | None = None,
                   label: int | None = None, patient: str | None = None) -> Rejected:
            """A rejection in its split and camera (and class, when decided), so that a lost group shows."""
            return Rejected(image_id, reason, source_path, line, patient_id=patient,
                            labels={} if label is None else {"glaucoma": label}, metadata={"camera": camera},
                            split=split)

        decided: dict[str, tuple[int, str]] = {}
        for line, entry, decision in rows:
            key = name_key(entry)
            image_id = f"{split_name}/{camera}/{key}"
            label = self.decisions.get(" ".join(decision.upper().split()))
            if blank(entry):
                yield reject("", f"missing image name ({csv_name} row {line})", line=line)
            elif key in decided:
                yield reject(image_id, f"duplicate image id: {entry!r} (first on row {decided[key][0]}) "
                             f"({csv_name} row {line})", line=line, label=label)
            else:
                decided[key] = (line, decision)
                if key not in images:
                    yield reject(image_id, f"image file not found: {entry!r} in {split_name}/{IMAGES}/{camera} "
                                 f"({csv_name} row {line})", line=line, label=label)
        for key, path in images.items():
            stem = path.stem
            image_id = f"{split_name}/{camera}/{key}"
            source_path = str(path.relative_to(self.root))
            where = f"({source_path})"
            patient = patient_of(camera, stem)
            if key not in decided:
                yield reject(image_id, f"no glaucoma decision: not in {csv_name} {where}", source_path,
                             patient=patient)
                continue
            line, decision = decided[key]
            label = self.decisions.get(" ".join(decision.upper().split()))
            if label is None:
                yield reject(image_id, f"unknown decision: {decision!r} ({csv_name} row {line})", source_path, line,
                             patient=patient)
                continue
            candidates = masks.get(key, [])
            if not candidates:
                yield reject(image_id, f"no STAPLE mask: none named {key!r} under {split_name}/{MASKS}/**/STAPLE "
                             f"{where}", source_path, line, label, patient)
                continue
            mask, why = self._mask_for(candidates, camera)
            if mask is None:
                yield reject(image_id, f"{why} {where}", source_path, line, label, patient)
                continue
            yield Record(
                image_id=image_id,
                patient_id=patient,
                labels={"glaucoma": label},
                metadata={"camera": camera},
                source_path=source_path,
                split=split,
                key=ChaksuKey(image=str(path), mask=str(mask)),
                row=line,
            )

    # --------------------------------------------------------------------------------------- load

    def header_problem(self, record: Record) -> str:
        """What :meth:`load` would reject, from the headers: an unreadable file, or mask and image sizes that differ."""
        key: ChaksuKey = record.key
        try:
            image, mask = image_header(Path(key.image)), image_header(Path(key.mask))
        except MaskauditError as exc:
            return f"unreadable image or mask: {exc}"
        return mask_size_mismatch(key.mask, (mask.height, mask.width), key.image, (image.height, image.width))

    def load(self, record: Record) -> Loaded:
        """The RGB image, and ``disc`` / ``cup`` from the STAPLE fusion mask.

        Raises
        ------
        MaskauditError
            For an unreadable file, or a mask whose size differs from the image's.
        """
        key: ChaksuKey = record.key
        image = read_image(Path(key.image), "rgb")
        gray = read_image(Path(key.mask), "gray")
        why = mask_size_mismatch(key.mask, gray.shape, key.image, image.shape[:2])
        if why:
            raise MaskauditError(why)
        peak = int(gray.max())
        disc = gray >= max(1, int(np.ceil(0.25 * peak)))  # every level drawn, not JPEG noise near black
        cup = gray >= max(1, int(np.ceil(0.75 * peak))) if peak > 0 else np.zeros_like(disc)
        if np.array_equal(cup, disc):
            cup = np.zeros_like(disc)  # one level only: no cup drawn
        return Loaded(image=image, rois={"disc": disc, "cup": cup})

