"""Build a reader study: its cases, its readers with their secret links, and each reader's own order of cases.

A case is one image under one strategy: the reader reads it once and answers every class, even when
the selection picked the image for several classes (``files`` keeps every blinded file of the case).
The cases come from the run's reader selection (``analyses/reader/selection.parquet``) or from a CSV
with columns ``path``, ``strategy``, ``image_id`` and ``label_<class>``.

Secrets come from :mod:`secrets`, never from the run's seed: a token is ``token_urlsafe(32)``, the
database keeps only its SHA-256, and the links are printed once and written to ``RUN/reader/links.txt``
(mode 0600). Each reader's order of cases is shuffled by :class:`secrets.SystemRandom`, and each of
their cases gets a random opaque id: the only name under which the app shows it.

::

    RUN/reader/
      study.sqlite      cases, readers, order, sessions, answers, history (WAL)
      links.txt         the readers' and the admin's links (0600; delete it once they are sent)
    RUN/analyses/reader_study/   what ``maskaudit reader analyse`` writes
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from maskaudit.errors import MaskauditError
from maskaudit.reader import db
from maskaudit.rundir import RunDir, atomic_path

log = logging.getLogger(__name__)

READER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
OPAQUE = re.compile(r"^[A-Za-z0-9_-]{22}$")


@dataclass(frozen=True)
class StudyPaths:
    """Where a run's reader study lives (the only place these paths are built)."""

    run: RunDir

    @property
    def root(self) -> Path:
        return self.run.reader_study

    @property
    def db(self) -> Path:
        return self.root / "study.sqlite"

    @property
    def links(self) -> Path:
        return self.root / "links.txt"

    @property
    def selection(self) -> Path:
        return self.run.analysis("reader") / "selection.parquet"

    @property
    def images(self) -> Path:
        return self.run.analysis("reader") / "images"

    @property
    def results(self) -> Path:
        return self.run.analysis("reader_study")


def study_paths(run_dir: Path) -> StudyPaths:
    return StudyPaths(RunDir(Path(run_dir)))


def _image_kind(path: Path) -> str:
    with Image.open(path) as image:
        return "rgb" if image.mode in ("RGB", "RGBA", "P") else "gray"


def stored_path(paths: StudyPaths, image: str | Path) -> str:
    """How the study keeps an image's path: relative to the run when inside it (the run can move), else absolute."""
    image = Path(image).resolve()
    root = paths.run.root.resolve()
    return str(image.relative_to(root)) if image.is_relative_to(root) else str(image)


def image_path(paths: StudyPaths, stored: str) -> Path:
    """The image file of a stored path (see :func:`stored_path`)."""
    return Path(stored) if Path(stored).is_absolute() else paths.run.root / stored


def cases_from_selection(paths: StudyPaths) -> pd.DataFrame:
    """One row per (strategy, image) of the selection: ``strategy, image_id, path, labels, files``."""
    if not paths.selection.is_file():
        raise MaskauditError(f"{paths.selection} does not exist; run `maskaudit analyse --out {paths.run.root} "
                             "reader` first, or pass --cases FILE.csv")
    selection = pd.read_parquet(paths.selection)
    label_cols = [c for c in selection.columns if c.startswith("label_")]
    missing = [c for c in ("file", "image_id", "strategy") if c not in selection.columns]
    if missing or not label_cols:
        raise MaskauditError(f"{paths.selection} lacks columns {missing or ['label_<class>']}; rerun the reader "
                             "analysis with --force")
    rows = []
    for (strategy, image_id), part in selection.groupby(["strategy", "image_id"], sort=False):
        files = sorted(map(str, part["file"]))
        rows.append({"strategy": str(strategy), "image_id": str(image_id), "path": str(paths.images / files[0]),
                     "files": files, **{c: part[c].iloc[0] for c in label_cols}})
    return pd.DataFrame(rows)


def cases_from_csv(path: Path) -> pd.DataFrame:
    """Cases from a CSV: ``path`` (absolute or relative to the CSV), ``strategy``, ``image_id``, ``label_<class>``."""
    path = Path(path)
    if not path.is_file():
        raise MaskauditError(f"{path} does not exist")
    table = pd.read_csv(path, dtype={"image_id": str, "strategy": str, "path": str})
    label_cols = [c for c in table.columns if c.startswith("label_")]
    missing = [c for c in ("path", "strategy", "image_id") if c not in table.columns]
    if missing or not label_cols:
        raise MaskauditError(f"{path}: expected columns path, strategy, image_id and label_<class>; "
                             f"missing {missing or ['label_<class>']}")
    table = table.drop_duplicates(["strategy", "image_id"])
    table["path"] = [str(p if Path(p).is_absolute() else (path.parent / p).resolve()) for p in table["path"]]
    table["files"] = [[Path(p).name] for p in table["path"]]
    return table[["strategy", "image_id", "path", "files", *label_cols]].reset_index(drop=True)


