"""The audit as a fixed sequence of stages over one run directory.

prepare → split → train (grid of jobs) → predict (cross-masking) → metrics
        → baseline · explain · embed · sweep · reader → verdict → report

Each stage has a fingerprint made of the config keys it reads and the fingerprints of the
stages before it. A stage whose outputs exist with the same fingerprint is skipped, so a
killed run, started again, continues where it stopped; a changed config redoes exactly the
stages it affects. Jobs are plain functions of (run directory, strategy, fold), run by an
executor in this process or on Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from maskaudit.config import ANALYSES, AuditConfig, dump_config, load_config
from maskaudit.data.sources import make_source
from maskaudit.data.splits import Splits, load_splits, make_splits, save_splits
from maskaudit.data.store import Store, prepare_store
from maskaudit.errors import MaskauditError, disk_error
from maskaudit.executors import make_executor
from maskaudit.progress import format_duration
from maskaudit.rundir import RunDir, read_json, write_json, write_table, write_text

log = logging.getLogger(__name__)



def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_stamp(path: Path | None) -> tuple[int, int] | None:
    """Size and modification time of a file (None when there is none): a changed file redoes what it feeds."""
    if path is None or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def _entry_point_file(entry_point: str | None) -> Path | None:
    """The source file of a probed model's ``package.module:function``, so that editing the code redoes the probe."""
    if not entry_point:
        return None
    import importlib.util

    try:
        spec = importlib.util.find_spec(entry_point.partition(":")[0])
    except (ImportError, ValueError):
        return None  # loading the model will say what is wrong
    return Path(spec.origin) if spec is not None and spec.origin else None


