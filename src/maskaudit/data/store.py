"""The prepared store: every image decoded once, resized with padding, kept as memory maps.

::

    prepared/
      images.npy            (n, C, S, S) uint8, or uint16 when any kept source image is 16-bit
      mask_<key>.npy        (n, S, ceil(S / 8)) uint8: each ROI's resized mask, bit-packed along the rows
                            (``np.packbits``, first pixel in the high bit), one per named ROI and per
                            union key such as ``mask_left+right.npy``
      manifest.parquet      every input row, kept or rejected, with its reason
      store.json            written last: the completion marker and the store's description
      .partial/             only while preparing: provisional slots, resumable

Preparation lists the source's records first (cheap), gives every candidate a provisional
slot, and lets worker processes decode, resize and pack the masks, a bounded number
of images at a time; the parent writes each result into memory-mapped slot files and
records, every few seconds, which slots are finished. A killed preparation, started again,
continues with the unfinished slots. Failures (unreadable files, mask size mismatch, empty
ROI, all-zero image) are only known after loading, so a final pass compacts the kept slots to
indices ``0 .. n-1`` (a rename when nothing failed). The result does not depend on the
number of workers or the order in which they finish.

At 512 px with lungs, heart and their union an image takes 256 KiB of pixels (8-bit) and 3 × 32 KiB of
masks, 0.36 MB in all, on disk and in the page cache. The signed taxicab distance a spread other than 0
reads is computed per batch from the mask (:func:`maskaudit.masking.distance_map`: exact, on the batch's
device), not stored: an int16 map per ROI took 0.5 MiB each. Images are stored with 8 bits after the
per-image maximum scaling, as the study fed them (its preprocessing saved max-scaled 8-bit PNGs);
``bits=16`` keeps 16 bits for 16-bit sources (PadChest, DICOM).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from maskaudit import processes
from maskaudit.data.imaging import resize_pad
from maskaudit.data.sources.base import Record, Rejected, Source, shown_path
from maskaudit.errors import MaskauditError, require_space
from maskaudit.progress import stage
from maskaudit.rundir import allocated, atomic_path, read_json, read_table, reserve, write_json, write_table

log = logging.getLogger(__name__)

STORE_VERSION = 2  # 2: bit-packed masks instead of distance maps; 8-bit images unless bits=16
MARKER = "store.json"
MANIFEST = "manifest.parquet"
IMAGES = "images.npy"
#: The manifest's column of each kept image's maximum before the per-image scaling (SPEC §1), in the source's units
#: after resizing: the factor its stored pixels were divided by (the ``scale`` diagnostic of the baseline analysis).
PEAK = "image_max"
WORK = ".partial"
#: the parent records finished slots after this many results or this many seconds, whichever first
CHECKPOINT_EVERY = 64
CHECKPOINT_SECONDS = 2.0
#: bytes of each blake2b digest: of the stored content, and of the image file (the same file on two rows)
DIGEST = 16
#: slot states in ``.partial/state.npy``
_PENDING, _FAILED, _DONE8, _DONE16 = 0, 1, 8, 16
#: manifest columns that classes and metadata columns may not reuse
FIXED_COLUMNS = ("image_id", "patient_id", "status", "reason", "source_path", "row", "index", "split", "no_masks",
                 "same_file_as", PEAK)


def mask_file(key: str) -> str:
    """File name of the bit-packed masks of a ROI key (a named ROI or a union ``a+b``)."""
    return f"mask_{key}.npy"


def packed_width(size: int) -> int:
    """Bytes per packed mask row of ``size`` pixels."""
    return (size + 7) // 8


def reason_kind(reason: str) -> str:
    """The kind of a rejection: its text before the first ``:``, ``;`` or ``(``."""
    return re.split(r"[:;(]", reason, maxsplit=1)[0].strip() if reason else ""


def count_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows kept and rejected per kind of reason (:func:`reason_kind`) of a store's manifest.

    Returns
    -------
    DataFrame
        Columns ``status``, ``reason`` (empty for the kept rows) and ``rows``: the kept rows first, then the
        rejected ones, most first (ties by reason). ``prepare`` keeps it, one block per dataset, as the run's
        ``counts/prepared`` table (:meth:`maskaudit.rundir.RunDir.counts`), which the report reads.
    """
    kinds = manifest["reason"].fillna("").map(reason_kind)
    table = (pd.DataFrame({"status": manifest["status"], "reason": kinds})
             .groupby(["status", "reason"], sort=False).size().reset_index(name="rows"))
    order = table["status"].map({"kept": 0}).fillna(1)
    return (table.assign(_order=order).sort_values(["_order", "rows", "reason"], ascending=[True, False, True])
            .drop(columns="_order").reset_index(drop=True))


def to_pixels(image01: np.ndarray, max_value: int) -> np.ndarray:
    """Stored pixel values of a [0, 1] image: ``round(image01 * max_value)`` as uint8 or uint16."""
    dtype = np.uint8 if max_value == 255 else np.uint16
    return np.rint(image01 * np.float32(max_value)).astype(dtype)


def union_keys(rois: Sequence[str], roi_keys: Iterable[str]) -> list[str]:
    """The union keys (``"a+b"``) among ``roi_keys``, checked against the named ROIs.

    Raises
    ------
    MaskauditError
        When a key, or a part of a union, is not a named ROI of the source.
    """
    unions: list[str] = []
    for key in roi_keys:
        parts = key.split("+")
        unknown = [p for p in parts if p not in rois]
        if unknown or len(set(parts)) != len(parts):
            problem = f"no ROI named {', '.join(map(repr, unknown))}" if unknown else "a ROI repeats"
            raise MaskauditError(
                f"ROI key {key!r}: {problem}; a key is a named ROI or distinct named ROIs joined by '+', "
                f"and the source's ROIs are {', '.join(rois) or '(none)'}"
            )
        if len(parts) > 1 and key not in unions:
            unions.append(key)
    return unions


def describe_source(source: Source) -> dict[str, Any]:
    """What the store records about its source."""
    return {"name": source.name, **source.describe()}


# ------------------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _Settings:
    image_size: int
    channels: int
    rois: tuple[str, ...]
    unions: tuple[str, ...]
    bits: int = 8  # 16: keep 16 bits for 16-bit sources


@dataclass
class _Result:
    slot: int
    failure: str = ""
    image: np.ndarray | None = None  # (C, S, S) uint8 (8-bit source) or uint16 (16-bit source)
    masks: list[np.ndarray] = field(default_factory=list)  # per key, (S, ceil(S / 8)) uint8, bit-packed
    fractions: list[float] = field(default_factory=list)  # per named ROI, share of the native image
    mean: float = 0.0  # mean pixel value in [0, 1]
    peak: float = math.nan  # the resized image's maximum in the source's units, which the stored pixels are divided by
    #: what was stored (blake2b of the pixels and maps), then the image file's own bytes (:func:`_hashed`)
    digest: bytes = b""


def _load_failure(exc: MaskauditError) -> str:
    message = str(exc)
    if message.startswith("mask size mismatch"):
        return message
    return f"unreadable image or mask: {message}"


#: what opening one row's files raises for a reason of that row alone: an OSError (no such file, a name too
#: long, a symlink loop, permission denied, a directory), a ValueError (a NUL byte in the path), a RuntimeError
#: (``pathlib``'s symlink loop before Python 3.13); the row is rejected with the OS's reason
_ROW_ERRORS = (OSError, ValueError, RuntimeError)
#: RuntimeErrors that are bugs, not a row's problem: they stay loud
_BUGS = (RecursionError, NotImplementedError)


def _row_failure(exc: BaseException, record: Record) -> str:
    """``unreadable image or mask: <path>: <OS reason>`` for an error raised while loading ``record``."""
    where = record.source_path or record.image_id
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = os.fsdecode(exc.filename) if isinstance(exc.filename, str | bytes) and exc.filename else where
    else:
        reason = str(exc) or type(exc).__name__
    return f"unreadable image or mask: {shown_path(str(where))}: {reason}"


def _process(source: Source, record: Record, slot: int, settings: _Settings) -> _Result:
    """Load, resize and measure one record. User-caused problems become a failure reason.

    A record without masks (``record.no_masks``, kept only in an external set) gets
    empty masks and NaN ROI fractions.
    """
    try:
        loaded = source.load(record)
        image = np.asarray(loaded.image)
    except MaskauditError as exc:
        return _Result(slot, failure=_load_failure(exc))
    except _ROW_ERRORS as exc:
        if isinstance(exc, _BUGS):
            raise
        return _Result(slot, failure=_row_failure(exc, record))
    if settings.channels == 1 and image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    expected = "(H, W)" if settings.channels == 1 else f"(H, W, {settings.channels})"
    if image.ndim != (2 if settings.channels == 1 else 3) or (
        image.ndim == 3 and image.shape[2] != settings.channels
    ):
        raise ValueError(
            f"{source.name}: load({record.image_id!r}) gave shape {image.shape}, expected {expected}"
        )
    where = shown_path(record.source_path or record.image_id)
    if record.no_masks:
        return _hashed(_measured(slot, image, {}, settings, where), record)
    fractions = []
    for roi in settings.rois:
        if roi not in loaded.rois:
            raise ValueError(f"{source.name}: load({record.image_id!r}) gave no mask for ROI {roi!r}")
        mask = np.asarray(loaded.rois[roi]).astype(bool)
        if mask.shape != image.shape[:2]:
            return _Result(
                slot,
                failure=f"mask size mismatch: ROI {roi!r} is {mask.shape[1]}x{mask.shape[0]}, "
                f"image is {image.shape[1]}x{image.shape[0]} ({where})",
            )
        if not mask.any():
            return _Result(slot, failure=f"empty ROI mask: {roi!r} ({where})")
        fractions.append(float(mask.mean()))
    return _hashed(_measured(slot, image, {roi: loaded.rois[roi] for roi in settings.rois}, settings, where,
                             fractions), record)


def _measured(slot: int, image: np.ndarray, rois: dict[str, np.ndarray], settings: _Settings, where: str,
              fractions: list[float] | None = None) -> _Result:
    """The stored pixels and packed masks of a loaded image; no ``rois``: every mask is empty.

    An array that cannot be resized (``resize_pad``'s MaskauditError, e.g. an empty one) is the row's failure.
    """
    if not np.any(image):
        return _Result(slot, failure=f"image all zero: {where}")
    wide = settings.bits == 16 and (image.dtype.kind == "f" or image.dtype.itemsize > 1)
    try:
        resized = resize_pad(image, settings.image_size, "image", scaled=False)
        peak = float(resized.max())
        image01 = resized / np.float32(peak) if peak > 0 else resized
        masks = {roi: resize_pad(rois[roi], settings.image_size, "mask") for roi in settings.rois} if rois else {}
    except MaskauditError as exc:
        return _Result(slot, failure=f"unreadable image or mask: {where}: {exc}")
    pixels = to_pixels(image01, 65535 if wide else 255)
    pixels = pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))
    if rois:
        packed = [np.packbits(masks[roi], axis=-1) for roi in settings.rois]
        for key in settings.unions:
            packed.append(np.packbits(np.logical_or.reduce([masks[p] for p in key.split("+")]), axis=-1))
    else:
        blank = np.zeros((settings.image_size, packed_width(settings.image_size)), dtype=np.uint8)
        packed = [blank] * (len(settings.rois) + len(settings.unions))
        fractions = [math.nan] * len(settings.rois)
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=DIGEST)
    for mask in packed:
        digest.update(mask.tobytes())
    mean = float(pixels.mean(dtype=np.float64)) / (65535 if wide else 255)
    return _Result(slot, "", pixels, packed, fractions or [], mean, peak=peak, digest=digest.digest())


