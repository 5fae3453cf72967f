"""What a stage or a job is given: the run directory, the config as the stage may read it, the data, the models.

:class:`Context` is all an analysis (:mod:`maskaudit.analyses.run`) and a job function see of the
audit: no pipeline object. The kind of audit (:class:`maskaudit.pipeline.Audit`, the probe's
:class:`maskaudit.probe_audit.ProbeAudit`) makes it, filling in :class:`Plan` (which models
exist, what each analysis looks at by default, where the verdict reads its evidence) and the two
things only it can do: load a job's model, and run a stage's jobs on its executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch

from maskaudit.analyses.verdict import Reading
from maskaudit.data.splits import Splits, load_splits
from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.loader import mask_spec
from maskaudit.rundir import RunDir, read_json, write_json, write_table
from maskaudit.strategies import MaskSpec


@dataclass(frozen=True)
class Plan:
    """What differs between kinds of audit, as values an analysis reads.

    Attributes
    ----------
    models : list of str
        The prediction table's ``train_strategy`` values: the trained strategies, or the probed models' names.
    model_folds : list of int
        The folds that have a model (every fold; a probe: 0, its one model).
    models_word : str
        What the models are, in a plural: ``strategies`` (each trained on its masking), or ``probed models``.
    explain_pairs, baseline_pairs, reader_pairs : list of (str, str)
        The (model, test masking) pairs SHAP explains, the metadata baseline is tested against, and whose cases
        a reader reads.
    explain_folds : list of int
        Whose fold's models SHAP explains (``analyses.explain.folds``).
    sweep_models : list of str
        Whose models the dilation sweep runs.
    embed_model : str or None
        Whose features are embedded (None: no model exposes its layers).
    embed_fold, reader_fold : int
        The fold of the embedded model and of the reader study's models.
    evidence : dict
        Verdict-table ``model`` label → where each piece of evidence is read
        (:func:`maskaudit.strategies.evidence_cells`); a full audit has one entry, ``""``.
    reading : Reading
        How the verdict's reading is worded (a probe's says what a probe cannot show).
    validation : bool
        Whether each job also predicts its own validation fold.
    """

    models: list[str]
    model_folds: list[int]
    models_word: str
    explain_pairs: list[tuple[str, str]]
    baseline_pairs: list[tuple[str, str]]
    reader_pairs: list[tuple[str, str]]
    explain_folds: list[int]
    sweep_models: list[str]
    embed_model: str | None
    embed_fold: int
    reader_fold: int
    evidence: dict[str, dict[str, list[tuple[str, str]]]]
    reading: Reading = Reading()
    validation: bool = True

    @property
    def explain_jobs(self) -> list[tuple[str, int]]:
        """The models SHAP runs: each explained model of this run on each of ``explain_folds``, in model order."""
        jobs = {(m, k) for m, _ in self.explain_pairs for k in self.explain_folds if m in self.models}
        return sorted(jobs, key=lambda job: (self.models.index(job[0]), job[1]))

    @property
    def sweep_jobs(self) -> list[tuple[str, int]]:
        """The models the dilation sweep runs: each of ``sweep_models`` this run has, every fold of it."""
        return [(m, k) for m in self.sweep_models if m in self.models for k in self.model_folds]

    def require(self, model: str, key: str) -> None:
        """A config key naming a model this run does not have is a one-line error naming the key."""
        if model not in self.models:
            raise MaskauditError(f"analyses.{key}: {model!r} is not one of this run's {self.models_word} "
                                 f"({', '.join(self.models)})")


@dataclass
class Context:
    """One stage (or one job of it) of one run: what it reads, and where it writes.

    ``config`` is a :class:`maskaudit.stages.ConfigView`: the keys the stage table declares for the stage.
    """

    run: RunDir
    config: Any
    plan: Plan
    stage: str
    load_model: Callable[[Store, str, int, torch.device], torch.nn.Module]
    map_jobs: Callable[[str, list[tuple[str, int]]], None]
    job_fingerprint: Callable[[str, str, int], str]
    outputs: dict[str, str] = field(default_factory=dict)
    externals: list[tuple[str, str | None]] = field(default_factory=list)

    @cached_property
    def store(self) -> Store:
        """The prepared store (memory-mapped)."""
        return Store.open(self.run.prepared)

    @cached_property
    def splits(self) -> Splits:
        return load_splits(self.run.splits, self.store.kept)

    def predictions(self) -> pd.DataFrame:
        if not self.run.predictions.is_file():
            raise MaskauditError(f"no {self.run.predictions}; run `maskaudit predict` first")
        return pd.read_parquet(self.run.predictions)

    @cached_property
    def masking(self) -> MaskSpec:
        """How the run's images are masked (the config's roi, spread, fill; the store's mean)."""
        c = self.config
        return mask_spec(self.store, c.roi, c.spread, c.fill, c.seed, scale=c.scale)

    def external_sets(self) -> dict[str, tuple[MaskSpec, Store]]:
        """Each external dataset's masking (its ROI where its masks have it, else none) and prepared store."""
        out = {}
        for name, roi in self.externals:
            store = Store.open(self.run.external(name))
            usable = roi if roi and all(p in store.rois for p in roi.split("+")) else None
            spec = mask_spec(store, usable, self.config.spread, self.config.fill, self.config.seed, name,
                             required=False, scale=self.config.scale)
            out[name] = (spec, store)
        return out

    def scored_images(self) -> np.ndarray:
        """The store indices the models are scored on: the hold-out, or every image (``predict.images: all``)."""
        return np.arange(self.store.n) if self.config.predict.images == "all" else self.splits.test

    def model(self, strategy: str, fold: int, device: torch.device) -> torch.nn.Module:
        """The model of job (strategy, fold) in eval mode on ``device``."""
        return self.load_model(self.store, strategy, fold, device)

    # -------------------------------------------------------------------------------- per-job outputs

    def job_output_current(self, strategy: str, fold: int, part: str) -> bool:
        """Whether job (strategy, fold) holds part ``part``'s table made from its current inputs (the table, and its
        record with their fingerprint: a table deleted by hand is made again)."""
        job_dir = self.run.job(strategy, fold)
        meta = job_dir / f"{self.outputs[part]}.json"
        return (meta.is_file() and (job_dir / f"{self.outputs[part]}.parquet").is_file()
                and read_json(meta).get("fingerprint") == self.job_fingerprint(part, strategy, fold))

    def write_job_output(self, strategy: str, fold: int, part: str, table: pd.DataFrame) -> dict:
        """Keep part ``part``'s table of a job as ``<output>.parquet`` beside ``<output>.json`` (its fingerprint)."""
        job_dir = self.run.job(strategy, fold)
        write_table(job_dir / f"{self.outputs[part]}.parquet", table)
        write_json(job_dir / f"{self.outputs[part]}.json",
                   {"fingerprint": self.job_fingerprint(part, strategy, fold), "rows": len(table)})
        return {"rows": len(table)}

    def gather(self, part: str, jobs: list[tuple[str, int]]) -> pd.DataFrame:
        """Run the jobs of ``part`` whose tables are missing or stale, then concatenate every job's table."""
        todo = [(s, k) for s, k in jobs if not self.job_output_current(s, k, part)]
        self.map_jobs(part, todo)
        return pd.concat([pd.read_parquet(self.run.job(s, k) / f"{self.outputs[part]}.parquet") for s, k in jobs],
                         ignore_index=True)
