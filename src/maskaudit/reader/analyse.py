"""Score the readers' answers against the labels, measure their agreement, and set the models beside them.

Per reader, strategy and class (``readers.parquet``):

- ``n_cases`` the reader's cases, ``n_answered`` those answered for the class, ``n_cannot_tell`` the
  "cannot tell" answers. "Cannot tell" is neither positive nor negative: it is left out of TP/FN/TN/FP,
  sensitivity and specificity, and counted in ``n_cannot_tell``; it stays in the AUC as the middle score.
- sensitivity TP / (TP + FN) and specificity TN / (TN + FP) with 95 % Wilson intervals (NaN with a
  reason when there is no positive or negative).
- AUC from an ordinal score: present with confidence c scores +c, absent with confidence c scores -c,
  cannot tell scores 0 (so -5 … +5); DeLong interval from :func:`maskaudit.stats.auc_ci`.

Agreement per strategy and class, on the three answers (present / absent / cannot tell): Cohen's kappa for
every pair of readers on the cases both answered (``kappa_pairs.parquet``), and Fleiss' kappa over the cases
every reader answered (``kappa_fleiss.parquet``).

The models (``model.parquet``): on the same images, the models the images were selected from (from
``selection.parquet``'s model, masking and fold; else the strategy's own model of the study's fold, tested
on images with the same masking; hold-out split): AUC with its DeLong
interval, and sensitivity / specificity at the threshold :data:`THRESHOLD` on the probability.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm
from sklearn.metrics import cohen_kappa_score

from maskaudit.analyses.reader_selection import study_fold
from maskaudit.config import AuditConfig, load_config
from maskaudit.errors import MaskauditError
from maskaudit.metrics import prediction_sets
from maskaudit.reader import db
from maskaudit.reader.study import StudyPaths, study_paths
from maskaudit.rundir import write_json, write_table
from maskaudit.stats import auc_ci

log = logging.getLogger(__name__)

#: The model's probability at or above which a case counts as positive.
THRESHOLD = 0.5
LEVEL = 0.95
CATEGORIES = ("present", "absent", "cannot_tell")


def ordinal_score(answer: str, confidence: float | None) -> float:
    """present c → +c, absent c → -c, cannot tell → 0 (a missing confidence counts as 1)."""
    c = 1.0 if confidence is None or pd.isna(confidence) else float(confidence)
    return {"present": c, "absent": -c, "cannot_tell": 0.0}[answer]


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float, float]:
    """Proportion with its Wilson score interval; NaNs when ``n`` is 0."""
    if n == 0:
        return math.nan, math.nan, math.nan
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def rates(tp: int, fn: int, tn: int, fp: int, level: float) -> dict:
    """The four counts, sensitivity TP / (TP + FN) and specificity TN / (TN + FP), each with its Wilson interval."""
    sens, sens_lo, sens_hi = wilson(tp, tp + fn, level)
    spec, spec_lo, spec_hi = wilson(tn, tn + fp, level)
    return {"tp": tp, "fn": fn, "tn": tn, "fp": fp,
            "sensitivity": sens, "sensitivity_low": sens_lo, "sensitivity_high": sens_hi,
            "specificity": spec, "specificity_low": spec_lo, "specificity_high": spec_hi}


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a table of shape (n_items, n_categories): how many raters put each item in each category.

    Every item must have the same number of raters (at least 2). NaN when agreement by chance is 1
    (every rating in one category).

    Examples
    --------
    >>> round(fleiss_kappa(np.array([[2, 0], [0, 2], [1, 1]])), 3)
    0.333
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(f"counts must have shape (n_items, n_categories) with items; got {counts.shape}")
    raters = counts.sum(axis=1)
    if not np.all(raters == raters[0]) or raters[0] < 2:
        raise ValueError(f"every item needs the same number (>= 2) of raters; got {sorted(set(raters.tolist()))}")
    n, m = counts.shape[0], raters[0]
    p_j = counts.sum(axis=0) / (n * m)
    p_i = (np.sum(counts * counts, axis=1) - m) / (m * (m - 1))
    p_bar, p_e = p_i.mean(), np.sum(p_j * p_j)
    if math.isclose(p_e, 1.0):
        return math.nan
    return float((p_bar - p_e) / (1 - p_e))


def cohen_kappa(a: list[str], b: list[str]) -> tuple[float, str]:
    """Cohen's kappa of two readers' answers on the same cases, or NaN and why."""
    if len(a) < 2:
        return math.nan, f"{len(a)} case(s) answered by both"
    if len(set(a) | set(b)) < 2:
        return math.nan, "both gave one and the same answer to every case: chance agreement is 1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(cohen_kappa_score(a, b, labels=list(CATEGORIES)))
    return value, "" if math.isfinite(value) else "undefined"


def load_answers(db_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``(answers, assignments, classes)``: answers with reader, strategy, image_id, class, label and score."""
    with db.opened(db_path) as conn:
        classes = json.loads(conn.execute("SELECT value FROM study WHERE key='classes'").fetchone()[0])
        cases = pd.read_sql_query("SELECT id AS case_id, strategy, image_id, labels FROM cases", conn)
        answers = pd.read_sql_query("SELECT r.name AS reader, a.case_id, a.class, a.answer, a.confidence "
                                    "FROM answers a JOIN readers r ON r.id = a.reader_id", conn)
        assignments = pd.read_sql_query("SELECT r.name AS reader, a.case_id FROM assignments a "
                                        "JOIN readers r ON r.id = a.reader_id", conn)
    labels = {row.case_id: json.loads(row.labels) for row in cases.itertuples()}
    answers = answers.merge(cases[["case_id", "strategy", "image_id"]], on="case_id")
    answers["label"] = [labels[c].get(k) for c, k in zip(answers["case_id"], answers["class"], strict=True)]
    answers["label"] = pd.to_numeric(answers["label"], errors="coerce")
    answers["score"] = [ordinal_score(a, c) for a, c in zip(answers["answer"], answers["confidence"], strict=True)]
    assignments = assignments.merge(cases[["case_id", "strategy", "image_id"]], on="case_id")
    return answers, assignments, classes


