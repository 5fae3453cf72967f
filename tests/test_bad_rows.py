"""A bad row never aborts a dataset: whatever the OS says about one row's files becomes that row's rejection.

Built in tmp_path from real X-rays (copied from ../shared/data/cxr_covid_ieee8023; nothing is written there):
a symlink loop, a 5000-character path, a NUL byte, a directory, a FIFO (root reads any file whatever its mode,
so "unreadable" is a FIFO, which would block a reader forever, and a path under a file, ENOTDIR).
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from maskaudit.config import FolderData
from maskaudit.data.sources.base import Loaded, Record, Rejected
from maskaudit.data.sources.folder import FolderSource
from maskaudit.data.store import Store, prepare_store

SIZE = 32
HEADER = ["image", "mask", "image_id", "patient_id", "covid"]


def _folder(cxr_dir: Path, root: Path, count: int = 3) -> list[str]:
    labels = pd.read_csv(cxr_dir / "labels.csv").head(count)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for image_id in labels["image_id"]:
            shutil.copy(cxr_dir / sub / f"{image_id}.png", root / sub / f"{image_id}.png")
    return list(labels["image_id"])


def _config(csv_path: Path) -> FolderData:
    return FolderData(source="folder", labels_csv=csv_path, image_column="image", mask_column="mask",
                      id_column="image_id", patient_column="patient_id", classes=["covid"])


@pytest.fixture
def bad_rows(cxr_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A labels CSV of 3 good rows and 8 bad ones; returns it and the expected reason of each bad id."""
    root = tmp_path / "data"
    a, b, c = _folder(cxr_dir, root)
    images = root / "images"
    (images / "loop.png").symlink_to("loop.png")  # a symlink to itself
    (images / "ping.png").symlink_to("pong.png")
    (images / "pong.png").symlink_to("ping.png")
    (images / "folder.png").mkdir()
    os.mkfifo(images / "fifo.png")
    long_name = "images/" + "x" * 4989 + ".png"  # 5000 characters: longer than any file name may be
    deep = "images/" + "d/" * 2100 + "x.png"  # a path longer than PATH_MAX, each part short
    mask = f"masks/{a}.png"
    rows = [
        [f"images/{a}.png", f"masks/{a}.png", "good_a", "p1", 1],
        ["images/loop.png", mask, "loop", "p2", 0],
        [long_name, mask, "long", "p3", 1],
        ["images/nul\0byte.png", mask, "nul", "p4", 0],
        [f"images/{b}.png", f"masks/{b}.png", "good_b", "p5", 0],
        ["images/folder.png", mask, "folder", "p6", 1],
        ["images/fifo.png", mask, "fifo", "p7", 0],
        [f"images/{a}.png/under.png", mask, "under_a_file", "p8", 1],
        ["images/ping.png", mask, "ping", "p9", 0],
        [f"images/{a}.png", "masks/../images/loop.png", "mask_loop", "p10", 1],
        [deep, mask, "deep", "p11", 0],
        [f"images/{c}.png", f"masks/{c}.png", "good_c", "p12", 1],
    ]
    csv_path = root / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    expected = {
        "loop": "unreadable image: images/loop.png: Symlink loop",
        "long": "unreadable image: images/xxx",
        "nul": "unreadable image: images/nul\\x00byte.png: embedded null byte",
        "folder": "unreadable image: images/folder.png: is a directory, not a file",
        "fifo": "unreadable image: images/fifo.png: not a regular file (a FIFO)",
        "under_a_file": f"unreadable image: images/{a}.png/under.png: Not a directory",
        "ping": "unreadable image: images/ping.png: Symlink loop",
        "mask_loop": "unreadable mask: masks/../images/loop.png: Symlink loop",
        "deep": "unreadable image: images/d/d/",
    }
    return csv_path, expected


