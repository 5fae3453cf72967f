"""A killed preparation leaves no process behind: workers, fork server and resource tracker end with it (issue 14).

``maskaudit prepare`` runs in a session of its own with 2 workers on 200 synthetic images at 256 px
(several seconds of work); the test SIGKILLs the parent alone, at three moments, and then waits (at most
10 s) until no process of that session is left. Before the fix they all stayed, re-parented to PID 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")

CONFIG = {
    "data": {"source": "synthetic", "kind": "cxr", "n_patients": 200, "images_per_patient": [1, 1],
             "classes": {"opacity": {"signal": "roi"}}},
    "image_size": 256,
    "strategies": ["full", "no_roi"],
    "folds": 2,
    "seed": 7,
    "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
    "workers": 2,
    "analyses": {"run": []},
}


def _session(sid: int) -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every live (not zombie) process of session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        state, ppid, _group, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            found.append((int(entry.name), int(ppid), command))
    return found


def _workers(processes: list[tuple[int, int, str]]) -> list[int]:
    """The pool's workers: the fork server's children."""
    servers = {pid for pid, _, command in processes if "multiprocessing.forkserver" in command}
    return [pid for pid, ppid, _ in processes if ppid in servers]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["fork server started", "workers started", "workers busy"])
def test_killed_prepare_leaves_no_process(tmp_path: Path, moment: str):
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "maskaudit", "prepare", "--config", str(cfg), "--out",
                             str(tmp_path / "run")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            processes = _session(proc.pid)
            if moment == "fork server started":
                ready = any("multiprocessing.forkserver" in command for _, _, command in processes)
            else:
                ready = len(_workers(processes)) >= 2
            if ready:
                break
            assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"no {moment} within 120 s: {processes}"
            time.sleep(0.02)
        if moment == "workers busy":
            time.sleep(1.0)
            assert proc.poll() is None, "prepare ended before it could be killed"
        before = _session(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone, as the OOM killer or `kill -9 PID` would
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        left = _session(proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _session(proc.pid)
        assert not left, f"left behind after SIGKILL of {proc.pid} (before: {before})"
    finally:
        for pid, _, _ in _session(proc.pid):  # never leave them to the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_in_process_pool_ends_cleanly(tmp_path: Path):
    """The lifeline changes nothing for a preparation that ends normally: the same store with 1 and 2 workers."""
    from maskaudit.config import config_from_dict
    from maskaudit.data.sources import make_source
    from maskaudit.data.store import prepare_store

    config = config_from_dict({**CONFIG, "image_size": 32,
                               "data": {**CONFIG["data"], "n_patients": 12}})
    source = make_source(config)
    one = prepare_store(source, tmp_path / "one", 32, workers=1, progress=False)
    two = prepare_store(source, tmp_path / "two", 32, workers=2, progress=False)
    assert one.n == two.n == 12
    assert (one.images[:] == two.images[:]).all()