def _image_file(record: Record) -> Path | None:
    """The record's image file: ``key.image`` of the sources that read files (folder, PadChest, ChestX-ray14,
    Chákṣu); None for a source that makes its pixels (synthetic)."""
    image = getattr(record.key, "image", None)
    return Path(image) if isinstance(image, str) and image else None


def _hashed(result: _Result, record: Record) -> _Result:
    """``result`` with the blake2b of its image file's raw bytes after the stored content's digest.

    Two rows whose files have the same digest are the same image (the manifest pass of :func:`prepare_store`);
    :data:`DIGEST` zero bytes stand for a record without a file. A failed result is returned as it is.
    """
    if result.failure:
        return result
    source = hashlib.blake2b(digest_size=DIGEST)
    path = _image_file(record)
    if path is None:
        result.digest += bytes(DIGEST)
        return result
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                source.update(chunk)
    except OSError as exc:
        return _Result(result.slot, failure=f"unreadable image or mask: {path}: {exc.strerror or exc}")
    result.digest += source.digest()
    return result


_WORKER: dict[str, Any] = {}


def _init_worker(source: Source, settings: _Settings) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    _WORKER["source"], _WORKER["settings"] = source, settings


def _run_task(slot: int, record: Record) -> _Result:
    return _process(_WORKER["source"], record, slot, _WORKER["settings"])


