"""Where everything of a run lives, and how files get there (atomically).

Every path inside a run directory comes from :class:`RunDir`; no other module builds one.

::

    RUN/
      config.yaml                    the resolved config, every default written out
      stages.json                    per stage: inputs' fingerprint, finish time, seconds
      prepared/                      the prepared store (manifest.parquet, images.npy, dist_<roi>.npy, store.json)
      external/<name>/prepared/      the prepared store of each external dataset
      splits.json                    patient ids (and image ids) of the hold-out and of each fold
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
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_table(path: Path, frame: pd.DataFrame, csv: bool = False) -> None:
    """Write ``frame`` as Parquet at ``path`` (and as CSV beside it when ``csv``)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    if csv:
        with atomic_path(path.with_suffix(".csv")) as tmp:
            frame.to_csv(tmp, index=False)


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
    def log(self) -> Path:
        return self.root / "logs" / "maskaudit.log"
