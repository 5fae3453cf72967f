"""The model card: what an audit found about its model(s), in sentences a reviewer can paste into a model card.

``maskaudit report --out RUN --model-card`` writes ``RUN/model_card.md`` and ``RUN/model_card.json`` (the same facts,
machine-readable) for the audited models: a full audit's (one model per masking and fold, read together as the
verdict reads them), or a probe's probed models, one block each. The Markdown's sections are named as in the Hugging
Face model card template (``huggingface/huggingface_hub``: ``src/huggingface_hub/templates/modelcard_template.md``;
annotated at https://huggingface.co/docs/hub/model-card-annotated), so each goes under the section of the same
name of the model's own card:

``Bias, Risks, and Limitations``
    per class the verdict and its reading (the numbers it rests on), the weak-evidence notes, and the limits of
    what the audit can show (a probe's caveat); then ``Recommendations``, one per class, from its verdict.
``Evaluation``
    ``Testing Data, Factors & Metrics`` (``Testing Data``: the hold-out set's and the folds' images, patients and
    positives per class; ``Factors``: the maskings; ``Metrics``: the AUC, its interval and the rules), and
    ``Results``: per class the cells the verdict rests on with their 95 % DeLong intervals, the metadata
    baseline, and the localisation summary when the run has one.
``Technical Specifications`` / ``Software``
    the software versions and the run's fingerprint (the report stage's in ``stages.json``: a digest of the
    config and of every stage before it).

It reads the run directory alone (``config.yaml``, ``stages.json``, ``analyses/verdict/verdict.parquet``,
``checks/<dataset>.json``, ``counts/splits.parquet``, ``analyses/localize/`` when there) and recomputes nothing:
every number is the verdict table's. The software versions are those installed when the card is written, as in
the report. A run without a verdict table is a one-line error naming it.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from maskaudit import __version__
from maskaudit.errors import MaskauditError
from maskaudit.report.html import run_config, software_versions
from maskaudit.rundir import RunDir, read_json, write_json, write_text
from maskaudit.strategies import STRATEGIES

if TYPE_CHECKING:
    from maskaudit.config import AuditConfig

#: The evidence the verdict reads, in the card's words (the verdict table's ``<name>_cell``/``_auc``/… columns).
EVIDENCE = {"full": "full image", "inside": "ROI alone", "outside": "without the ROI", "shape": "ROI shape alone"}

#: What a reviewer is advised, per verdict (``{cls}``: the class, ``{roi}``: the ROI, ``{columns}``: the metadata).
RECOMMENDATIONS = {
    "roi": "the audit found the evidence for {cls} in the {roi}, as intended, and none outside it within the "
           "precision of its intervals.",
    "outside": "do not rely on the model for {cls} before finding what outside the {roi} predicts it (a device, a "
               "marker, text, the acquisition) and checking that it holds beyond the sites audited.",
    "everywhere": "{cls} is visible both inside and outside the {roi}: check that what travels with the label "
                  "outside it holds in the population the model is meant for.",
    "shape": "the outline of the {roi} alone predicts {cls}, so the masked models cannot tell whether the evidence "
             "lies inside or outside it; review it with attribution maps or a reader study.",
    "metadata": "metadata alone ({columns}) predict {cls} as well as the images: evaluate the model on data where "
                "they are balanced across labels before trusting it for this class.",
    "none": "no model showed signal for {cls} on the hold-out images: do not use the model for this class.",
    "unclear": "the evidence for {cls} needs the {roi} together with its surroundings: read the AUC matrices of the "
               "report before drawing a conclusion.",
    "undertrained": "a model the verdict for {cls} rests on did not learn it on its own validation images: train "
                    "longer (the report's Training section says how) before reading where its evidence lies.",
    "undetermined": "the audit gives no verdict for {cls}: more hold-out images (positive and negative), or a "
                    "full-image model, are needed.",
    "not_predicted": "the model has no output for {cls}.",
}

#: The packages whose versions the card names (those of the report that the card's reader needs).
CARD_PACKAGES = ("python", "torch", "torchvision", "maskaudit")


# ------------------------------------------------------------------------------------------ reading the run


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _clean(value: Any) -> Any:
    """A JSON-able value: numpy scalars as Python ones, NaN as None."""
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _auc(auc: Any, low: Any, high: Any) -> str:
    """``0.972 [0.948, 0.996]``; the AUC alone without an interval; ``n/a`` without an AUC."""
    if _missing(auc):
        return "n/a"
    if _missing(low) or _missing(high):
        return f"{auc:.3f}"
    return f"{auc:.3f} [{low:.3f}, {high:.3f}]"


def _p(value: Any) -> str:
    return "n/a" if _missing(value) else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def require_verdicts(run: RunDir) -> Path:
    """The run's verdict table; a one-line :class:`MaskauditError` naming what is missing when it has none."""
    if not run.config.is_file():
        raise MaskauditError(f"{run.root} holds no config.yaml: not a run directory, so no model card")
    path = run.analysis("verdict") / "verdict.parquet"
    if not path.is_file():
        before = "" if (run.metrics / "auc_matrix.parquet").is_file() else \
            f" (it needs the metrics, missing too: `maskaudit metrics --out {run.root}`)"
        raise MaskauditError(f"{run.root} has no verdict table ({path.relative_to(run.root)}), which the model card "
                             f"is made from: run `maskaudit analyse --out {run.root} verdict` first{before}")
    return path


