"""`maskaudit status`: where a run stands, from its directory alone, without torch."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_pipeline import TINY
from typer.testing import CliRunner

from maskaudit.cli import app
from maskaudit.errors import MaskauditError
from maskaudit.lock import run_lock
from maskaudit.rundir import read_json
from maskaudit.runstatus import format_status, run_status, show_status

CONFIG = {**TINY, "strategies": ["full", "no_roi"]}  # 2 strategies x 2 folds = 4 jobs of 2 epochs
JOBS = [("full", 0), ("full", 1), ("no_roi", 0), ("no_roi", 1)]
ANALYSES = ["baseline", "explain", "embed", "sweep", "reader", "localize", "verdict"]


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("status")
    (root / "audit.yaml").write_text(yaml.safe_dump(CONFIG))
    _cli("run", str(root / "audit.yaml"), "--out", str(root / "run"))
    return root / "run"


def _states(status) -> dict[str, str]:
    return {s.name: s.state for s in status.stages}


def test_a_finished_run(finished: Path):
    status = run_status(finished)
    assert _states(status) == {"prepare": "done", "split": "done", "train": "done", "predict": "done",
                               "metrics": "done", **dict.fromkeys(ANALYSES, "left out"), "report": "done"}
    records = read_json(finished / "stages.json")
    for stage in ("prepare", "split", "train", "predict", "metrics", "report"):
        shown = status.stage(stage)
        assert shown.seconds == records[stage]["seconds"] and shown.fingerprint == records[stage]["fingerprint"]
        assert shown.finished is not None and shown.note == ""  # nothing stale in a fresh run
    assert [(j.strategy, j.fold) for j in status.jobs] == JOBS
    for job in status.jobs:
        meta = read_json(finished / "jobs" / job.strategy / f"fold_{job.fold}" / "job.json")
        assert (job.state, job.epochs, job.max_epochs) == ("done", 2, 2)
        assert job.seconds == meta["seconds"] and job.best_val_loss == meta["best_val_loss"]
        assert job.best_epoch == meta["best_epoch"] + 1
    assert status.counts() == {"done": 4}
    text = format_status(status)
    assert text.splitlines()[0] == f"run {finished} (2 strategies × 2 folds = 4 jobs)"
    assert text.splitlines()[-1] == "4 done (of 4 jobs)"
    assert "  no_roi/fold_1  done   2/2" in text


def test_a_run_stopped_after_prepare(tmp_path: Path):
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "run"
    _cli("prepare", "--config", str(tmp_path / "audit.yaml"), "--out", str(out))
    status = run_status(out)
    assert _states(status) == {"prepare": "done", "split": "not run", "train": "not run", "predict": "not run",
                               "metrics": "not run", **dict.fromkeys(ANALYSES, "left out"), "report": "not run"}
    assert [(j.strategy, j.fold, j.state, j.epochs) for j in status.jobs] == [(s, k, "not started", None)
                                                                              for s, k in JOBS]
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    show_status(out, console)
    lines = console.file.getvalue().splitlines()
    assert lines[-1] == "4 not started (of 4 jobs)"
    assert [line.split()[:2] for line in lines if line.startswith("  split ") or line.startswith("  full/fold_0")] \
        == [["split", "not"], ["full/fold_0", "not"]]


def test_an_interrupted_job(finished: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)  # file times kept
    job = run / "jobs" / "full" / "fold_0"
    (job / "model.pt").rename(job / "last.pt")  # the final model gone, the last epoch's checkpoint kept
    two_hours_ago = time.time() - 7200
    for path in [*job.iterdir(), *(job / "tb").iterdir()]:
        os.utime(path, (two_hours_ago, two_hours_ago))
    status = run_status(run)
    stopped = status.job("full", 0)
    assert (stopped.state, stopped.epochs, stopped.max_epochs, stopped.seconds) == ("interrupted", 2, 2, None)
    assert re.fullmatch(r"started \S+ (s|min) ago, last epoch 2 h 00 min ago; run the same command again to resume it",
                        stopped.note)
    assert status.counts() == {"done": 3, "interrupted": 1}
    assert status.stage("train").note == "but 1 job not finished (full/fold_0)"
    assert format_status(status).splitlines()[-1].startswith("3 done, 1 interrupted (of 4 jobs); ")

    os.utime(job / "last.pt")  # an epoch just finished, but no command holds the run's lock: it was killed
    killed = run_status(run).job("full", 0)
    assert killed.state == "interrupted" and killed.note.endswith("; run the same command again to resume it")
    with run_lock(run, "maskaudit train"):  # a writer at work: running
        running = run_status(run).job("full", 0)
    assert running.state == "running" and re.fullmatch(r"started \S+ (s|min) ago, last epoch \S+ s ago", running.note)


def test_a_job_json_without_its_model_is_incomplete(finished: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "jobs" / "no_roi" / "fold_1" / "model.pt").unlink()
    job = run_status(run).job("no_roi", 1)
    assert job.state == "incomplete" and "`maskaudit train` trains it again" in job.note


def test_config_edited_after_the_stages_may_make_them_stale(finished: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    later = time.time() + 60
    os.utime(run / "config.yaml", (later, later))
    status = run_status(run)
    assert {s.name for s in status.stages if "may be stale: config.yaml changed" in s.note} == {
        "prepare", "split", "train", "predict", "metrics", "report"}


def test_tables_on_a_terminal(finished: Path):
    console = Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None)
    show_status(finished, console)
    screen = console.file.getvalue()
    assert "training jobs" in screen and "no_roi/fold_1" in screen and "4 done (of 4 jobs)" in screen


def test_a_folder_that_is_no_run_directory(tmp_path: Path):
    with pytest.raises(MaskauditError, match="is not a maskaudit run directory") as error:
        run_status(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(MaskauditError, match="no such folder"):
        run_status(tmp_path / "missing")


def test_status_imports_no_torch(finished: Path):
    code = ("import sys; from pathlib import Path; from maskaudit.runstatus import show_status; "
            "show_status(Path(sys.argv[1])); "
            "print('torch loaded' if 'torch' in sys.modules or 'maskaudit.pipeline' in sys.modules else 'no torch')")
    done = subprocess.run([sys.executable, "-c", code, str(finished)], capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.splitlines()[-1] == "no torch"
    assert "4 done (of 4 jobs)" in done.stdout
