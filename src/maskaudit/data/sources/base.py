"""What every data source yields: kept records with a way to load their pixels, or rejected rows.

A source reads its own files and fixes its own spelling of labels and metadata (one class per
dataset, as in torchxrayvision); the prepared store treats all sources alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from maskaudit.errors import MaskauditError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from maskaudit.config import AuditConfig

#: the longest path a rejection's reason shows whole
SHOWN_PATH = 160


def mask_size_mismatch(mask: object, mask_hw: tuple[int, ...], image: object, image_hw: tuple[int, ...],
                       where: str = "") -> str:
    """The store's ``mask size mismatch`` reason when a mask's (height, width) differs from its image's, else ""."""
    if tuple(mask_hw) == tuple(image_hw):
        return ""
    return (f"mask size mismatch: {mask} is {mask_hw[1]}x{mask_hw[0]} but image {image} is {image_hw[1]}x{image_hw[0]}"
            + (f" ({where})" if where else ""))


def shown_path(text: str, limit: int = SHOWN_PATH) -> str:
    """A path as a one-line reason shows it: control characters (a NUL byte) escaped, and a path longer
    than ``limit`` cut in the middle with its length (the manifest's ``source_path`` keeps it whole)."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]} ({len(text)} characters)"


def require_columns(path: Any, found: Iterable[Any], needed: Iterable[str], kind: str = "") -> None:
    """Raise one error naming every needed column the file lacks, and the columns it has."""
    found = [str(c) for c in found]
    missing = [c for c in needed if c not in found]
    if missing:
        raise MaskauditError(
            f"{path}: missing {kind + ' ' if kind else ''}column(s) {', '.join(map(repr, missing))}; "
            f"the file has {', '.join(map(repr, found))}"
        )


@dataclass(frozen=True, slots=True)  # slots: no per-record __dict__ (a preparation holds every record)
class Record:
    """One image the source offers.

    ``labels`` maps every class of the source to 0 or 1; ``metadata`` maps every metadata
    column to a value (``None`` when missing); ``split`` is an official split (``"test"``
    puts the image in the hold-out set) or ``None``; ``key`` is whatever the source's
    :meth:`Source.load` needs (a row number, a path), and must be picklable.
    ``no_masks`` is empty when the record has every ROI mask of the source; otherwise it says
    why it has none (e.g. no usable CheXmask row), and :meth:`Source.load` returns no ROI for
    it. The store rejects such a record with that reason, unless it prepares an external set
    (scored under ``full`` alone, as the study scored everything unmasked).
    """

    image_id: str
    patient_id: str
    labels: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)
    source_path: str = ""
    split: str | None = None
    key: Any = None
    row: int | None = None
    no_masks: str = ""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A row the source could not use, and why. Every rejected row lands in the manifest.

    ``patient_id``, ``labels``, ``metadata`` and ``split`` are what the source could still read
    of the row (empty when nothing): they place the rejection in its group (a camera, a
    projection, the official test split), so that ``maskaudit check`` can say when a whole
    group is lost.
    """

    image_id: str
    reason: str
    source_path: str = ""
    row: int | None = None
    patient_id: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    split: str | None = None


@dataclass(frozen=True)
class Loaded:
    """Pixels of one record at its native size.

    ``image``: (H, W) gray or (H, W, 3) RGB, any integer or float dtype;
    ``rois``: every named ROI of the source as a bool (H, W) array.
    """

    image: np.ndarray
    rois: dict[str, np.ndarray]


class Source(ABC):
    """Base class of the data sources. Instances must be picklable (workers load in parallel)."""

    #: the ``data.source`` that names it (its key in :data:`maskaudit.data.sources.SOURCES`)
    name: str = ""
    #: the schema of its ``data`` section: the member of :data:`maskaudit.config.DataConfig` whose ``source`` is
    #: :attr:`name`
    config_type: ClassVar[type[BaseModel]]
    #: named ROIs in order; the first is the default ROI of a run
    rois: tuple[str, ...] = ()
    #: 1 for gray (X-ray), 3 for RGB (fundus)
    channels: int = 1

    @classmethod
    def from_config(cls, config: AuditConfig) -> Source:
        """The source of a run's config: ``cls(config.data)``; a source that needs more of the config overrides it."""
        return cls(config.data)  # type: ignore[call-arg]

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """The class names, in the order of the label columns."""

    @property
    def metadata_columns(self) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        """What the prepared store records about this source (and compares on a re-run)."""
        return {
            "type": f"{type(self).__module__}.{type(self).__qualname__}",
            "classes": list(self.classes),
            "rois": list(self.rois),
            "channels": self.channels,
        }

    @abstractmethod
    def records(self) -> Iterator[Record | Rejected]:
        """Every row of the source, in a stable order, kept or rejected."""

    @abstractmethod
    def load(self, record: Record) -> Loaded:
        """Decode one record's image and ROI masks. Raise ``MaskauditError`` for an unreadable file."""

    def header_problem(self, record: Record) -> str:
        """Why ``load`` would fail for this record, found from file headers alone (no pixel decoding).

        ``maskaudit check`` calls it for every kept record: an empty string when the headers look
        loadable, else the reason ``prepare`` would give (``unreadable image or mask: …``,
        ``mask size mismatch: …``). The default opens nothing.
        """
        return ""