def _counts(run: RunDir, config: AuditConfig) -> dict:
    """The data's counts: images and patients kept, rejected rows, positives per class, and each split's."""
    check = read_json(run.check("main")) if run.check("main").is_file() else {}
    splits: list[dict] = []
    if run.counts("splits").is_file():
        table = pd.read_parquet(run.counts("splits"))
        for _, row in table.iterrows():
            positives = {}
            for name in config.classes:
                found = re.match(r"\s*(\d+)", str(row.get(f"{name} +", "")))
                positives[name] = int(found.group(1)) if found else None
            splits.append({"split": str(row["split"]), "images": int(row["images"]), "patients": int(row["patients"]),
                           "positives": positives})
    balance = {b["class"]: b for b in check.get("balance", []) if b.get("split") == "all"}
    classes = {name: {"positives": _clean(balance.get(name, {}).get("positives")),
                      "negatives": _clean(balance.get(name, {}).get("negatives")),
                      "positive_patients": _clean(balance.get(name, {}).get("positive_patients"))}
               for name in config.classes}
    external = []
    for ext in config.external:
        other = read_json(run.check(ext.name)) if run.check(ext.name).is_file() else {}
        external.append({"name": ext.name, "source": ext.data.source, "images": other.get("kept"),
                         "rejected": other.get("rejected")})
    return {"source": config.data.source, "images": check.get("kept", sum(s["images"] for s in splits) or None),
            "rejected": check.get("rejected"), "patients": sum(s["patients"] for s in splits) or None,
            "classes": classes, "splits": splits, "external": external}


def _roi(run: RunDir, config: AuditConfig) -> str:
    """The ROI's name: the config's, else the prepared store's first (``prepared/store.json``)."""
    if config.roi:
        return config.roi
    store = run.prepared / "store.json"
    rois = read_json(store).get("rois", []) if store.is_file() else []
    return rois[0] if rois else "ROI"


def _localisation(run: RunDir) -> tuple[dict[tuple[str, str], list[str]], list[dict]]:
    """Sentences per (model, class) from ``analyses/localize/*.parquet`` tables with ``class`` and ``sentence``
    columns, and a line about every table found (its rows, whether sentences were read from it)."""
    sentences: dict[tuple[str, str], list[str]] = {}
    tables = []
    folder = run.analysis("localize")
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        table = pd.read_parquet(path)
        used = {"class", "sentence"} <= set(table.columns)
        if used:
            for _, row in table.iterrows():
                if isinstance(row["sentence"], str) and row["sentence"].strip():
                    model = row["model"] if "model" in table.columns and isinstance(row["model"], str) else ""
                    key = (model, str(row["class"]))
                    if row["sentence"] not in sentences.setdefault(key, []):
                        sentences[key].append(row["sentence"].strip())
        tables.append({"file": str(path.relative_to(run.root)), "rows": int(len(table)),
                       "columns": [str(c) for c in table.columns], "sentences": used})
    return sentences, tables


def _models(config: AuditConfig) -> list[dict]:
    """The audited models: a full audit's architecture per masking, or each probed model's source."""
    if config.kind == "probe":
        return [{"name": m.name, "source": m.source,
                 "from": " ".join(str(p) for p in (m.entry_point, m.weights, m.file) if p) or None}
                for m in config.models]
    return [{"name": s, "arch": config.model.arch, "weights": config.model.weights, "folds": config.folds,
             "trained_on": STRATEGIES[s].summary if s in STRATEGIES else s} for s in config.strategies]


