"""One writer per run directory (issue 14): the second is refused in one line naming the first; a dead
holder's lock is taken over; readers never wait; the lock is re-entrant in one process; jobs never take it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline import TINY
from typer.testing import CliRunner

from maskaudit.cli import app
from maskaudit.errors import MaskauditError
from maskaudit.lock import LOCK_FILE, holder, run_lock

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
HOLD = """
import sys, time
from maskaudit.lock import run_lock
with run_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(run: Path, command: str) -> subprocess.Popen:
    """Another process that takes the lock of ``run`` as ``command`` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run), command], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _maskaudit(*args: str, wait: bool = True, session: bool = False):
    command = [sys.executable, "-m", "maskaudit", *args]
    if wait:
        return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=session)


def _refusal(text: str, run: Path, pid: int, command: str) -> None:
    """``text`` is the one-line refusal naming ``run`` and its holder."""
    line = text.strip()
    assert line.count("\n") == 0, text
    assert line.startswith(f"error: run directory {run} is in use by PID {pid} on host {socket.gethostname()} "
                           f"(`{command}`, started 20"), line
    assert " UTC)" in line and "one command at a time writes a run" in line


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (in this process)."""
    where = tmp_path_factory.mktemp("done")
    cfg = where / "audit.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(where / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return where / "run"


# ------------------------------------------------------------------------ the lock alone


def test_second_writer_is_refused_then_takes_over_a_killed_holder(tmp_path: Path):
    run = tmp_path / "run"
    first = _hold(run, "maskaudit train --out runs/x")
    try:
        info = holder(run)
        assert info is not None and info["pid"] == first.pid and info["command"] == "maskaudit train --out runs/x"
        assert info["host"] == socket.gethostname()
        with pytest.raises(MaskauditError) as refused, run_lock(run, "second"):
            pytest.fail("a second writer got the lock")
        _refusal(f"error: {refused.value}", run, first.pid, "maskaudit train --out runs/x")
    finally:
        _kill(first)  # SIGKILL: it releases nothing itself; the kernel drops its lock
    with run_lock(run, "third"):
        info = holder(run)
        assert info is not None and info["pid"] == os.getpid() and info["command"] == "third"
    assert holder(run) is None
    assert (run / LOCK_FILE).read_text() == ""  # emptied on release; the file stays


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = {"pid": pid, "host": socket.gethostname(), "command": "maskaudit run a.yaml --out run",
             "started": "2025-01-01 00:00:00 UTC"}
    (run / LOCK_FILE).write_text(json.dumps(stale) + "\n" + "x" * 500)  # longer than what replaces it
    assert holder(run) is None  # a file, but nobody holds it
    with run_lock(run, "maskaudit prepare --out run"):
        info = holder(run)
        assert info is not None and info["pid"] == os.getpid() and info["command"] == "maskaudit prepare --out run"


