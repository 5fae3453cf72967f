"""The grid on a real two-node Ray cluster on this machine, as on a cluster of machines (issue 15, part 6).

The cluster is Ray's own multi-node test harness (``ray.cluster_utils.Cluster``: a head node and a second node,
each a raylet with one CPU, https://docs.ray.io/en/latest/ray-contribute/testing-tips.html), started and
stopped by this module. ``maskaudit run`` with ``executor: ray`` and ``ray.address`` naming the head trains and
scores the grid there, and its predictions must be those of the local executor, bit for bit: once as it is, once
with the worker process of one training job killed (SIGKILL, from here, by its process title) after that job has
saved its first epoch: Ray runs the task again, and the job resumes from its ``last.pt``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_pipeline import TINY
from typer.testing import CliRunner

from maskaudit.cli import app

ray = pytest.importorskip("ray", reason="the Ray executor needs `pip install maskaudit[ray]`")
from ray.cluster_utils import Cluster  # noqa: E402

#: Ray runs multi-node clusters on Linux only (elsewhere ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), and 127.0.0.2 is a
#: loopback address on Linux only.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a multi-node Ray cluster on one machine: Linux only")

#: The nodes' address: loopback, but not 127.0.0.1, which ``ray.init(address=...)`` rewrites to this machine's network
#: address (``resolve_ip_for_localhost``), where a cluster started on 127.0.0.1 does not answer.
NODE_IP = "127.0.0.2"
#: Four epochs, so that a job killed after its first has three left to resume (an epoch here: about 0.1 s).
CONFIG = {**TINY, "strategies": ["full", "no_roi"], "train": {**TINY["train"], "epochs": 4, "patience": 4}}
#: The training job whose worker is killed (submitted last: it runs while another job holds the other node).
KILLED = ("no_roi", 1)
#: ``train: job 3/4 no_roi fold 1 on node 1a2b3c4d (attempt 2 of 3: ...) finished`` in logs/maskaudit.log.
FINISHED = re.compile(r"(train|predict): job \d+/\d+ (\w+ fold \d+) on node (\w+)(?: \(attempt (\d+) of \d+)?")


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="ma-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_TMPDIR", temp)  # the cluster's address file goes here, not in the /tmp/ray other Rays read
    patch.delenv("RAY_ADDRESS", raising=False)
    patch.setenv("OMP_NUM_THREADS", "1")  # the workers' torch threads, whatever this shell says (Ray's default too)
    if ray.is_initialized():
        ray.shutdown()
    node = {"num_cpus": 1, "node_ip_address": NODE_IP, "include_dashboard": False}
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=60)
        print(f"two-node Ray cluster up in {time.perf_counter() - started:.1f} s at {cluster.address}")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()
        shutil.rmtree(temp, ignore_errors=True)


def _run(tmp_path: Path, name: str, config: dict) -> Path:
    path, out = tmp_path / f"{name}.yaml", tmp_path / name
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> pd.DataFrame:
    """The local executor's predictions, torch on one thread as on a Ray worker of one CPU (``OMP_NUM_THREADS=1``):
    the same float summation order, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = _run(tmp_path_factory.mktemp("local"), "local", {**CONFIG, "executor": "local"})
    finally:
        torch.set_num_threads(threads)
    return pd.read_parquet(out / "predictions.parquet")


def _on_ray(cluster: Cluster) -> dict:
    return {**CONFIG, "executor": "ray", "ray": {"address": cluster.address, "num_cpus": 1, "max_retries": 2}}


def _finished(out: Path) -> list[tuple[str, str, str, int]]:
    """(stage, job, node id's first 8 characters, attempt from 1) of every job the driver saw finish."""
    text = (out / "logs" / "maskaudit.log").read_text()
    return [(stage, job, node, int(attempt or 1)) for stage, job, node, attempt in FINISHED.findall(text)]


def _nodes(cluster: Cluster) -> set[str]:
    return {node.node_id[:8] for node in cluster.list_all_nodes()}


@pytest.mark.slow
def test_the_grid_on_two_nodes_equals_the_local_grid(cluster: Cluster, local: pd.DataFrame, tmp_path: Path):
    out = _run(tmp_path, "ray", _on_ray(cluster))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), local)
    finished = _finished(out)
    assert sorted(job for stage, job, _, _ in finished if stage == "train") == \
        sorted(f"{s} fold {k}" for s in CONFIG["strategies"] for k in range(CONFIG["folds"]))
    assert {node for stage, _, node, _ in finished if stage == "train"} == _nodes(cluster), finished
    assert all(attempt == 1 for *_, attempt in finished)


def _worker_of(title: str) -> int | None:
    """The PID of the process whose title (Ray sets it to ``ray::`` and the task's name) is ``title``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") == title:
                    return int(entry.name)
            except OSError:
                continue
    return None


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_resumes_to_the_same_predictions(cluster: Cluster, local: pd.DataFrame,
                                                                      tmp_path: Path):
    out = tmp_path / "killed"
    job = out / "jobs" / KILLED[0] / f"fold_{KILLED[1]}"
    title = f"ray::maskaudit train {KILLED[0]} fold {KILLED[1]}"
    killed: dict = {}
    stop = threading.Event()

    def kill_after_first_epoch() -> None:
        deadline, pid = time.monotonic() + 120, None
        while not stop.is_set() and time.monotonic() < deadline:
            pid = pid or _worker_of(title)  # found while the job starts, so that the kill follows its first epoch
            history = job / "history.csv"
            if pid is not None and history.is_file() and not (job / "job.json").exists():
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, epochs=len(pd.read_csv(history)))
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
    killer.start()
    try:
        _run(tmp_path, "killed", _on_ray(cluster))
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, f"{title} was never seen running after an epoch"
    assert 1 <= killed["epochs"] < CONFIG["train"]["epochs"], killed
    pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), local)
    attempts = {(stage, job): attempt for stage, job, _, attempt in _finished(out)}
    label = f"{KILLED[0]} fold {KILLED[1]}"
    assert attempts[("train", label)] == 2, attempts
    assert all(attempt == 1 for key, attempt in attempts.items() if key != ("train", label)), attempts
    log = (out / "logs" / "maskaudit.log").read_text()
    resumed = re.findall(rf"{label}: resuming after epoch (\d+)", log)
    assert resumed and int(resumed[0]) >= killed["epochs"], (resumed, killed)  # not retrained from scratch
    assert "1 job ran again after a worker running it died" in log
