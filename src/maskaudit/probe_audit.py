"""The probe: an audit of classifiers trained elsewhere, scored as they are under every masking.

:class:`ProbeAudit` shares the full audit's stages (:class:`maskaudit.pipeline.Audit`) and owns what
differs: it trains nothing (its models come from :mod:`maskaudit.probe`), so it has one model per
probed model (fold 0), a ``model`` part that reads the probed models' declarations and files instead
of the training settings, no validation-fold predictions, its analysis defaults (each model on full
images for SHAP, every model in the sweep, the first model whose layers can be hooked for the
embeddings), and its verdict evidence: each probed model's own cells, read with
:data:`PROBE_READING`, which says what a probe cannot show.

With ``adapt`` (light cross-masking, :mod:`maskaudit.adapt`) it also trains: an ``adapt`` stage runs one
``model`` job per adapted model (``<model>+<masking>``, and the ``roi_shape`` shape control) and fold, through
the same job machinery as a full audit's training (executors, resume, per-job fingerprints); those models are
scored like the probed ones, and each probed model's verdict reads them first (:func:`probe_cells` with the
adapted maskings), worded by :func:`adapted_reading`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import torch

from maskaudit.adapt import adapt_job, load_adapted, load_probed, load_shape, shape_job
from maskaudit.analyses.verdict import Reading
from maskaudit.config import AdaptConfig, ProbedModelConfig
from maskaudit.context import Context, Plan
from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.pipeline import MASKING, TABLE, Audit, _file_stamp
from maskaudit.probe_report import probe_view
from maskaudit.report.html import ReportView
from maskaudit.rundir import write_json
from maskaudit.stages import Stage
from maskaudit.strategies import STRATEGIES, adapted_name, adapted_split, probe_cells
from maskaudit.train import job_finished

log = logging.getLogger(__name__)

#: Appended to every reading of a probed model.
PROBE_CAVEAT = (" A probe trains nothing on masked images: signal that survives masking is evidence, signal lost "
                "under masking may only mean the masked images are unlike what the model was trained on.")

#: How a probed model's verdict reads: one model; inside is the better of the two ROI-only maskings (either is
#: evidence that survived masking); masking that reverses the scores is pointed out; and the caveat.
PROBE_READING = Reading(who="the model", finds="finds", does="it does", relies="relies",
                        subject="The model on full images", best_inside=True, note_reversed=True, caveat=PROBE_CAVEAT)

#: The keys an adapt job reads: the recipe, not which jobs there are (``strategies``, ``folds``: the adapt stage's
#: and the predict stage's), so adding a fold or a masking trains only the new jobs.
ADAPT_JOB_KEYS = tuple(f"adapt.{key}" for key in AdaptConfig.model_fields if key not in ("strategies", "folds"))


def adapt_caveat(adapt: AdaptConfig, folds: int) -> str:
    """Appended to every reading of a probe with ``adapt``: which cells came from adaptation, how to read the rest."""
    tuned, controls = adapted_split(adapt.strategies)
    parts = []
    if tuned:
        parts.append(f"cells named model+masking ({', '.join(f'+{s}' for s in tuned)}) come from copies of the model "
                     f"fine-tuned on that masking's training images ({adapt.layers}, at most {adapt.epochs} epochs, "
                     f"{folds} fold{'s' if folds > 1 else ''})")
    if controls:
        parts.append(f"{', '.join(f'{s}→{s}' for s in controls)} from a small CNN trained from scratch on the ROI "
                     "masks alone")
    return (f" Adapted: {'; '.join(parts)}. These read as a full audit reads models trained on masked images; where a "
            "cell is the model itself on masked images (model→masking), signal lost under masking may only mean the "
            "masked images are unlike what it was trained on.")


def adapted_reading(adapt: AdaptConfig, folds: int) -> Reading:
    """:data:`PROBE_READING` for a probe with ``adapt``: an adapted ROI-only cell is read first, as a full audit reads
    ``only_roi→only_roi`` (the better of the model's own two ROI-only cells only where no inside masking was adapted);
    scores reversed by masking are pointed out only while a masked role has no adapted cell; and its caveat."""
    adapted = {STRATEGIES[s].evidence for s in adapt.strategies if STRATEGIES[s].probe}
    return replace(PROBE_READING, best_inside="inside" not in adapted,
                   note_reversed=not {"inside", "outside"} <= adapted, caveat=adapt_caveat(adapt, folds))


def _entry_point_file(entry_point: str | None) -> Path | None:
    """The source file of a probed model's ``package.module:function``, so that editing the code redoes the probe."""
    if not entry_point:
        return None
    try:
        spec = importlib.util.find_spec(entry_point.partition(":")[0])
    except (ImportError, ValueError):
        return None  # loading the model will say what is wrong
    return Path(spec.origin) if spec is not None and spec.origin else None


class ProbeAudit(Audit):
    """Models trained elsewhere (``models``), audited as they are: no train stage, one model each; with ``adapt``,
    an adapt stage that trains their adapted copies and the shape control, one job per (model, fold)."""

    KIND = "probe"
    #: The model part reads the probed models (their declarations), the masking and the adapt recipe, not the
    #: training settings; ``adapt`` runs the adapted models' jobs; predict also depends on which there are.
    TABLE = {**{name: stage for name, stage in TABLE.items() if name != "train"},
             "model": Stage("model", reads=("models", *MASKING, *ADAPT_JOB_KEYS), after=("split",), job=True),
             "adapt": Stage("adapt", reads=("adapt",), jobs="model"),
             "predict": Stage("predict", reads=("adapt.strategies", "adapt.folds"), jobs="predictions")}
    FLOW = ("prepare", "split", "adapt", *(stage for stage in Audit.FLOW if stage not in ("prepare", "split", "train")))

    @property
    def probed(self) -> list[str]:
        """The probed models' names."""
        return [m.name for m in self.config.models]

    @property
    def adapted(self) -> dict[str, tuple[str | None, str]]:
        """Each adapted model's name → (the probed model it is a copy of, None for a control; its masking), in
        the order of the matrices' rows: each probed model's copies by masking, then the controls."""
        tuned, controls = adapted_split(s for s in STRATEGIES if s in self.config.adapt.strategies)
        return {adapted_name(m, s): (m, s) for m in self.probed for s in tuned} | {s: (None, s) for s in controls}

    def training_settings(self) -> dict[str, str]:
        """An adapted copy trains with ``adapt``'s recipe, the shape control with ``adapt.shape``'s
        (:func:`maskaudit.adapt.adapt_job`, :func:`~maskaudit.adapt.shape_job`)."""
        return {name: "adapt" if of is not None else "adapt.shape" for name, (of, _) in self.adapted.items()}

    @property
    def adapt_folds(self) -> list[int]:
        """The folds each adapted model is trained on: the first ``adapt.folds`` (default every fold)."""
        return list(range(self.config.adapt.folds or self.config.folds))

    @property
    def models(self) -> list[str]:
        """The prediction table's ``train_strategy`` values: each probed model, then the adapted ones."""
        copies = {m: [n for n, (of, _) in self.adapted.items() if of == m] for m in self.probed}
        controls = [n for n, (of, _) in self.adapted.items() if of is None]
        return [name for m in self.probed for name in (m, *copies[m])] + controls

    @property
    def model_folds(self) -> list[int]:
        return [0]  # one model each, nothing trained per fold; an adapted model's folds: adapt_folds

    @property
    def jobs(self) -> list[tuple[str, int]]:
        """(model, fold): each probed model once (fold 0), each adapted model on each of :attr:`adapt_folds`."""
        return [(m, k) for m in self.models for k in (self.adapt_folds if m in self.adapted else [0])]

    def _active(self, name: str) -> bool:
        """The adapt stage takes part only when the probe adapts (``adapt.strategies``)."""
        if name == "adapt":
            return bool(self.config.adapt.strategies)
        return super()._active(name)

    def _stage_jobs(self, name: str) -> list[tuple[str, int]]:
        if name == "adapt":
            return [(m, k) for m, k in self.jobs if m in self.adapted]
        return super()._stage_jobs(name)

    def plan(self) -> Plan:
        c, a = self.config, self.config.analyses
        hookable = next((m.name for m in c.models if m.source in ("python", "torchxrayvision")), None)
        adapted = list(c.adapt.strategies)
        outside = {m: adapted_name(m, "no_roi_bbox") if "no_roi_bbox" in adapted else None for m in self.probed}
        return replace(
            super().plan(), models=self.models, models_word="probed models",
            explain_pairs=[tuple(p) for p in a.explain.pairs or [(m, "full") for m in self.probed]],
            baseline_pairs=[tuple(p) for p in a.baseline.compare or
                            [(m, t) for m in self.probed for t in ("no_roi_bbox", "full") if t in c.eval_strategies]
                            + [(outside[m], "no_roi_bbox") for m in self.probed if outside[m]]],
            reader_pairs=[(m, t) for m in self.probed for t in c.eval_strategies],
            sweep_models=list(a.sweep.train_strategies or self.probed),
            embed_model=a.embed.train_strategy or hookable, embed_fold=0, reader_fold=0,
            evidence={m: probe_cells(m, adapted) for m in self.probed},
            reading=adapted_reading(c.adapt, len(self.adapt_folds)) if adapted else PROBE_READING, validation=False)

    def _probed_config(self, name: str) -> ProbedModelConfig:
        probed = {m.name: m for m in self.config.models}
        if name not in probed:
            raise MaskauditError(f"no probed model named {name!r} (models: {', '.join(probed)})")
        return probed[name]

    def load_model(self, store: Store, strategy: str, fold: int, device: torch.device) -> torch.nn.Module:
        if strategy in self.adapted:
            of, _ = self.adapted[strategy]
            job = self.run.job(strategy, fold)
            if of is None:
                return load_shape(store, self.config.adapt.shape.size, job, device)
            return load_adapted(self._probed_config(of), store, job, device, self.config.seed)
        model = load_probed(self._probed_config(strategy), store, device, self.config.seed)
        # what it is fed and which output became which class, for the report
        write_json(self.run.job(strategy, fold) / "probe.json", model.describe())
        return model

    def model_inputs(self, strategy: str, fold: int) -> object:
        """The probed model's declaration and files (its weights, its entry point's source); an adapted model's:
        those of the model it is a copy of, its masking and fold; a control's: its strategy and fold."""
        if strategy in self.adapted:
            of, masking = self.adapted[strategy]
            return [self.model_inputs(of, 0) if of else None, masking, fold]
        probed = self._probed_config(strategy)
        return [probed.model_dump(mode="json"),
                [_file_stamp(path) for path in (probed.file, _entry_point_file(probed.entry_point))]]

    def model_done(self, strategy: str, fold: int) -> bool:
        if strategy not in self.adapted:
            return True  # given, not trained
        return job_finished(self.run.job(strategy, fold), self.fingerprint("model", strategy=strategy, fold=fold))

    def adapt(self, force: bool = False) -> None:
        """Train the adapted models (``adapt``): the jobs not finished with their current inputs, on the executor.
        A probe without ``adapt`` has no such stage (nothing is recorded)."""
        jobs = self._stage_jobs("adapt")
        if not jobs:
            return

        def work() -> dict:
            todo = [job for job in jobs if force or not self.model_done(*job)]
            log.info("adapt: %d of %d jobs to run", len(todo), len(jobs))
            self.map_jobs("model", todo, total=len(jobs))
            return {"jobs": len(jobs)}

        self._stage("adapt", work, force)

    def heatmap_title(self) -> str:
        return "probed models"

    def report_view(self) -> ReportView:
        return probe_view(self.config)

    def train(self, only: list[tuple[str, int]] | None = None, force: bool = False) -> None:
        raise MaskauditError("this config probes models trained elsewhere (`models`): there is nothing to train; "
                             "run `maskaudit probe` (its adapt stage trains the adapted copies `adapt` asks for)")

    def make_model(self, ctx: Context, strategy: str, fold: int) -> dict:
        """Train adapted model ``strategy`` on fold ``fold`` (:mod:`maskaudit.adapt`); a probed model is given."""
        if strategy not in self.adapted:
            raise RuntimeError("a probed model is given, not trained: no model job runs for it")
        of, masking = self.adapted[strategy]
        job, fingerprint = self.run.job(strategy, fold), self.fingerprint("model", strategy=strategy, fold=fold)
        if of is None:
            return shape_job(ctx.config, ctx.store, ctx.splits, ctx.masking, strategy, fold, job, fingerprint)
        return adapt_job(ctx.config, ctx.store, ctx.splits, ctx.masking, self._probed_config(of), masking, strategy,
                         fold, job, fingerprint)
