"""What a person watching a stage sees: a live display on a terminal, plain log lines elsewhere.

Every long stage opens one :func:`stage` and counts what matters to it: the jobs of the grid
(``train``, ``predict``, ``explain``, ``sweep``; the executor opens it) or the images
(``prepare``). Within a job, the job's own code counts its steps on :func:`active` (training: the
epochs, with the best validation loss so far; ``predict``: the images scored; ``explain``: the
images explained; ``sweep``: images × spreads). Outside a stage :func:`active` is a no-op, so
the job functions run the same on a Ray worker or in a test.

- **live** (stdout is a terminal): a ``rich.progress`` display of two rows, the stage
  (``train: job 7/30 no_roi fold 2``, jobs done, elapsed, time left) and the running job
  (``epoch 5/250 · best val 0.3730 (epoch 4)``, or ``improved: val 0.3712``). Log records print above it.
- **plain** (CI, ``nohup``, output to a file): the same as log lines of the logger
  ``maskaudit.progress``: one when a job starts, one when it ends, and within a job at most one
  every ``interval`` seconds (``MASKAUDIT_PROGRESS_INTERVAL``, default 30), each with the time left.
- **off**: nothing (``prepare_store(progress=False)``).

``MASKAUDIT_PROGRESS=live|plain|off`` overrides the choice. In both live and plain mode the
job's end is a log line (``train: job 7/30 no_roi fold 2 done in 42 s: 17 epochs, …``): the
terminal keeps one line per job. Per-epoch lines are logged with :data:`DETAIL`; while a stage
is shown, :class:`DetailFilter` keeps them off every handler of the root logger that is not a
``FileHandler``, so they reach ``logs/maskaudit.log`` and not the console.

The time left: when a job's length is known in steps (images), the share of the work done so
far; when it is only bounded (training stops early), the mean time of the jobs finished in this
session, or, before the first one ends, the epoch rate times the epochs still allowed, shown as
``eta ≤ …``. On Ray only finished jobs are seen (epochs run on the workers), so the count and
the time left move when a job ends.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import get_console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

log = logging.getLogger("maskaudit.progress")

#: ``extra=`` of a log record that belongs in the log file, not on the console (per-epoch lines).
DETAIL = {"maskaudit_detail": True}

MODES = ("live", "plain", "off")
DEFAULT_INTERVAL = 30.0


class DetailFilter(logging.Filter):
    """Drops the records logged with :data:`DETAIL` (put on console handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "maskaudit_detail", False)