def card_facts(run: RunDir) -> dict:
    """Everything the card says, JSON-able (``model_card.json``), read from the run directory alone.

    Raises
    ------
    MaskauditError
        The run has no verdict table (:func:`require_verdicts`).
    """
    verdict_path = require_verdicts(run)
    config = run_config(run)
    verdicts = pd.read_parquet(verdict_path)
    stages = read_json(run.stages) if run.stages.is_file() else {}
    fingerprint = stages.get("report", stages.get("verdict", {})).get("fingerprint")
    baseline_record = stages.get("baseline", {})
    located, localisation_tables = _localisation(run)
    roi = _roi(run, config)
    rows = []
    for _, v in verdicts.iterrows():
        model = str(v["model"]) if "model" in verdicts.columns else ""
        reading = str(v.get("reading") or "")
        weak = str(v.get("weak_evidence") or "")
        evidence = {}
        for name in EVIDENCE:
            cell = str(v.get(f"{name}_cell") or "")
            evidence[name] = None if not cell else {
                "cell": cell, **{key: _clean(v.get(f"{name}_{key}")) for key in ("auc", "ci_low", "ci_high")},
                "signal": bool(v.get(f"{name}_signal", False))}
        baseline = None
        if not _missing(_clean(v.get("baseline_auc"))):
            baseline = {key: _clean(v.get(f"baseline_{key}")) for key in ("auc", "ci_low", "ci_high", "p_full")}
            baseline["signal"] = bool(v.get("baseline_signal", False))
        sentences = located.get((model, str(v["class"])), [])
        rows.append({
            "model": model or None, "class": str(v["class"]), "verdict": str(v["verdict"]), "label": str(v["label"]),
            "reading": reading, "weak_evidence": weak, "evidence": evidence, "baseline": baseline,
            "attribution_ratio": _clean(v.get("attribution_ratio")),
            "localisation": sentences,
            "recommendation": RECOMMENDATIONS.get(str(v["verdict"]), "").format(
                cls=v["class"], roi=roi, columns=", ".join(baseline_record.get("columns", [])) or "the metadata")})
    versions = dict(software_versions())
    rules = config.analyses.verdict
    return {
        "title": config.report.title, "run": str(run.root.resolve()), "kind": config.kind,
        "fingerprint": fingerprint, "stage_fingerprints": {k: r.get("fingerprint") for k, r in stages.items()},
        "written": datetime.now(UTC).isoformat(timespec="seconds"), "maskaudit": __version__,
        "models": _models(config), "roi": roi, "spread": config.spread, "fill": config.fill,
        "strategies": list(config.strategies) if config.kind != "probe" else [],
        "adapted": ({"strategies": list(config.adapt.strategies), "layers": config.adapt.layers,
                     "epochs": config.adapt.epochs} if config.kind == "probe" and config.adapt.strategies else None),
        "test_strategies": config.eval_strategies, "folds": config.folds, "image_size": config.image_size,
        "rules": {"min_auc": rules.min_auc, "alpha": rules.alpha},
        "baseline": {"columns": baseline_record.get("columns"), "status": baseline_record.get("status"),
                     "ran": "baseline" in stages},
        "classes": rows, "data": _counts(run, config), "localisation_tables": localisation_tables,
        "software": {name: versions.get(name, "not installed") for name in CARD_PACKAGES},
    }


# ------------------------------------------------------------------------------------------ the Markdown


def _reading_without(reading: str, weak: str) -> str:
    """The verdict's reading less its weak-evidence notes (listed on their own line in the card)."""
    return " ".join(reading.replace(weak, "").split()) if weak else reading


