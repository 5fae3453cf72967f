"""Progress a person can read: plain log lines off a terminal, a live display on one, every epoch in the log file."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_pipeline import TINY
from typer.testing import CliRunner

from maskaudit import progress
from maskaudit.cli import app
from maskaudit.rundir import read_json

GRID = {**TINY, "strategies": ["full", "no_roi"]}  # 2 strategies x 2 folds = 4 jobs of 2 epochs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "maskaudit.progress"]


def test_plain_lines_count_jobs_and_give_the_time_left(caplog: pytest.LogCaptureFixture):
    clock = Clock()
    caplog.set_level(logging.INFO)
    epochs = logging.getLogger("maskaudit.train")
    with progress.stage("train", 2, mode="plain", interval=10, clock=clock) as shown:
        assert progress.active() is shown
        for job, stop in (("full fold 0", 3), ("no_roi fold 0", 3)):
            shown.start_job(job)
            progress.active().steps(4, "epochs", exact=False)  # what train_job does: at most 4 epochs
            for epoch in range(stop):
                clock.now += 5
                epochs.info("epoch %d detail", epoch, extra=progress.DETAIL)
                progress.active().step(note=f"improved: val {0.6 - 0.1 * epoch:.4f}")
            shown.end_job({"epochs_run": stop, "best_epoch": stop - 1, "best_val_loss": 0.4, "stopped_early": True})
    assert _messages(caplog) == [
        "train: job 1/2 full fold 0 started · elapsed 0.0 s · eta ?",
        # at most one line every 10 s within a job; before a job ends, epochs left bound the time left
        "train: job 1/2 full fold 0 · epoch 2/4 · improved: val 0.5000 · elapsed 10 s · eta ≤ 30 s",
        "train: job 1/2 full fold 0 done in 15 s: 3 epochs, best val loss 0.4000 at epoch 3, stopped early"
        " · elapsed 15 s · eta 15 s",
        "train: job 2/2 no_roi fold 0 started · elapsed 15 s · eta 15 s",
        "train: job 2/2 no_roi fold 0 · epoch 2/4 · improved: val 0.5000 · elapsed 25 s · eta 5.0 s",
        "train: job 2/2 no_roi fold 0 done in 15 s: 3 epochs, best val loss 0.4000 at epoch 3, stopped early"
        " · elapsed 30 s",
    ]
    # the per-epoch lines are kept off every console-like handler while the stage is shown
    assert not [r for r in caplog.records if r.name == "maskaudit.train"]
    assert progress.active() is not shown and progress.active().mode == "off"
    epochs.info("after the stage", extra=progress.DETAIL)  # no display: nothing is filtered
    assert caplog.records[-1].getMessage() == "after the stage"


def test_resumed_grid_counts_the_jobs_done_before(caplog: pytest.LogCaptureFixture):
    clock = Clock()
    caplog.set_level(logging.INFO)
    with progress.stage("predict", 30, done=27, mode="plain", interval=1000, clock=clock) as shown:
        for fold in range(3):
            shown.start_job(f"only_roi fold {fold}")
            shown.steps(100, "images", note="each under 6 maskings")
            for _ in range(4):
                clock.now += 1
                progress.active().step(25)
            shown.end_job({"rows": 1200})
    lines = _messages(caplog)
    assert lines[0] == "predict: job 28/30 only_roi fold 0 started · elapsed 0.0 s · eta ?"
    assert lines[1] == "predict: job 28/30 only_roi fold 0 done in 4.0 s: 100 images · elapsed 4.0 s · eta 8.0 s"
    assert lines[-1] == "predict: job 30/30 only_roi fold 2 done in 4.0 s: 100 images · elapsed 12 s"


def test_a_stage_counted_in_images(caplog: pytest.LogCaptureFixture):
    clock = Clock()
    caplog.set_level(logging.INFO)
    with progress.stage("prepare", 100, unit="images", mode="plain", interval=10, clock=clock) as shown:
        for _ in range(100):
            clock.now += 0.25
            shown.advance()
    assert _messages(caplog) == [
        "prepare: 40/100 images · elapsed 10 s · eta 15 s",
        "prepare: 80/100 images · elapsed 20 s · eta 5.0 s",
        "prepare: 100 images in 25 s (4 images/s)",
    ]


def test_jobs_finished_on_other_workers(caplog: pytest.LogCaptureFixture):
    clock = Clock()
    caplog.set_level(logging.INFO)
    note = "4 jobs on Ray; progress counts finished jobs"
    with progress.stage("train", 4, mode="plain", clock=clock, note=note) as s:
        for label in ("full fold 1", "full fold 0"):
            clock.now += 10
            s.job_finished_elsewhere(label, {"epochs_run": 7, "best_epoch": 4, "best_val_loss": 0.25})
    assert _messages(caplog) == [
        "train: 4 jobs on Ray; progress counts finished jobs",
        "train: job 1/4 full fold 1 finished: 7 epochs, best val loss 0.2500 at epoch 5 · elapsed 10 s · eta 30 s",
        "train: job 2/4 full fold 0 finished: 7 epochs, best val loss 0.2500 at epoch 5 · elapsed 20 s · eta 20 s",
    ]


def test_live_display_on_a_terminal(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("MASKAUDIT_PROGRESS", raising=False)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    caplog.set_level(logging.INFO)
    with progress.stage("train", 3, done=1, console=console) as shown:
        assert shown.mode == "live"
        shown.start_job("no_roi fold 2")
        shown.steps(250, "epochs", exact=False)
        for _ in range(5):
            shown.step(note="improved: val 0.3730")
        shown._live.refresh()
        shown.end_job({"epochs_run": 5, "best_epoch": 4, "best_val_loss": 0.373})
    screen = out.getvalue()
    assert "train: job 2/3 no_roi fold 2" in screen and "epoch 5/250" in screen and "improved: val 0.3730" in screen
    assert "eta ≤" in screen
    # on a terminal the display replaces the start and step lines; each job's end is still a line
    lines = _messages(caplog)
    assert len(lines) == 1 and lines[0].startswith("train: job 2/3 no_roi fold 2 done in ")


def test_outside_a_stage_progress_calls_do_nothing():
    shown = progress.active()
    shown.steps(10, "images")
    shown.step(3, note="x")
    assert shown.mode == "off"


@pytest.mark.parametrize(("seconds", "text"), [(0.04, "0.0 s"), (4.25, "4.2 s"), (42, "42 s"), (185, "3 min 05 s"),
                                               (720, "12 min"), (7500, "2 h 05 min")])
def test_durations_in_words(seconds: float, text: str):
    assert progress.format_duration(seconds) == text


# ------------------------------------------------------------------------------------------ a real tiny grid


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished tiny run (4 jobs), and what `maskaudit run` printed off a terminal."""
    root = tmp_path_factory.mktemp("progress")
    cfg, out = root / "audit.yaml", root / "run"
    cfg.write_text(yaml.safe_dump(GRID))
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def test_a_tiny_grid_prints_job_counts_and_logs_every_epoch(tiny_run: tuple[Path, str]):
    out, printed = tiny_run
    console = " ".join(printed.split())  # the console handler wraps long lines
    for i, job in enumerate(("full fold 0", "full fold 1", "no_roi fold 0", "no_roi fold 1"), start=1):
        assert f"train: job {i}/4 {job} started" in console
        assert re.search(rf"train: job {i}/4 {job} done in [\d.]+ s: 2 epochs, best val loss [\d.]+ at epoch \d",
                         console)
    # the four models' predictions are one call, each batch read once for all of them (predict.models)
    assert re.search(r"predict: job 1/1 4 models: full fold 0 … no_roi fold 1 done in [\d.]+ s: \d+ images·models",
                     console)
    assert re.search(r"train: job 2/4 full fold 1 started · elapsed [\d.]+ s · eta [\d.]+ s", console)
    assert "train loss" not in console  # per-epoch lines: the log file's only

    log = (out / "logs" / "maskaudit.log").read_text()
    epochs = re.findall(r"maskaudit\.train: (\w+) fold (\d) epoch (\d)/2: train loss [\d.]+, val loss [\d.]+ "
                        r"\((best so far, saved as model\.pt|best [\d.]+ at epoch \d; \d/2 epochs without an "
                        r"improvement of more than 0\.001)\)", log)
    assert sorted((s, int(k), int(e)) for s, k, e, _ in epochs) == sorted(
        (s, k, e) for s in ("full", "no_roi") for k in (0, 1) for e in (1, 2))
    assert all(standing.startswith("best so far") for _, _, e, standing in epochs if e == "1")
    assert "train: job 4/4 no_roi fold 1 done in" in log  # and the summary lines too
    assert read_json(out / "jobs" / "full" / "fold_0" / "job.json")["epochs_run"] == 2
