"""What a probe's report shows differently from a full audit's (:class:`maskaudit.report.html.ReportView`).

A probe (``maskaudit probe``) scores models trained elsewhere and trains nothing: its AUC matrices have a
row per probed model, its verdict section opens with what a probe can and cannot show, and in place of
the training curves it lists each probed model: where it came from, the input made from the masked image
and which of its outputs is which class (each model's ``jobs/<name>/fold_0/probe.json``). With ``adapt`` (light
cross-masking, :mod:`maskaudit.adapt`) the notice says which cells come from adapted models, and the models
section adds a row per adapted model (its jobs' ``job.json`` and ``adapt.json``). Like the rest of the report,
this reads the run directory alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from maskaudit.report.html import ReportView
from maskaudit.report.parts import frame_table
from maskaudit.rundir import RunDir, read_json
from maskaudit.strategies import STRATEGIES, adapted_name, adapted_split

if TYPE_CHECKING:
    from maskaudit.config import AuditConfig


def probe_notice(config: AuditConfig) -> str:
    """The paragraph at the top of a probe's verdict section (plain text): what its verdicts can show."""
    images = "every image" if config.predict.images == "all" else "the hold-out images"
    if config.adapt.strategies:
        return adapt_notice(config)
    return (f"This is a probe: models trained elsewhere, scored as they are on {images} under each masking; "
            "nothing was trained on masked images. Signal that survives masking is evidence (the model finds the "
            "class without the ROI, or from the ROI alone); signal lost under masking may only mean the masked "
            "images are unlike what the model was trained on. So \"shortcut suspected\" and \"inside and "
            "outside\" are as strong as in a full audit, while \"relies on the ROI\" and \"unclear\" are weaker: "
            "a full audit (`maskaudit run`), which trains models on masked images, settles them. The rules are in "
            "the README (\"Reading the verdict\", \"Audit your own model\"). AUCs are each model's on the scored "
            "images with 95 % DeLong intervals.")


def adapt_notice(config: AuditConfig) -> str:
    """:func:`probe_notice` of a probe with ``adapt``: which cells were adapted, and how the others read."""
    a = config.adapt
    folds = a.folds or config.folds
    tuned, controls = adapted_split(a.strategies)
    what = []
    if tuned:
        what.append(f"copies of each model fine-tuned on {', '.join(tuned)} images (rows model+masking; "
                    f"layers: {a.layers}, at most {a.epochs} epochs, on the training images of "
                    + (f"each of the {folds}" if folds == config.folds else f"{folds} of the {config.folds}")
                    + " patient-grouped folds)")
    if controls:
        what.append(f"the shape control ({', '.join(controls)}: a small CNN trained from scratch on the ROI masks "
                    f"alone at {a.shape.size} px)")
    return ("This is a probe with light cross-masking (adapt): models trained elsewhere, scored as they are on the "
            f"hold-out images under each masking, and {' and '.join(what)}. The verdict reads the adapted cells "
            "first, as a full audit reads its models trained on masked images, and each reading names the cells it "
            "rests on: a cell of the model itself on masked images (model→masking) is read only where no adapted "
            "one exists, and there signal lost under masking may only mean the masked images are unlike what the "
            "model was trained on. Adapted models start from the model's weights and train a few epochs: a full "
            "audit (`maskaudit run`) trains every masking from scratch. The rules are in the README (\"Reading the "
            "verdict\", \"Audit your own model\"). AUCs are fold means on the hold-out images with 95 % DeLong "
            "intervals.")


#: The introduction of a probe's models section, in place of the training curves'.
PROBE_INTRO = ("A probe trains nothing: each model was given (`models` in the configuration) and is scored as it is. "
               "The masked image, in [0, 1] at the run's image size, is turned into the model's own input as below, "
               "and each dataset class is read from the output of the same name (or an alias); a class no output "
               "matches is reported as not predicted, never guessed.")