def _check_cases(cases: pd.DataFrame, source: str) -> list[str]:
    if cases.empty:
        raise MaskauditError(f"{source} holds no case")
    absent = [p for p in cases["path"] if not Path(p).is_file()]
    if absent:
        raise MaskauditError(f"{source}: {len(absent)} image(s) missing, e.g. {absent[0]}")
    classes = [c.removeprefix("label_") for c in cases.columns if c.startswith("label_")]
    for name in classes:
        values = set(pd.to_numeric(cases[f"label_{name}"], errors="coerce").dropna().unique())
        if not values <= {0, 1}:
            raise MaskauditError(f"{source}: label_{name} holds {sorted(values)}; expected 0 or 1 (empty: unknown)")
    bad = [c for c in classes if not re.fullmatch(r"[A-Za-z0-9_ .-]{1,60}", c)]
    if bad:
        raise MaskauditError(f"{source}: class names {bad} must be letters, digits, space, '_', '.', '-'")
    return classes


def parse_readers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MaskauditError("--readers is empty; give names such as alice,bob")
    bad = [n for n in names if not READER_NAME.match(n)]
    if bad:
        raise MaskauditError(f"reader names {bad} must be 1-40 letters, digits, '.', '_' or '-'")
    if len(set(names)) != len(names):
        raise MaskauditError(f"reader names repeat: {names}")
    return names


def create_study(run_dir: Path, readers: list[str], cases_csv: Path | None = None,
                 base_url: str = "http://127.0.0.1:8000") -> dict[str, str]:
    """Create the study (or add readers to it) and return ``{name: link}``, the admin's as ``"admin"`` when new.

    Raises
    ------
    MaskauditError
        When the cases are missing or malformed, a reader already exists, or --cases disagrees with the study.
    """
    paths = study_paths(run_dir)
    base_url = base_url.rstrip("/")
    new_study = not paths.db.is_file()
    paths.root.mkdir(parents=True, exist_ok=True)
    links: dict[str, str] = {}
    with db.opened(paths.db) as conn:
        db.init(conn)
        with db.transaction(conn):
            if new_study or conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 0:
                source = str(cases_csv) if cases_csv else str(paths.selection)
                cases = cases_from_csv(cases_csv) if cases_csv else cases_from_selection(paths)
                classes = _check_cases(cases, source)
                for _, row in cases.iterrows():
                    labels = {c: (None if pd.isna(row[f"label_{c}"]) else int(row[f"label_{c}"])) for c in classes}
                    conn.execute("INSERT INTO cases (strategy, image_id, path, kind, labels, files) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (row["strategy"], row["image_id"], stored_path(paths, row["path"]),
                                  _image_kind(Path(row["path"])), json.dumps(labels), json.dumps(row["files"])))
                admin = secrets.token_urlsafe(32)
                conn.execute("INSERT INTO study VALUES ('classes', ?), ('admin_token_hash', ?), ('created_at', ?), "
                             "('source', ?)", (json.dumps(classes), db.digest(admin), db.now(), source))
                links["admin"] = f"{base_url}/admin/login/{admin}"
            elif cases_csv is not None:
                raise MaskauditError(f"{paths.db} already holds a study; --cases only applies to a new one "
                                     "(move the study away to start another)")
            taken = {r[0] for r in conn.execute("SELECT name FROM readers")}
            again = [n for n in readers if n in taken]
            if again:
                raise MaskauditError(f"readers {again} are already in {paths.db}; their links were printed when "
                                     "they were added (see links.txt)")
            case_ids = [r[0] for r in conn.execute("SELECT id FROM cases ORDER BY id")]
            shuffle = secrets.SystemRandom()
            for name in readers:
                token = secrets.token_urlsafe(32)
                reader_id = conn.execute("INSERT INTO readers (name, token_hash, created_at) VALUES (?, ?, ?)",
                                         (name, db.digest(token), db.now())).lastrowid
                order = list(case_ids)
                shuffle.shuffle(order)
                conn.executemany(
                    "INSERT INTO assignments (reader_id, position, case_id, opaque) VALUES (?, ?, ?, ?)",
                    [(reader_id, k, case_id, secrets.token_urlsafe(16)) for k, case_id in enumerate(order)])
                links[name] = f"{base_url}/r/{token}"
    os.chmod(paths.db, 0o600)  # answers and session hashes: the owner's only
    _append_links(paths.links, links)
    log.info("reader study %s: %d readers added (%s)", paths.db, len(readers), ", ".join(readers))
    return links


def _append_links(path: Path, links: dict[str, str]) -> None:
    old = path.read_text() if path.is_file() else ""
    text = old + "".join(f"{name}\t{link}\n" for name, link in links.items())
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(text)
    os.chmod(path, 0o600)