def _bias_section(facts: dict) -> list[str]:
    data, roi = facts["data"], facts["roi"]
    probe = facts["kind"] == "probe"
    lines = ["## Bias, Risks, and Limitations", ""]
    if probe:
        names = ", ".join(f"`{m['name']}`" for m in facts["models"])
        lines += [f"A maskaudit probe scored the model{'s' if len(facts['models']) > 1 else ''} {names} as "
                  f"{'they are' if len(facts['models']) > 1 else 'it is'} on images with the {roi} (the region of "
                  "interest, ROI) removed or kept alone, to see where the evidence for each class lies. Per class:", ""]
    else:
        lines += [f"A maskaudit cross-masking audit trained {facts['models'][0]['arch']} models on images with the "
                  f"{roi} (the region of interest, ROI) removed or kept alone ({len(facts['strategies'])} maskings "
                  f"× {facts['folds']} folds) and tested each under every masking, to see where the evidence for "
                  "each class lies. Per class:", ""]
    for model, rows in _by_model(facts["classes"]):
        if probe and model:
            lines += [f"Model `{model}`:", ""]
        for row in rows:
            reading = _reading_without(row["reading"], row["weak_evidence"])
            lines.append(f"- **{row['class']}: {row['label']}.** {reading}")
            for sentence in row["localisation"]:
                if sentence not in row["reading"]:  # the verdict's reading holds it once localize has run
                    lines.append(f"  Localisation: {sentence}")
            if row["weak_evidence"]:
                lines.append(f"  Weak evidence: {row['weak_evidence']}")
        lines.append("")
    scope = (f"{data['images']} images of {data['patients']} patients ({data['source']} data)"
             if data["images"] and data["patients"] else f"the {data['source']} data audited")
    lines += [f"These verdicts describe the models on {scope}. They say where the signal lies (inside or outside "
              "the ROI, in its outline, in metadata), not whether the model is accurate or safe enough for clinical "
              "use; a verdict holds within the precision of its intervals, which are wide for a class with few "
              "hold-out images."]
    adapted = facts.get("adapted")
    if probe and adapted:
        maskings = ", ".join(f"`{s}`" for s in adapted["strategies"])
        lines += ["", f"This probe also fine-tuned a copy of each model on masked images ({maskings}; `adapt`, "
                      f"layers `{adapted['layers']}`, at most {adapted['epochs']} epochs) and read its verdicts from "
                      "those copies first: signal lost under one of these maskings is evidence, as in a full audit "
                      "(`maskaudit run`), for what a copy could learn from the model's own weights. Under the maskings "
                      "not adapted, signal lost may only mean that the masked images are unlike anything the model "
                      "saw."]
    elif probe:
        lines += ["", "A probe trains nothing on masked images: signal that survives masking is evidence, but signal "
                      "lost under masking may only mean that the masked images are unlike anything the model saw, so "
                      "\"relies on the ROI\" and \"unclear\" are weaker than in a full audit (`maskaudit run`), which "
                      "trains models on masked images."]
    lines += ["", "### Recommendations", ""]
    for model, rows in _by_model(facts["classes"]):
        for row in rows:
            if row["recommendation"]:
                who = f"`{model}`, " if probe and model else ""
                lines.append(f"- {who}{row['class']}: {row['recommendation']}")
    return [*lines, ""]


