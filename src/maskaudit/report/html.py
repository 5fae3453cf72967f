"""The run's report: one self-contained HTML file (figures inlined, no network requests).

The report reads only the run directory: the metric and analysis tables, the figures and the
training histories. Every image is downscaled before it is inlined (see :data:`WIDTHS`), so a
PadChest-size run stays well under 20 MB. A stage that did not run, or an analysis left out of
``analyses.run``, gets a line that says so instead of an empty space: a run in progress (stopped
after ``prepare``, after ``split``, mid-training) renders what it has, each missing section marked
"not run yet" with the commands that make it. Nothing outside the run directory is opened, and
neither the prepared store nor the pipeline is needed: the configuration is the run's ``config.yaml``,
the data tables are the counts ``prepare`` and ``split`` keep (``counts/prepared``, ``counts/splits``:
:meth:`~maskaudit.rundir.RunDir.counts`) and the data checks are ``checks/<dataset>.json``.

What differs between the report of a full audit and a probe's (the AUC matrices' corner, the
introduction of the verdict, the training section, whether a train stage is still needed) is a
:class:`ReportView`: the default is a full audit's; :func:`maskaudit.probe_report.probe_view` a probe's.

Where the evidence is weak (:func:`maskaudit.analyses.evidence.evidence_flags`: few positives or
negatives, scores below chance, a fold's model at chance on its validation images, a baseline on
fewer images), the number carries a ⚠ with the reason on hover, the reasons are listed under its
table, and the verdict's reading ends with them.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from maskaudit import __version__
from maskaudit.analyses.evidence import (
    FLAG_COLUMNS,
    run_evidence_flags,
    undertrained_flags,
    undertraining_advice,
    verdict_notes,
)
from maskaudit.analyses.run import ANALYSES
from maskaudit.analyses.verdict import VERDICTS
from maskaudit.config import STAGES, AuditConfig, load_config
from maskaudit.data.check import read_check
from maskaudit.report.figures import auc_colour, save_figure, training_curves
from maskaudit.report.parts import (
    Table,
    _cell,
    _fmt,
    _missing,
    fmt_auc,
    fmt_p,
    frame_table,
    inline_image,
)
from maskaudit.rundir import RunDir, read_json, write_text

if TYPE_CHECKING:
    from collections.abc import Callable

#: What a number whose evidence is weak carries (its reasons on hover and in the list under its table).
WEAK = "⚠"

#: Packages whose versions the report lists.
PACKAGES = ("maskaudit", "torch", "torchvision", "numpy", "pandas", "scikit-learn", "shap", "matplotlib")

#: Each analysis's title (its section's heading), from the registry.
ANALYSIS_TITLES = {name: analysis.title for name, analysis in ANALYSES.items()}


@dataclass(frozen=True)
class ReportView:
    """What differs between the reports of two kinds of audit; ``ReportView()`` is a full audit's.

    Attributes
    ----------
    corner : str
        The corner of each AUC matrix: what its rows are, then its columns.
    models_label : str
        What a row of an AUC matrix is, in words (the heatmaps' axis).
    trains : bool
        Whether the run has a train stage: without one, the commands a missing section still needs skip it.
    notice : str
        Plain text (escaped) at the top of the verdict section, in place of the full audit's introduction;
        empty: the full audit's.
    models_section : callable, optional
        ``(run, config) -> dict`` in place of :func:`training_section`: ``title`` and ``intro`` (plain text)
        of the section and its ``table`` (a :class:`Table`); None: the training curves.
    rows_are, cells_are : str
        What an AUC matrix's rows and cells are, in the words of the matrices' introduction.
    """

    corner: str = "train \\ test"
    models_label: str = "training masking"
    trains: bool = True
    notice: str = ""
    models_section: Callable[[RunDir, AuditConfig], dict] | None = None
    rows_are: str = "the masking a model was trained with"
    cells_are: str = "the mean AUC over the folds' models on the hold-out test set"


def run_config(run: RunDir) -> AuditConfig:
    """The run's own configuration (``config.yaml``); its data and model files need not exist any more."""
    return load_config(run.config, check_files=False)


# ------------------------------------------------------------------------------------------ images


# ------------------------------------------------------------------------------------------ tables


def _no_flags() -> pd.DataFrame:
    return pd.DataFrame(columns=FLAG_COLUMNS)


def cell_flags(flags: pd.DataFrame, dataset: str, split: str, class_name: str, train: str, test: str) -> list[str]:
    """The reasons one cell's number is weak: its own flags, its split's counts, and its models' folds at chance
    on their validation images (a fold mean of the hold-out or validation set takes every fold's model)."""
    if flags is None or not len(flags):
        return []
    part = flags[(flags["dataset"] == dataset) & (flags["split"] == split) & (flags["class"] == class_name)]
    own = (part["train_strategy"] == train) & (part["test_strategy"] == test)
    few = part["kind"] == "few_images"
    reasons = list(part.loc[few | own, "text"])
    if dataset == "main" and split in ("test", "val"):
        models = flags[flags["kind"].isin(["val_chance", "undertrained"]) & (flags["class"] == class_name)
                       & (flags["train_strategy"] == train)]
        reasons += [text for text in models["text"] if text not in reasons]
    return reasons


def _marked(cell: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    """``cell`` with the weak-evidence mark and its reasons appended to the hover text."""
    if reasons:
        cell["mark"] = WEAK
        title = cell["title"].rstrip()
        cell["title"] = " ".join([f"{title}." if title and title[-1] not in ".)" else title, *reasons]).strip()
    return cell


def auc_matrix_table(matrix: pd.DataFrame, class_name: str, split: str, config: AuditConfig, caption: str,
                     dataset: str = "main", flags: pd.DataFrame | None = None,
                     corner: str = ReportView.corner) -> Table | None:
    """One class's AUC matrix as a coloured table (the study's layout); CI, std and folds on hover.

    Parameters
    ----------
    matrix : DataFrame
        ``metrics/auc_matrix.parquet``.
    class_name, split, dataset : str
        Which rows of ``matrix``.
    config : AuditConfig
        Gives the order of the test strategies (columns); the rows are :func:`matrix_models`.
    caption : str
        The table's caption.
    flags : DataFrame, optional
        :func:`maskaudit.analyses.evidence.evidence_flags`: a weak cell is marked :data:`WEAK`, its reasons
        on hover.
    corner : str
        The table's corner (:attr:`ReportView.corner`).

    Returns
    -------
    Table or None
        None when the split has no AUC of this class.
    """
    part = matrix[(matrix["class"] == class_name) & (matrix["split"] == split) & (matrix["dataset"] == dataset)]
    if part.empty or part["auc_mean"].isna().all():
        return None
    cells = part.set_index(["train_strategy", "test_strategy"])
    tests = [s for s in config.eval_strategies if s in set(part["test_strategy"])]
    table = Table(caption, [corner, *tests], corner=True)
    for train in matrix_models(matrix):
        row = [_cell(train, left=True)]
        for test in tests:
            if (train, test) not in cells.index:
                row.append(_cell("n/a", title=f"{train}→{test}: not scored", style="background:#d9d9d9"))
                continue
            r = cells.loc[(train, test)]
            background, text = auc_colour(float(r["auc_mean"]) if not _missing(r["auc_mean"]) else np.nan)
            title = f"{train}→{test}: AUC {fmt_auc(r['auc_mean'], r['ci_low'], r['ci_high'])}"
            if not _missing(r["auc_std"]):
                title += f", ± {r['auc_std']:.3f} over {int(r['n_folds'])} folds"
            if not _missing(r.get("n_pos")) and not _missing(r.get("n_neg")):
                title += f", {int(r['n_pos'])} positives and {int(r['n_neg'])} negatives"
            if r.get("reason"):
                title += f" ({r['reason']})"
            value = "n/a" if _missing(r["auc_mean"]) else f"{r['auc_mean']:.3f}"
            cell = _cell(value, title=title, style=f"background:{background};color:{text}")
            row.append(_marked(cell, cell_flags(flags, dataset, split, class_name, train, test)))
        table.rows.append(row)
    return table


# ------------------------------------------------------------------------------------------ sections


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def matrix_models(matrix: pd.DataFrame) -> list[str]:
    """The rows of an AUC matrix (``metrics/auc_matrix``): each model's name (its training strategy, or a probed
    model's name), in the order the run made them."""
    return list(dict.fromkeys(matrix["train_strategy"].astype(str)))


def _datasets(config: AuditConfig) -> list[str]:
    """``main``, then each external dataset's name."""
    return ["main", *(ext.name for ext in config.external)]


def data_tables(run: RunDir, config: AuditConfig, view: ReportView, stages: dict | None = None) -> dict[str, Any]:
    """Counts kept/rejected by reason, and per split: images, patients, positives per class.

    Read from the tables ``prepare`` and ``split`` keep in the run directory (``counts/prepared`` and
    ``counts/splits``, :meth:`~maskaudit.rundir.RunDir.counts`); the prepared store is not opened. ``status``
    and ``split_status`` say what is missing: a table not there, or its stage not finished (``stages.json``).
    """
    stages = _stage_records(run) if stages is None else stages
    names = _datasets(config)
    counts = _read(run.counts("prepared"))
    if counts is not None:
        counts = counts[counts["dataset"].isin(names)].reset_index(drop=True)
    present = set() if counts is None else set(counts["dataset"])
    tables: dict[str, Any] = {"status": "", "split_status": ""}
    unfinished = names if "prepare" not in stages else [name for name in names if name not in present]
    if "main" not in present:
        tables["status"] = f"not prepared yet: {_commands(run, ['prepare'])}"
    elif unfinished:
        tables["status"] = (f"not prepared yet ({', '.join(unfinished)}: the preparation has not finished): "
                            f"{_commands(run, ['prepare'])}")
    if present:
        counts = counts.assign(reason=counts["reason"].replace("", "—"))
        tables["counts"] = counts[["status", "reason", "rows", "dataset"]]
    splits = _read(run.counts("splits"))
    if "main" not in present or splits is None or "split" not in stages:
        tables["split_status"] = f"not run yet: {_commands(run, [*_missing_before(view, 'split', stages), 'split'])}"
        return tables
    tables["splits"] = splits
    return tables


def data_checks(run: RunDir, config: AuditConfig) -> list[dict[str, Any]]:
    """The data check ``prepare`` kept of each dataset (``checks/<name>.json``): main, then external sets."""
    checks = [read_check(run.check(name)) for name in _datasets(config)]
    return [check.to_dict() for check in checks if check is not None]


#: The stages a section needs, in order; each is one command (``maskaudit analyse NAME`` for an analysis).
_CHAIN = ("prepare", "split", "train", "predict", "metrics")


def _command(run: RunDir, stage: str) -> str:
    name = f"analyse {stage}" if stage in ANALYSIS_TITLES else stage
    return f"`maskaudit {name} --out {run.root}`"


def _commands(run: RunDir, stages: list[str]) -> str:
    """The commands that make ``stages``, in order: ``maskaudit split --out RUN``, then …"""
    commands = [_command(run, stage) for stage in stages]
    return commands[0] + (f", then {', '.join(commands[1:])}" if len(commands) > 1 else "")


def _missing_before(view: ReportView, stage: str, stages: dict) -> list[str]:
    """The stages before ``stage`` in :data:`_CHAIN` that have not finished (train only where the view trains)."""
    chain = [s for s in _CHAIN if view.trains or s != "train"]
    before = chain[:chain.index(stage)] if stage in chain else chain
    return [s for s in before if s not in stages]


def _stage_records(run: RunDir) -> dict:
    return read_json(run.stages) if run.stages.is_file() else {}


def _pending(run: RunDir, view: ReportView, stages: dict, stage: str) -> str:
    """``not run yet: `maskaudit <stage> --out RUN``` after the commands of the stages it still needs."""
    return f"not run yet: {_commands(run, [*_missing_before(view, stage, stages), stage])}"


def _status(run: RunDir, config: AuditConfig, view: ReportView, stages: dict, name: str) -> str:
    """Why an analysis shows nothing (or a note it left), empty when it ran without one."""
    if name not in config.analyses.run:
        return "not in analyses.run"
    record = stages.get(name)
    if not record:
        return _pending(run, view, stages, name)
    return str(record.get("status", ""))


def _flag_texts(flags: pd.DataFrame, **where: str) -> list[str]:
    """The texts of the flags whose columns equal ``where`` (e.g. ``dataset="main", split="test"``)."""
    if flags is None or not len(flags):
        return []
    chosen = np.ones(len(flags), dtype=bool)
    for column, value in where.items():
        chosen &= (flags[column] == value).to_numpy()
    return list(flags.loc[chosen, "text"])


def auc_sections(run: RunDir, config: AuditConfig, view: ReportView, matrix: pd.DataFrame | None,
                 flags: pd.DataFrame | None = None,
                 stages: dict | None = None) -> tuple[list[dict], list[Table], list[str]]:
    """Per class: the heatmap figure, the coloured hold-out table and its weak evidence; then hold-out vs
    validation vs external, and the weak evidence of the validation and external cells."""
    flags = _no_flags() if flags is None else flags
    pending = _pending(run, view, _stage_records(run) if stages is None else stages, "metrics")
    classes = []
    for name in config.classes:
        entry = {"name": name, "heatmap": inline_image(run.figures / f"auc_{name}.png", "heatmap"), "table": None,
                 "pending": pending, "weak": _flag_texts(flags, dataset="main", split="test", **{"class": name})
                 + _flag_texts(flags, dataset="main", split="val", **{"class": name})}
        baseline = set(_flag_texts(flags, train_strategy="metadata"))  # in the baseline's section
        entry["weak"] = [t for t in entry["weak"] if not t.startswith("Validation: ") and t not in baseline]
        if matrix is not None:
            entry["table"] = auc_matrix_table(matrix, name, "test", config, f"{name}: hold-out AUC, mean of folds "
                                                                              "(hover a cell for its 95 % CI)",
                                              flags=flags, corner=view.corner)
        classes.append(entry)
    if matrix is None:
        return classes, [], []
    splits = [("main", "test", "hold-out"), ("main", "val", "validation")]
    splits += [(ext.name, "external", f"external: {ext.name}") for ext in config.external]
    keyed = matrix.set_index(["dataset", "split", "class", "train_strategy", "test_strategy"]).sort_index()
    present = [s for s in splits if (s[0], s[1]) in set(zip(matrix["dataset"], matrix["split"], strict=True))]
    comparison = []
    for name in config.classes:
        diagonal = Table(f"{name}: AUC [95 % CI] of each model on its own masking, per split (mean of folds)",
                         ["train → test", *[label for _, _, label in present]])
        table = Table(f"{name}: every cell, per split", diagonal.header)
        for train in matrix_models(matrix):
            for test in config.eval_strategies:
                row = [_cell(f"{train} → {test}", left=True)]
                for dataset, split, _ in present:
                    key = (dataset, split, name, train, test)
                    if key in keyed.index:
                        r = keyed.loc[key]
                        cell = _cell(fmt_auc(r["auc_mean"], r["ci_low"], r["ci_high"]) or "n/a")
                        row.append(_marked(cell, cell_flags(flags, dataset, split, name, train, test)))
                    else:
                        row.append(_cell(""))
                if any(c["text"] for c in row[1:]):
                    table.rows.append(row)
                    if train == test:
                        diagonal.rows.append(row)
        table.folded = True
        comparison.append({"diagonal": diagonal, "all": table})
    others = flags[(flags["dataset"] != "main") | ((flags["split"] == "val") & flags["kind"].isin(
        ["reversed", "below_chance"]))] if len(flags) else flags
    weak = [f"{r['class']}: {r['text']}" for _, r in others.iterrows()]
    return classes, comparison, weak


def baseline_section(run: RunDir, config: AuditConfig, flags: pd.DataFrame | None = None) -> dict:
    """The metadata baseline's AUCs (weak evidence marked), its DeLong tests, and every model's fold-mean
    DeLong test vs full→full."""
    flags = _no_flags() if flags is None else flags
    tables = []
    auc = _read(run.analysis("baseline") / "baseline_auc.parquet")
    if auc is not None and len(auc):
        means = auc[auc["fold"] == "mean"]

        def weak(r: pd.Series) -> list[str]:
            return _flag_texts(flags, train_strategy="metadata", **{"class": r["class"]})

        table = frame_table(means, "metadata baseline: hold-out AUC [95 % CI], fold mean", {
            "class": lambda r: str(r["class"]),
            "AUC [95 % CI]": lambda r: fmt_auc(r["auc"], r["ci_low"], r["ci_high"]) or "n/a",
            "positives": lambda r: _fmt(r["n_pos"]), "negatives": lambda r: _fmt(r["n_neg"]),
            "note": lambda r: " ".join(t for t in [_fmt(r["reason"]), *weak(r)] if t),
        })
        for row, (_, r) in zip(table.rows, means.iterrows(), strict=True):
            if len(row) > 1 and table.header[1] == "AUC [95 % CI]":
                _marked(row[1], weak(r))
        tables.append(table)
    tests = _read(run.analysis("baseline") / "baseline_tests.parquet")
    if tests is not None and len(tests):
        means = tests[tests["fold"] == "mean"]
        tables.append(frame_table(means, "DeLong test: metadata baseline against image models (fold mean)", {
            "class": lambda r: str(r["class"]), "image model": lambda r: str(r["model"]),
            "AUC baseline": lambda r: _fmt(r["auc_baseline"]), "AUC model": lambda r: _fmt(r["auc_model"]),
            "difference": lambda r: _fmt(r["difference"]), "z": lambda r: _fmt(r["z"]),
            "p": lambda r: fmt_p(r["p_value"]), "images": lambda r: _fmt(r["n_images"]),
            "note": lambda r: _fmt(r["reason"]),
        }))
    delong = _read(run.metrics / "delong.parquet")
    delong_tables = []
    if delong is not None and len(delong):
        means = delong[(delong["fold"] == "mean") & (delong["split"] == "test") & (delong["dataset"] == "main")]
        for name in config.classes:
            part = means[means["class"] == name]
            if len(part):
                table = frame_table(part, f"{name}: each model against {part['reference'].iloc[0]} "
                                          "(DeLong, hold-out, fold mean)", {
                    "train → test": lambda r: f"{r['train_strategy']} → {r['test_strategy']}",
                    "AUC": lambda r: _fmt(r["auc"]), "AUC reference": lambda r: _fmt(r["auc_reference"]),
                    "difference": lambda r: _fmt(r["difference"]), "z": lambda r: _fmt(r["z"]),
                    "p": lambda r: fmt_p(r["p_value"]), "images": lambda r: _fmt(r["n_images"]),
                    "note": lambda r: _fmt(r["reason"]),
                })
                table.folded = True
                delong_tables.append(table)
    return {"tables": tables, "delong": delong_tables}


def explain_section(run: RunDir, config: AuditConfig) -> dict:
    """SHAP panels (one per explained pair and class) and the attribution-inside-ROI table."""
    roi = _read(run.analysis("explain") / "attribution_in_roi.parquet")
    pairs = [] if roi is None else list(dict.fromkeys(zip(roi["train_strategy"], roi["test_strategy"], strict=True)))
    panels = []
    for train, test in pairs:  # the pairs the explain stage explained, in its order
        for name in config.classes:
            uri = inline_image(run.figures / f"explain_{train}_{test}_{name}.png", "panel")
            if uri:
                panels.append({"caption": f"{name}: {train} → {test}", "uri": uri})
    tables = []
    if roi is not None and len(roi):
        table = Table("share of the positive attribution inside the ROI / the ROI's share of the image "
                      "(× ratio; above 1: the attribution concentrates in the ROI); hover for the number of images",
                      ["train → test", *config.classes])
        keyed = roi.set_index(["train_strategy", "test_strategy", "class"])
        for train, test in pairs:
            row = [_cell(f"{train} → {test}", left=True)]
            for name in config.classes:
                if (train, test, name) not in keyed.index:
                    row.append(_cell(""))
                    continue
                r = keyed.loc[(train, test, name)]
                text = f"{_fmt(r['in_roi'])} / {_fmt(r['roi_area'])} (×{r['ratio']:.2f})" \
                    if not _missing(r["ratio"]) else "n/a"
                row.append(_cell(text, title=f"{int(r['n_images'])} images"))
            table.rows.append(row)
        tables.append(table)
    return {"panels": panels, "tables": tables}


def embed_section(run: RunDir) -> dict:
    cosine = _read(run.analysis("embed") / "cosine.parquet")
    tables = []
    if cosine is not None and len(cosine):
        tables.append(frame_table(cosine, "cosine similarity between each image's full and masked embedding", {
            "strategy": lambda r: str(r["strategy"]), "images": lambda r: str(r["group"]),
            "mean ± std": lambda r: f"{r['mean']:.3f} ± {r['std']:.3f}" if not _missing(r["std"]) else _fmt(r["mean"]),
            "n": lambda r: _fmt(r["n"]),
        }))
    return {"figures": [u for u in [inline_image(run.figures / "tsne.png")] if u], "tables": tables}


def sweep_section(run: RunDir) -> dict:
    """The dilation sweep's figure per swept model (those of ``sweep.parquet``) and its table."""
    sweep = _read(run.analysis("sweep") / "sweep.parquet")
    swept = [] if sweep is None else list(dict.fromkeys(sweep["train_strategy"]))
    figures = [inline_image(run.figures / f"sweep_{s}.png") for s in swept]
    tables = []
    if sweep is not None and len(sweep):
        table = frame_table(sweep, "AUC against the ROI's dilation, mean ± std over folds", {
            "train → test": lambda r: f"{r['train_strategy']} → {r['test_strategy']}",
            "spread (at 512 px)": lambda r: _fmt(r["spread"]), "spread here (px)": lambda r: _fmt(r["spread_px"]),
            "class": lambda r: str(r["class"]),
            "AUC": lambda r: f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f}" if not _missing(r["auc_mean"]) else "n/a",
            "folds": lambda r: _fmt(r["n_folds"]),
        })
        table.folded = True
        tables.append(table)
    return {"figures": [u for u in figures if u], "tables": tables}


def reader_section(run: RunDir) -> dict:
    """Thumbnails of the reader-study images with strategy, class, percentile and probability (not blinded)."""
    selection = _read(run.analysis("reader") / "selection.parquet")
    groups: list[dict] = []
    if selection is None:
        return {"groups": groups, "tables": []}
    labels = [c for c in selection.columns if c.startswith("label_")]
    for strategy, part in selection.groupby("strategy", sort=False):
        cases = []
        for _, r in part.iterrows():
            positive = [c.removeprefix("label_") for c in labels if r[c] == 1]
            cases.append({
                "uri": inline_image(run.analysis("reader") / "images" / str(r["file"]), "thumbnail"),
                "file": str(r["file"]), "image_id": str(r["image_id"]), "class": str(r["class"]),
                "percentile": f"{r['percentile']:g}", "probability": f"{r['probability']:.3f}",
                "labels": ", ".join(positive) or "none",
            })
        by_class: dict[str, list[dict]] = {}
        for case in cases:
            by_class.setdefault(case["class"], []).append(case)
        groups.append({"strategy": str(strategy), "classes": by_class})
    return {"groups": groups, "tables": [], "results": reader_results(run.analysis("reader_study"))}


def _rate(row: pd.Series, name: str) -> str:
    return fmt_auc(row.get(name), row.get(f"{name}_low"), row.get(f"{name}_high"))


def reader_results(folder: Path) -> dict | None:
    """The readers' answers scored by ``maskaudit reader analyse``: readers and models side by side, kappas."""
    readers = _read(folder / "readers.parquet")
    if readers is None:
        return None
    model = _read(folder / "model.parquet")
    pairs, fleiss = _read(folder / "kappa_pairs.parquet"), _read(folder / "kappa_fleiss.parquet")
    summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    tables = []
    for name, part in readers.groupby("class", sort=False):
        rows = [{"strategy": r["strategy"], "who": f"reader {r['reader']}", "n": f"{r['n_answered']} / {r['n_cases']}",
                 "pos / neg": f"{r['n_pos']} / {r['n_neg']}", "cannot tell": str(r["n_cannot_tell"]),
                 "TP FN TN FP": f"{r['tp']} {r['fn']} {r['tn']} {r['fp']}", "sensitivity": _rate(r, "sensitivity"),
                 "specificity": _rate(r, "specificity"), "AUC": _rate(r, "auc"), "note": r["reason"]}
                for _, r in part.iterrows()]
        if model is not None and len(model):
            for _, r in model[model["class"] == name].iterrows():
                counts = "" if _missing(r.get("tp")) else f"{int(r['tp'])} {int(r['fn'])} {int(r['tn'])} {int(r['fp'])}"
                rows.append({"strategy": r["strategy"], "who": f"model {r['model']} (fold {r['fold']}, p ≥ "
                             f"{r['threshold']:g})", "n": str(r["n_images"]),
                             "pos / neg": "" if _missing(r.get("n_pos")) else f"{int(r['n_pos'])} / {int(r['n_neg'])}",
                             "cannot tell": "", "TP FN TN FP": counts, "sensitivity": _rate(r, "sensitivity"),
                             "specificity": _rate(r, "specificity"), "AUC": _rate(r, "auc"), "note": r["reason"]})
        frame = pd.DataFrame(rows).sort_values(["strategy", "who"], kind="stable")
        level = f"{100 * summary.get('level', 0.95):g} %"
        table = frame_table(frame, f"{name}: each reader and the model on the same images, by masking "
                                   f"({level} Wilson / DeLong intervals)", columns=list(frame.columns))
        table.folded = False
        tables.append(table)
    if fleiss is not None and len(fleiss):
        kappas = fleiss.rename(columns={"kappa": "Fleiss κ", "n_cases": "cases read by all", "reason": "note"})
        if pairs is not None and len(pairs):
            cohen = pairs.assign(pair=pairs["reader_a"] + "–" + pairs["reader_b"] + ": " + pairs["kappa"].map(
                lambda v: "n/a" if _missing(v) else f"{v:.2f}"))
            kappas = kappas.merge(cohen.groupby(["strategy", "class"])["pair"].agg("; ".join).rename(
                "Cohen κ per pair").reset_index(), on=["strategy", "class"], how="left")
        tables.append(frame_table(kappas, "agreement between readers on present / absent / cannot tell: Fleiss' "
                                          "kappa over the cases every reader answered, Cohen's kappa per pair",
                                  columns=[c for c in ("strategy", "class", "n_readers", "cases read by all",
                                                       "Fleiss κ", "Cohen κ per pair", "note") if c in kappas]))
    return {"tables": tables, "readers": ", ".join(summary.get("readers", [])), "score": summary.get("score", ""),
            "threshold": summary.get("model_threshold", ""), "model_note": summary.get("model_note", "")}


def training_section(run: RunDir, config: AuditConfig) -> dict:
    """Training curves per job (figure written to figures/training_curves.*) and each job's kept epoch."""
    histories: dict[str, dict[int, pd.DataFrame]] = {}
    rows = []
    for strategy in config.strategies:
        for fold in range(config.folds):
            path = run.job(strategy, fold) / "history.csv"
            if not path.is_file():
                rows.append({"job": f"{strategy}/fold_{fold}", "epochs": "", "best epoch": "",
                             "best val loss": "", "note": "no history.csv: not trained"})
                continue
            history = pd.read_csv(path)
            histories.setdefault(strategy, {})[fold] = history
            best = history[history["best"].astype(str).str.lower() == "true"] if "best" in history else history[:0]
            kept = best.iloc[-1] if len(best) else None
            rows.append({"job": f"{strategy}/fold_{fold}", "epochs": len(history),
                         "best epoch": "" if kept is None else int(kept["epoch"]),
                         "best val loss": "" if kept is None else f"{kept['val_loss']:.3f}", "note": ""})
    uri = None
    if histories:
        save_figure(training_curves(histories), run.figures / "training_curves", config.report.formats)
        uri = inline_image(run.figures / "training_curves.png")
    table = frame_table(pd.DataFrame(rows), "each job's training: epochs run and the epoch kept (lowest "
                                            "validation loss)", columns=["job", "epochs", "best epoch",
                                                                         "best val loss", "note"])
    return {"figure": uri, "table": table, "pending": _pending(run, ReportView(), _stage_records(run), "train"),
            **undertrained_table(run)}


def undertrained_table(run: RunDir) -> dict:
    """The jobs whose kept weights are at chance for a class on their validation images, with the advice that fits
    (``metrics/training``; :func:`maskaudit.analyses.evidence.undertrained_flags`)."""
    training = _read(run.metrics / "training.parquet")
    if training is None or not len(training):
        return {"undertrained": None, "advice": ""}
    flags = pd.DataFrame(undertrained_flags(training[training["kept_learnt"].notna()]), columns=FLAG_COLUMNS)
    if not len(flags):
        return {"undertrained": None, "advice": ""}
    table = Table(f"{len(flags)} of {len(training)} (job, class) pairs: kept weights at chance on the job's own "
                  "validation images (CI lower bound at most 0.5)", ["job", "class", "what happened"])
    for _, f in flags.iterrows():
        table.rows.append([_cell(f"{f['train_strategy']}/fold_{f['fold']}", left=True), _cell(f["class"], left=True),
                           _cell(f["text"], left=True)])
    return {"undertrained": table, "advice": undertraining_advice(flags)}


def software_versions() -> list[tuple[str, str]]:
    """Python and the versions of :data:`PACKAGES` installed (``not installed`` for a missing one)."""
    versions = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, __version__ if name == "maskaudit" else "not installed"))
    versions.append(("platform", platform.platform()))
    return versions


