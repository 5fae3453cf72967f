"""``maskaudit status RUN``: where a run stands, read from its directory alone.

:func:`run_status` reads ``config.yaml`` (as plain YAML: the data it names need not exist on this
machine), ``stages.json`` and the small files of ``jobs/<strategy>/fold_<k>/`` (``job.json``,
``history.csv``, the presence and times of ``model.pt``/``last.pt``, ``predictions.json`` …). It never
opens the prepared store or a checkpoint and imports neither torch nor the pipeline, so it answers
in a fraction of a second, also on a copy of a run made on another machine. :func:`show_status`
prints it: rich tables on a terminal, plain text otherwise.

What it can and cannot tell:

- **Stages**: done (when it finished and how long it took, from ``stages.json``), partly done (some
  of its jobs' outputs exist), not run, or not in this config (an analysis left out of
  ``analyses.run``). Whether a done stage is *stale* needs its fingerprint, which hashes the config
  and the input files' stamps through the pipeline (torch and all); instead a done stage is marked
  "may be stale" when a stage it depends on finished after it, or when ``config.yaml`` was
  rewritten after it finished and no later stage has run since. ``maskaudit run`` compares the
  fingerprints and redoes exactly what changed.
- **Jobs** (training): done (``job.json`` and ``model.pt``, no ``last.pt``), with epochs, best
  validation loss and training time; running or interrupted (a ``last.pt``, or a folder with a
  history but no model): running while a command holds the run directory's lock
  (:mod:`maskaudit.lock`; the lock dies with its holder) and its files changed within three times
  the run's typical epoch time (at least 10 min), else interrupted; "last epoch 12 min ago" says
  which; incomplete (``job.json`` without ``model.pt``); not started. A job's fingerprint is not
  checked, so a job trained under an older config still reads as done.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from maskaudit.config import ANALYSES, STAGES
from maskaudit.errors import MaskauditError
from maskaudit.lock import holder
from maskaudit.progress import format_duration
from maskaudit.rundir import RunDir

#: The stages whose inputs each stage's fingerprint includes (see :meth:`maskaudit.pipeline.Audit.fingerprint`).
DEPENDS: dict[str, tuple[str, ...]] = {
    "split": ("prepare",),
    "train": ("split",),
    "adapt": ("split",),
    "predict": ("train", "adapt", "split"),
    "metrics": ("predict",),
    **{name: ("predict", "metrics") for name in ANALYSES if name != "verdict"},
    "verdict": ("metrics", "baseline", "explain", "localize"),
    "report": ("metrics", *ANALYSES),
}

#: Per-job outputs of the stages that run one job per model.
JOB_OUTPUTS = {"predict": "predictions.json", "explain": "explain.json", "sweep": "sweep.json",
               "localize": "localize.json"}

#: A job whose files changed within this many seconds (or three epoch times, if longer) is called running.
RUNNING_WITHIN = 600.0


@dataclass(frozen=True)
class StageStatus:
    name: str
    state: str  # done | partly done | running | started | not run | left out (analyses.run) | not in a probe
    finished: datetime | None = None
    seconds: float | None = None
    fingerprint: str | None = None
    note: str = ""


@dataclass(frozen=True)
class JobStatus:
    strategy: str
    fold: int
    state: str  # done | running | interrupted | incomplete | not started (a probe: predicted | not predicted)
    epochs: int | None = None  # finished epochs
    max_epochs: int | None = None
    seconds: float | None = None  # a finished job's training time (job.json)
    best_val_loss: float | None = None
    best_epoch: int | None = None  # counted from 1
    stopped_early: bool | None = None
    last_change: datetime | None = None  # the newest file of the job's folder
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.strategy}/fold_{self.fold}"


@dataclass(frozen=True)
class RunStatus:
    root: Path
    grid: str  # "3 strategies × 2 folds = 6 jobs"
    probe: bool
    stages: list[StageStatus]
    jobs: list[JobStatus]
    now: datetime
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageStatus:
        return next(s for s in self.stages if s.name == name)

    def job(self, strategy: str, fold: int) -> JobStatus:
        return next(j for j in self.jobs if j.strategy == strategy and j.fold == fold)

    def counts(self) -> dict[str, int]:
        """Jobs per state, in a fixed order, states without jobs left out."""
        order = ("done", "running", "interrupted", "incomplete", "not started", "predicted", "not predicted")
        return {state: n for state in order if (n := sum(j.state == state for j in self.jobs))}


# ------------------------------------------------------------------------------------------ reading


def _read_config(run: RunDir) -> dict[str, Any] | None:
    if not run.config.is_file():
        return None
    try:
        raw = yaml.safe_load(run.config.read_text())
    except yaml.YAMLError as exc:
        raise MaskauditError(f"{run.config}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise MaskauditError(f"{run.config}: not a maskaudit config (expected a mapping of keys)")
    return raw


def _read_records(run: RunDir) -> dict[str, dict]:
    if not run.stages.is_file():
        return {}
    try:
        records = json.loads(run.stages.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MaskauditError(f"{run.stages}: not valid JSON ({exc})") from None
    return {k: v for k, v in records.items() if isinstance(v, dict)} if isinstance(records, dict) else {}


def _finished(record: dict) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(record.get("finished")))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:
        return None


def _grid(config: dict | None, run: RunDir) -> tuple[list[tuple[str, int]], bool, str]:
    """The run's jobs (from the config; without one, the job folders there are), whether it probes, and in words."""
    if config is not None:
        models = [m["name"] for m in config.get("models") or [] if isinstance(m, dict) and "name" in m]
        if models:
            return [(m, 0) for m in models], True, f"{len(models)} probed model{'s' * (len(models) != 1)}"
        strategies, folds = list(config.get("strategies") or []), int(config.get("folds") or 0)
        jobs = [(s, k) for s in strategies for k in range(folds)]
        return jobs, False, f"{len(strategies)} strategies × {folds} folds = {len(jobs)} jobs"
    jobs = []
    for folder in sorted(run.jobs.glob("*/fold_*")) if run.jobs.is_dir() else []:
        try:
            jobs.append((folder.parent.name, int(folder.name.removeprefix("fold_"))))
        except ValueError:
            continue
    return jobs, False, f"{len(jobs)} job folders (no config.yaml)"


