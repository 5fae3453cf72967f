"""A full, read-only or over-quota disk: one line naming the file and what to do, nothing half-written, and the
same command finishes once space is freed.

The real cases run on small tmpfs mounts made here (``mount -t tmpfs -o size=…``, unmounted in a finally; "freeing
space" is a remount with a larger size, "read-only" a remount ``ro``: root ignores ``chmod 0555``). Where mounting
is not permitted they are skipped with the reason; the tests that raise the errno by monkeypatching still run.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from maskaudit.data.store import Store
from maskaudit.errors import DiskError, disk_error, human_size, require_space
from maskaudit.reader import db
from maskaudit.rundir import atomic_path, read_json, write_json, write_table, write_text

AGAIN = "then run the same command again"

# ------------------------------------------------------------------------------------------- mounts

_MOUNT_PROBE: list[str] = []  # the reason mounting is not permitted ("" when it is), probed once


def _mount_refusal() -> str:
    if not _MOUNT_PROBE:
        reason = ""
        if shutil.which("mount") is None or shutil.which("umount") is None:
            reason = "no mount/umount command"
        else:
            probe = tempfile.mkdtemp(prefix="maskaudit-mount-probe-")
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                reason = f"mounting a tmpfs is not permitted here: {(done.stderr or done.stdout).strip()}"
            else:
                subprocess.run(["umount", probe], check=False)
            os.rmdir(probe)
        _MOUNT_PROBE.append(reason)
    return _MOUNT_PROBE[0]


class Mounts:
    """Small tmpfs mounts under ``tmp_path``, all unmounted at the end of the test."""

    def __init__(self, root: Path) -> None:
        self.root, self.mounted = root, []

    def tmpfs(self, size: str, name: str = "disk") -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        self.mounted.append(path)
        return path

    @staticmethod
    def remount(path: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    def close(self) -> None:
        for path in reversed(self.mounted):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    refusal = _mount_refusal()
    if refusal:
        pytest.skip(refusal)
    made = Mounts(tmp_path / "mnt")
    try:
        yield made
    finally:
        made.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maskaudit", *args], capture_output=True, text=True, timeout=300)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit 1 (not a signal: no SIGBUS) and said so in one line."""
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0].removeprefix("error: ")


# -------------------------------------------------------------------------------------- preparation


