"""Chaos: a run killed with SIGKILL at 10 seeded random moments, restarted each time, ends as an uninterrupted run.

Every restart is the same command. The final ``predictions.parquet`` and every metric table must equal those of a
run that was never killed, bit for bit; a file read half-written by a restart would fail that run or change them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_pipeline import TINY

KILLS = 10
#: seconds a restart spends before it works again (Python, torch, reading the run directory)
STARTUP = 3.0


def _start(config: Path, out: Path) -> subprocess.Popen:
    """``maskaudit run`` in its own process group (so its workers die with it), output to a log beside the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same arithmetic in every process
    with (out.parent / f"{out.name}.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "maskaudit", "run", str(config), "--out", str(out)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    paths = [run / "predictions.parquet", *sorted((run / "metrics").glob("*.parquet"))]
    return {str(p.relative_to(run)): pd.read_parquet(p) for p in paths}


@pytest.mark.slow
def test_ten_random_kills_end_as_an_uninterrupted_run(tmp_path: Path):
    config = {**TINY, "strategies": ["full", "no_roi"], "train": {**TINY["train"], "epochs": 3, "patience": 3},
              "workers": 2, "analyses": {"run": ["verdict"]}}
    cfg = tmp_path / "audit.yaml"
    cfg.write_text(yaml.safe_dump(config))
    whole, chaos = tmp_path / "whole", tmp_path / "chaos"
    started = time.monotonic()
    assert _start(cfg, whole).wait(timeout=600) == 0
    duration = time.monotonic() - started

    # 10 seeded moments of the uninterrupted run's life, in order; restart i is killed after the work between
    # moments i-1 and i (plus the start-up every restart pays again), so the kills fall all along the run
    moments = np.sort(np.random.default_rng(1907).uniform(0.0, duration, KILLS))
    landed = 0
    for work in np.diff(moments, prepend=0.0):
        proc = _start(cfg, chaos)
        try:
            proc.wait(timeout=STARTUP + work)  # finished before the kill: the restart redid less than expected
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            landed += 1
    assert landed >= KILLS - 2, f"only {landed} of {KILLS} kills landed before the run finished"
    assert _start(cfg, chaos).wait(timeout=600) == 0, (tmp_path / "chaos.log").read_text()[-3000:]

    expected, got = _tables(whole), _tables(chaos)
    assert list(got) == list(expected)
    for name, table in expected.items():
        pd.testing.assert_frame_equal(got[name], table, obj=name)
    verdicts = [pd.read_parquet(run / "analyses" / "verdict" / "verdict.parquet") for run in (whole, chaos)]
    pd.testing.assert_frame_equal(*verdicts)