def _history(path: Path) -> tuple[int, float | None, int | None]:
    """Finished epochs, and the best validation loss with its epoch (from 1), of a ``history.csv``."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return 0, None, None
    best, best_epoch = None, None
    for number, row in enumerate(rows, start=1):
        if str(row.get("best", "")).strip().lower() == "true":
            try:
                best, best_epoch = float(row["val_loss"]), number
            except (KeyError, TypeError, ValueError):
                continue
    return len(rows), best, best_epoch


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _newest(folder: Path) -> datetime | None:
    """The newest modification time of the files in a job folder and its ``tb/``."""
    times = []
    for where in (folder, folder / "tb"):
        try:
            with os.scandir(where) as entries:
                times += [e.stat().st_mtime for e in entries if e.is_file()]
        except OSError:
            continue
    return datetime.fromtimestamp(max(times), UTC) if times else None


def _started(folder: Path) -> datetime | None:
    """When a job first started: the time in the name of its first TensorBoard file (``events.out.tfevents.<s>.…``)."""
    times = []
    for path in (folder / "tb").glob("events.out.tfevents.*"):
        stamp = path.name.split(".")[3] if path.name.count(".") >= 3 else ""
        if stamp.isdigit():
            times.append(int(stamp))
    return datetime.fromtimestamp(min(times), UTC) if times else None


def _train_job(run: RunDir, strategy: str, fold: int, max_epochs: int | None, now: datetime,
               running_within: float, written: bool = True) -> JobStatus:
    """One training job's state; ``written``: some command holds the run directory's lock (without one, an
    unfinished job is interrupted, however recent its files)."""
    folder = run.job(strategy, fold)
    base = {"strategy": strategy, "fold": fold, "max_epochs": max_epochs}
    if not folder.is_dir():
        return JobStatus(state="not started", **base)
    meta_path, model, last, history = (folder / n for n in ("job.json", "model.pt", "last.pt", "history.csv"))
    epochs, best, best_epoch = _history(history) if history.is_file() else (0, None, None)
    changed = _newest(folder)
    meta = _json(meta_path) if meta_path.is_file() else {}
    if not last.is_file() and meta:
        if not model.is_file():
            return JobStatus(state="incomplete", epochs=meta.get("epochs_run", epochs), seconds=meta.get("seconds"),
                             last_change=changed, note="job.json without model.pt: `maskaudit train` trains it again",
                             **base)
        best_epoch = meta.get("best_epoch")
        return JobStatus(state="done", epochs=meta.get("epochs_run", epochs), seconds=meta.get("seconds"),
                         best_val_loss=meta.get("best_val_loss", best),
                         best_epoch=best_epoch + 1 if isinstance(best_epoch, int) and best_epoch >= 0 else None,
                         stopped_early=meta.get("stopped_early"), last_change=changed, **base)
    if not (last.is_file() or epochs or (folder / "tb").is_dir()):
        return JobStatus(state="not started", last_change=changed, **base)
    # a checkpoint of an unfinished job (or a first epoch under way): running, or stopped
    epoch_time = _mtime(last) or _mtime(history)
    age = (now - (changed or now)).total_seconds()
    state = "running" if written and age <= running_within else "interrupted"
    started = _started(folder)
    note = f"started {format_duration((now - started).total_seconds())} ago, " if started else ""
    if epochs and epoch_time is not None:
        note += f"last epoch {format_duration((now - epoch_time).total_seconds())} ago"
    else:
        note += f"no epoch finished; files last changed {format_duration(age)} ago"
    if state == "interrupted":
        note += "; run the same command again to resume it"
    return JobStatus(state=state, epochs=epochs, best_val_loss=best, best_epoch=best_epoch, last_change=changed,
                     note=note, **base)


def _probe_job(run: RunDir, name: str) -> JobStatus:
    done = (run.job(name, 0) / JOB_OUTPUTS["predict"]).is_file()
    return JobStatus(strategy=name, fold=0, state="predicted" if done else "not predicted",
                     last_change=_newest(run.job(name, 0)))


def _typical_epoch(jobs: list[JobStatus]) -> float | None:
    times = [j.seconds / j.epochs for j in jobs
             if j.state == "done" and isinstance(j.seconds, int | float) and j.epochs]
    return statistics.median(times) if times else None


# ------------------------------------------------------------------------------------------ stages


def _stage_states(run: RunDir, config: dict | None, records: dict[str, dict], jobs: list[JobStatus],
                  grid: list[tuple[str, int]], probe: bool, now: datetime) -> list[StageStatus]:
    selected = set((config.get("analyses") or {}).get("run") or []) if config is not None else set(ANALYSES)
    finished = {name: _finished(rec) for name, rec in records.items()}
    config_time = _mtime(run.config)
    out = []
    adapts = probe and bool(((config or {}).get("adapt") or {}).get("strategies"))
    stages = tuple("adapt" if name == "train" and adapts else name for name in STAGES)  # a probe's only training
    for index, name in enumerate(stages):
        record = records.get(name)
        if record is None:
            out.append(_not_done(run, name, jobs, grid, probe, selected))
            continue
        when = finished.get(name)
        notes = []
        if name in ANALYSES and name not in selected:
            notes.append("no longer in analyses.run")
        later = [finished[s] for s in stages[index + 1:] if finished.get(s) is not None]
        if (when is not None and config_time is not None and (config_time - when).total_seconds() > 2
                and not any(t >= config_time for t in later)):
            notes.append("may be stale: config.yaml changed after it finished")
        redone = [d for d in DEPENDS.get(name, ()) if when is not None and finished.get(d) is not None
                  and finished[d] > when]
        if redone:
            notes.append(f"may be stale: {', '.join(redone)} finished after it")
        if name == "train" and not probe:
            unfinished = [j.name for j in jobs if j.state != "done"]
            if unfinished:
                notes.append(f"but {len(unfinished)} job{'s' * (len(unfinished) != 1)} not finished "
                             f"({', '.join(unfinished[:3])}{'…' if len(unfinished) > 3 else ''})")
        seconds = record.get("seconds")
        out.append(StageStatus(name, "done", when, float(seconds) if isinstance(seconds, int | float) else None,
                               record.get("fingerprint"), "; ".join(notes)))
    return out


def _not_done(run: RunDir, name: str, jobs: list[JobStatus], grid: list[tuple[str, int]], probe: bool,
              selected: set[str]) -> StageStatus:
    if name == "train" and probe:
        return StageStatus(name, "not in a probe", note="models trained elsewhere")
    if name in ANALYSES and name not in selected:
        return StageStatus(name, "left out", note="not in analyses.run")
    if name == "train":
        done = sum(j.state == "done" for j in jobs)
        running = sum(j.state == "running" for j in jobs)
        if running:
            return StageStatus(name, "running", note=f"{done}/{len(jobs)} jobs done, {running} running")
        if done or any(j.state != "not started" for j in jobs):
            return StageStatus(name, "partly done", note=f"{done}/{len(jobs)} jobs done")
    if name in JOB_OUTPUTS:
        done = sum((run.job(s, k) / JOB_OUTPUTS[name]).is_file() for s, k in grid)
        if done:
            of = f"/{len(grid)}" if name == "predict" else ""
            return StageStatus(name, "partly done", note=f"{done}{of} jobs done")
    if name == "prepare" and run.prepared.is_dir() and any(run.prepared.iterdir()):
        return StageStatus(name, "started", note="prepared/ holds a store not finished (or of other inputs)")
    return StageStatus(name, "not run")


# ------------------------------------------------------------------------------------------ the status


def run_status(run_dir: Path, now: datetime | None = None) -> RunStatus:
    """Where the run in ``run_dir`` stands, from its files alone (see the module's docstring).

    Raises
    ------
    MaskauditError
        When ``run_dir`` is no run directory (neither ``config.yaml`` nor ``stages.json``), or one of
        them cannot be read.
    """
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise MaskauditError(f"{run.root}: no such folder")
    if not run.config.is_file() and not run.stages.is_file():
        raise MaskauditError(f"{run.root} is not a maskaudit run directory: it holds neither config.yaml nor "
                             "stages.json (give the folder passed as --out)")
    now = now or datetime.now(UTC)
    config = _read_config(run)
    records = _read_records(run)
    grid, probe, words = _grid(config, run)
    epochs = (config or {}).get("train", {}).get("epochs") if isinstance((config or {}).get("train"), dict) else None
    if probe:
        jobs = [_probe_job(run, name) for name, _ in grid]
    else:
        first = [_train_job(run, s, k, epochs, now, math.inf) for s, k in grid]
        typical = _typical_epoch(first)
        within = max(RUNNING_WITHIN, 3 * typical) if typical else RUNNING_WITHIN
        written = holder(run.root) is not None  # a writer at work (the lock dies with its holder)
        jobs = [_train_job(run, s, k, epochs, now, within, written) if j.state == "running" else j
                for (s, k), j in zip(grid, first, strict=True)]
    notes = []
    if config is None:
        notes.append("config.yaml is missing: the jobs listed are the job folders found")
    return RunStatus(run.root, words, probe, _stage_states(run, config, records, jobs, grid, probe, now), jobs,
                     now, notes)


# ------------------------------------------------------------------------------------------ printing


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return ""
    local = moment.astimezone()
    return f"{local:%Y-%m-%d %H:%M:%S} ({format_duration((now - moment).total_seconds())} ago)"


def _epochs(job: JobStatus) -> str:
    if job.epochs is None:
        return ""
    return f"{job.epochs}/{job.max_epochs}" if job.max_epochs else str(job.epochs)


def _best(job: JobStatus) -> str:
    if not isinstance(job.best_val_loss, int | float) or not math.isfinite(job.best_val_loss):
        return ""
    return f"{job.best_val_loss:.4f}" + (f" (epoch {job.best_epoch})" if job.best_epoch else "")


def _job_note(job: JobStatus) -> str:
    parts = [job.note] if job.note else []
    if job.stopped_early:
        parts.append("stopped early")
    return "; ".join(parts)


def _stage_rows(status: RunStatus) -> list[list[str]]:
    return [[s.name, s.state, _when(s.finished, status.now),
             format_duration(s.seconds) if s.seconds is not None else "", s.note] for s in status.stages]


def _job_rows(status: RunStatus) -> list[list[str]]:
    return [[j.name, j.state, _epochs(j), _best(j), format_duration(j.seconds) if j.seconds is not None else "",
             _job_note(j)] for j in status.jobs]


def summary(status: RunStatus) -> str:
    """One line: the jobs per state and, while training is unfinished, the time left at the mean job time."""
    counts = status.counts()
    if not status.jobs:
        return "no jobs"
    text = ", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {len(status.jobs)} jobs)"
    done = [j.seconds for j in status.jobs if j.state == "done" and isinstance(j.seconds, int | float)]
    left = len(status.jobs) - counts.get("done", 0)
    if done and left and not status.probe:
        mean = sum(done) / len(done)
        text += f"; {format_duration(mean)} per job: about {format_duration(mean * left)} of training left"
    return text


STAGE_HEADER = ["stage", "state", "finished", "took", "note"]
JOB_HEADER = ["job", "state", "epochs", "best val loss", "took", "note"]


def _plain_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def format_status(status: RunStatus) -> str:
    """The status as plain text (what :func:`show_status` prints when stdout is not a terminal)."""
    lines = [f"run {status.root} ({status.grid})", "stages:"]
    lines += _plain_table(STAGE_HEADER, _stage_rows(status))
    if status.jobs:
        lines.append("models:" if status.probe else "training jobs:")
        lines += _plain_table(JOB_HEADER, _job_rows(status))
        lines.append(summary(status))
    lines += status.notes
    return "\n".join(lines)


def show_status(run_dir: Path, console: Any = None) -> None:
    """Print :func:`run_status` of ``run_dir``: rich tables on a terminal, plain text otherwise."""
    from rich.console import Console

    status = run_status(run_dir)
    console = console or Console()
    if not console.is_terminal:
        console.print(format_status(status), markup=False, highlight=False, soft_wrap=True)
        return
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]run[/bold] {escape(str(status.root))} ({status.grid})", highlight=False)
    styles = {"done": "green", "running": "cyan", "predicted": "green", "partly done": "yellow",
              "interrupted": "yellow", "incomplete": "red", "started": "yellow"}
    stages = Table(title="stages", title_justify="left")
    for name in STAGE_HEADER:
        stages.add_column(name, no_wrap=name != "note")
    for row in _stage_rows(status):
        stages.add_row(escape(row[0]), f"[{styles.get(row[1], 'dim')}]{row[1]}[/]", *map(escape, row[2:]))
    console.print(stages)
    if status.jobs:
        jobs = Table(title="models" if status.probe else "training jobs", title_justify="left")
        for name in JOB_HEADER:
            jobs.add_column(name, no_wrap=name != "note", justify="right" if name in ("epochs", "took") else "left")
        for row in _job_rows(status):
            jobs.add_row(escape(row[0]), f"[{styles.get(row[1], 'dim')}]{row[1]}[/]", *map(escape, row[2:]))
        console.print(jobs)
        console.print(summary(status), highlight=False)
    for note in status.notes:
        console.print(note, highlight=False)
