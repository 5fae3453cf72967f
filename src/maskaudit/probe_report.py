"""What a probe's report shows differently from a full audit's (:class:`maskaudit.report.html.ReportView`).

A probe (``maskaudit probe``) scores models trained elsewhere and trains nothing: its AUC matrices have a
row per probed model, its verdict section opens with what a probe can and cannot show, and in place of
the training curves it lists each probed model: where it came from, the input made from the masked image
and which of its outputs is which class (each model's ``jobs/<name>/fold_0/probe.json``). Like the rest of
the report, this reads the run directory alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from maskaudit.report.html import ReportView, frame_table
from maskaudit.rundir import RunDir, read_json

if TYPE_CHECKING:
    from maskaudit.config import AuditConfig


def probe_notice(config: AuditConfig) -> str:
    """The paragraph at the top of a probe's verdict section (plain text): what its verdicts can show."""
    images = "every image" if config.predict.images == "all" else "the hold-out images"
    return (f"This is a probe: models trained elsewhere, scored as they are on {images} under each masking; "
            "nothing was trained on masked images. Signal that survives masking is evidence (the model finds the "
            "class without the ROI, or from the ROI alone); signal lost under masking may only mean the masked "
            "images are unlike what the model was trained on. So \"shortcut suspected\" and \"inside and "
            "outside\" are as strong as in a full audit, while \"relies on the ROI\" and \"unclear\" are weaker: "
            "a full audit (`maskaudit run`), which trains models on masked images, settles them. The rules are in "
            "the README (\"Reading the verdict\", \"Audit your own model\"). AUCs are each model's on the scored "
            "images with 95 % DeLong intervals.")


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
    table = frame_table(pd.DataFrame(rows), "each probed model: its source, the input made from the masked image, "
                                            "and which of its outputs is which class")
    return {"title": "Probed models", "intro": PROBE_INTRO, "table": table}


def probe_view(config: AuditConfig) -> ReportView:
    """A probe's report: a row per probed model, no train stage, the probe's notice and models section."""
    scored = "every image" if config.predict.images == "all" else "the hold-out images"
    return ReportView(corner="model \\ test", models_label="probed model", trains=False,
                      notice=probe_notice(config), models_section=probe_section, rows_are="the probed model",
                      cells_are=f"the model's AUC on {scored}")


def report_view(config: AuditConfig) -> ReportView:
    """The view of ``config``'s kind of audit: :func:`probe_view` for a probe, else a full audit's."""
    return probe_view(config) if config.kind == "probe" else ReportView()
