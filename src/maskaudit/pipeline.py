"""The audit as a fixed sequence of stages over one run directory.

prepare → split → train (grid of jobs) → predict (cross-masking) → metrics
        → baseline · explain · embed · sweep · reader → verdict → report

:data:`TABLE` declares, for each stage and each per-model part, the config keys it reads and the
parts it follows (:mod:`maskaudit.stages`); every fingerprint is derived from it. A stage whose
outputs exist with the same fingerprint is skipped, so a killed run, started again, continues
where it stopped; a changed config redoes exactly the stages it affects. Jobs are plain functions
of (audit kind, run directory, part, strategy, fold), run by an executor in this process or on Ray.

:class:`Audit` is the full audit: it trains its models. The probe, which audits models trained
elsewhere, is its own kind (:class:`maskaudit.probe_audit.ProbeAudit`) sharing these stages;
:func:`maskaudit.kinds.open_audit` picks the kind a config asks for.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from maskaudit.analyses.reader_selection import study_fold
from maskaudit.analyses.run import ANALYSES, FIGURES, GROUP_WORK, JOB_WORK
from maskaudit.config import AuditConfig, dump_config, load_config
from maskaudit.context import Context, Plan
from maskaudit.data.check import check_store, write_check
from maskaudit.data.sources import make_source
from maskaudit.data.splits import Splits, make_splits, save_splits, split_count_table
from maskaudit.data.store import STORE_VERSION, Store, count_table, prepare_store
from maskaudit.errors import MaskauditError, disk_error
from maskaudit.executors import make_executor
from maskaudit.lock import python_command, run_lock
from maskaudit.metrics import MAIN, auc_by_fold, auc_matrix, delong_table, matrix_of, training_table
from maskaudit.predict import load_trained, predict_jobs
from maskaudit.progress import format_duration
from maskaudit.report.figures import auc_heatmap, save_figure
from maskaudit.report.html import ReportView, report_inputs, write_report
from maskaudit.rundir import RunDir, read_json, write_json, write_table, write_text
from maskaudit.stages import ConfigView, Fingerprints, Stage
from maskaudit.strategies import evidence_cells
from maskaudit.tracking import track_job, track_run
from maskaudit.train import job_finished, train_job

log = logging.getLogger(__name__)

#: The masking keys every model part reads (:class:`maskaudit.strategies.MaskSpec`).
MASKING = ("roi", "spread", "fill", "scale", "seed")

#: The full audit's stages and per-model parts (``job``): the keys each reads, the parts it follows; each
#: analysis brings its own rows (:meth:`maskaudit.analyses.run.Analysis.stages`).
TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("store", reads=("data", "image_size", "data_checks.duplicate_images", "store")),
    Stage("prepare", reads=("data", "image_size", "roi", "external", "data_checks", "store", "seed", "folds",
                            "test_fraction", "strategies", "test_strategies")),
    Stage("split", reads=("folds", "test_fraction", "seed"), after=("prepare",)),
    Stage("model", reads=("model", "train", *MASKING), after=("split",), job=True),
    Stage("train", reads=("strategies",), jobs="model"),
    Stage("predictions", reads=("strategies", "test_strategies", "predict", "external"), after=("model",),
          job=True, output="predictions"),
    Stage("predict", jobs="predictions"),
    Stage("metrics", reads=("analyses.level", FIGURES), after=("predict",)),
    *(row for analysis in ANALYSES.values() for row in analysis.stages()),
    Stage("report", reads=("",), after=("metrics", *ANALYSES)),
)}

#: The per-model parts run in groups of models, each group reading the images once (:meth:`Audit.map_groups`):
#: part → ``group(ctx, jobs)``, which yields (job, its table)
GROUPED = {"predictions": predict_jobs, **GROUP_WORK}


def _file_stamp(path: Path | None) -> tuple[int, int] | None:
    """Size and modification time of a file (None when there is none): a changed file redoes what it feeds."""
    if path is None or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def union_keys(roi: str | None) -> list[str]:
    """The ROI unions (``a+b``) a config asks for: the store keeps a distance map of each."""
    return [roi] if roi and "+" in roi else []


class Audit:
    """One run directory and its config: the full audit, which trains a model per (strategy, fold)."""

    #: The config's kind (:attr:`maskaudit.config.AuditConfig.kind`) this class audits.
    KIND = "audit"
    #: Its stages and per-model parts.
    TABLE: dict[str, Stage] = TABLE
    #: The stages ``maskaudit run`` runs, in order (analyses: those in ``analyses.run``).
    FLOW: tuple[str, ...] = ("prepare", "split", "train", "predict", "metrics", *ANALYSES, "report")

    def __init__(self, run: RunDir, config: AuditConfig) -> None:
        self.run, self.config = run, config

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, out: Path, config: AuditConfig) -> Audit:
        """Start or continue a run in ``out`` with ``config`` (written as ``config.yaml``)."""
        run = RunDir(out)
        try:
            run.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, run.root) or exc from None
        text = dump_config(config)
        if not run.config.is_file() or run.config.read_text() != text:
            write_text(run.config, text)
        return cls(run, config)

    @classmethod
    def open(cls, out: Path, check_files: bool = True) -> Audit:
        """The run directory's audit, with the config it holds."""
        run = RunDir(out)
        if not run.config.is_file():
            raise MaskauditError(f"{run.root} holds no config.yaml; pass a config file or use `maskaudit run`")
        return cls(run, load_config(run.config, check_files))

    # ------------------------------------------------------------------ what this kind of audit has

    @property
    def models(self) -> list[str]:
        """The prediction table's ``train_strategy`` values: the trained strategies."""
        return list(self.config.strategies)

    @property
    def model_folds(self) -> list[int]:
        return list(range(self.config.folds))

    @property
    def jobs(self) -> list[tuple[str, int]]:
        """(model, fold) of every model: the grid of training strategy × fold."""
        return [(s, k) for s in self.models for k in self.model_folds]

    def plan(self) -> Plan:
        """What the analyses read of this kind of audit (defaults from ``analyses.*`` when they are not set)."""
        c, a = self.config, self.config.analyses
        return Plan(
            models=self.models, model_folds=self.model_folds, models_word="strategies",
            explain_pairs=[tuple(p) for p in a.explain.pairs or [(s, s) for s in c.strategies]],
            baseline_pairs=[tuple(p) for p in a.baseline.compare or [("no_roi_bbox", "no_roi_bbox"), ("full", "full")]],
            reader_pairs=[(s, s) for s in c.strategies if s in c.eval_strategies], explain_folds=list(a.explain.folds),
            sweep_models=list(a.sweep.train_strategies or ["full"]),
            embed_model=a.embed.train_strategy or "full", embed_fold=a.embed.fold, reader_fold=study_fold(c),
            evidence={"": evidence_cells()})

    def load_model(self, store: Store, strategy: str, fold: int, device: torch.device) -> torch.nn.Module:
        """The model job (strategy, fold) trained, in eval mode on ``device``."""
        return load_trained(self.config, store, self.run, strategy, fold, device)

    def model_inputs(self, strategy: str, fold: int) -> object:
        """What a model depends on beyond the config: its strategy and fold."""
        return [strategy, fold]

    def report_view(self) -> ReportView:
        """How the report words this kind of audit."""
        return ReportView()

    def model_done(self, strategy: str, fold: int) -> bool:
        """Whether the job's model exists, trained with the current inputs."""
        return job_finished(self.run.job(strategy, fold), self.fingerprint("model", strategy=strategy, fold=fold))

    # ------------------------------------------------------------------ fingerprints

    @cached_property
    def fingerprints(self) -> Fingerprints:
        return Fingerprints(self.TABLE, self.config, self._inputs, self._active)

    def fingerprint(self, name: str, **job: object) -> str:
        """The fingerprint of stage or part ``name`` (a per-model part: of ``strategy=``, ``fold=``)."""
        return self.fingerprints.of(name, **job)

    def job_fingerprint(self, name: str, strategy: str, fold: int) -> str:
        return self.fingerprint(name, strategy=strategy, fold=fold)

    def _active(self, name: str) -> bool:
        return name not in ANALYSES or name in self.config.analyses.run

    def _inputs(self, name: str, strategy: str | None = None, fold: int | None = None,
                dataset: str = MAIN) -> object:
        """What part ``name`` depends on that is not config: file stamps, the job's name, its jobs' fingerprints."""
        if name == "store":
            return self._store_inputs(dataset)
        if name == "prepare":
            return {d: self.fingerprint("store", dataset=d) for d in self.datasets}
        if name == "model":
            return self.model_inputs(strategy, fold)
        part = self.TABLE[name]
        if part.output:  # one model's predictions, explanations, sweep
            return [strategy, fold] + ([self._external_inputs()] if name == "predictions" else [])
        if part.jobs:
            return [self.fingerprint(part.jobs, strategy=s, fold=k) for s, k in self._stage_jobs(name)]
        return None

    def _stage_jobs(self, name: str) -> list[tuple[str, int]]:
        """The jobs a stage runs: every model's (train, predict), those its analysis names (explain, sweep)."""
        if name in ("explain", "sweep"):
            plan = self.plan()
            return plan.explain_jobs if name == "explain" else plan.sweep_jobs
        return self.jobs

    @property
    def datasets(self) -> list[str]:
        """The run's datasets: ``main``, then each external one."""
        return [MAIN, *(ext.name for ext in self.config.external)]

    def _store_inputs(self, dataset: str) -> object:
        """A store's data: the dataset's ``data``, the ROI unions it keeps, and its input files (size and time, not
        content: CheXmask's tables are gigabytes), or the seed of synthetic data."""
        data, roi = self.config.dataset(dataset)
        files = (str(self.config.seed) if data.source == "synthetic" else
                 {key: _file_stamp(value) for key, value in data if isinstance(value, Path) and value.is_file()})
        return [data.model_dump(mode="json"), union_keys(roi), files, STORE_VERSION]  # a new format: prepare again

    def _external_inputs(self) -> object:
        """Each external dataset's store and ROI: a changed one redoes every model's predictions."""
        return {name: (self.fingerprint("store", dataset=name), self.config.dataset(name)[1])
                for name in self.datasets[1:]}

    def view(self, stage: str) -> Any:
        """The config as stage (or part) ``stage`` may read it (:class:`maskaudit.stages.ConfigView`)."""
        return ConfigView.of(self.config, self.fingerprints.readable(stage), stage)

    def context(self, stage: str) -> Context:
        """What stage (or part) ``stage`` is given: the run, its config view, the plan, model loading, job mapping."""
        externals = [(name, self.config.dataset(name)[1]) for name in self.datasets[1:]]
        return Context(run=self.run, config=self.view(stage), plan=self.plan(), stage=stage,
                       load_model=self.load_model, map_jobs=self.map_jobs, job_fingerprint=self.job_fingerprint,
                       outputs={name: part.output for name, part in self.TABLE.items() if part.output},
                       externals=externals)

    # ------------------------------------------------------------------ stage bookkeeping

    def _records(self) -> dict:
        return read_json(self.run.stages) if self.run.stages.is_file() else {}

    def is_done(self, stage: str) -> bool:
        return self._records().get(stage, {}).get("fingerprint") == self.fingerprint(stage)

    def _mark(self, stage: str, seconds: float, **extra: object) -> None:
        records = self._records()
        records[stage] = {
            "fingerprint": self.fingerprint(stage),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2),
            **extra,
        }
        write_json(self.run.stages, records)

    def _stage(self, stage: str, work: Callable[[], dict | None], force: bool = False) -> None:
        if not force and self.is_done(stage):
            log.info("%s: up to date, skipped", stage)
            return
        log.info("%s: running", stage)
        started = time.perf_counter()
        extra = work() or {}
        self._mark(stage, time.perf_counter() - started, **extra)
        log.info("%s: done in %s", stage, format_duration(time.perf_counter() - started))

    def map_jobs(self, part: str, jobs: list[tuple[str, int]], total: int | None = None) -> None:
        """Run part ``part`` for each (strategy, fold) of ``jobs`` on the run's executor (in groups of models, one
        read of the images for each group, for a part that has them: :meth:`map_groups`)."""
        if part in GROUPED:
            self.map_groups(part, jobs)
            return
        total = len(jobs) if total is None else total
        make_executor(self.config).map(run_job, [(type(self), str(self.run.root), part, s, k) for s, k in jobs],
                                       name=self._shown_as(part), total=total, done=total - len(jobs))

    def _shown_as(self, part: str) -> str:
        """The stage a per-model part's jobs show under (``predictions`` → ``predict``)."""
        return next((s.name for s in self.TABLE.values() if s.jobs == part), part)

    def map_groups(self, part: str, jobs: list[tuple[str, int]]) -> None:
        """Run part ``part`` (predictions, or a grouped part of an analysis: the sweep's) on the run's executor with
        several models per call, each call reading the images once for all its models
        (:func:`maskaudit.predict.predict_jobs`, :data:`GROUPED`).

        ``predict.models`` models per call; 0: every job in one call locally (the call loads as many models at a
        time as fit in memory), one per call on Ray (the cluster's workers share the jobs).
        """
        if not jobs:
            return
        at_once = self.config.predict.models or (1 if self.config.executor == "ray" else len(jobs))
        calls = [(type(self), str(self.run.root), part, tuple(jobs[i:i + at_once]))
                 for i in range(0, len(jobs), at_once)]
        make_executor(self.config).map(run_group, calls, name=self._shown_as(part))

    # ------------------------------------------------------------------ stages

    def prepare(self, force: bool = False) -> None:
        tables = []

        def prepare_one(dataset: str, where: Path) -> dict:
            config = self.config.for_dataset(dataset)
            marker = where / ".fingerprint"
            wanted = self.fingerprint("store", dataset=dataset)
            if where.exists() and (not marker.is_file() or marker.read_text() != wanted):
                shutil.rmtree(where)  # a store of other data or settings: start afresh
            where.mkdir(parents=True, exist_ok=True)
            write_text(marker, wanted)
            source = make_source(config)
            unions = [k for k in union_keys(config.roi) if all(p in source.rois for p in k.split("+"))]
            external = dataset != MAIN  # scored, never trained on: images without masks are scored under full
            store = prepare_store(source, where, config.image_size, roi_keys=unions, workers=config.workers,
                                  masks="optional" if external else "required",
                                  duplicate_images=config.data_checks.duplicate_images, bits=config.store.bits)
            check = check_store(store, config, dataset, external=external)  # as `maskaudit check` says
            for text in check.warnings:
                log.warning("prepare: %s", text)
            for text in check.errors:
                log.error("prepare: %s", text)
            write_check(self.run.check(dataset), check)
            tables.append(count_table(store.manifest).assign(dataset=dataset))
            counts = store.manifest["status"].value_counts().to_dict()
            return {"kept": int(counts.get("kept", 0)), "rejected": int(counts.get("rejected", 0))}

        def work() -> dict:
            summary = prepare_one(MAIN, self.run.prepared)
            for name in self.datasets[1:]:
                log.info("prepare: external dataset %s", name)
                summary[f"external {name}"] = prepare_one(name, self.run.external(name))
            write_table(self.run.counts("prepared"), pd.concat(tables, ignore_index=True), csv=True)  # the report's
            return summary

        self._stage("prepare", work, force)

    def store(self) -> Store:
        return Store.open(self.run.prepared)

    def split(self, force: bool = False) -> None:
        def work() -> dict:
            store = self.store()
            c = self.config
            if store.n == 0:
                raise MaskauditError(f"no image was kept in {self.run.prepared}; see manifest.parquet for reasons")
            masked = sorted((set(c.strategies) | set(c.eval_strategies)) - {"full"})
            if not store.rois and masked:
                raise MaskauditError(f"this data has no ROI masks, so strategies {', '.join(masked)} cannot be "
                                     "applied; set `data.mask_column` or use `strategies: [full]`")
            splits = make_splits(store.kept, store.classes, c.test_fraction, c.folds, c.seed)
            save_splits(self.run.splits, splits, store.kept)
            write_table(self.run.counts("splits"), split_count_table(store.kept, splits, store.classes), csv=True)
            warnings = split_warnings(store, splits)
            for text in warnings:
                log.warning("split: %s", text)
            return {"method": splits.method, **({"warnings": warnings} if warnings else {})}

        self._stage("split", work, force)

    def train(self, only: list[tuple[str, int]] | None = None, force: bool = False) -> None:
        def work() -> None:
            grid = only or self.jobs
            todo = [job for job in grid if force or not self.model_done(*job)]
            log.info("train: %d of %d jobs to run", len(todo), len(grid))
            self.map_jobs("model", todo, total=len(grid))

        if only:  # a partial grid never marks the stage done
            work()
            return
        self._stage("train", work, force)

    def predict(self, force: bool = False) -> None:
        def work() -> dict:
            missing = [f"{s}/fold_{k}" for s, k in self.jobs if not self.model_done(s, k)]
            if missing:
                raise MaskauditError(f"untrained jobs: {', '.join(missing[:6])}…; run `maskaudit train` first")
            ctx = self.context("predict")
            todo = [(s, k) for s, k in self.jobs if force or not ctx.job_output_current(s, k, "predictions")]
            self.map_groups("predictions", todo)
            table = pd.concat([pd.read_parquet(self.run.job(s, k) / f"{self.TABLE['predictions'].output}.parquet")
                               for s, k in self.jobs], ignore_index=True)
            write_table(self.run.predictions, table)
            return {"rows": len(table)}

        self._stage("predict", work, force)

    def metrics(self, force: bool = False) -> None:
        def work() -> None:
            if not self.run.predictions.is_file():
                raise MaskauditError(f"no {self.run.predictions}; run `maskaudit predict` first")
            c, plan = self.view("metrics"), self.plan()
            predictions = pd.read_parquet(self.run.predictions)
            by_fold = auc_by_fold(predictions, c.analyses.level)
            matrix = auc_matrix(predictions, by_fold, c.analyses.level)
            write_table(self.run.metrics / "auc_by_fold.parquet", by_fold, csv=True)
            write_table(self.run.metrics / "auc_matrix.parquet", matrix, csv=True)
            write_table(self.run.metrics / "delong.parquet", delong_table(predictions), csv=True)
            training = training_table({job: self.run.job(*job) for job in self.jobs}, c.classes, c.analyses.level,
                                      self.training_settings())
            write_table(self.run.metrics / "training.parquet", training, csv=True)
            panels = [(MAIN, "test", "hold-out", "auc_{}")]
            panels += [(name, "external", name, f"auc_{name}_{{}}") for name in self.datasets[1:]]
            of, rows = self.heatmap_title(), self.report_view().models_label
            for dataset, split, label, file_name in panels:
                for name in c.classes:
                    mean, std = (matrix_of(matrix, name, split, plan.models, c.eval_strategies, value, dataset)
                                 for value in ("auc_mean", "auc_std"))
                    fig = auc_heatmap(mean, std, f"{name}: {label} AUC, {of}", rows)
                    save_figure(fig, self.run.figures / file_name.format(name), c.report.formats)

        self._stage("metrics", work, force)

    def heatmap_title(self) -> str:
        """What an AUC heatmap's cells are the AUC of."""
        return f"mean of {self.config.folds} folds"

    def training_settings(self) -> dict[str, str]:
        """The config section each trained strategy's settings come from, where not ``train``
        (:func:`~maskaudit.metrics.training_table`): none in a full audit."""
        return {}

    def analyse(self, name: str, force: bool = False) -> None:
        """One analysis of SPEC §6/§8 (see :mod:`maskaudit.analyses.run`); needs the metrics stage."""
        if name not in ANALYSES:
            raise MaskauditError(f"unknown analysis {name!r}; expected one of {', '.join(ANALYSES)}")
        if not self.is_done("metrics"):
            raise MaskauditError(f"analysis {name}: the metrics are missing or stale; run `maskaudit metrics` first")
        self._stage(name, lambda: ANALYSES[name].run(self.context(name)), force)

    def report(self, force: bool = False) -> None:
        """Render report.html from whatever the run directory holds; redone whenever another stage or a
        job's training history has changed since the last one (a run in progress), not only its config."""
        inputs = report_inputs(self.run)
        stale = self._records().get("report", {}).get("inputs") != inputs
        self._stage("report", lambda: {**write_report(self.run, self.report_view()), "inputs": inputs},
                    force or stale)
        track_run(self)  # MLflow, when `tracking` is set: the jobs not logged yet, the run's results; never raises

    def run_all(self) -> Path:
        """Every stage of :attr:`FLOW` in order, under the run directory's writer lock (:mod:`maskaudit.lock`;
        re-entrant: the CLI holds it already)."""
        with run_lock(self.run.root, python_command("Audit.run_all")):
            if self.config.executor == "ray":
                make_executor(self.config)  # connect now: a wrong ray.address is one line before, not after, prepare
            for stage in self.FLOW:
                if stage in ANALYSES:
                    if stage in self.config.analyses.run:
                        self.analyse(stage)
                else:
                    getattr(self, stage)()
        return self.run.report

    # ------------------------------------------------------------------ the per-model parts, run as jobs

    def run_part(self, part: str, strategy: str, fold: int) -> dict:
        """One job of part ``part``: train a model, predict with it, or one model's share of an analysis."""
        ctx = self.context(part)
        if part == "model":
            summary = self.make_model(ctx, strategy, fold)
            track_job(self, strategy, fold)  # MLflow, when `tracking` is set: the finished job's folder; never raises
            return summary
        if part in GROUPED:
            return self.run_group(part, [(strategy, fold)])
        return JOB_WORK[part](ctx, strategy, fold)

    def run_group(self, part: str, jobs: Sequence[tuple[str, int]]) -> dict:
        """Part ``part`` of several models (:data:`GROUPED`), the images read once for all of them; each job's table
        is kept in its folder as its group ends."""
        ctx = self.context(part)
        rows = [ctx.write_job_output(s, k, part, table)["rows"] for (s, k), table in GROUPED[part](ctx, jobs)]
        return {"rows": sum(rows), "models": len(rows)}

    def make_model(self, ctx: Context, strategy: str, fold: int) -> dict:
        """Train the model of (strategy, fold)."""
        return train_job(ctx.config, ctx.store, ctx.splits, ctx.masking, strategy, fold, self.run.job(strategy, fold),
                         self.fingerprint("model", strategy=strategy, fold=fold))