class Audit:
    """One run directory and its config; each stage is a method."""

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
    def open(cls, out: Path, config_path: Path | None = None, check_files: bool = True) -> Audit:
        """A stage command: the given config, or the one the run directory already holds.

        ``check_files=False``: the config's data and model files need not exist (the report reads the run
        directory alone, so it renders a run whose data has moved)."""
        if config_path is not None:
            return cls.create(out, load_config(config_path, check_files))
        run = RunDir(out)
        if not run.config.is_file():
            raise MaskauditError(f"{run.root} holds no config.yaml; pass a config file or use `maskaudit run`")
        return cls(run, load_config(run.config, check_files))

    # ------------------------------------------------------------------ fingerprints

    @staticmethod
    def _source_fingerprint(config: AuditConfig) -> str:
        """The seed for synthetic data; else size and modification time of every input table the config names.

        Size and time, not content: CheXmask's tables are gigabytes, and a run is restarted often.
        """
        data = config.data
        if data.source == "synthetic":
            return str(config.seed)
        return _hash({key: _file_stamp(value) for key, value in data if isinstance(value, Path) and value.is_file()})

    @staticmethod
    def _union_keys(roi: str | None) -> list[str]:
        return [roi] if roi and "+" in roi else []

    def external_configs(self) -> dict[str, AuditConfig]:
        """Each external dataset as a config of its own: its data, the run's image size, seed and masking."""
        return {ext.name: self.config.model_copy(update={"data": ext.data, "roi": ext.roi or self.config.roi,
                                                        "external": []})
                for ext in self.config.external}

    def _store_fingerprint(self, config: AuditConfig) -> str:
        kept_twice = config.data_checks.duplicate_images  # which rows the store keeps; the default hashes as before
        return _hash("store", config.data.model_dump(mode="json"), config.image_size,
                     self._union_keys(config.roi), self._source_fingerprint(config),
                     *([kept_twice] if kept_twice != "reject" else []))

    def fingerprint(self, stage: str) -> str:
        c = self.config
        if stage == "prepare":
            return _hash("prepare", self._store_fingerprint(c),
                         {name: self._store_fingerprint(ext) for name, ext in self.external_configs().items()})
        if stage == "split":
            return _hash("split", self.fingerprint("prepare"), c.folds, c.test_fraction, c.seed)
        if stage == "train":
            return _hash("train", [self.job_fingerprint(s, k) for s, k in self.jobs])
        if stage == "predict":
            return _hash("predict", [self.predict_fingerprint(s, k) for s, k in self.jobs])
        if stage == "metrics":
            return _hash("metrics", self.fingerprint("predict"), c.analyses.level)
        if stage == "verdict":
            return _hash("verdict", self.fingerprint("metrics"), c.analyses.verdict.model_dump(),
                         [self.fingerprint(a) for a in ("baseline", "explain") if a in c.analyses.run])
        if stage in ANALYSES:
            return _hash(stage, self.fingerprint("predict"), c.analyses.level,
                         getattr(c.analyses, stage).model_dump(mode="json"))
        if stage == "report":
            return _hash("report", self.fingerprint("metrics"), dump_config(c),
                         [self.fingerprint(a) for a in c.analyses.run])
        raise ValueError(stage)

    def analysis_job_fingerprint(self, name: str, strategy: str, fold: int) -> str:
        """What one model's part of an analysis (``explain``, ``sweep``) depends on."""
        c = self.config
        return _hash(name, self.job_fingerprint(strategy, fold), getattr(c.analyses, name).model_dump(mode="json"))

    def job_fingerprint(self, strategy: str, fold: int) -> str:
        c = self.config
        if c.probing:  # a probed model: its declaration, its files, scored on the split's images
            probed = next(m for m in c.models if m.name == strategy)
            return _hash("probe", self.fingerprint("split"), probed.model_dump(mode="json"),
                         [_file_stamp(path) for path in (probed.file, _entry_point_file(probed.entry_point))],
                         c.spread, c.fill, c.roi)
        return _hash("job", self.fingerprint("split"), strategy, fold, c.model.model_dump(mode="json"),
                     c.train.model_dump(mode="json", exclude={"num_workers", "device"}), c.spread, c.fill,
                     c.roi)

    def predict_fingerprint(self, strategy: str, fold: int) -> str:
        c = self.config
        return _hash("predict", self.job_fingerprint(strategy, fold), c.eval_strategies,
                     c.predict.model_dump(mode="json", exclude={"batch_size"}),
                     {name: (self._store_fingerprint(ext), ext.roi) for name, ext in self.external_configs().items()})

    @property
    def jobs(self) -> list[tuple[str, int]]:
        """(training strategy, fold) of every model; a probe has one job per probed model (fold 0)."""
        return [(s, k) for s in self.config.train_strategies for k in self.config.model_folds]

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

    # ------------------------------------------------------------------ stages

    def prepare(self, force: bool = False) -> None:
        from maskaudit.data.check import CHECK_FILE, check_store

        def prepare_one(config: AuditConfig, where: Path, name: str = "main") -> dict:
            marker = where / ".fingerprint"
            wanted = self._store_fingerprint(config)
            if where.exists() and (not marker.is_file() or marker.read_text() != wanted):
                shutil.rmtree(where)  # a store of other data or settings: start afresh
            where.mkdir(parents=True, exist_ok=True)
            write_text(marker, wanted)
            source = make_source(config)
            unions = [k for k in self._union_keys(config.roi) if all(p in source.rois for p in k.split("+"))]
            external = name != "main"  # scored, never trained on: images without masks are scored under full
            store = prepare_store(source, where, config.image_size, roi_keys=unions, workers=config.workers,
                                  masks="optional" if external else "required",
                                  duplicate_images=config.data_checks.duplicate_images)
            check = check_store(store, config, name, external=external)  # as `maskaudit check` says
            for text in check.warnings:
                log.warning("prepare: %s", text)
            for text in check.errors:
                log.error("prepare: %s", text)
            write_json(where / CHECK_FILE, check.to_dict())
            counts = store.manifest["status"].value_counts().to_dict()
            return {"kept": int(counts.get("kept", 0)), "rejected": int(counts.get("rejected", 0))}

        def work() -> dict:
            summary = prepare_one(self.config, self.run.prepared)
            for name, config in self.external_configs().items():
                log.info("prepare: external dataset %s", name)
                summary[f"external {name}"] = prepare_one(config, self.run.external(name), name)
            return summary

        self._stage("prepare", work, force)

    def store(self) -> Store:
        return Store.open(self.run.prepared)

    def external_stores(self) -> dict[str, tuple[AuditConfig, Store]]:
        """Each external dataset's config (its ROI settled against its masks) and prepared store."""
        out = {}
        for name, config in self.external_configs().items():
            store = Store.open(self.run.external(name))
            roi = config.roi if config.roi and all(p in store.rois for p in config.roi.split("+")) else None
            out[name] = (config.model_copy(update={"roi": roi}), store)
        return out

    def split(self, force: bool = False) -> None:
        def work() -> dict:
            store = self.store()
            if store.n == 0:
                raise MaskauditError(f"no image was kept in {self.run.prepared}; see manifest.parquet for reasons")
            masked = sorted((set(self.config.strategies) | set(self.config.eval_strategies)) - {"full"})
            if not store.rois and masked:
                raise MaskauditError(f"this data has no ROI masks, so strategies {', '.join(masked)} cannot be "
                                     "applied; set `data.mask_column` or use `strategies: [full]`")
            splits = make_splits(store.kept, store.classes, self.config.test_fraction, self.config.folds,
                                 self.config.seed)
            save_splits(self.run.splits, splits, store.kept)
            warnings = split_warnings(store, splits)
            for text in warnings:
                log.warning("split: %s", text)
            return {"method": splits.method, **({"warnings": warnings} if warnings else {})}

        self._stage("split", work, force)

    def splits(self, store: Store) -> Splits:
        return load_splits(self.run.splits, store.kept)

    def train(self, only: list[tuple[str, int]] | None = None, force: bool = False) -> None:
        if self.config.probing:
            raise MaskauditError("this config probes models trained elsewhere (`models`): there is nothing to "
                                 "train; run `maskaudit probe`")

        def work() -> None:
            grid = only or self.jobs
            todo = [job for job in grid if force or not self.job_done(*job)]
            log.info("train: %d of %d jobs to run", len(todo), len(grid))
            make_executor(self.config).map(run_train_job, [(str(self.run.root), s, k) for s, k in todo],
                                           total=len(grid), done=len(grid) - len(todo))

        if only:  # a partial grid never marks the stage done
            work()
            return
        self._stage("train", work, force)

    def job_done(self, strategy: str, fold: int) -> bool:
        """Whether the job's model exists: trained and current, or (a probe) given."""
        from maskaudit.train import job_finished

        if self.config.probing:
            return True
        return job_finished(self.run.job(strategy, fold), self.job_fingerprint(strategy, fold))

    def predict(self, force: bool = False) -> None:
        def work() -> dict:
            missing = [f"{s}/fold_{k}" for s, k in self.jobs if not self.job_done(s, k)]
            if missing:
                raise MaskauditError(f"untrained jobs: {', '.join(missing[:6])}…; run `maskaudit train` first")
            todo = [(s, k) for s, k in self.jobs if force or not self._job_predicted(s, k)]
            make_executor(self.config).map(run_predict_job, [(str(self.run.root), s, k) for s, k in todo],
                                           total=len(self.jobs), done=len(self.jobs) - len(todo))
            table = pd.concat([pd.read_parquet(self.run.job(s, k) / "predictions.parquet") for s, k in self.jobs],
                              ignore_index=True)
            write_table(self.run.predictions, table)
            return {"rows": len(table)}

        self._stage("predict", work, force)

    def _job_predicted(self, strategy: str, fold: int) -> bool:
        return self.job_output_current(strategy, fold, "predictions", self.predict_fingerprint(strategy, fold))

    def job_output_current(self, strategy: str, fold: int, name: str, fingerprint: str) -> bool:
        """Whether job (strategy, fold) holds ``<name>.parquet`` made from inputs with ``fingerprint``."""
        meta = self.run.job(strategy, fold) / f"{name}.json"
        return meta.is_file() and read_json(meta).get("fingerprint") == fingerprint

    def write_job_output(self, strategy: str, fold: int, name: str, table: pd.DataFrame, fingerprint: str) -> dict:
        """Keep a job's table as ``<name>.parquet`` beside ``<name>.json`` (its inputs' fingerprint)."""
        job_dir = self.run.job(strategy, fold)
        write_table(job_dir / f"{name}.parquet", table)
        write_json(job_dir / f"{name}.json", {"fingerprint": fingerprint, "rows": len(table)})
        return {"rows": len(table)}

    def metrics(self, force: bool = False) -> None:
        from maskaudit.metrics import MAIN, auc_by_fold, auc_matrix, delong_table, matrix_of
        from maskaudit.report.figures import auc_heatmap, save_figure

        def work() -> None:
            if not self.run.predictions.is_file():
                raise MaskauditError(f"no {self.run.predictions}; run `maskaudit predict` first")
            predictions = pd.read_parquet(self.run.predictions)
            by_fold = auc_by_fold(predictions, self.config.analyses.level)
            matrix = auc_matrix(predictions, by_fold, self.config.analyses.level)
            write_table(self.run.metrics / "auc_by_fold.parquet", by_fold, csv=True)
            write_table(self.run.metrics / "auc_matrix.parquet", matrix, csv=True)
            write_table(self.run.metrics / "delong.parquet", delong_table(predictions), csv=True)
            c = self.config
            panels = [(MAIN, "test", "hold-out", "auc_{}")]
            panels += [(name, "external", name, f"auc_{name}_{{}}") for name in self.external_configs()]
            for dataset, split, label, file_name in panels:
                for name in c.classes:
                    mean, std = (matrix_of(matrix, name, split, c.train_strategies, c.eval_strategies, value,
                                           dataset) for value in ("auc_mean", "auc_std"))
                    of = "probed models" if c.probing else f"mean of {c.folds} folds"
                    fig = auc_heatmap(mean, std, f"{name}: {label} AUC, {of}",
                                      "probed model" if c.probing else "training masking")
                    save_figure(fig, self.run.figures / file_name.format(name), self.config.report.formats)

        self._stage("metrics", work, force)

    def analyse(self, name: str, force: bool = False) -> None:
        """One analysis of SPEC §6/§8 (see :mod:`maskaudit.analyses.stages`); needs the metrics stage."""
        from maskaudit.analyses.stages import ANALYSIS_FUNCTIONS

        if name not in ANALYSIS_FUNCTIONS:
            raise MaskauditError(f"unknown analysis {name!r}; expected one of {', '.join(ANALYSES)}")
        if not self.is_done("metrics"):
            raise MaskauditError(f"analysis {name}: the metrics are missing or stale; run `maskaudit metrics` first")
        self._stage(name, lambda: ANALYSIS_FUNCTIONS[name](self), force)

    def report(self, force: bool = False) -> None:
        """Render report.html from whatever the run directory holds; redone whenever another stage or a
        job's training history has changed since the last one (a run in progress), not only its config."""
        from maskaudit.report.html import report_inputs, write_report

        inputs = report_inputs(self)
        stale = self._records().get("report", {}).get("inputs") != inputs
        self._stage("report", lambda: {**write_report(self), "inputs": inputs}, force or stale)

    def run_all(self) -> Path:
        """Every stage in order (``maskaudit run``; ``maskaudit probe`` for a config of probed models), under the
        run directory's writer lock (:mod:`maskaudit.lock`; re-entrant: the CLI holds it already)."""
        from maskaudit.lock import python_command, run_lock

        with run_lock(self.run.root, python_command("Audit.run_all")):
            self.prepare()
            self.split()
            if not self.config.probing:
                self.train()
            self.predict()
            self.metrics()
            for name in ANALYSES:
                if name in self.config.analyses.run:
                    self.analyse(name)
            self.report()
        return self.run.report


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


def open_job(run_root: str) -> tuple[Audit, Store, Splits]:
    """What a job function opens first: the run's audit, its prepared store and its splits."""
    audit = Audit.open(Path(run_root))
    store = audit.store()
    return audit, store, audit.splits(store)


def run_train_job(run_root: str, strategy: str, fold: int) -> dict:
    """One training job, as a plain function of (run directory, strategy, fold)."""
    from maskaudit.train import train_job

    audit, store, splits = open_job(run_root)
    return train_job(audit.config, store, splits, strategy, fold, audit.run.job(strategy, fold),
                     audit.job_fingerprint(strategy, fold))


def run_predict_job(run_root: str, strategy: str, fold: int) -> dict:
    """One job's cross-masking predictions, written into its folder."""
    from maskaudit.predict import predict_job

    audit, store, splits = open_job(run_root)
    table = predict_job(audit.config, store, splits, audit.run, strategy, fold, audit.external_stores())
    return audit.write_job_output(strategy, fold, "predictions", table, audit.predict_fingerprint(strategy, fold))