def reader_table(answers: pd.DataFrame, assignments: pd.DataFrame, classes: list[str],
                 level: float = LEVEL) -> pd.DataFrame:
    """Per reader, strategy and class: counts, sensitivity, specificity and AUC (see the module's docstring)."""
    rows = []
    n_cases = assignments.groupby(["reader", "strategy"]).size()
    for (reader, strategy), n in n_cases.items():
        for name in classes:
            part = answers[(answers["reader"] == reader) & (answers["strategy"] == strategy)
                           & (answers["class"] == name) & answers["label"].notna()]
            decided = part[part["answer"] != "cannot_tell"]
            pos, neg = decided[decided["label"] == 1], decided[decided["label"] == 0]
            tp, fn = int((pos["answer"] == "present").sum()), int((pos["answer"] == "absent").sum())
            tn, fp = int((neg["answer"] == "absent").sum()), int((neg["answer"] == "present").sum())
            reasons = []
            if tp + fn == 0:
                reasons.append("sensitivity undefined: no positive case answered present/absent")
            if tn + fp == 0:
                reasons.append("specificity undefined: no negative case answered present/absent")
            est = auc_ci(part["label"].to_numpy(float), part["score"].to_numpy(float), level) if len(part) else None
            if est is None:
                reasons.append("no answer")
            elif est.reason:
                reasons.append(f"AUC: {est.reason}")
            rows.append({
                "reader": reader, "strategy": strategy, "class": name, "n_cases": int(n), "n_answered": len(part),
                "n_cannot_tell": int((part["answer"] == "cannot_tell").sum()), "n_pos": int((part["label"] == 1).sum()),
                "n_neg": int((part["label"] == 0).sum()), **rates(tp, fn, tn, fp, level),
                "auc": est.auc if est else math.nan, "auc_low": est.ci_low if est else math.nan,
                "auc_high": est.ci_high if est else math.nan, "reason": "; ".join(reasons),
            })
    return pd.DataFrame(rows)


