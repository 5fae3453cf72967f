"""Experiment tracking to MLflow (issue 17, part 4): a tiny audit tracked to a real local store (SQLite, in the run
directory: no server), read back through MLflow's own client; tracking changes no fingerprint; a tracking server that
is down only warns.

The tracked run is trained once per session (:func:`tracked_run`); ``test_model_card.py`` reads it too.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from maskaudit import tracking
from maskaudit.cli import app
from maskaudit.config import TrackingConfig, config_from_dict, load_config
from maskaudit.errors import MaskauditError
from maskaudit.kinds import audit_class
from maskaudit.rundir import RunDir, read_json

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import TINY  # noqa: E402

#: TINY with metadata (for the baseline), the baseline and the verdict, tracked to the default store.
TRACKED = {**TINY, "data": {**TINY["data"], "metadata": {"sex": {}, "projection": {"correlates_with": "device",
                                                                                    "strength": 0.6}}},
           "analyses": {"run": ["baseline", "verdict"]}, "tracking": {"mlflow": {}}}

_RUNS: dict[str, Path] = {}


def tracked_run(factory: pytest.TempPathFactory) -> Path:
    """A finished tiny audit of :data:`TRACKED` run through the CLI, made once per session (treat it as read-only:
    copy it to change it)."""
    if "run" not in _RUNS:
        root = factory.mktemp("tracked")
        config = root / "audit.yaml"
        config.write_text(yaml.safe_dump(TRACKED))
        result = CliRunner().invoke(app, ["run", str(config), "--out", str(root / "run")])
        assert result.exit_code == 0, result.output + repr(result.exception)
        _RUNS["run"] = root / "run"
    return _RUNS["run"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tracked_run(tmp_path_factory)


@pytest.fixture(autouse=True)
def _fresh_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "_FAILED", {})  # a URI that failed in another test is tried again here


def _client(run: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run.resolve()}/mlflow/mlflow.db")


def _runs(client) -> tuple[object, list]:
    """The parent run and its job runs in the experiment ``maskaudit``."""
    experiment = client.get_experiment_by_name("maskaudit")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in found]
    jobs = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], jobs


def test_a_tracked_run_reads_back_through_mlflows_client(tracked: Path, tmp_path: Path):
    client = _client(tracked)
    parent, jobs = _runs(client)
    strategies, folds = TRACKED["strategies"], range(TRACKED["folds"])
    assert sorted(r.info.run_name for r in jobs) == sorted(f"{s}/fold_{k}" for s in strategies for k in folds)
    for job in jobs:
        strategy, fold = job.data.params["strategy"], int(job.data.params["fold"])
        folder = tracked / "jobs" / strategy / f"fold_{fold}"
        summary, history = read_json(folder / "job.json"), pd.read_csv(folder / "history.csv")
        assert job.info.status == "FINISHED"
        assert job.data.params["train.lr"] == str(TRACKED["train"]["lr"])
        assert job.data.params["train.epochs"] == str(TRACKED["train"]["epochs"])
        assert job.data.params["model.arch"] == "small_cnn" and job.data.params["seed"] == "7"
        assert job.data.params["job_seed"] == str(summary["seed"])
        for key in ("train_loss", "val_loss", "val_auc_opacity", "val_auc_device"):  # the epoch curves
            curve = sorted(client.get_metric_history(job.info.run_id, key), key=lambda m: m.step)
            expected = history[["epoch", key]].dropna()
            assert [m.step for m in curve] == list(expected["epoch"]), key
            assert [m.value for m in curve] == pytest.approx(list(expected[key])), key
        assert job.data.metrics["best_val_loss"] == pytest.approx(summary["best_val_loss"])
        assert job.data.metrics["epochs_run"] == summary["epochs_run"]
        assert {a.path for a in client.list_artifacts(job.info.run_id, "job")} == {"job/job.json", "job/history.csv"}

    assert parent.info.run_name == tracked.name and parent.info.status == "FINISHED"
    verdicts = pd.read_parquet(tracked / "analyses" / "verdict" / "verdict.parquet")
    for _, v in verdicts.iterrows():
        assert parent.data.tags[f"verdict/{v['class']}"] == v["verdict"]
    matrix = pd.read_parquet(tracked / "metrics" / "auc_matrix.parquet")
    full = matrix[(matrix["split"] == "test") & (matrix["dataset"] == "main") & (matrix["class"] == "opacity")
                  & (matrix["train_strategy"] == "full") & (matrix["test_strategy"] == "full")]
    assert parent.data.metrics["auc/opacity/full/full"] == pytest.approx(float(full["auc_mean"].iloc[0]))
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "config.yaml", "stages.json", "metrics", "analyses", "figures"} <= top
    assert {"metrics/auc_matrix.parquet", "metrics/auc_matrix.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "metrics")}
    copy = client.download_artifacts(parent.info.run_id, "analyses/verdict/verdict.parquet", str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_parquet(copy), verdicts)  # the verdict table itself, as logged
    # the artifacts live beside the database, inside the run directory
    assert Path(client.get_experiment_by_name("maskaudit").artifact_location.removeprefix("file://")) == \
        (tracked / "mlflow" / "artifacts").resolve()


def test_logging_again_adds_nothing_but_what_changed(tracked: Path):
    run = tracked  # the run directory itself: a copy is another run directory, with a parent run of its own
    config = load_config(run / "config.yaml", check_files=False)
    audit = audit_class(config)(RunDir(run), config)
    before = _runs(_client(run))
    tracking.track_run(audit)  # a second `maskaudit report`: every job and the results are logged already
    after = _runs(_client(run))
    assert after[0].info.run_id == before[0].info.run_id
    assert sorted(r.info.run_id for r in after[1]) == sorted(r.info.run_id for r in before[1])
    history = _client(run).get_metric_history(after[0].info.run_id, "auc/opacity/full/full")
    assert len(history) == 1
    from maskaudit.model_card import write_model_card

    write_model_card(RunDir(run))  # as `maskaudit report --model-card` does: the card is logged, the numbers are not
    tracking.track_run(audit)
    parent = after[0].info.run_id
    assert {"model_card.md", "model_card.json"} <= {a.path for a in _client(run).list_artifacts(parent)}
    assert len(_client(run).get_metric_history(parent, "auc/opacity/full/full")) == 1


def test_tracking_changes_no_fingerprint_and_a_run_without_it_reuses_every_output(tracked: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tracked, run)  # times kept: the report's inputs (the histories' stamps) are unchanged
    tracked_config = load_config(run / "config.yaml", check_files=False)
    assert tracked_config.tracking.mlflow is not None
    plain = tracked_config.model_copy(update={"tracking": TrackingConfig()})
    kind = audit_class(plain)
    records = read_json(run / "stages.json")
    for config in (tracked_config, plain):
        audit = kind(RunDir(run), config)
        assert {stage: audit.fingerprint(stage) for stage in records} == \
            {stage: record["fingerprint"] for stage, record in records.items()}
        for strategy, fold in audit.jobs:
            assert audit.model_done(strategy, fold)
    kind.create(run, plain).run_all()  # without tracking: every stage is up to date, nothing is redone
    assert read_json(run / "stages.json") == records
    assert "tracking:\n  mlflow: null" in (run / "config.yaml").read_text()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once it is closed


def test_a_tracking_server_that_is_down_warns_and_the_audit_goes_on(tracked: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    shutil.copytree(tracked, run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    uri = f"http://127.0.0.1:{_closed_port()}"
    raw["tracking"] = {"mlflow": {"uri": uri}}
    config = config_from_dict(raw, check_files=False)
    audit = audit_class(config).create(run, config)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="maskaudit.tracking"):
        audit.report(force=True)  # the report stage runs and its tracking hook fails
        tracking.track_job(audit, "full", 0)  # a job finishing meanwhile: the URI is left alone, no second warning
    assert time.monotonic() - started < 30
    assert (run / "report.html").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert uri in warnings[0] and "the audit goes on" in warnings[0] and "no tracking server answers" in warnings[0]


def test_without_mlflow_installed_tracking_only_warns(tracked: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    shutil.copytree(tracked, run)
    config = load_config(run / "config.yaml", check_files=False)
    raw = config.model_dump(mode="json") | {"tracking": {"mlflow": {"uri": f"sqlite:///{tmp_path}/other.db"}}}
    audit = audit_class(config)(RunDir(run), config_from_dict(raw, check_files=False))
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with caplog.at_level(logging.WARNING, logger="maskaudit.tracking"):
        tracking.track_job(audit, "full", 0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "pip install 'maskaudit[tracking]'" in messages[0]
    assert not (tmp_path / "other.db").exists()


def test_the_tracking_config(tmp_path: Path):
    base = {**TINY}
    assert config_from_dict(base).tracking.mlflow is None  # off by default
    settings = config_from_dict({**base, "tracking": {"mlflow": {}}}).tracking.mlflow
    assert settings.uri is None and settings.experiment == "maskaudit"
    assert tracking.tracking_uri(RunDir(tmp_path), settings) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    short = config_from_dict({**base, "tracking": {"mlflow": "http://127.0.0.1:5000"}}).tracking.mlflow
    assert short.uri == "http://127.0.0.1:5000" and tracking.tracking_uri(RunDir(tmp_path), short) == short.uri
    assert tracking.artifact_location(RunDir(tmp_path), "sqlite:////data/t.db") == "file:///data/artifacts"
    with pytest.raises(MaskauditError, match=r"unknown key 'tracking.mlflow.url' \(did you mean 'uri'\?\)"):
        config_from_dict({**base, "tracking": {"mlflow": {"url": "http://x"}}})
    with pytest.raises(MaskauditError, match=r"tracking.mlflow.uri: the URI holds a password, which config.yaml"):
        config_from_dict({**base, "tracking": {"mlflow": "postgresql://audit:secret@db.example/mlflow"}})