def stage_rows(stages: dict, config: AuditConfig) -> list[dict]:
    """One row per stage: when it finished, its seconds and notes, or why it did not run."""
    skip = {"fingerprint", "finished", "seconds", "inputs"}
    rows = []
    for name in STAGES:
        record = stages.get(name)
        if record is None and name != "report":
            note = "not in analyses.run" if name in ANALYSIS_TITLES and name not in config.analyses.run \
                else "not run"
            rows.append({"name": name, "finished": "", "seconds": "", "note": note, "missing": True})
            continue
        if record is None:  # the report itself, written the first time
            rows.append({"name": name, "finished": "", "seconds": "", "note": "this page", "missing": False})
            continue
        notes = [f"{k}: {_short(v)}" for k, v in record.items() if k not in skip]
        rows.append({"name": name, "finished": record.get("finished", ""),
                     "seconds": f"{record['seconds']:.1f}" if isinstance(record.get("seconds"), int | float) else "",
                     "note": "; ".join(notes), "missing": False})
    return rows


def _short(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(_short, value))
    return str(value)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("maskaudit", "report/templates"), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = _fmt
    return env


def verdict_rows(verdicts: pd.DataFrame | None, flags: pd.DataFrame | None,
                 config: AuditConfig) -> list[dict[str, Any]]:
    """The verdict table's rows: the reading, then its weak-evidence notes (those the verdict stage did not
    write into the reading are added from ``flags``, so the notes follow the run's current tables)."""
    if verdicts is None:
        return []
    flags = _no_flags() if flags is None else flags
    colours = {}
    for key, (_, colour) in VERDICTS.items():
        r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
        colours[key] = (colour, "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "#fff")
    rows = []
    for _, v in verdicts.iterrows():
        reading, notes = str(v["reading"]), []
        if v["verdict"] not in ("not_predicted", "undetermined"):
            cells = [str(v[f"{n}_cell"]) for n in ("full", "inside", "outside", "shape")
                     if isinstance(v.get(f"{n}_cell"), str) and v.get(f"{n}_cell")]
            notes = verdict_notes(flags[flags["class"] == v["class"]], cells, config.analyses.verdict.evidence)
            for note in notes:  # shown apart from the reading, in the order of verdict_notes
                reading = reading.replace(f" {note}", "")
        rows.append({"model": v.get("model", ""), "class": v["class"], "label": v["label"], "reading": reading,
                     "notes": notes, "colour": colours.get(v["verdict"], ("#ffffff", "#000"))})
    return rows


def report_inputs(run: RunDir) -> str:
    """What the report shows, in short: every other stage's record and each job's training history.

    The report stage is redone when it changes, so that the report of a run in progress follows the run.
    """
    import hashlib
    import json

    records = {k: v for k, v in _stage_records(run).items() if k != "report"}
    histories = sorted((str(p.relative_to(run.root)), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in run.root.glob("jobs/*/fold_*/history.csv"))
    return hashlib.sha256(json.dumps([records, histories], sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_report(run: RunDir, view: ReportView) -> dict:
    """Render ``report.html`` from the run directory alone (see the module's docstring).

    Parameters
    ----------
    run : RunDir
        The run; only its files are read, its configuration from its ``config.yaml``. Any stage may be
        missing: its sections say so.
    view : ReportView
        The kind of audit: ``ReportView()`` for a full audit, :func:`maskaudit.probe_report.probe_view`
        for a probe.

    Returns
    -------
    dict
        ``{"bytes": size of the report}``, recorded in ``stages.json``.
    """
    config = run_config(run)
    matrix = _read(run.metrics / "auc_matrix.parquet")
    stages = _stage_records(run)
    flags = run_evidence_flags(run, config.analyses.verdict.evidence)
    classes, comparison, weak_others = auc_sections(run, config, view, matrix, flags, stages)
    verdicts = _read(run.analysis("verdict") / "verdict.parquet")
    analyses = {
        "baseline": baseline_section(run, config, flags), "explain": explain_section(run, config),
        "embed": embed_section(run), "sweep": sweep_section(run), "reader": reader_section(run),
    }
    added = {name: a.section(run, config) for name, a in ANALYSES.items() if name not in analyses
             and a.section is not None and name in config.analyses.run}  # an analysis added to the registry
    analyses.update(added)
    for name, section in analyses.items():
        section["status"] = _status(run, config, view, stages, name)
        section["title"] = ANALYSIS_TITLES[name]
    verdict_status = _status(run, config, view, stages, "verdict")
    if verdicts is None and not verdict_status.startswith("not "):  # recorded, but its table is gone
        verdict_status = f"not run yet: {_commands(run, ['verdict'])}"
    models_section = view.models_section or training_section
    html = _environment().get_template("report.html").render(
        verdicts=verdict_rows(verdicts, flags, config),
        has_verdicts=verdicts is not None,
        model_column=verdicts is not None and "model" in verdicts.columns,
        verdict_status=verdict_status,
        notice=view.notice,
        analyses=analyses,
        added=list(added),
        view=view,
        title=config.report.title,
        run=run.root.resolve(),
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        python=platform.python_version(),
        classes=classes,
        comparison=comparison,
        weak_others=weak_others,
        weak_mark=WEAK,
        n_weak=len(flags),
        metrics_status="" if matrix is not None else _pending(run, view, stages, "metrics"),
        training=models_section(run, config),
        data=data_tables(run, config, view, stages),
        data_checks=data_checks(run, config),
        stages=stage_rows(stages, config),
        versions=software_versions(),
        config_yaml=run.config.read_text(),
    )
    write_text(run.report, html)
    return {"bytes": len(html.encode())}