# --------------------------------------------------------------------------------- provisional slots


class _Slots:
    """The provisional, resumable arrays of a preparation under ``out/.partial``."""

    def __init__(self, work: Path, plan: str, m: int, settings: _Settings) -> None:
        self.work, self.m, self.settings = work, m, settings
        self.keys = [*settings.rois, *settings.unions]
        plan_file = work / "plan.json"
        if work.is_dir() and not self._resumable(plan_file, plan):
            log.info("discarding an unfinished preparation (other inputs, or files missing) in %s", work)
            shutil.rmtree(work)
        fresh = not work.is_dir()
        size, n_rois = settings.image_size, len(settings.rois)
        self._require_space(m, size, n_rois)
        work.mkdir(parents=True, exist_ok=True)
        self.state = self._array("state.npy", (m,), np.uint8, fresh)
        self.masks = [self._array(mask_file(k), (m, size, packed_width(size)), np.uint8, fresh) for k in self.keys]
        self.fractions = self._array("fractions.npy", (m, max(n_rois, 1)), np.float64, fresh)
        self.means = self._array("means.npy", (m,), np.float64, fresh)
        self.peaks = self._array("peaks.npy", (m,), np.float64, fresh)
        self.digests = self._array("digests.npy", (m, 2 * DIGEST), np.uint8, fresh)  # content, then file (_hashed)
        self.images: np.memmap | None = None
        if not fresh and (work / IMAGES).is_file():
            self.images = np.lib.format.open_memmap(work / IMAGES, mode="r+")
            reserve(work / IMAGES, what=self._named(IMAGES))
        failures = work / "failures.json"
        self.failures: dict[int, str] = (
            {int(k): v for k, v in read_json(failures).items()} if failures.is_file() and not fresh else {}
        )
        if fresh:
            write_json(plan_file, {"plan": plan, "m": m})
        self.pending: list[tuple[int, int]] = []
        self.last = time.monotonic()

    def _resumable(self, plan_file: Path, plan: str) -> bool:
        """Whether ``work`` holds an unfinished preparation of the same plan with all its files."""
        if not plan_file.is_file() or read_json(plan_file).get("plan") != plan:
            return False
        names = ["state.npy", "fractions.npy", "means.npy", "peaks.npy", "digests.npy",
                 *(mask_file(k) for k in self.keys)]
        if not all((self.work / name).is_file() for name in names):
            return False  # e.g. killed between the final renames and store.json
        finished = np.load(self.work / "state.npy", mmap_mode="r") >= _DONE8
        return not finished.any() or (self.work / IMAGES).is_file()

    def _named(self, name: str) -> str:
        """How a disk message names a slot file: the store file it becomes (``.partial`` is a detail)."""
        return str(self.work.parent / name) if name == IMAGES or name.startswith("dist_") else str(self.work / name)

    def _require_space(self, m: int, size: int, n_rois: int) -> None:
        """Refuse, with the numbers, slot files the disk cannot hold, before any is memory-mapped (a map on a full
        disk dies of SIGBUS at its first unbacked page). Counts what resumed files already hold on disk; the
        images as uint8 (widening to uint16 checks again)."""
        images = self.work / IMAGES
        shape = (m, self.settings.channels, size, size)
        wide = images.is_file() and images.stat().st_size > _npy_bytes(shape, np.uint8)
        layout: dict[str, tuple[tuple[int, ...], Any]] = {
            "state.npy": ((m,), np.uint8),
            **{mask_file(k): ((m, size, packed_width(size)), np.uint8) for k in self.keys},
            "fractions.npy": ((m, max(n_rois, 1)), np.float64),
            "means.npy": ((m,), np.float64),
            "peaks.npy": ((m,), np.float64),
            "digests.npy": ((m, 2 * DIGEST), np.uint8),
            IMAGES: (shape, np.uint16 if wide else np.uint8),
        }
        needed = sum(max(0, _npy_bytes(*shape_dtype) - allocated(self.work / name))
                     for name, shape_dtype in layout.items())
        require_space(self.work, needed, what=_store_files(self.work.parent, len(self.keys)))

    def _array(self, name: str, shape: tuple[int, ...], dtype: Any, fresh: bool) -> np.memmap:
        """A slot file, memory-mapped with its blocks reserved (see :func:`maskaudit.rundir.reserve`)."""
        path = self.work / name
        if fresh or not path.is_file():
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        else:
            array = np.lib.format.open_memmap(path, mode="r+")
        reserve(path, what=self._named(name))
        return array

    def _images_for(self, wide: bool) -> np.memmap:
        """The image slots, created at the first result, widened to uint16 at the first 16-bit one."""
        dtype = np.uint16 if wide else np.uint8
        size, channels = self.settings.image_size, self.settings.channels
        path = self.work / IMAGES
        if self.images is None:
            self.images = np.lib.format.open_memmap(
                path, mode="w+", dtype=dtype, shape=(self.m, channels, size, size)
            )
            reserve(path, what=self._named(IMAGES))
        elif wide and self.images.dtype == np.uint8:
            log.info("a 16-bit image among 8-bit ones: widening the prepared images to uint16")
            with atomic_path(path, needed=_npy_bytes(self.images.shape, np.uint16)) as tmp:
                wider = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=self.images.shape)
                reserve(tmp, what=self._named(IMAGES))
                for start in range(0, self.m, 256):
                    wider[start : start + 256] = self.images[start : start + 256].astype(np.uint16) * 257
                wider.flush()
                del wider
                self.images = None
            self.images = np.lib.format.open_memmap(path, mode="r+")
        return self.images

    def put(self, result: _Result) -> None:
        if result.failure:
            self.failures[result.slot] = result.failure
            self.pending.append((result.slot, _FAILED))
        else:
            assert result.image is not None
            wide = result.image.dtype == np.uint16
            images = self._images_for(wide)
            pixels = result.image
            if images.dtype == np.uint16 and not wide:
                pixels = pixels.astype(np.uint16) * 257
            images[result.slot] = pixels
            for target, mask in zip(self.masks, result.masks, strict=True):
                target[result.slot] = mask
            if result.fractions:
                self.fractions[result.slot] = result.fractions
            self.means[result.slot] = result.mean
            self.peaks[result.slot] = result.peak
            self.digests[result.slot] = np.frombuffer(result.digest, dtype=np.uint8)
            self.pending.append((result.slot, _DONE16 if wide else _DONE8))
        if len(self.pending) >= CHECKPOINT_EVERY or time.monotonic() - self.last >= CHECKPOINT_SECONDS:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Flush the data, then the failure list, then mark the slots finished (in that order)."""
        if not self.pending:
            return
        for array in (self.images, *self.masks, self.fractions, self.means, self.peaks, self.digests):
            if array is not None:
                array.flush()
        for array in (self.images, *self.masks):  # written and flushed: out of this process's memory
            release(array)
        write_json(self.work / "failures.json", {str(k): v for k, v in sorted(self.failures.items())})
        for slot, state in self.pending:
            self.state[slot] = state
        self.state.flush()
        self.pending.clear()
        self.last = time.monotonic()

    def close(self) -> None:
        self.images = None
        self.masks = []


def release(array: np.memmap | None) -> None:
    """Drop a flushed memory map's pages from this process (``madvise(MADV_DONTNEED)`` on a shared file mapping: the
    data stays in the file and the page cache, and is read back on the next access), so that preparing 100k images
    keeps the memory of a few checkpoints, not of the whole store. A no-op where ``madvise`` is not available."""
    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def _store_files(out: Path, maps: int) -> str:
    """How a disk message names a store's arrays: ``RUN/prepared/images.npy and its 2 mask files``."""
    tail = "" if not maps else " and its mask file" if maps == 1 else f" and its {maps} mask files"
    return f"{out / IMAGES}{tail}"


