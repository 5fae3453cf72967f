"""Experiment tracking: an audit's training jobs and results, logged to MLflow when the config asks.

``tracking: {mlflow: {uri: ..., experiment: ...}}`` (:class:`maskaudit.config.MlflowTracking`; off by default) logs

* per **training job**, once it has finished (:func:`track_job`, called by the job itself on the local executor;
  on Ray the driver logs them at the report stage): a run named ``<strategy>/fold_<k>`` with the parameters
  (strategy, fold, the job's seed and the run's, the masking, every ``model.*`` and ``train.*`` key), the
  per-epoch curves of its ``history.csv`` (``train_loss``, ``val_loss``, ``val_auc_<class>`` … as metrics with
  ``step`` = epoch), the best metrics of its ``job.json`` (``best_val_loss``, ``best_epoch``, ``epochs_run``,
  ``best_val_auc_<class>`` …) and both files as artifacts (``job/``);
* per **run directory** (:func:`track_run`, after the report stage): the parent run of those jobs, named after the
  folder, with the run's settings as parameters, each hold-out AUC (``auc/<class>/<train>/<test>``) as a metric,
  each verdict as a tag (``verdict/<class>``, a probe's ``verdict/<model>/<class>``), and as artifacts the AUC
  tables (``metrics/``), the verdict table (``analyses/verdict/``), ``report.html``, the model card when there is
  one, ``config.yaml``, ``stages.json`` and the AUC figures. It also logs any finished job not logged yet, so a
  run that was tracked late, or while the server was down, catches up on its next ``maskaudit report``.

Logging reads the job folders and tables the stages wrote, after they wrote them: it never runs inside the
training loop, and no stage fingerprint holds ``tracking`` (:data:`maskaudit.stages.EXECUTION_KEYS`), so a run
with tracking and one without reuse each other's outputs. Everything is logged once: a job run carries the tag
``maskaudit.job`` (a digest of the audit, the job and its ``job.json``) and the parent ``maskaudit.audit`` (a
digest of the run directory and its config less the execution keys: a config that changes the results starts a
new parent run, with the jobs logged again under it); the parent logs its numbers again only when they changed
(``maskaudit.logged_numbers``: MLflow appends a metric logged twice) and its files when one changed
(``maskaudit.logged_files``: an artifact logged again replaces the old one).

**The default store** is ``sqlite:///RUN/mlflow/mlflow.db`` with the artifacts in ``RUN/mlflow/artifacts``: a
SQLite database inside the run directory, needing no server (``mlflow ui --backend-store-uri
sqlite:///RUN/mlflow/mlflow.db`` shows it). Not a ``file:`` store: MLflow 3 deprecates the file store
(mlflow/mlflow#18534) and from 3.13 refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set. A ``sqlite:`` URI of
one's own keeps its artifacts beside its database (``artifacts/``); a server keeps them where it is set up to.

**A tracking failure never stops the audit.** MLflow not installed (``pip install 'maskaudit[tracking]'``), a
server that does not answer (its port is tried for :data:`CONNECT_TIMEOUT` seconds first; MLflow's own HTTP
retries are cut to :data:`HTTP_LIMITS`, from its default of about 4 minutes per call), a refused request: one
warning in the log, the audit goes on, and the tracker stays quiet for :data:`RETRY_AFTER` seconds before trying
that URI again.

The MLflow API used is the client's (``MlflowClient``, mlflow/mlflow: ``mlflow/tracking/client.py``):
``get_experiment_by_name``, ``create_experiment(name, artifact_location)``, ``search_runs(experiment_ids,
filter_string)``, ``create_run(experiment_id, tags=, run_name=)``, ``log_batch(run_id, metrics, params, tags)``
(MLflow's REST API, "Log Batch": at most 1000 metrics, 100 parameters and 100 tags a call, so batches are cut to
that), ``log_artifact(run_id, local_path, artifact_path)``, ``set_terminated(run_id, status)`` and
``delete_run``; reading back (the tests): ``get_metric_history(run_id, key)`` and ``list_artifacts(run_id,
path)``. Metrics are ``mlflow.entities.Metric(key, value, timestamp, step)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from maskaudit.rundir import RunDir, read_json
from maskaudit.stages import digest, read_key

if TYPE_CHECKING:
    from maskaudit.config import AuditConfig, MlflowTracking
    from maskaudit.pipeline import Audit

log = logging.getLogger(__name__)

#: Seconds a TCP connection to a tracking server may take before the server is taken to be down.
CONNECT_TIMEOUT = 5.0
#: MLflow's HTTP settings while maskaudit logs (unless the environment sets them): 2 retries, 30 s per request.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
#: Seconds a URI that failed is left alone before it is tried again.
RETRY_AFTER = 600.0
#: MLflow's limits per ``log_batch`` call.
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
#: The run's files logged as the parent run's artifacts (relative to the run directory; globs allowed).
RUN_ARTIFACTS = ("config.yaml", "stages.json", "report.html", "model_card.md", "model_card.json",
                 "metrics/*.parquet", "metrics/*.csv", "analyses/verdict/*", "figures/auc_*.png")

#: When each URI last failed (``time.monotonic``): it is not tried again for :data:`RETRY_AFTER` seconds.
_FAILED: dict[str, float] = {}
#: One MLflow client per URI in this process (making one opens the store: seconds for a SQLite database).
_CLIENTS: dict[str, Any] = {}


def _client(uri: str) -> Any:
    """The process's ``MlflowClient`` of ``uri`` (a SQLite database's folder is created first)."""
    if uri not in _CLIENTS:
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # the store's table creation and migrations: dozens of INFO lines
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def tracking_uri(run: RunDir, settings: MlflowTracking) -> str:
    """The tracking URI: the configured one, else the SQLite database in :attr:`RunDir.mlflow`."""
    if settings.uri:
        return settings.uri
    return "sqlite:///" + str((run.mlflow / "mlflow.db").resolve())


def artifact_location(run: RunDir, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (MLflow's own default would be
    ``./mlruns`` in whatever folder the audit was started from); a server's own choice for any other URI."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / "artifacts").resolve().as_uri()


def mlflow_key(text: str) -> str:
    """A metric, parameter or tag name MLflow accepts (letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    """``{"train.lr": "0.002", "train.augment.rotation": "10.0", ...}`` from a dumped config section."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return {mlflow_key(prefix): text[:6000]}


def _number(value: Any) -> float | None:
    """``value`` as a finite float; None for text, missing and NaN values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextlib.contextmanager
def _http_limits(uri: str) -> Iterator[None]:
    """MLflow's HTTP retries and timeout cut to :data:`HTTP_LIMITS` while logging to a server, unless the
    environment sets them; restored afterwards."""
    if urlparse(uri).scheme not in ("http", "https"):
        yield
        return
    added = {key: value for key, value in HTTP_LIMITS.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _reachable(uri: str) -> None:
    """Raise ``ConnectionError`` when an HTTP(S) tracking server's port does not answer within
    :data:`CONNECT_TIMEOUT` seconds; any other URI is left to MLflow."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ConnectionError(f"no tracking server answers at {parsed.hostname}:{port} ({exc})") from None


class Tracker:
    """One run directory's logging to one MLflow store; every call may raise (the ``track_*`` functions catch)."""

    def __init__(self, run: RunDir, config: AuditConfig) -> None:
        settings = config.tracking.mlflow
        if settings is None:
            raise ValueError("tracking.mlflow is not set")
        self.run, self.config = run, config
        self.uri = tracking_uri(run, settings)
        self.experiment = settings.experiment
        self.audit_key = digest(str(run.root.resolve()), read_key(config, ""))
        self._client: Any = None
        self._experiment_id: str | None = None
        self._parent: str | None = None

    # ------------------------------------------------------------------ the store

    @property
    def client(self) -> Any:
        if self._client is None:
            _reachable(self.uri)
            self._client = _client(self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=artifact_location(self.run, self.uri))
                except Exception:  # noqa: BLE001 - created meanwhile by another process: read it back
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
                    self._experiment_id = found.experiment_id
            else:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def find(self, tag: str, value: str) -> list[Any]:
        """The runs of the experiment whose tag ``tag`` is ``value``, oldest first."""
        return list(self.client.search_runs([self.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                                            order_by=["attributes.start_time ASC"]))

    def log(self, run_id: str, metrics: Iterable[tuple[str, float, int]] = (), params: dict[str, str] | None = None,
            tags: dict[str, str] | None = None) -> None:
        """``log_batch`` in batches of MLflow's limits; ``metrics`` as (key, value, step), NaN left out."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metric_list = [Metric(mlflow_key(k), v, now, int(step)) for k, v, step in metrics if _number(v) is not None]
        param_list = [Param(mlflow_key(k), v) for k, v in (params or {}).items()]
        tag_list = [RunTag(mlflow_key(k), v) for k, v in (tags or {}).items()]
        for batch in _chunks(metric_list, MAX_METRICS):
            self.client.log_batch(run_id, metrics=batch)
        for batch in _chunks(param_list, MAX_PARAMS):
            self.client.log_batch(run_id, params=batch)
        for batch in _chunks(tag_list, MAX_TAGS):
            self.client.log_batch(run_id, tags=batch)

    # ------------------------------------------------------------------ the run directory's parent run

    @property
    def parent(self) -> str:
        """The id of this run directory's (and config's) parent run, created when there is none."""
        if self._parent is None:
            found = self.find("maskaudit.audit", self.audit_key)
            if found:
                self._parent = found[0].info.run_id
            else:
                tags = {"maskaudit.audit": self.audit_key, "maskaudit.run_dir": str(self.run.root.resolve()),
                        "maskaudit.kind": self.config.kind}
                created = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run.root.name)
                self._parent = created.info.run_id
                self.log(self._parent, params=run_params(self.config))
        return self._parent

    # ------------------------------------------------------------------ jobs

    def job_logged(self, key: str) -> bool:
        """Whether a job run with tag ``maskaudit.job`` = ``key`` was logged to the end; half-logged ones (a
        failure midway) are deleted, so that it is logged again whole."""
        done = False
        for found in self.find("maskaudit.job", key):
            if found.info.status == "FINISHED":
                done = True
            else:
                self.client.delete_run(found.info.run_id)
        return done

    def log_job(self, strategy: str, fold: int) -> bool:
        """Log one finished training job from its folder; False when it has no ``job.json`` yet or was logged."""
        folder = self.run.job(strategy, fold)
        summary_path, history_path = folder / "job.json", folder / "history.csv"
        if not summary_path.is_file():
            return False
        key = digest(self.audit_key, strategy, fold, summary_path.read_text())
        if self.job_logged(key):
            return False
        summary = read_json(summary_path)
        tags = {"maskaudit.job": key, "maskaudit.audit": self.audit_key, "mlflow.parentRunId": self.parent,
                "maskaudit.run_dir": str(self.run.root.resolve()), "strategy": strategy, "fold": str(fold),
                **{name: str(summary[name]) for name in ("device", "monitor", "stopped_early") if name in summary}}
        created = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{strategy}/fold_{fold}")
        run_id = created.info.run_id
        self.log(run_id, metrics=[*history_metrics(history_path), *best_metrics(summary)],
                 params=job_params(self.config, strategy, fold, summary))
        for path in (summary_path, history_path):
            if path.is_file():
                self.client.log_artifact(run_id, str(path), "job")
        self.client.set_terminated(run_id, "FINISHED")
        return True

    # ------------------------------------------------------------------ the run's results

    def log_results(self, jobs: Iterable[tuple[str, int]]) -> None:
        """The finished jobs not logged yet, then the run's results on the parent run (unless logged as they are)."""
        logged = sum(self.log_job(strategy, fold) for strategy, fold in jobs)
        if logged:
            log.info("tracking: %d job%s logged to MLflow (%s)", logged, "" if logged == 1 else "s", self.uri)
        parent = self.parent
        logged = self.client.get_run(parent).data.tags
        metrics, verdicts, files = auc_metrics(self.run), verdict_tags(self.run), run_artifacts(self.run)
        numbers = digest(metrics, verdicts)
        stamps = digest([(str(p.relative_to(self.run.root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
        if logged.get("maskaudit.logged_numbers") == numbers and logged.get("maskaudit.logged_files") == stamps:
            return
        if logged.get("maskaudit.logged_numbers") != numbers:  # metrics append: each set of numbers once
            self.log(parent, metrics=metrics, tags={**verdicts, "maskaudit.logged_numbers": numbers})
        for path in files:  # an artifact logged again replaces the one before
            where = str(path.parent.relative_to(self.run.root))
            self.client.log_artifact(parent, str(path), None if where == "." else where)
        self.log(parent, tags={"maskaudit.logged_files": stamps})
        self.client.set_terminated(parent, "FINISHED")
        log.info("tracking: the run's results logged to MLflow (%s, experiment %s)", self.uri, self.experiment)


# ---------------------------------------------------------------------------------------------- what is logged


def job_params(config: AuditConfig, strategy: str, fold: int, summary: dict) -> dict[str, str]:
    """A job's parameters: its name and seeds, the masking, the image size, and every ``model.*`` and ``train.*``
    key."""
    params = {"strategy": strategy, "fold": str(fold), "job_seed": str(summary.get("seed", "")),
              "seed": str(config.seed), "roi": str(config.roi), "spread": str(config.spread), "fill": config.fill,
              "image_size": str(config.image_size), "folds": str(config.folds)}
    params |= _flatten("model", config.model.model_dump(mode="json"))
    params |= _flatten("train", config.train.model_dump(mode="json"))
    return params


def run_params(config: AuditConfig) -> dict[str, str]:
    """The parent run's parameters: the kind of audit, the data's source, classes and maskings, folds, seed, the
    model (or the probed models)."""
    params = {"kind": config.kind, "data.source": config.data.source, "classes": json.dumps(config.classes),
              "strategies": json.dumps(config.strategies), "test_strategies": json.dumps(config.eval_strategies),
              "roi": str(config.roi), "spread": str(config.spread), "fill": config.fill, "folds": str(config.folds),
              "test_fraction": str(config.test_fraction), "seed": str(config.seed),
              "image_size": str(config.image_size), "analyses.run": json.dumps(list(config.analyses.run))}
    if config.kind == "probe":
        params["models"] = json.dumps([m.name for m in config.models])
    else:
        params |= _flatten("model", config.model.model_dump(mode="json"))
    return params


def history_metrics(path: Path) -> list[tuple[str, float, int]]:
    """Every numeric column of ``history.csv`` but ``epoch`` and ``best``, per epoch: (column, value, epoch)."""
    if not path.is_file():
        return []
    import pandas as pd

    history = pd.read_csv(path)
    if "epoch" not in history.columns:
        return []
    found = []
    for _, row in history.iterrows():
        step = int(row["epoch"])
        for column in history.columns:
            value = _number(row[column]) if column not in ("epoch", "best") else None
            if value is not None:
                found.append((str(column), value, step))
    return found


def best_metrics(summary: dict) -> list[tuple[str, float, int]]:
    """``job.json``'s numbers: the best epoch and its validation loss, the epochs run, each class's best validation
    AUC and its epoch, the image counts and seconds."""
    found = [(name, summary[name], 0) for name in ("best_val_loss", "best_monitored", "best_epoch", "epochs_run",
                                                   "n_train", "n_val", "trainable_parameters", "seconds")
             if _number(summary.get(name)) is not None]
    for name, best in (summary.get("best_val_auc") or {}).items():
        if isinstance(best, dict):
            found += [(f"best_val_auc_{name}", best.get("auc"), 0),
                      (f"best_val_auc_epoch_{name}", best.get("epoch"), 0)]
    return [(key, float(value), step) for key, value, step in found if _number(value) is not None]


def auc_metrics(run: RunDir) -> list[tuple[str, float, int]]:
    """The hold-out AUC matrix (``metrics/auc_matrix.parquet``, the main dataset's test split) as
    ``auc/<class>/<train>/<test>``."""
    path = run.metrics / "auc_matrix.parquet"
    if not path.is_file():
        return []
    import pandas as pd

    matrix = pd.read_parquet(path)
    if {"dataset", "split"} <= set(matrix.columns):
        matrix = matrix[(matrix["dataset"] == "main") & (matrix["split"] == "test")]
    return [(f"auc/{r['class']}/{r['train_strategy']}/{r['test_strategy']}", float(r["auc_mean"]), 0)
            for _, r in matrix.iterrows() if _number(r["auc_mean"]) is not None]


def verdict_tags(run: RunDir) -> dict[str, str]:
    """Each verdict as a tag: ``verdict/<class>`` (a probe's ``verdict/<model>/<class>``) = ``roi``, ``outside`` …"""
    path = run.analysis("verdict") / "verdict.parquet"
    if not path.is_file():
        return {}
    import pandas as pd

    table = pd.read_parquet(path)
    return {"/".join(["verdict", *([str(r["model"])] if "model" in table.columns else []), str(r["class"])]):
            str(r["verdict"]) for _, r in table.iterrows()}


def run_artifacts(run: RunDir) -> list[Path]:
    """The files of :data:`RUN_ARTIFACTS` the run has."""
    return sorted({path for pattern in RUN_ARTIFACTS for path in run.root.glob(pattern) if path.is_file()})


# ---------------------------------------------------------------------------------------------- the hooks


def _settings(config: AuditConfig) -> MlflowTracking | None:
    return config.tracking.mlflow


def _guarded(run: RunDir, config: AuditConfig, what: str, work: Any) -> None:
    """Run ``work(tracker)``; any failure is one warning (and the URI is left alone for :data:`RETRY_AFTER` s)."""
    uri = tracking_uri(run, config.tracking.mlflow)
    failed = _FAILED.get(uri)
    if failed is not None and time.monotonic() - failed < RETRY_AFTER:
        log.debug("tracking: %s not logged: %s failed %.0f s ago", what, uri, time.monotonic() - failed)
        return
    try:
        with _http_limits(uri):
            work(Tracker(run, config))
        _FAILED.pop(uri, None)
    except ImportError:
        _FAILED[uri] = time.monotonic()
        log.warning("tracking: tracking.mlflow is set but MLflow is not installed (pip install "
                    "'maskaudit[tracking]'); %s not logged, the audit goes on without tracking", what)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop an audit
        _FAILED[uri] = time.monotonic()
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        log.warning("tracking: logging %s to MLflow at %s failed (%s: %s); the audit goes on, the next `maskaudit "
                    "report` logs what was missed (this URI is tried again in %.0f minutes)", what, uri,
                    type(exc).__name__, reason, RETRY_AFTER / 60)


def track_job(audit: Audit, strategy: str, fold: int) -> None:
    """Log the training job (``strategy``, ``fold``) that just finished, when ``tracking.mlflow`` is set and the jobs
    run in this process (on Ray the driver logs them at the report stage: :func:`track_run`). Never raises."""
    config = audit.config
    if _settings(config) is None or config.executor != "local":
        return
    _guarded(audit.run, config, f"job {strategy} fold {fold}", lambda tracker: tracker.log_job(strategy, fold))


def track_run(audit: Audit) -> None:
    """After the report stage: log the jobs not logged yet and the run's results, when ``tracking.mlflow`` is set.
    Never raises."""
    if _settings(audit.config) is None:
        return
    _guarded(audit.run, audit.config, "the run's results", lambda tracker: tracker.log_results(audit.jobs))