def kappa_tables(answers: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cohen's kappa per pair of readers and Fleiss' kappa over all, per strategy and class."""
    pairs, overall = [], []
    readers = sorted(answers["reader"].unique())
    for strategy in sorted(answers["strategy"].unique()):
        for name in classes:
            part = answers[(answers["strategy"] == strategy) & (answers["class"] == name)]
            wide = part.pivot_table(index="case_id", columns="reader", values="answer", aggfunc="first")
            for a, b in combinations(readers, 2):
                both = wide[[a, b]].dropna() if {a, b} <= set(wide.columns) else wide.iloc[:0, :0]
                value, reason = cohen_kappa(both[a].tolist(), both[b].tolist()) if len(both.columns) else \
                    (math.nan, "no case answered by both")
                pairs.append({"strategy": strategy, "class": name, "reader_a": a, "reader_b": b,
                              "n_cases": len(both), "kappa": value, "reason": reason})
            complete = wide.dropna() if wide.shape[1] == len(readers) else wide.iloc[:0]
            value, reason = math.nan, ""
            if len(readers) < 2:
                reason = "fewer than 2 readers"
            elif len(complete) == 0:
                reason = "no case answered by every reader"
            else:
                counts = np.stack([(complete == c).sum(axis=1).to_numpy() for c in CATEGORIES], axis=1)
                value = fleiss_kappa(counts)
                reason = "" if math.isfinite(value) else "every answer the same: chance agreement is 1"
            overall.append({"strategy": strategy, "class": name, "n_readers": len(readers),
                            "n_cases": len(complete), "kappa": value, "reason": reason})
    return pd.DataFrame(pairs), pd.DataFrame(overall)


def _model_pairs(paths, assignments: pd.DataFrame, config) -> list[tuple[str, str, int]]:
    """(model, masking, fold) whose predictions the study's images came from: the selection's, else own models."""
    if paths.selection.is_file():
        selection = pd.read_parquet(paths.selection)
        if {"model", "fold"} <= set(selection.columns):
            pairs = selection[["model", "strategy", "fold"]].drop_duplicates()
            return [(str(m), str(s), int(f)) for m, s, f in pairs.itertuples(index=False)]
    return [(s, s, study_fold(config)) for s in sorted(assignments["strategy"].unique())]


def model_table(paths: StudyPaths, assignments: pd.DataFrame, classes: list[str], config: AuditConfig | None,
                level: float = LEVEL) -> tuple[pd.DataFrame, str]:
    """The models on the study's images (see the module's docstring); empty with a reason when unavailable."""
    if not paths.run.predictions.is_file() or config is None:
        return pd.DataFrame(), f"no model comparison: {paths.run.predictions} or config.yaml is missing"
    predictions = pd.read_parquet(paths.run.predictions)
    images_of = {s: set(part["image_id"]) for s, part in assignments.groupby("strategy")}
    rows = []
    for model, strategy, fold in _model_pairs(paths, assignments, config):
        if strategy not in images_of:
            continue
        for name in classes:
            frame = prediction_sets(predictions, name, model, strategy).get(fold)
            row = {"model": model, "strategy": strategy, "class": name, "fold": fold, "threshold": THRESHOLD,
                   "n_images": 0}
            if frame is None:
                rows.append({**row, "reason": f"no predictions of the {model} model (fold {fold}) on {strategy}"})
                continue
            frame = frame[frame["image_id"].isin(images_of[strategy]) & frame["label"].notna()]
            est = auc_ci(frame["label"].to_numpy(float), frame["probability"].to_numpy(float), level)
            said = frame["probability"] >= THRESHOLD
            pos, neg = frame["label"] == 1, frame["label"] == 0
            counts = rates(int((said & pos).sum()), int((~said & pos).sum()), int((~said & neg).sum()),
                           int((said & neg).sum()), level)
            rows.append({**row, "n_images": len(frame), "n_pos": int(pos.sum()), "n_neg": int(neg.sum()), **counts,
                         "auc": est.auc, "auc_low": est.ci_low, "auc_high": est.ci_high,
                         "reason": f"AUC: {est.reason}" if est.reason else ""})
    return pd.DataFrame(rows), ""


def analyse_study(run_dir: Path) -> dict[str, Path]:
    """Write the tables into ``RUN/analyses/reader_study/`` (Parquet and CSV) and return their paths."""
    paths = study_paths(run_dir)
    if not paths.db.is_file():
        raise MaskauditError(f"{paths.db} does not exist; run `maskaudit reader create {run_dir} --readers ...` "
                             "and collect answers first")
    answers, assignments, classes = load_answers(paths.db)
    if answers.empty:
        raise MaskauditError(f"{paths.db} holds no answer yet; readers answer in `maskaudit reader serve {run_dir}`")
    config = load_config(paths.run.config) if paths.run.config.is_file() else None  # none: a study outside a run
    level = config.analyses.level if config is not None else LEVEL
    readers = reader_table(answers, assignments, classes, level)
    pairs, fleiss = kappa_tables(answers, classes)
    model, model_reason = model_table(paths, assignments, classes, config, level)
    out = paths.results
    tables = {"readers": readers, "kappa_pairs": pairs, "kappa_fleiss": fleiss, "model": model}
    written = {}
    for name, frame in tables.items():
        written[name] = out / f"{name}.parquet"
        write_table(written[name], frame, csv=True)
    write_json(out / "summary.json", {
        "readers": sorted(answers["reader"].unique()), "classes": classes, "n_answers": len(answers),
        "score": "present c -> +c, absent c -> -c, cannot tell -> 0", "model_threshold": THRESHOLD,
        "cannot_tell": "left out of sensitivity and specificity, counted in n_cannot_tell, scored 0 in the AUC",
        "level": level, "model_note": model_reason,
    })
    log.info("reader study: %d answers of %d readers -> %s", len(answers), answers["reader"].nunique(), out)
    return written