def test_reentrant_within_one_process(tmp_path: Path):
    run = tmp_path / "run"
    with run_lock(run, "maskaudit run a.yaml --out run"):
        with run_lock(run, "Audit.run_all"):  # `maskaudit run` holds it, then Audit.run_all takes it again
            assert holder(run)["command"] == "maskaudit run a.yaml --out run"
        assert holder(run)["pid"] == os.getpid()  # still held by the outer block
        with pytest.raises(ValueError), run_lock(run, "inner"):
            raise ValueError("a failing stage")
        assert holder(run)["pid"] == os.getpid()
    assert holder(run) is None
    with pytest.raises(ValueError), run_lock(run, "outer"):
        raise ValueError("a failing stage")
    assert holder(run) is None  # released on an exception too
    with run_lock(run, "again"):
        assert holder(run)["command"] == "again"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_is_another_writer(tmp_path: Path):
    run = tmp_path / "run"
    with run_lock(run, "parent"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                with run_lock(run, "child"):
                    os._exit(1)
            except MaskauditError:
                os._exit(0)
            os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child was let in"
        assert holder(run)["command"] == "parent"


# ------------------------------------------------------------------------ through the CLI, real processes


@pytest.mark.slow
def test_cli_second_writer_exits_1_naming_the_first_then_runs_after_it_was_killed(tmp_path: Path):
    cfg = tmp_path / "audit.yaml"  # long enough to outlast the checks below on a loaded machine; killed anyway
    cfg.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 2000, "patience": 2000}}))
    run = tmp_path / "run"
    first = _maskaudit("run", str(cfg), "--out", str(run), wait=False, session=True)
    try:
        deadline = time.monotonic() + 120
        while (holder(run) or {}).get("pid") != first.pid:
            assert first.poll() is None, f"the first run ended: {first.stderr.read()}"
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        second = _maskaudit("train", "--out", str(run))
        assert second.returncode == 1, second.stdout + second.stderr
        _refusal(second.stderr, run, first.pid, f"maskaudit run {cfg} --out {run}")
        assert second.stdout == ""
        for reader in (("status", str(run)), ("check", str(cfg))):  # read-only commands do not wait
            done = _maskaudit(*reader)
            assert done.returncode == 0, f"{reader}: {done.stdout} {done.stderr}"
        assert first.poll() is None, "the first run ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        first.stderr.close()
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(TINY))
    again = _maskaudit("run", str(short), "--out", str(run))  # takes over the killed run's lock and finishes
    assert again.returncode == 0, again.stderr
    assert (run / "report.html").is_file() and holder(run) is None


@pytest.mark.slow
def test_two_runs_started_together_one_runs_one_is_refused(tmp_path: Path):
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    procs = [_maskaudit("run", str(cfg), "--out", str(run), wait=False) for _ in range(2)]
    codes = []
    for proc in procs:
        proc.wait(timeout=600)
        codes.append(proc.returncode)
    assert sorted(codes) == [0, 1], [p.stderr.read() for p in procs]
    winner, loser = procs if codes[0] == 0 else procs[::-1]
    _refusal(loser.stderr.read(), run, winner.pid, f"maskaudit run {cfg} --out {run}")
    for proc in procs:
        proc.stderr.close()
    assert (run / "report.html").is_file()


@pytest.mark.slow
def test_readers_work_while_a_writer_holds_the_lock_and_writers_are_refused(tmp_path: Path, done: Path):
    held = _hold(done, "maskaudit train --out somewhere")
    try:
        for reader in (("status", str(done)), ("report", "--compare", str(done), str(done), "--out",
                                                 str(tmp_path / "compare.html"))):
            result = _maskaudit(*reader)
            assert result.returncode == 0, f"{reader}: {result.stdout} {result.stderr}"
        assert (tmp_path / "compare.html").is_file()
        for writer in (("report", "--out", str(done)), ("metrics", "--out", str(done), "--force"),
                       ("analyse", "--out", str(done), "verdict"), ("reader", "analyse", str(done)),
                       ("reader", "create", str(done), "--readers", "alice")):
            result = _maskaudit(*writer)
            assert result.returncode == 1, f"{writer}: {result.stdout} {result.stderr}"
            _refusal(result.stderr, done, held.pid, "maskaudit train --out somewhere")
    finally:
        _kill(held)


def test_job_functions_never_take_the_lock(tmp_path: Path, done: Path):
    """What a Ray worker runs (``run_job`` of the model and predictions parts) writes its job folder under the
    driver's lock: while another process holds it, the job functions still run."""
    from maskaudit.pipeline import Audit, run_job

    run = tmp_path / "run"
    shutil.copytree(done, run)
    driver = _hold(run, "maskaudit train --out run (the driver)")
    try:
        assert run_job(Audit, str(run), "model", "full", 0)
        assert run_job(Audit, str(run), "predictions", "full", 0) is not None
        assert holder(run)["pid"] == driver.pid
    finally:
        _kill(driver)