def test_each_bad_path_is_its_rows_rejection_with_the_os_reason(bad_rows: tuple[Path, dict[str, str]]) -> None:
    csv_path, expected = bad_rows
    items = list(FolderSource(_config(csv_path)).records())
    kept = [item.image_id for item in items if isinstance(item, Record)]
    rejected = {item.image_id: item.reason for item in items if isinstance(item, Rejected)}
    assert kept == ["good_a", "good_b", "good_c"]
    assert set(rejected) == set(expected)
    for image_id, start in expected.items():
        assert rejected[image_id].startswith(start), (image_id, rejected[image_id])
    # the OS's own words for the long paths; the path shown is cut, with its length
    assert rejected["long"].endswith("xxx.png (5000 characters): File name too long (labels.csv row 4)")
    assert "File name too long" in rejected["deep"] and "characters)" in rejected["deep"]
    assert max(len(reason) for reason in rejected.values()) < 300


def test_prepare_keeps_the_good_rows_and_writes_the_manifest(bad_rows: tuple[Path, dict[str, str]],
                                                             tmp_path: Path) -> None:
    csv_path, expected = bad_rows
    store = prepare_store(FolderSource(_config(csv_path)), tmp_path / "prepared", SIZE, workers=1, progress=False)
    assert store.n == 3 and list(store.kept["image_id"]) == ["good_a", "good_b", "good_c"]
    manifest = Store.open(tmp_path / "prepared").manifest.set_index("image_id")
    assert len(manifest) == 12
    for image_id, start in expected.items():
        assert manifest.loc[image_id, "status"] == "rejected"
        assert manifest.loc[image_id, "reason"].startswith(start)
    assert manifest.loc["nul", "source_path"] == "images/nul\0byte.png"  # kept whole in its own column
    kinds = store.counts().set_index("reason")["count"].to_dict()
    assert kinds["unreadable image"] == 8 and kinds["unreadable mask"] == 1


class _Failing(FolderSource):
    """A folder source whose ``load`` raises what the OS (or pathlib) raises for some rows."""

    def load(self, record: Record) -> Loaded:
        raising = {
            "loop": RuntimeError(f"Symlink loop from {record.key.image!r}"),
            "long": OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), record.key.image),
            "nul": ValueError("embedded null byte"),
            "denied": PermissionError(errno.EACCES, os.strerror(errno.EACCES), record.key.image),
        }
        if record.image_id in raising:
            raise raising[record.image_id]
        if record.image_id == "bug":
            raise TypeError("a bug in the source")
        return super().load(record)


def _plain_rows(cxr_dir: Path, root: Path, ids: list[str]) -> Path:
    files = _folder(cxr_dir, root, len(ids))  # one image file per row (two rows of one file are duplicates)
    csv_path = root / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows([[f"images/{f}.png", f"masks/{f}.png", name, f"p_{name}", i % 2]
                          for i, (name, f) in enumerate(zip(ids, files, strict=True))])
    return csv_path


def test_an_os_error_while_loading_a_row_rejects_that_row(cxr_dir: Path, tmp_path: Path) -> None:
    csv_path = _plain_rows(cxr_dir, tmp_path / "data", ["good", "loop", "long", "nul", "denied", "good2"])
    store = prepare_store(_Failing(_config(csv_path)), tmp_path / "prepared", SIZE, workers=1, progress=False)
    assert list(store.kept["image_id"]) == ["good", "good2"]
    reasons = store.manifest.set_index("image_id")["reason"]
    assert reasons["loop"].startswith("unreadable image or mask: images/") and "Symlink loop from" in reasons["loop"]
    assert reasons["long"].startswith(f"unreadable image or mask: {tmp_path / 'data' / 'images'}")
    assert reasons["long"].endswith(": File name too long")
    assert reasons["nul"].endswith(".png: embedded null byte")
    assert reasons["denied"].endswith(": Permission denied")


def test_a_programmer_error_while_loading_stays_loud(cxr_dir: Path, tmp_path: Path) -> None:
    csv_path = _plain_rows(cxr_dir, tmp_path / "data", ["good", "bug"])
    with pytest.raises(TypeError, match="a bug in the source"):
        prepare_store(_Failing(_config(csv_path)), tmp_path / "prepared", SIZE, workers=1, progress=False)