def probe_section(run: RunDir, config: AuditConfig) -> dict:
    """A probe's models: where each came from, what it is fed, which output is which class.

    Read from each model's ``jobs/<name>/fold_0/probe.json`` (written when predict loads it); a model not
    loaded yet says so. The section of :attr:`ReportView.models_section`: ``title``, ``intro`` and ``table``.
    """
    rows = []
    for m in config.models:
        seen = run.job(m.name, 0) / "probe.json"
        mapping = read_json(seen) if seen.is_file() else {}
        rows.append({
            "model": m.name, "source": m.source,
            "from": " ".join(str(part) for part in (m.entry_point, m.weights, m.file) if part),
            "input": mapping.get("input", "not loaded yet"),
            "activation": mapping.get("activation", m.output.activation),
            "classes → outputs": mapping.get("outputs", ""),
            "not predicted": ", ".join(mapping.get("not_predicted", [])) or "none"})
        if config.adapt.strategies:
            rows[-1]["trained"] = "nothing: given as it is"
            rows += [_adapted_row(run, config, m.name, s, mapping) for s in config.adapt.strategies
                     if STRATEGIES[s].probe]
    rows += [_adapted_row(run, config, None, s, {}) for s in config.adapt.strategies if not STRATEGIES[s].probe]
    table = frame_table(pd.DataFrame(rows), "each probed model: its source, the input made from the masked image, "
                                            "and which of its outputs is which class"
                        + ("; each adapted model: what it was trained on and how far" if config.adapt.strategies
                           else ""))
    intro = PROBE_INTRO + (ADAPT_INTRO if config.adapt.strategies else "")
    return {"title": "Probed models", "intro": intro, "table": table}


#: Added to the models section's introduction when the probe adapts its models.
ADAPT_INTRO = (" With adapt, each model+masking row is a copy of the model fine-tuned on that masking (one job per "
               "fold: jobs/<model>+<masking>/fold_<k>/, with history.csv and job.json as a full audit's jobs), and "
               "roi_shape a small CNN trained from scratch on the ROI masks alone.")


def _adapted_row(run: RunDir, config: AuditConfig, model: str | None, strategy: str, mapping: dict) -> dict:
    """One adapted model's row of the models section, from its jobs' ``job.json`` and ``adapt.json``."""
    name = adapted_name(model, strategy) if model else strategy
    folds = range(config.adapt.folds or config.folds)
    jobs = [read_json(path) for k in folds if (path := run.job(name, k) / "job.json").is_file()]
    trained = [read_json(path) for k in folds if (path := run.job(name, k) / "adapt.json").is_file()]
    if jobs:
        epochs = sum(j["epochs_run"] for j in jobs) / len(jobs)
        modules = ", ".join(trained[0]["trained"]) if trained else ""
        how = (f"{len(jobs)} of {len(folds)} folds; {epochs:.1f} epochs on average (best at "
               f"{', '.join(str(j['best_epoch'] + 1) for j in jobs)}); {jobs[0]['trainable_parameters']:,} "
               f"parameters trained" + (f": {modules}" if modules else ""))
    else:
        how = "not trained yet"
    if model is None:
        source = f"small_cnn from scratch on the masks alone ({config.adapt.shape.size} px)"
    else:
        source = f"{model} fine-tuned on {strategy} (layers: {config.adapt.layers})"
    return {"model": name, "source": source, "from": "", "input": mapping.get("input", "the ROI mask"),
            "activation": mapping.get("activation", "sigmoid"), "classes → outputs": mapping.get("outputs", ""),
            "not predicted": ", ".join(mapping.get("not_predicted", [])) or "none", "trained": how}


def probe_view(config: AuditConfig) -> ReportView:
    """A probe's report: a row per probed model, no train stage, the probe's notice and models section."""
    scored = "every image" if config.predict.images == "all" else "the hold-out images"
    if config.adapt.strategies:
        return ReportView(corner="model \\ test", models_label="probed or adapted model", trains=False,
                          notice=probe_notice(config), models_section=probe_section,
                          rows_are="the probed model, or an adapted copy of it (model+masking, roi_shape)",
                          cells_are=f"the model's AUC on {scored} (an adapted model's: the mean over its folds)")
    return ReportView(corner="model \\ test", models_label="probed model", trains=False,
                      notice=probe_notice(config), models_section=probe_section, rows_are="the probed model",
                      cells_are=f"the model's AUC on {scored}")


def report_view(config: AuditConfig) -> ReportView:
    """The view of ``config``'s kind of audit: :func:`probe_view` for a probe, else a full audit's."""
    return probe_view(config) if config.kind == "probe" else ReportView()