def _npy_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """What an ``.npy`` file of ``shape`` and ``dtype`` takes on disk, at most: its data and a 4 KiB block of header."""
    return 4096 + math.prod(shape) * np.dtype(dtype).itemsize


# ------------------------------------------------------------------------------------------ prepare


def _sharing(item: Record | Rejected, shared: dict[tuple, dict]) -> Record | Rejected:
    """``item`` with its ``labels`` replaced by an equal mapping seen before (same keys in the same order, values of
    the same types), and an empty ``metadata`` by one shared empty mapping.

    A listing holds every input at once, and most inputs repeat a few label patterns: sharing them keeps a
    100k-image listing to the records' own fields (a mapping per record is about 0.2 KB). Nothing changes a record's
    mappings. Metadata values are mostly an image's own (an age, a date), so only the empty mapping is shared.
    """
    labels, metadata = item.labels, item.metadata
    try:
        same_labels = shared.setdefault(("labels", *((k, type(v), v) for k, v in labels.items())), labels)
    except TypeError:  # a value that cannot be a key: kept as it is (the store rejects what is not 0 or 1)
        same_labels = labels
    same_metadata = metadata if metadata else shared.setdefault(("metadata",), metadata)
    if same_labels is labels and same_metadata is metadata:
        return item
    return dataclasses.replace(item, labels=same_labels, metadata=same_metadata)


def _plan_hash(doc: dict[str, Any], items: Sequence[Record | Rejected]) -> str:
    """The plan of a preparation: the sha256 of ``json.dumps({**doc, "items": listing}, sort_keys=True,
    default=str)`` with the listing one :func:`_listing_entry` per input, hashed one entry at a time (the same
    bytes as the whole document, which at 100k inputs would be about 0.3 KB an image held at once)."""
    hole = "\0items\0"
    text = json.dumps({**doc, "items": hole}, sort_keys=True, default=str)
    head, tail = text.split(json.dumps(hole))
    digest = hashlib.sha256(head.encode())
    digest.update(b"[")
    for k, item in enumerate(items):
        digest.update((", " if k else "").encode() + json.dumps(_listing_entry(item), sort_keys=True,
                                                                 default=str).encode())
    digest.update(b"]" + tail.encode())
    return digest.hexdigest()