def split_warnings(store: Store, splits: Splits) -> list[str]:
    """A class with no positive (or no negative) image in the hold-out set, or in a fold's training images.

    Both still run: the hold-out set's AUC of that class cannot be computed (so it gets no verdict), and the
    fold's models are trained without ever seeing one. Kept in the split stage's record (the report's stages).
    """
    parts = [("the hold-out set", splits.test)]
    parts += [(f"the training images of fold {k}", splits.train(k)) for k in range(len(splits.folds))]
    found = []
    for k, name in enumerate(store.classes):
        for where, index in parts:
            labels = store.labels[index, k]
            for side, value in (("positive", 1.0), ("negative", 0.0)):
                if not (labels == value).any():
                    outcome = ("no hold-out AUC, so no verdict" if index is splits.test
                               else "that fold's models never see one")
                    images = f"{len(index)} image{'' if len(index) == 1 else 's'}"
                    found.append(f"class {name}: no {side} image in {where} ({images}): {outcome}")
    return found


def run_job(kind: type[Audit], run_root: str, part: str, strategy: str, fold: int) -> dict:
    """One job, as a plain function of picklable arguments: the kind of audit (a class), the run directory, the
    part and the model's (strategy, fold). It reads everything else from the run directory."""
    return kind.open(Path(run_root)).run_part(part, strategy, fold)


def run_group(kind: type[Audit], run_root: str, part: str, jobs: tuple[tuple[str, int], ...]) -> dict:
    """:func:`run_job` for a group of models (the predictions, read once for all of them)."""
    return kind.open(Path(run_root)).run_group(part, jobs)