DETAIL_FILTER = DetailFilter()


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``3 min 05 s``, ``12 min``, ``2 h 05 min``."""
    s = max(0.0, float(seconds))
    if s < 9.95:
        return f"{s:.1f} s"
    if s < 59.5:
        return f"{s:.0f} s"
    minutes, sec = divmod(int(round(s)), 60)
    if minutes < 10:
        return f"{minutes} min {sec:02d} s"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def describe_result(result: Any) -> str:
    """A job's summary in words, for what the job functions return (a training job's summary)."""
    if not isinstance(result, dict) or "epochs_run" not in result:
        return ""
    text = f"{result['epochs_run']} epochs"
    best = result.get("best_val_loss")
    if isinstance(best, float | int) and result.get("best_epoch", -1) >= 0:
        text += f", best val loss {best:.4f} at epoch {result['best_epoch'] + 1}"
    if result.get("stopped_early"):
        text += ", stopped early"
    return text


def _resolve_mode(mode: str | None, console: Any) -> str:
    mode = mode or os.environ.get("MASKAUDIT_PROGRESS", "").strip().lower() or None
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        return mode
    return "live" if console.is_terminal and not console.is_dumb_terminal else "plain"


def _interval(interval: float | None) -> float:
    if interval is not None:
        return float(interval)
    try:
        return float(os.environ.get("MASKAUDIT_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL


class StageProgress:
    """One stage's display: ``total`` units (``jobs``, or e.g. ``images``), of which ``done`` were done before.

    With ``unit="jobs"``: :meth:`start_job` / :meth:`end_job` around each job (or
    :meth:`job_finished_elsewhere` when it ran on another machine), and inside a job
    :meth:`steps` then :meth:`step`. With another unit: :meth:`advance`.
    """

    def __init__(self, name: str, total: int, *, unit: str = "jobs", done: int = 0, note: str = "",
                 mode: str | None = None, interval: float | None = None, console: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.total, self.unit, self.note = name, int(total), unit, note
        self.console = console or get_console()
        self.mode = _resolve_mode(mode, self.console)
        self.interval = _interval(interval)
        self.clock = clock
        self.count = self.done0 = int(done)
        self.jobs = unit == "jobs"
        self.durations: list[float] = []
        self.started = self._last_line = clock()
        self.job_label: str | None = None
        self.job_index = 0
        self.job_started = self.started
        self.bounded = False  # a job's steps are an upper bound (training may stop early)
        self._inner(0, "", 0, True, "")
        self._live: Any = None
        self._filtered: list[logging.Handler] = []
        self._previous: StageProgress | None = None

    # ------------------------------------------------------------------ the stage

    def __enter__(self) -> StageProgress:
        global _active
        self._previous, _active = _active, self
        if self._previous is not None and self._previous.mode == "live" and self.mode == "live":
            self.mode = "plain"  # rich shows one live display at a time
        if self.mode == "off":
            return self
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler) and DETAIL_FILTER not in handler.filters:
                handler.addFilter(DETAIL_FILTER)
                self._filtered.append(handler)
        if self.note:
            log.info("%s: %s", self.name, self.note)
        if self.mode == "live":
            self._start_live()
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        global _active
        _active = self._previous
        try:
            if self._live is not None:
                self._live.stop()
                self._live = None
            if kind is None and not self.jobs and self.mode != "off" and self.count > self.done0:
                elapsed = self.clock() - self.started
                rate = (self.count - self.done0) / elapsed if elapsed > 0 else 0.0
                log.info("%s: %d %s in %s (%.0f %s/s)", self.name, self.count - self.done0, self.unit,
                         format_duration(elapsed), rate, self.unit)
        finally:
            for handler in self._filtered:
                handler.removeFilter(DETAIL_FILTER)
            self._filtered = []

    def advance(self, n: int = 1) -> None:
        """``n`` more units done (a stage counted in images)."""
        self.count += n
        self._refresh()
        if self.mode == "plain" and self.count < self.total and self._due():
            self._emit(f"{self.count}/{self.total} {self.unit} · {self.times()}")

    # ------------------------------------------------------------------ jobs

    def start_job(self, label: str) -> None:
        self.job_label, self.job_started = label, self.clock()
        self.job_index = self.count + 1
        self._inner(0, "", 0, True, "")
        if self.mode == "plain":
            self._emit(f"job {self.job_index}/{self.total} {label} started · {self.times()}")
        self._refresh()

    def end_job(self, result: Any = None) -> None:
        """The running job ended; its summary (``result``, a training job's dict) goes into the line."""
        now = self.clock()
        duration = now - self.job_started
        self.durations.append(duration)
        self.count += 1
        what = describe_result(result) or (f"{self.inner_done} {self.inner_unit}" if self.inner_unit else "")
        label, index = self.job_label, self.job_index
        self.job_label = None
        self._inner(0, "", 0, True, "")
        if self.mode != "off":
            self._emit(f"job {index}/{self.total} {label} done in {format_duration(duration)}"
                       f"{': ' + what if what else ''} · {self.times()}")
        self._refresh()

    def job_finished_elsewhere(self, label: str, result: Any = None) -> None:
        """A job that ran on another worker ended (Ray): counted in the order jobs finish."""
        self.count += 1
        what = describe_result(result)
        if self.mode != "off":
            self._emit(f"job {self.count}/{self.total} {label} finished{': ' + what if what else ''} · {self.times()}")
        self._refresh()

    # ------------------------------------------------------------------ steps within a job

    def steps(self, total: int, unit: str, *, done: int = 0, exact: bool = True, note: str = "") -> None:
        """The running job has ``total`` steps of ``unit`` (``done`` of them before).

        ``exact=False``: ``total`` is an upper bound (epochs, when training may stop early).
        """
        self._inner(int(total), unit, int(done), exact, note)
        self.inner_exact = self.inner_exact and exact
        self.bounded = self.bounded or not exact
        self._refresh()

    def step(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more steps done; ``note`` (e.g. ``val loss 0.3730 (best so far)``) replaces the last one."""
        self.inner_done += n
        if note is not None:
            self.inner_note = note
        self._refresh()
        if self.mode == "plain" and self._due():
            self._emit(f"job {self.job_index}/{self.total} {self.job_label} · {self._inner_text()} · {self.times()}")

    # ------------------------------------------------------------------ time left

    def eta(self) -> tuple[float | None, bool]:
        """Seconds left (None while unknown), and whether that is only an upper bound."""
        now = self.clock()
        elapsed = now - self.started
        if not self.jobs:
            done = self.count - self.done0
            return (elapsed / done * max(self.total - self.count, 0), False) if done > 0 else (None, False)
        running = self.job_label is not None
        if self.durations and self.bounded:
            per_job = sum(self.durations) / len(self.durations)
            current = max(per_job - (now - self.job_started), 0.0) if running else 0.0
            after = max(self.total - self.count - (1 if running else 0), 0)
            return current + per_job * after, False
        fraction = 0.0
        if running and self.inner_total > self.inner_done0:
            fraction = min((self.inner_done - self.inner_done0) / (self.inner_total - self.inner_done0), 1.0)
        work_done = self.count - self.done0 + fraction
        if work_done <= 0:
            return None, False
        return elapsed * max(self.total - self.count - fraction, 0.0) / work_done, self.bounded and not self.durations

    def eta_text(self) -> str:
        seconds, bound = self.eta()
        if seconds is None:
            return "eta ?"
        return f"eta {'≤ ' if bound else ''}{format_duration(seconds)}"

    def times(self) -> str:
        elapsed = f"elapsed {format_duration(self.clock() - self.started)}"
        return elapsed if self.count >= self.total else f"{elapsed} · {self.eta_text()}"

    # ------------------------------------------------------------------ output

    def _inner(self, total: int, unit: str, done: int, exact: bool, note: str) -> None:
        self.inner_total, self.inner_unit, self.inner_done, self.inner_done0 = total, unit, done, done
        self.inner_exact, self.inner_note = exact, note

    def _inner_count(self) -> str:
        if self.inner_unit == "epochs":
            return f"epoch {self.inner_done}/{self.inner_total}"
        return f"{self.inner_done}/{self.inner_total} {self.inner_unit}"

    def _inner_text(self) -> str:
        if not self.inner_unit:
            return "starting"
        return f"{self._inner_count()}{' · ' + self.inner_note if self.inner_note else ''}"

    def _due(self) -> bool:
        return self.clock() - self._last_line >= self.interval

    def _emit(self, text: str) -> None:
        self._last_line = self.clock()
        log.info("%s: %s", self.name, text)

    def _start_live(self) -> None:
        self._live = Progress(TextColumn("{task.description}"), BarColumn(bar_width=16),
                              TextColumn("{task.fields[count]}"), _TimeColumn(self),
                              console=self.console, transient=True)
        self._outer_task = self._live.add_task(self.name, total=self.total or None, completed=self.count,
                                               count="", row="stage")
        self._inner_task = self._live.add_task("", total=None, visible=False, count="", row="job")
        self._live.start()
        self._refresh()

    def _refresh(self) -> None:
        if self._live is None:
            return
        if self.jobs:
            where = f": job {self.job_index}/{self.total} {self.job_label}" if self.job_label else ""
            count = f"{self.count}/{self.total} done"
        else:
            where, count = f": {self.unit}", f"{self.count}/{self.total} {self.unit}"
        self._live.update(self._outer_task, description=f"{self.name}{where}", completed=self.count, count=count)
        if self.job_label is not None and self.inner_unit:
            self._live.update(self._inner_task, visible=True, total=self.inner_total or None,
                              completed=self.inner_done, description=f"  {self._inner_count()}",
                              count=self.inner_note)
        else:
            self._live.update(self._inner_task, visible=False)


class _TimeColumn(ProgressColumn):
    """The stage row: elapsed and time left (computed at every refresh); the job row: the job's time."""

    def __init__(self, stage: StageProgress) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.stage = stage

    def render(self, task: Task) -> Text:
        if task.fields.get("row") == "stage":
            return Text(self.stage.times(), style="progress.remaining")
        return Text(f"job {format_duration(self.stage.clock() - self.stage.job_started)}", style="progress.elapsed")


class _Null:
    """:func:`active` outside a stage: every call does nothing."""

    mode = "off"

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


_NULL = _Null()
_active: StageProgress | None = None


def active() -> StageProgress | _Null:
    """The stage being shown in this process, or an object whose methods do nothing."""
    return _active if _active is not None else _NULL


@contextmanager
def stage(name: str, total: int, **options: Any) -> Iterator[StageProgress]:
    """Show stage ``name`` of ``total`` units while the block runs (options: see :class:`StageProgress`)."""
    with StageProgress(name, total, **options) as shown:
        yield shown