def _listing_entry(item: Record | Rejected) -> list[Any]:
    if isinstance(item, Rejected):
        return ["rejected", item.image_id, item.reason, item.source_path, item.row, item.patient_id, item.labels,
                item.metadata, item.split]
    return [
        "record", item.image_id, item.patient_id, item.labels, item.metadata,
        item.source_path, item.split, repr(item.key), item.no_masks,
    ]  # fmt: skip


class _Digesting:
    """A text file that feeds what is written to it into ``digest``: ``frame.to_csv(_Digesting(digest))`` hashes the
    same bytes as ``digest.update(frame.to_csv().encode())`` without holding the whole text (pandas writes a CSV
    in chunks of rows), which at 100k manifest rows would be tens of MB at once."""

    def __init__(self, digest: Any) -> None:
        self.digest = digest

    def write(self, text: str) -> int:
        self.digest.update(text.encode())
        return len(text)


def _arrow_safe(values: list[Any]) -> pd.Series:
    """A metadata column Parquet can store: as read when its types agree, else as text."""
    try:
        pa.array(values, from_pandas=True)
        return pd.Series(values, dtype=object).infer_objects()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return pd.Series([None if v is None else str(v) for v in values], dtype=object)


def _run(
    source: Source,
    candidates: list[Record],
    slots: _Slots,
    settings: _Settings,
    workers: int,
    progress: bool,
) -> None:
    todo = [s for s in range(len(candidates)) if slots.state[s] == _PENDING]
    if len(todo) < len(candidates):
        log.info(
            "resuming a preparation: %d of %d images already done",
            len(candidates) - len(todo),
            len(candidates),
        )
    # the run's one progress display (maskaudit.progress): a bar on a terminal, log lines elsewhere
    shown = stage("prepare", len(candidates), unit="images", done=len(candidates) - len(todo),
                  mode=None if progress else "off")
    with shown as bar:
        try:
            if workers == 1 or len(todo) <= 1:
                for slot in todo:
                    slots.put(_process(source, candidates[slot], slot, settings))
                    bar.advance()
                return
            died = ("preparation: a worker process died (killed, or out of memory: the system log says which; "
                    f"workers: {workers} run at once); the images prepared so far are kept and the next run resumes "
                    "after them")
            with processes.pool(workers, [__name__], _init_worker, (source, settings), died=died) as pool:
                queue = iter(todo)
                running: dict[Future[_Result], int] = {}

                def submit() -> None:
                    slot = next(queue, None)
                    if slot is not None:
                        running[pool.submit(_run_task, slot, candidates[slot])] = slot

                try:
                    for _ in range(2 * workers):
                        submit()
                    while running:
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for future in sorted(finished, key=running.__getitem__):
                            del running[future]
                            slots.put(future.result())
                            bar.advance()
                            submit()
                except BaseException:
                    for future in running:
                        future.cancel()
                    raise
        finally:
            slots.checkpoint()