def _xray_config(cxr_dir: Path, root: Path, count: int, image_size: int) -> Path:
    """A folder-source config over ``count`` real X-rays copied under ``root``."""
    labels = pd.read_csv(cxr_dir / "labels.csv").head(count)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for name in labels[sub[:-1]]:
            shutil.copy(cxr_dir / name, root / name)
    labels[["image", "mask", "image_id", "patient_id", "covid"]].to_csv(root / "labels.csv", index=False)
    config = {
        "data": {"source": "folder", "labels_csv": str(root / "labels.csv"), "mask_column": "mask",
                 "patient_column": "patient_id", "id_column": "image_id", "classes": ["covid"]},
        "image_size": image_size, "strategies": ["full", "no_roi"], "folds": 2, "workers": 1,
        "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
    }  # fmt: skip
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_prepare_on_a_full_disk_refuses_with_the_numbers_then_resumes(
    mounts: Mounts, cxr_dir: Path, tmp_path: Path
) -> None:
    # 24 images at 320 px: 2.5 MB of images and 0.3 MB of packed masks, on a 2 MiB disk
    config = _xray_config(cxr_dir, tmp_path / "data", 24, 320)
    disk = mounts.tmpfs("2m")
    run = disk / "run"
    message = _one_error_line(_cli("prepare", "--config", str(config), "--out", str(run)))
    assert message.startswith(f"No space left on device writing {run}/prepared/images.npy and its mask file "
                              "(needs 2.8 MB, ")
    assert message.endswith(f" MB free): free space or choose another --out, {AGAIN}")
    assert not (run / "prepared" / "store.json").exists()
    assert not (run / "prepared" / "images.npy").exists()
    with pytest.raises(Exception, match="run `maskaudit prepare` first"):
        Store.open(run / "prepared")

    mounts.remount(disk, "size=64m")  # space freed: the same command finishes
    done = _cli("prepare", "--config", str(config), "--out", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    store = Store.open(run / "prepared")
    assert store.n == 24 and store.images.shape == (24, 1, 320, 320)


def test_a_map_on_a_full_disk_is_reserved_not_left_to_sigbus(mounts: Mounts, cxr_dir: Path, tmp_path: Path) -> None:
    """With the space check out of the way (another writer filled the disk after it), the reservation of the
    memory-mapped files (posix_fallocate) still turns the full disk into the message, never SIGBUS."""
    config = _xray_config(cxr_dir, tmp_path / "data", 24, 320)
    disk = mounts.tmpfs("2m")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import maskaudit.data.store as store
        from maskaudit.config import load_config
        from maskaudit.data.sources import make_source
        from maskaudit.errors import DiskError

        store.require_space = lambda *args, **kwargs: None  # as if the disk filled after the check
        source = make_source(load_config(Path({str(config)!r})))
        try:
            store.prepare_store(source, Path({str(disk / "prepared")!r}), 320, workers=1, progress=False)
        except DiskError as exc:
            print(exc)
            sys.exit(3)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != -signal.SIGBUS, "a memory map met the full disk"
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stdout.startswith(f"No space left on device writing {disk}/prepared/"), done.stdout
    assert not (disk / "prepared" / "store.json").exists()


# ----------------------------------------------------------------------------------------- training

TINY = {
    "data": {"source": "synthetic", "kind": "cxr", "n_patients": 24, "images_per_patient": [1, 2],
             "classes": {"opacity": {"signal": "roi"}}},
    "image_size": 32, "strategies": ["full"], "folds": 2, "seed": 7, "workers": 1,
    "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "patience": 2},
    "analyses": {"run": []},
}  # fmt: skip


def test_training_whose_checkpoint_does_not_fit_says_so_then_resumes(mounts: Mounts, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    disk = mounts.tmpfs("64m")
    run = disk / "run"
    for stage in (["prepare", "--config", str(config)], ["split"]):
        done = _cli(*stage, "--out", str(run))
        assert done.returncode == 0, done.stderr[-3000:]
    used = shutil.disk_usage(disk).used
    # room for model.pt (about 250 kB), not for last.pt (weights and Adam's moments, about 750 kB)
    mounts.remount(disk, f"size={(used + (450 << 10)) // 4096 * 4}k")
    message = _one_error_line(_cli("train", "--out", str(run), "--fold", "0"))
    job = run / "jobs" / "full" / "fold_0"
    assert message.startswith(f"No space left on device writing {job}/last.pt (needs ")
    assert message.endswith(f" kB free): free space or choose another --out, {AGAIN}")
    assert not (job / "job.json").exists() and not (job / "last.pt").exists()
    assert not list(job.glob(".*.tmp"))  # no temporary file left behind

    mounts.remount(disk, "size=64m")
    done = _cli("train", "--out", str(run), "--fold", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_json(job / "job.json")["epochs_run"] == 2


def test_torch_save_on_a_full_disk_is_the_disk_message(mounts: Mounts) -> None:
    """``torch.save`` reports a full disk as ``RuntimeError: … unexpected pos …``, without errno."""
    disk = mounts.tmpfs("256k")
    target = disk / "model.pt"
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save({"w": torch.zeros(200_000)}, disk / "raw.pt")
    (disk / "raw.pt").unlink(missing_ok=True)
    with pytest.raises(DiskError) as caught:
        with atomic_path(target) as tmp:
            torch.save({"w": torch.zeros(200_000)}, tmp)
    assert str(caught.value).startswith(f"No space left on device writing {target} (")
    assert str(caught.value).endswith(f"free): free space or choose another --out, {AGAIN}")
    assert list(disk.iterdir()) == []


# ---------------------------------------------------------------------------------- tables and JSON


def test_tables_and_json_on_a_full_disk_keep_the_old_file(mounts: Mounts) -> None:
    disk = mounts.tmpfs("512k")
    write_json(disk / "small.json", {"old": True})
    big = pd.DataFrame({"x": np.random.default_rng(0).random(200_000)})
    with pytest.raises(DiskError, match=rf"^No space left on device writing {disk}/t.parquet \(.* free\): "):
        write_table(disk / "t.parquet", big, csv=True)
    with pytest.raises(DiskError, match=rf"^No space left on device writing {disk}/small.json \(.* free\): "):
        write_json(disk / "small.json", list(range(200_000)))
    assert read_json(disk / "small.json") == {"old": True}
    assert sorted(p.name for p in disk.iterdir()) == ["small.json"]


def test_tables_and_json_in_a_read_only_folder_are_one_line(mounts: Mounts) -> None:
    disk = mounts.tmpfs("1m")
    write_json(disk / "kept.json", {"old": True})
    mounts.remount(disk, "ro")
    frame = pd.DataFrame({"a": [1, 2]})
    expected = {
        disk / "t.parquet": lambda: write_table(disk / "t.parquet", frame, csv=True),
        disk / "kept.json": lambda: write_json(disk / "kept.json", {"new": True}),
        disk / "sub" / "report.html": lambda: write_text(disk / "sub" / "report.html", "<html>"),
    }
    for path, write in expected.items():
        with pytest.raises(DiskError) as caught:
            write()
        assert str(caught.value) == (f"Read-only file system writing {path}: remount it read-write or "
                                     f"choose another --out, {AGAIN}")
        assert caught.value.errno == errno.EROFS and "\n" not in str(caught.value)
    assert read_json(disk / "kept.json") == {"old": True}


@pytest.mark.parametrize(
    ("code", "start"),
    [
        (errno.EROFS, "Read-only file system writing {path}: remount it read-write or choose another --out"),
        (errno.EACCES, "Permission denied writing {path}: make {folder} writable or choose another --out"),
        (errno.EPERM, "Permission denied writing {path}: make {folder} writable or choose another --out"),
        (errno.EDQUOT, "Disk quota exceeded writing {path}: free space within your quota or choose another --out"),
        (errno.ENOSPC, "No space left on device writing {path} ("),
    ],
)
@pytest.mark.parametrize("where", ["rename", "create"])
def test_each_refused_write_is_one_line_without_mounting(
    code: int, start: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same errors raised by monkeypatching ``os.replace`` / ``tempfile.mkstemp`` (runs where mounting cannot)."""
    path = tmp_path / "table.parquet"
    write_table(path, pd.DataFrame({"a": [0]}))

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(os, "replace", refuse) if where == "rename" else monkeypatch.setattr(
        tempfile, "mkstemp", refuse)
    with pytest.raises(DiskError) as caught:
        write_table(path, pd.DataFrame({"a": [1, 2]}))
    monkeypatch.undo()
    assert str(caught.value).startswith(start.format(path=path, folder=tmp_path))
    assert str(caught.value).endswith(AGAIN) and caught.value.errno == code
    assert pd.read_parquet(path)["a"].tolist() == [0]  # the old table, whole
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]  # no temporary file left


def test_other_errors_are_not_disk_errors(tmp_path: Path) -> None:
    assert disk_error(OSError(errno.ENOENT, "No such file or directory"), tmp_path / "x") is None
    assert disk_error(RuntimeError("a bug"), tmp_path / "x") is None  # plenty of space: not a disk problem
    assert disk_error(ValueError("nope"), tmp_path / "x") is None
    with pytest.raises(ValueError, match="not a disk problem"):
        with atomic_path(tmp_path / "y.json"):
            raise ValueError("not a disk problem")
    assert list(tmp_path.iterdir()) == []


def test_require_space_names_the_numbers(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    require_space(tmp_path, 1)
    with pytest.raises(DiskError) as caught:
        require_space(tmp_path / "a" / "b.npy", free * 2 + 10**12, what="RUN/prepared/images.npy")
    assert str(caught.value) == (f"No space left on device writing RUN/prepared/images.npy (needs "
                                 f"{human_size(free * 2 + 10**12)}, {human_size(free)} free): free space or "
                                 f"choose another --out, {AGAIN}")
    assert [human_size(n) for n in (512, 12_300, 1_200_000, 1.2e9)] == ["512 B", "12.3 kB", "1.2 MB", "1.2 GB"]


# ----------------------------------------------------------------------------------------- SQLite


def _fill(conn: sqlite3.Connection, rows: int) -> None:
    with db.transaction(conn):
        conn.executemany("INSERT INTO study (key, value) VALUES (?, ?)",
                         ((f"k{os.urandom(8).hex()}", "x" * 2000) for _ in range(rows)))


def test_sqlite_on_a_full_then_read_only_disk(mounts: Mounts) -> None:
    disk = mounts.tmpfs("512k")
    path = disk / "reader" / "study.sqlite"
    path.parent.mkdir()
    with db.opened(path) as conn:
        db.init(conn)
        _fill(conn, 10)
    with pytest.raises(DiskError) as caught, db.opened(path) as conn:
        _fill(conn, 1000)
    assert str(caught.value).startswith(f"No space left on device writing {path} (")
    assert str(caught.value).endswith(f"free): free space or move the run directory to another disk, {AGAIN}")
    with db.opened(path) as conn:  # the failed transaction was rolled back whole
        assert conn.execute("SELECT COUNT(*) FROM study").fetchone()[0] == 10

    mounts.remount(disk, "ro")
    with pytest.raises(DiskError) as caught, db.opened(path) as conn:
        _fill(conn, 1)
    assert str(caught.value).startswith(f"Read-only file system writing {path}: remount it read-write")
    mounts.remount(disk, "rw,size=4m")
    with db.opened(path) as conn:
        _fill(conn, 100)
        assert conn.execute("SELECT COUNT(*) FROM study").fetchone()[0] == 110


def test_sqlite_errors_that_are_not_the_disk_stay_as_they_are(tmp_path: Path) -> None:
    with db.opened(tmp_path / "study.sqlite") as conn:
        db.init(conn)
    with pytest.raises(sqlite3.IntegrityError), db.opened(tmp_path / "study.sqlite") as conn:
        with db.transaction(conn):
            conn.execute("INSERT INTO study (key, value) VALUES ('a', 'b')")
            conn.execute("INSERT INTO study (key, value) VALUES ('a', 'c')")
    with db.opened(tmp_path / "study.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM study").fetchone()[0] == 0




def test_commands_on_a_read_only_run_directory_are_one_line(mounts: Mounts, cxr_dir: Path, tmp_path: Path) -> None:
    """`maskaudit prepare` into a read-only run directory, existing or not: one line (was a 157-line traceback)."""
    config = _xray_config(cxr_dir, tmp_path / "data", count=8, image_size=32)
    disk = mounts.tmpfs("4m", "ro-disk")
    (disk / "run").mkdir()
    mounts.remount(disk, "ro")
    for out in (disk / "run", disk / "new-run"):
        message = _one_error_line(_cli("prepare", "--out", str(out), "--config", str(config)))
        assert message.startswith("Read-only file system writing ") and "remount it read-write" in message
