"""The probe: an audit of classifiers trained elsewhere, scored as they are under every masking.

:class:`ProbeAudit` shares the full audit's stages (:class:`maskaudit.pipeline.Audit`) and owns what
differs: it trains nothing (its models come from :mod:`maskaudit.probe`), so it has one model per
probed model (fold 0), a ``model`` part that reads the probed models' declarations and files instead
of the training settings, no validation-fold predictions, its analysis defaults (each model on full
images for SHAP, every model in the sweep, the first model whose layers can be hooked for the
embeddings), and its verdict evidence: each probed model's own cells, read with
:data:`PROBE_READING`, which says what a probe cannot show.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import torch

from maskaudit.analyses.verdict import Reading
from maskaudit.context import Context, Plan
from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.pipeline import MASKING, TABLE, Audit, _file_stamp
from maskaudit.probe import load_probed_model
from maskaudit.probe_report import probe_view
from maskaudit.report.html import ReportView
from maskaudit.rundir import write_json
from maskaudit.stages import Stage
from maskaudit.strategies import probe_cells

#: Appended to every reading of a probed model.
PROBE_CAVEAT = (" A probe trains nothing on masked images: signal that survives masking is evidence, signal lost "
                "under masking may only mean the masked images are unlike what the model was trained on.")

#: How a probed model's verdict reads: one model; inside is the better of the two ROI-only maskings (either is
#: evidence that survived masking); masking that reverses the scores is pointed out; and the caveat.
PROBE_READING = Reading(who="the model", finds="finds", does="it does", relies="relies",
                        subject="The model on full images", best_inside=True, note_reversed=True, caveat=PROBE_CAVEAT)


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
    """Models trained elsewhere (``models``), audited as they are: no train stage, one model each."""

    KIND = "probe"
    #: The model part reads the probed models (their declarations) and the masking, not the training settings.
    TABLE = {**{name: stage for name, stage in TABLE.items() if name != "train"},
             "model": Stage("model", reads=("models", *MASKING), after=("split",), job=True)}
    FLOW = tuple(stage for stage in Audit.FLOW if stage != "train")

    @property
    def models(self) -> list[str]:
        return [m.name for m in self.config.models]

    @property
    def model_folds(self) -> list[int]:
        return [0]  # one model each, nothing trained per fold

    def plan(self) -> Plan:
        c, a = self.config, self.config.analyses
        hookable = next((m.name for m in c.models if m.source in ("python", "torchxrayvision")), None)
        return replace(
            super().plan(), models_word="probed models",
            explain_pairs=[tuple(p) for p in a.explain.pairs or [(m, "full") for m in self.models]],
            baseline_pairs=[tuple(p) for p in a.baseline.compare or
                            [(m, t) for m in self.models for t in ("no_roi_bbox", "full") if t in c.eval_strategies]],
            reader_pairs=[(m, t) for m in self.models for t in c.eval_strategies],
            sweep_models=list(a.sweep.train_strategies or self.models),
            embed_model=a.embed.train_strategy or hookable, embed_fold=0, reader_fold=0,
            evidence={m: probe_cells(m) for m in self.models}, reading=PROBE_READING, validation=False)

    def load_model(self, store: Store, strategy: str, fold: int, device: torch.device) -> torch.nn.Module:
        probed = {m.name: m for m in self.config.models}
        if strategy not in probed:
            raise MaskauditError(f"no probed model named {strategy!r} (models: {', '.join(probed)})")
        model = load_probed_model(probed[strategy], store.classes, store.channels, device, store.image_size)
        # what it is fed and which output became which class, for the report
        write_json(self.run.job(strategy, fold) / "probe.json", model.describe())
        return model

    def model_inputs(self, strategy: str, fold: int) -> object:
        """The probed model's declaration and files (its weights, its entry point's source)."""
        probed = next(m for m in self.config.models if m.name == strategy)
        return [probed.model_dump(mode="json"),
                [_file_stamp(path) for path in (probed.file, _entry_point_file(probed.entry_point))]]

    def model_done(self, strategy: str, fold: int) -> bool:
        return True  # given, not trained

    def heatmap_title(self) -> str:
        return "probed models"

    def report_view(self) -> ReportView:
        return probe_view(self.config)

    def train(self, only: list[tuple[str, int]] | None = None, force: bool = False) -> None:
        raise MaskauditError("this config probes models trained elsewhere (`models`): there is nothing to train; "
                             "run `maskaudit probe`")

    def make_model(self, ctx: Context, strategy: str, fold: int) -> dict:
        raise RuntimeError("a probed model is given, not trained: no model job runs in a probe")