def prepare_store(
    source: Source,
    out: Path,
    image_size: int,
    roi_keys: Sequence[str] = (),
    workers: int = 0,
    progress: bool = True,
    masks: Literal["required", "optional"] = "required",
    duplicate_images: Literal["reject", "warn"] = "reject",
    bits: Literal[8, 16] = 8,
) -> Store:
    """Decode every image of ``source`` once into a prepared store under ``out``.

    Parameters
    ----------
    source : Source
        Any data source (folder, synthetic, PadChest …).
    out : Path
        The store's folder (``RUN/prepared``).
    image_size : int
        Side S of the square images (resize with padding, SPEC §1).
    roi_keys : sequence of str
        Union keys such as ``"disc+cup"`` to precompute besides the named ROIs (named ROIs
        may be listed too; they always get masks).
    workers : int
        Processes that decode images; 0 = one per CPU core, 1 = in this process.
    progress : bool
        Show a progress bar.
    masks : {"required", "optional"}
        What becomes of a record the source offers without masks (``Record.no_masks``):
        ``"required"`` (a dataset that trains models) rejects it with that reason;
        ``"optional"`` (an external test set) keeps it, to be scored under ``full`` alone
        (the study scored its external set unmasked): its ``no_masks`` column says why, its
        masks are empty and :attr:`Store.masked` is False for it.
    duplicate_images : {"reject", "warn"}
        What becomes of a kept row whose image file is byte-identical to an earlier kept row's
        (the blake2b of the raw file, taken by the worker that decodes it; sources that make their
        pixels, like ``synthetic``, have no file): ``"reject"`` rejects every row after the first,
        by input order (``duplicate image file: same image file as 'a' (row 2)``, with the first
        row's patient when it differs), ``"warn"`` keeps them and names the first row in their
        ``same_file_as`` column (``maskaudit.data.check`` warns about both).

    Notes
    -----
    ``manifest.parquet`` has one row per input, in the source's order: ``image_id``,
    ``patient_id``, ``status`` ("kept"/"rejected"), ``reason`` (empty when kept; the text
    before its first ``:``, ``;`` or ``(`` is its kind, see :meth:`Store.counts`),
    ``source_path``, ``row`` (the source's row number where it has one: ``Rejected.row``, or
    ``row`` of the record or of its key; the folder source counts the CSV header as row 1),
    ``index`` (0..n-1 for kept rows, -1 otherwise), ``split``, ``no_masks`` (why a kept image has no
    masks, see ``masks``; empty otherwise), ``same_file_as`` (a kept row whose image file is an earlier
    row's, under ``duplicate_images="warn"``: that row, e.g. ``'a' (row 2)``; empty otherwise), one
    nullable Int8 column per class, one column per metadata column (as read; text when a column mixes types) and
    ``roi_fraction_<roi>`` per named ROI (share of the native image inside the ROI; NaN
    unless kept). Rejections found while preparing: ``unreadable image or mask``, ``mask size
    mismatch``, ``empty ROI mask`` (naming the ROI), ``image all zero``, ``duplicate image id``,
    ``duplicate image file`` (see ``duplicate_images``).

    bits : {8, 16}
        Bits per stored pixel: 8 (the default, as the study fed its network: each image divided by its own maximum,
        then 8-bit), or 16, which keeps 16 bits for 16-bit sources (an 8-bit source stays 8-bit).

    Returns
    -------
    Store
        The opened store. A complete store of the same inputs is opened without work; an
        unfinished one is resumed; one of other inputs (source rows, image size, ROI keys)
        is prepared again.

    Raises
    ------
    MaskauditError
        For an unknown ROI key, a class or metadata name that clashes with a manifest column,
        or when no image is usable (the manifest is still written, to say why). Its subclass
        :class:`~maskaudit.errors.DiskError` when the disk cannot hold the store's memory maps
        (checked, with the numbers, before any is allocated; then each is reserved with
        ``fallocate`` so that a write to it cannot die of SIGBUS) or refuses a write (full,
        read-only, over quota): nothing is left half-written, and the same call, once space is
        freed, resumes. A row whose files cannot be opened or read (any ``OSError``,
        ``ValueError`` or ``RuntimeError`` of its ``load``) is that row's rejection
        ``unreadable image or mask: <path>: <reason>``, never an error.
    """
    out = Path(out)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    workers = workers or os.cpu_count() or 1
    rois = tuple(source.rois)
    unions = tuple(union_keys(rois, roi_keys))
    classes, metadata_columns = list(source.classes), list(source.metadata_columns)
    fraction_columns = [f"roi_fraction_{roi}" for roi in rois]
    clashes = [c for c in [*classes, *metadata_columns] if c in FIXED_COLUMNS or c in fraction_columns]
    if clashes or len(set(classes + metadata_columns)) != len(classes) + len(metadata_columns):
        raise MaskauditError(
            f"{source.name}: class and metadata column names must be distinct and must not be one of the "
            f"manifest's own columns {', '.join(FIXED_COLUMNS)}; "
            f"got classes {classes}, metadata {metadata_columns}"
        )
    settings = _Settings(image_size, int(source.channels), rois, unions, int(bits))

    shared: dict[tuple, dict] = {}
    items = [_sharing(item, shared) for item in source.records()]
    del shared
    description = describe_source(source)
    plan = _plan_hash({
        "version": STORE_VERSION, "image_size": image_size, "channels": settings.channels, "rois": list(rois),
        "unions": list(unions), "classes": classes, "metadata": metadata_columns, "source": description,
        "masks": masks, "duplicate_images": duplicate_images, "digests": [DIGEST, "content", "file"], "bits": int(bits),
    }, items)  # fmt: skip

    marker = out / MARKER
    if marker.is_file():
        if read_json(marker).get("plan") == plan:
            return Store.open(out)
        log.info("the prepared store in %s was made from other inputs; preparing it again", out)
        marker.unlink()
    for stale in [out / IMAGES, out / MANIFEST, *out.glob("mask_*.npy"), *out.glob("dist_*.npy")]:
        stale.unlink(missing_ok=True)  # files of an older store (dist_*: the format before bit-packed masks)

    # candidates: records the source kept, less repeated image ids
    candidates: list[Record] = []
    slot_of = np.full(len(items), -1, dtype=np.int64)  # item position -> slot (-1: none)
    duplicates: dict[int, str] = {}
    first_seen: dict[str, int] = {}
    for position, item in enumerate(items):
        if isinstance(item, Record):
            if item.no_masks and (masks == "required" or not rois):
                duplicates[position] = item.no_masks
                continue
            if item.image_id in first_seen:
                duplicates[position] = (
                    f"duplicate image id: {item.image_id!r} (first at input {first_seen[item.image_id]})"
                )
                continue
            first_seen[item.image_id] = position
            slot_of[position] = len(candidates)
            candidates.append(item)
    del first_seen
    position_of = np.flatnonzero(slot_of >= 0)  # slot -> item position (slots are given in input order)

    m = len(candidates)
    slots = _Slots(out / WORK, plan, m, settings) if m else None
    if slots is not None:
        try:
            _run(source, candidates, slots, settings, workers, progress)
        finally:
            slots.checkpoint()
    state = np.asarray(slots.state) if slots is not None else np.zeros(0, np.uint8)
    kept_slots = np.flatnonzero(state >= _DONE8)

    # the same image file on two rows (_hashed): decided in input order, whatever order the workers finished
    # in; the first row keeps it, a later one is rejected (or, duplicate_images="warn", kept naming the first)
    same_file: dict[int, int] = {}  # slot -> the slot of the first row with its file
    if slots is not None:
        first_of: dict[bytes, int] = {}
        for slot in map(int, kept_slots):
            file_digest = bytes(slots.digests[slot, DIGEST:])
            if file_digest != bytes(DIGEST):  # zeros: a record without a file
                first = first_of.setdefault(file_digest, slot)
                if first != slot:
                    same_file[slot] = first
        if duplicate_images == "reject" and same_file:
            kept_slots = np.array([s for s in kept_slots if int(s) not in same_file], dtype=kept_slots.dtype)

    def first_row(slot: int) -> str:
        """``'a' (row 2)``: the first row with the image file of ``slot``, and its patient when another."""
        first, record = candidates[same_file[slot]], candidates[slot]
        where = f"row {first.row}" if first.row is not None else f"input {position_of[same_file[slot]]}"
        other = f", patient {first.patient_id!r}" if first.patient_id != record.patient_id else ""
        return f"{first.image_id!r} ({where}{other})"

    n = len(kept_slots)
    kept_positions = position_of[kept_slots]
    index = np.full(len(items), -1, dtype=np.int64)  # item position -> its image in the store (-1: rejected)
    index[kept_positions] = np.arange(n)

    # the manifest: every input, in the source's order, built column by column (a dict per row would cost
    # about 0.65 KB an image at once)
    reason, no_masks, same_as = [], [], []
    for position, item in enumerate(items):
        slot = int(slot_of[position])
        if isinstance(item, Rejected):  # with whatever of its row the source could read
            why, masks_why, first = item.reason, "", ""
        elif slot < 0:
            why, masks_why, first = duplicates[position], "", ""
        elif index[position] >= 0:
            why, masks_why, first = "", item.no_masks, first_row(slot) if slot in same_file else ""
        elif slot in same_file:
            why, masks_why, first = f"duplicate image file: same image file as {first_row(slot)}", "", ""
        else:
            assert slots is not None
            why, masks_why, first = slots.failures.get(slot, "not prepared"), "", ""
        reason.append(why)
        no_masks.append(masks_why)
        same_as.append(first)
    # the measured numbers as arrays: the kept rows' from the slots, NaN elsewhere
    measured = np.full((len(items), len(fraction_columns) + 1), math.nan)
    if n:
        assert slots is not None
        measured[kept_positions, : len(fraction_columns)] = slots.fractions[kept_slots, : len(fraction_columns)]
        measured[kept_positions, -1] = slots.peaks[kept_slots]

    def texts(values: list[Any]) -> pd.Series:
        """Text as Arrow holds it (one buffer per column, the dtype the manifest is read back with), not as a
        pointer per row to a Python string the records hold."""
        return pd.Series(pd.array(values, dtype=pd.StringDtype("pyarrow", na_value=np.nan)))

    manifest = pd.DataFrame(
        {
            "image_id": texts([item.image_id for item in items]),
            "patient_id": texts([item.patient_id for item in items]),
            "status": texts(["kept" if i >= 0 else "rejected" for i in index.tolist()]), "reason": texts(reason),
            "source_path": texts([item.source_path for item in items]),
            "row": pd.array([item.row for item in items], dtype="Int64"),
            "index": index,
            "split": pd.Series([item.split for item in items], dtype=object),  # None unless the source has splits
            "no_masks": texts(no_masks), "same_file_as": texts(same_as),
            **{c: pd.array([item.labels.get(c) for item in items], dtype="Int8") for c in classes},
            **{c: _arrow_safe([item.metadata.get(c) for item in items]) for c in metadata_columns},
            **{c: measured[:, k] for k, c in enumerate([*fraction_columns, PEAK])},
        }
    )  # fmt: skip
    # the manifest holds what is left to know of the inputs: the records go before it is written (their text
    # was copied into its Arrow columns), first_row's two lists with them (it is not called again)
    del reason, no_masks, same_as, measured, items, slot_of, index
    candidates.clear()
    write_table(out / MANIFEST, manifest)
    pa.default_memory_pool().release_unused()  # else Arrow's allocator keeps what writing it freed (tens of MB)
    if n == 0:
        if slots is not None:
            slots.close()
            shutil.rmtree(out / WORK, ignore_errors=True)
        counts = manifest["reason"].map(reason_kind).value_counts()
        raise MaskauditError(
            f"{source.name}: no usable image among {len(manifest)} inputs "
            f"({'; '.join(f'{k}: {v}' for k, v in counts.items())}); see {out / MANIFEST}"
        )
    assert slots is not None

    # compact the kept slots to 0 .. n-1 (a rename when every candidate was kept)
    wide = bool(np.any(state[kept_slots] == _DONE16))
    dtype = np.uint16 if wide else np.uint8
    work_images = slots.images
    assert work_images is not None and work_images.dtype == dtype
    finals = [
        (work_images, out / IMAGES),
        *((d, out / mask_file(k)) for d, k in zip(slots.masks, slots.keys, strict=True)),
    ]
    sources_paths = [out / WORK / IMAGES, *(out / WORK / mask_file(k) for k in slots.keys)]
    if n < m:  # the kept slots are copied beside the provisional ones: check, then reserve, before mapping
        require_space(out, sum(_npy_bytes((n, *array.shape[1:]), array.dtype) for array, _ in finals),
                      what=_store_files(out, len(finals) - 1))
    for (array, target), work_path in zip(finals, sources_paths, strict=True):
        if n == m:
            array.flush()
            os.replace(work_path, target)
            continue
        final = np.lib.format.open_memmap(target, mode="w+", dtype=array.dtype, shape=(n, *array.shape[1:]))
        reserve(target)
        for start in range(0, n, 256):
            final[start : start + 256] = array[kept_slots[start : start + 256]]
            if start % 4096 == 0:
                final.flush()
                release(final)
                release(array)
        final.flush()
        del final
    mean_intensity = float(np.mean(slots.means[kept_slots]))
    fingerprint = hashlib.sha256()
    meta = {
        "version": STORE_VERSION, "image_size": image_size, "channels": settings.channels,
        "dtype": np.dtype(dtype).name, "classes": classes, "rois": list(rois), "roi_keys": [*rois, *unions],
        "metadata_columns": metadata_columns,
    }  # fmt: skip
    fingerprint.update(json.dumps(meta, sort_keys=True).encode())
    manifest.to_csv(_Digesting(fingerprint), index=False)  # the CSV's bytes, a few thousand rows at a time
    fingerprint.update(np.ascontiguousarray(slots.digests[kept_slots]).tobytes())
    slots.close()
    write_json(
        marker,
        {
            **meta,
            "image_max": 65535 if wide else 255,
            "n": n,
            "n_rejected": int((manifest["status"] == "rejected").sum()),
            "mean_intensity": mean_intensity,
            "fingerprint": fingerprint.hexdigest()[:16],
            "source": description,
            "plan": plan,
        },
    )
    shutil.rmtree(out / WORK, ignore_errors=True)
    del manifest  # before the store reads its own
    return Store.open(out)


