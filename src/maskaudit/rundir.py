"""Where everything of a run lives, and how files get there (atomically).

Every path inside a run directory comes from :class:`RunDir`; no other module builds one.

::

    RUN/
      config.yaml                    the resolved config, every default written out
      stages.json                    per stage: inputs' fingerprint, finish time, seconds
      prepared/                      the prepared store (manifest.parquet, images.npy, dist_<roi>.npy, store.json)
      external/<name>/prepared/      the prepared store of each external dataset
      splits.json                    patient ids (and image ids) of the hold-out and of each fold
      counts/                        what the report shows of the data, so that it needs no prepared store:
                                     prepared (rows kept and rejected per kind of reason, per dataset, written
                                     by prepare) and splits (images, patients and positives per split, written
                                     by split), each .parquet and .csv
      checks/<name>.json             the data check prepare ran on what it kept: main, then each external set
      jobs/<strategy>/fold_<k>/      model.pt, last.pt, history.csv, tb/, predictions.parquet, job.json
      predictions.parquet            the long table: every model x test strategy x image x class
      metrics/                       auc_by_fold, auc_matrix, delong (each .parquet and .csv)
      analyses/<name>/               baseline, explain, embed, sweep, reader, verdict: tables, arrays, images;
                                     reader_study: the readers' results (``maskaudit reader analyse``)
      reader/                        the reader study: study.sqlite (answers), links.txt (0600)
      figures/                       auc_<class>.png
      report.html
      logs/maskaudit.log
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from maskaudit.errors import DiskError, disk_error, disk_message, require_space

#: errno values of a file system without ``fallocate`` (the space check alone then guards a memory map)
_NO_FALLOCATE = frozenset(
    code for code in (errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None), errno.ENOSYS, errno.EINVAL) if code
)


@contextlib.contextmanager
def atomic_path(path: Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A write the file system refuses (full, read-only, over quota, not writable; see
    :func:`maskaudit.errors.disk_error`), in creating the folder or the temporary file, in the
    block or in the rename, raises a one-line :class:`~maskaudit.errors.DiskError` naming
    ``path``; the temporary file is removed and ``path`` keeps its old content. ``needed``
    (bytes, when known) is checked against the free space first, and shown in the message.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if needed:
            require_space(path.parent, needed, what=str(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise (disk_error(exc, path, needed) or exc) from exc
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        except (OSError, RuntimeError) as exc:
            written = tmp_path.stat().st_size if tmp_path.is_file() else 0
            error = disk_error(exc, path, needed)  # judged while the partial file still fills the disk
            if error is None:
                raise
            if error.errno == errno.ENOSPC:  # the numbers once it is gone: what it reached, what is free
                with contextlib.suppress(OSError):
                    tmp_path.unlink(missing_ok=True)
                error = DiskError(disk_message(errno.ENOSPC, path, needed, written=written), path, errno.ENOSPC)
            raise error from exc
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def reserve(path: Path, size: int | None = None, what: str | None = None) -> None:
    """Allocate the blocks of the file ``path`` (its first ``size`` bytes; default all), so a memory map of it
    cannot meet a full disk: an unbacked page of a map on a full disk fails with SIGBUS, not an error.

    Raises :class:`~maskaudit.errors.DiskError` (naming ``what``, default ``path``) when the space is not
    there; does nothing where the file system has no ``fallocate`` (the caller's space check then stands alone).
    """
    path = Path(path)
    size = path.stat().st_size if size is None else size
    if size <= 0:
        return
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            _fallocate(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in _NO_FALLOCATE:
            return
        error = disk_error(exc, path, size, what=what)
        if error is None:
            raise
        raise error from exc


def _fallocate(fd: int, size: int) -> None:
    """Linux's ``fallocate(2)``, which refuses (EOPNOTSUPP) where the file system cannot allocate, instead of
    ``posix_fallocate``'s emulation (a write per block: minutes for a large store on NFS); ``posix_fallocate``
    on other systems that have it; nothing elsewhere (macOS, Windows)."""
    libc = _libc()
    call = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None) if libc is not None else None
    if call is not None:
        call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        call.restype = ctypes.c_int
        if call(fd, 0, 0, size) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    elif hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def allocated(path: Path) -> int:
    """Bytes the file ``path`` already holds on disk (0 when it does not exist)."""
    try:
        return Path(path).stat().st_blocks * 512
    except (OSError, AttributeError):
        return 0


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


#: rows of a Parquet table encoded or decoded at once (:func:`write_table`'s row groups, :func:`read_table`'s batches):
#: pyarrow holds a row group's encoded columns, or a batch's decoded ones, whole
ROWS_AT_ONCE = 16_384


def write_table(path: Path, frame: pd.DataFrame, csv: bool = False) -> None:
    """Write ``frame`` as Parquet at ``path`` (and as CSV beside it when ``csv``), :data:`ROWS_AT_ONCE` rows per row
    group."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, row_group_size=ROWS_AT_ONCE)
    if csv:
        with atomic_path(path.with_suffix(".csv")) as tmp:
            frame.to_csv(tmp, index=False)




def read_table(path: Path) -> pd.DataFrame:
    """The Parquet table at ``path``, decoded :data:`ROWS_AT_ONCE` rows at a time: ``pd.read_parquet`` decodes each
    row group's columns whole, which for a 100k-row store manifest in one row group (as written before
    :func:`write_table` had row groups) held about three times the table's bytes at once (measured: 63 MB against
    43 MB). The same frame (dtypes from the file's pandas metadata,
    https://arrow.apache.org/docs/python/pandas.html#storing-pandas-dataframe-metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    batches = parquet.iter_batches(batch_size=ROWS_AT_ONCE, use_threads=False)
    return pa.Table.from_batches(list(batches), schema=parquet.schema_arrow).to_pandas()


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def external(self, name: str) -> Path:
        """The prepared store of an external dataset."""
        return self.root / "external" / name / "prepared"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    def counts(self, name: str) -> Path:
        """A table of counts the report reads instead of the prepared store: ``prepared`` (rows kept and
        rejected per kind of reason and dataset, :func:`maskaudit.data.store.count_table`) or ``splits``
        (images, patients and positives per split, :func:`maskaudit.data.splits.split_count_table`)."""
        return self.root / "counts" / f"{name}.parquet"

    def check(self, name: str) -> Path:
        """The data check of one dataset (``main`` or an external set's name) that ``prepare`` ran on what it
        kept (:func:`maskaudit.data.check.write_check`)."""
        return self.root / "checks" / f"{name}.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job(self, strategy: str, fold: int) -> Path:
        return self.jobs / strategy / f"fold_{fold}"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def analysis(self, name: str) -> Path:
        return self.root / "analyses" / name

    @property
    def reader_study(self) -> Path:
        """The reader study of ``maskaudit reader``: ``study.sqlite`` and ``links.txt``."""
        return self.root / "reader"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def model_card(self) -> tuple[Path, Path]:
        """``model_card.md`` and ``model_card.json`` (:mod:`maskaudit.model_card`)."""
        return self.root / "model_card.md", self.root / "model_card.json"

    @property
    def mlflow(self) -> Path:
        """The default MLflow store: ``mlflow.db`` and ``artifacts/`` (:mod:`maskaudit.tracking`)."""
        return self.root / "mlflow"

    @property
    def log(self) -> Path:
        return self.root / "logs" / "maskaudit.log"