def _by_model(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    order: dict[str, list[dict]] = {}
    for row in rows:
        order.setdefault(row["model"] or "", []).append(row)
    return list(order.items())


def _evaluation_section(facts: dict) -> list[str]:
    data, roi, probe = facts["data"], facts["roi"], facts["kind"] == "probe"
    lines = ["## Evaluation", "", "### Testing Data, Factors & Metrics", "", "#### Testing Data", ""]
    splits = {s["split"]: s for s in data["splits"]}
    test = splits.get("hold-out test")
    if test:
        positives = ", ".join(f"{n} {name}" for name, n in test["positives"].items() if n is not None)
        lines.append(f"The hold-out test set: {test['images']} images of {test['patients']} patients "
                     f"(positives: {positives}), set apart by patient before any training.")
    kept = (f"In all, {data['images']} images of {data['patients']} patients were kept"
            if data["images"] and data["patients"] else "The data's counts are not in the run directory")
    rejected = f" ({data['rejected']} rejected at preparation)" if data.get("rejected") else ""
    totals = ", ".join(f"{name} {c['positives']}" for name, c in data["classes"].items() if c["positives"] is not None)
    lines.append(f"{kept}{rejected}" + (f"; positive images per class: {totals}." if totals else "."))
    folds = [s for name, s in splits.items() if name.startswith("fold ")]
    if folds and not probe:
        sizes = "; ".join(f"{s['split']}: {s['images']} images of {s['patients']} patients" for s in folds)
        lines.append(f"The rest was split by patient into {len(folds)} cross-validation folds, each model trained "
                     f"on all folds but one and stopped early on that one ({sizes}).")
    for ext in data["external"]:
        lines.append(f"External dataset {ext['name']} ({ext['source']}): {ext['images']} images, scored only.")
    lines += ["", "#### Factors", ""]
    if probe:
        lines.append(f"Each probed model was scored on the hold-out images under each masking of the {roi}:")
    else:
        trained = ", ".join(f"`{s}`" for s in facts["strategies"])
        lines.append(f"One model per masking ({trained}) and fold was trained, and each was tested under every "
                     f"masking of the {roi}:")
    lines += ["", *(f"- `{s}`: {STRATEGIES[s].summary if s in STRATEGIES else s}" for s in facts["test_strategies"]),
              "", f"The ROI is `{roi}` (spread {facts['spread']}, masked pixels filled with `{facts['fill']}`); images "
                  f"at {facts['image_size']} px."]
    rules = facts["rules"]
    lines += ["", "#### Metrics", "",
              "The area under the ROC curve (AUC) per class, with its 95 % DeLong confidence interval"
              + ("" if probe else f", the mean over the {facts['folds']} folds' models") + ", on the hold-out "
              f"images. An AUC shows signal when its interval's lower bound is above 0.5 and the AUC is at least "
              f"{rules['min_auc']:g}. "
              + _baseline_words(facts)]
    lines += ["", "### Results", "", _results_table(facts), "",
              "In bold: an AUC that shows signal. Cells are named trained→tested masking."]
    located = [(row, sentence) for row in facts["classes"] for sentence in row["localisation"]]
    if located:
        lines += ["", "Where the evidence lies (occlusion on a grid, `analyses/localize/`):", ""]
        lines += [f"- {'`' + row['model'] + '`, ' if probe and row['model'] else ''}{row['class']}: {sentence}"
                  for row, sentence in located]
    notes = [t for t in facts["localisation_tables"] if not t["sentences"]]
    if notes:
        lines += ["", "The localisation analysis's tables are in the run directory: " + "; ".join(
            f"`{t['file']}` ({t['rows']} rows)" for t in notes) + "."]
    return [*lines, ""]


def _baseline_words(facts: dict) -> str:
    base, rules = facts["baseline"], facts["rules"]
    if base["columns"]:
        return (f"The metadata baseline is a logistic regression on {', '.join(base['columns'])} alone, fitted per "
                f"fold; DeLong's paired test (alpha {rules['alpha']:g}) asks whether an image model does better.")
    if base["status"]:
        return f"No metadata baseline: {base['status']}."
    return "No metadata baseline in this run (`analyses.run` leaves out `baseline`)."


def _results_table(facts: dict) -> str:
    probe = facts["kind"] == "probe"
    header = (["model"] if probe else []) + ["class", "verdict", *EVIDENCE.values(), "metadata baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in facts["classes"]:
        cells = []
        for name in EVIDENCE:
            cell = row["evidence"][name]
            if cell is None:
                cells.append("—")
                continue
            value = _auc(cell["auc"], cell["ci_low"], cell["ci_high"])
            cells.append(f"{cell['cell']} " + (f"**{value}**" if cell["signal"] else value))
        base = row["baseline"]
        base_text = "—" if base is None else (
            (f"**{_auc(base['auc'], base['ci_low'], base['ci_high'])}**" if base["signal"]
             else _auc(base["auc"], base["ci_low"], base["ci_high"])) + f" (vs full: p {_p(base['p_full'])})")
        lines.append("| " + " | ".join([*([row["model"] or ""] if probe else []), row["class"], row["label"], *cells,
                                        base_text]) + " |")
    return "\n".join(lines)


def _software_section(facts: dict) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in facts["software"].items())
    fingerprint = (f"`{facts['fingerprint']}` (the report stage's in `stages.json`: a digest of the configuration and "
                   "of every stage before it)" if facts["fingerprint"] else "not recorded (the report stage has not "
                                                                             "run)")
    return ["## Technical Specifications", "", "### Software", "",
            f"Audited with maskaudit; software installed when this card was written: {versions}.",
            f"Run fingerprint: {fingerprint}; run directory `{facts['run']}`, whose `report.html` holds the AUC "
            "matrices and every analysis.", ""]


def card_markdown(facts: dict) -> str:
    """The card's Markdown (``model_card.md``) from :func:`card_facts`."""
    head = [f"# Model card sections: {facts['title']}", "",
            f"<!-- Written by maskaudit {facts['maskaudit']} on {facts['written']} from {facts['run']}. Each section "
            "is named as in the Hugging Face model card template: paste it under the section of the same name. -->", ""]
    return "\n".join([*head, *_bias_section(facts), *_evaluation_section(facts), *_software_section(facts)])


def write_model_card(run: RunDir) -> tuple[Path, Path]:
    """Write ``model_card.md`` and ``model_card.json`` into the run directory (each atomically); their paths."""
    facts = card_facts(run)
    markdown, json_path = run.model_card
    write_text(markdown, card_markdown(facts))
    write_json(json_path, facts)
    return markdown, json_path