# --------------------------------------------------------------------------------------------- open


class Store:
    """A prepared store, memory-mapped; training and evaluation read only this.

    Attributes
    ----------
    root : Path
    image_size, channels, n : int
        S, C and the number of kept images.
    classes, rois, roi_keys, metadata_columns : list of str
        ``roi_keys`` are the keys :meth:`masks` accepts (named ROIs, then unions).
    manifest : DataFrame
        Every input row, kept and rejected (see :func:`prepare_store`).
    kept : DataFrame
        The kept rows, ordered by ``index`` (row ``i`` describes ``images[i]``).
    images : ndarray of shape (n, C, S, S)
        Read-only memory map, uint8 or uint16; ``images / image_max`` is the image in [0, 1].
    image_max : int
        255 or 65535.
    labels : ndarray of shape (n, K), float32
    mean_intensity : float
        Mean of all kept images in [0, 1].
    fingerprint : str
        Changes when the prepared content changes.
    """

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = Path(root)
        self.meta = meta
        self.image_size: int = int(meta["image_size"])
        self.channels: int = int(meta["channels"])
        self.classes: list[str] = list(meta["classes"])
        self.rois: list[str] = list(meta["rois"])
        self.roi_keys: list[str] = list(meta["roi_keys"])
        self.metadata_columns: list[str] = list(meta["metadata_columns"])
        self.n: int = int(meta["n"])
        self.image_max: int = int(meta["image_max"])
        self.mean_intensity: float = float(meta["mean_intensity"])
        self.fingerprint: str = str(meta["fingerprint"])
        self.source: dict[str, Any] = dict(meta.get("source", {}))
        self.manifest: pd.DataFrame = read_table(self.root / MANIFEST)
        rows = np.flatnonzero(self.manifest["status"].to_numpy() == "kept")
        rows = rows[np.argsort(self.manifest["index"].to_numpy()[rows])]  # in image order (the indices are unique)
        # every row kept in image order (most stores): the manifest's own columns, not a copy (copy-on-write
        # keeps either from seeing the other changed)
        whole = len(rows) == len(self.manifest) and bool(np.all(rows == np.arange(len(rows))))
        self.kept: pd.DataFrame = (self.manifest if whole else self.manifest.iloc[rows]).reset_index(drop=True)
        self.images: np.ndarray = np.load(self.root / IMAGES, mmap_mode="r")
        expected = (self.n, self.channels, self.image_size, self.image_size)
        if self.images.shape != expected or len(self.kept) != self.n:
            raise MaskauditError(
                f"{self.root}: the prepared store is inconsistent (images {self.images.shape}, "
                f"{len(self.kept)} kept rows, expected {expected}); "
                "delete it and run `maskaudit prepare` again"
            )
        self.labels: np.ndarray = (
            self.kept[self.classes]
            .to_numpy(dtype=np.float32, na_value=np.nan)
            .reshape(self.n, len(self.classes))
        )
        self._masks: dict[str, np.ndarray] = {}
        #: (n,) bool: the kept images that have their masks (all, unless prepared with ``masks="optional"``)
        self.masked: np.ndarray = (
            self.kept["no_masks"].fillna("").eq("").to_numpy()
            if "no_masks" in self.kept
            else np.ones(self.n, dtype=bool)
        )

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        """Pickled by path: a worker process reopens the memory maps instead of receiving their bytes."""
        return (Store.open, (self.root,))

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open a complete store.

        Raises
        ------
        MaskauditError
            When the folder holds no complete store (no ``store.json``, or a file missing).
        """
        root = Path(path)
        marker = root / MARKER
        if not marker.is_file():
            state = "an unfinished preparation" if (root / WORK).is_dir() else "no prepared store"
            raise MaskauditError(f"{root}: {state}; run `maskaudit prepare` first")
        meta = read_json(marker)
        if meta.get("version") != STORE_VERSION:
            raise MaskauditError(
                f"{root}: store version {meta.get('version')}, this maskaudit reads {STORE_VERSION}; "
                "run `maskaudit prepare` again"
            )
        needed = [MANIFEST, IMAGES, *(mask_file(k) for k in meta["roi_keys"])]
        missing = [name for name in needed if not (root / name).is_file()]
        if missing:
            raise MaskauditError(
                f"{root}: the prepared store is incomplete (missing {', '.join(missing)}); "
                "run `maskaudit prepare` first"
            )
        return cls(root, meta)

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype

    def packed_masks(self, roi_key: str) -> np.ndarray:
        """The bit-packed masks of a ROI key: a read-only (n, S, ceil(S / 8)) uint8 memory map (the loader reads it).

        Raises
        ------
        MaskauditError
            For a key that was not prepared; the message lists the available ones.
        """
        if roi_key not in self._masks:
            if roi_key not in self.roi_keys:
                raise MaskauditError(
                    f"ROI key {roi_key!r} is not in the prepared store {self.root}; available: "
                    f"{', '.join(self.roi_keys) or '(none)'} (a union must be listed when preparing)"
                )
            self._masks[roi_key] = np.load(self.root / mask_file(roi_key), mmap_mode="r")
        return self._masks[roi_key]

    def masks(self, roi_key: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The masks of a ROI key at ``rows``, unpacked: (len(rows), S, S) bool."""
        return self.unpack(np.asarray(self.packed_masks(roi_key)[rows]))

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """Bit-packed masks (..., S, ceil(S / 8)) uint8, as :meth:`packed_masks` holds them, unpacked: (..., S, S)
        bool (a new array)."""
        return np.unpackbits(packed, axis=-1, count=self.image_size).view(bool)

    def counts(self) -> pd.DataFrame:
        """Rows kept and rejected, per kind of reason: columns ``status``, ``reason``, ``count``
        (:func:`count_table` of the manifest)."""
        return count_table(self.manifest).rename(columns={"rows": "count"})

    def __repr__(self) -> str:
        return (
            f"Store({self.root}, n={self.n}, size={self.image_size}, channels={self.channels}, "
            f"dtype={self.dtype}, rois={self.roi_keys})"
        )
