"""The verdict per class: what the evidence of the audit says the models rely on.

Evidence is an AUC with its DeLong CI, fold-mean over the folds' models on the hold-out
images. An AUC *shows signal* when its CI's lower bound is above 0.5 and the AUC is at least
``analyses.verdict.min_auc`` (0.6): a small, unstable edge over chance is not read as evidence.
Four cells are read, each the first one the run has from its list:

``full``     the full-image model on full images (``full→full``);
``inside``   a model that sees only the ROI: ``only_roi→only_roi``, ``only_roi_bbox→only_roi_bbox``,
             else the full model tested on ``only_roi``;
``outside``  a model that never sees the ROI: ``no_roi_bbox→no_roi_bbox`` (its box hides the ROI's
             silhouette too), ``no_roi→no_roi``, else the full model tested on ``no_roi_bbox``/``no_roi``;
``shape``    a model fed the ROI's binary mask alone (``roi_shape→roi_shape``).

The rules, in order; the first that applies is the verdict:

1. ``metadata`` — the metadata baseline shows signal, and no cell that shows signal is
   significantly better than it (DeLong's test of the two fold means on the same hold-out images,
   p < alpha): the label is predictable from who was imaged and how, and the images add nothing
   that can be told apart from it.
2. ``none`` — no cell shows signal: the models learnt nothing that generalises to the hold-out.
3. ``shape`` — the mask alone shows signal: the ROI's outline (its size, its shape) predicts the
   class, so a masked model's success says nothing about evidence outside the ROI.
4. ``everywhere`` — inside and outside both show signal: the class (or something that travels
   with it, like an acquisition setting) is visible in both; a shortcut is possible.
5. ``outside`` — outside shows signal, inside does not: **shortcut suspected**.
6. ``roi`` — inside shows signal, outside does not: the models rely on the ROI.
7. ``unclear`` — the full model shows signal but neither masked model does: the evidence needs the
   ROI together with its surroundings; read the matrices.

**Did the models learn enough to be read?** A cell without signal is evidence of absence only if its
model could have learnt the class. Each job's history (``metrics/training``,
:func:`maskaudit.metrics.training_table`) says, per class, whether the weights it kept are above chance on
its own validation images (the CI's lower bound above 0.5) and, if not, whether some other epoch was.
A cell's model is *undertrained* for a class when the kept weights of most of its folds are at chance;
it *learnt but did not keep* the class when, in addition, most of those folds were above chance at another
epoch (Bonferroni-corrected for the epochs looked at; the study's rule keeps the best summed validation
loss, which can be an early epoch once the model starts to fit a class without signal), and it *never
learnt* it otherwise. Where such a cell's
absence decides the verdict:

- ``undertrained`` replaces ``unclear`` when the inside or the outside model is undertrained (the
  likeliest reading of "the full model finds it, neither masked model does" is that they stopped before
  they learnt it); it replaces ``roi``, ``outside`` and ``none`` when the cell whose absence they rest on
  (outside, inside, full) learnt the class at an epoch it did not keep: the evidence was there;
- ``roi`` and ``outside`` stand when that cell never learnt the class (what a model without the evidence
  gives); when it also stopped no later than the other masked model took to learn the class (the median
  epoch of its folds' first epoch above chance), a sentence says so and what would tell absence from a
  training cut short. A model that trained longer than the other needed is read as absence.

The reading gives the advice that fits (:func:`maskaudit.analyses.evidence.undertraining_advice`).

**The scaling leak.** With ``scale: before_masking`` (the study's order: each image divided by its own
maximum, then masked) a bright object outside the ROI lowers every pixel inside it, and a model shown the
ROI alone can find a class whose evidence lies outside. The baseline analysis scores each image by that
maximum alone (``image_max``, :mod:`maskaudit.analyses.baseline`). When it shows signal for the class and
the inside cell shows signal but is not significantly better than it (DeLong, p < alpha, on the same
hold-out images), the inside cell is not read as signal: the rules above read the class from the
outside evidence, and the reading says that the ROI-only signal may be carried by the scaling. With
``scale: after_masking`` each masked image is rescaled by the pixels it keeps, the leak is gone and the
rule is not applied.

Without an AUC of the full model the verdict is ``undetermined``, and its reading says why: the run has no
full model, or the class has no positive (or no negative) image in the hold-out set ("No positive image of
effusion in the hold-out set: no AUC, no verdict."; ``split`` warns about it first).

The share of positive attribution inside the ROI (``explain``) is reported beside the verdict as
supporting evidence, not used by the rules: attribution maps are not calibrated enough to overrule
models trained without the ROI.

**A probe** (``maskaudit probe``: one model trained elsewhere, nothing trained on masked images,
:mod:`maskaudit.probe_audit`) reads each probed model's own cells
(:func:`maskaudit.strategies.probe_cells`), worded by its :class:`Reading`: ``full`` the model on full
images, ``inside`` the better of the model on ``only_roi`` and on ``only_roi_bbox`` images (the higher CI lower bound:
either is evidence that survived masking), ``outside`` on ``no_roi_bbox`` (else ``no_roi``, whose hole
shows the ROI's outline) images, and no ``shape`` cell. The rules are the same, one verdict per model
and class, and every reading says what a probe cannot show: signal that *survives* masking is
evidence (the model finds the class without the ROI, or with the ROI alone); signal *lost* under
masking may be the masked images being unlike anything the model was trained on, not an absence of
evidence. So ``outside`` and
``everywhere`` are as strong as in a full audit, while ``roi`` (outside fails) and ``unclear`` (both
fail) are weaker: only models trained on masked images, a full audit, can settle them.

Where the evidence behind a verdict is weak, its reading says so (:mod:`maskaudit.analyses.evidence`); the flags never
change a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from maskaudit.analyses.evidence import evidence_flags, undertrained_flags, undertraining_advice, verdict_notes
from maskaudit.config import VerdictConfig
from maskaudit.strategies import evidence_cells as default_evidence

#: verdict → (short label for the report, colour)
VERDICTS = {
    "roi": ("relies on the ROI", "#1a9850"),
    "outside": ("shortcut suspected: signal outside the ROI", "#d73027"),
    "everywhere": ("signal inside and outside the ROI", "#fc8d59"),
    "shape": ("the ROI's silhouette predicts it (shape leakage)", "#fee08b"),
    "metadata": ("explained by metadata", "#d73027"),
    "none": ("no signal found", "#bdbdbd"),
    "unclear": ("unclear: needs the ROI and its surroundings", "#bdbdbd"),
    "undertrained": ("undertrained: a model it rests on did not learn it", "#c2a5cf"),
    "undetermined": ("undetermined: the run lacks the full model", "#bdbdbd"),
    "not_predicted": ("not predicted by the probed model", "#ffffff"),
}



@dataclass(frozen=True)
class Reading:
    """How a verdict's reading is worded, and the two rules that differ for a model trained elsewhere.

    The default is a full audit's (models trained per masking); a probe gives its own
    (:data:`maskaudit.probe_audit.PROBE_READING`).
    """

    who: str = "the models"
    finds: str = "find"
    does: str = "they do"
    relies: str = "rely"
    subject: str = "The full model"
    best_inside: bool = False  # inside: the candidate with the highest CI lower bound, not the first there is
    note_reversed: bool = False  # say when masking pushes a cell's whole CI below 0.5
    caveat: str = ""  # appended to every determined reading


@dataclass(frozen=True)
class Cell:
    """One piece of evidence: which model on which masking, its AUC and CI."""

    train: str
    test: str
    auc: float
    ci_low: float
    ci_high: float

    @property
    def name(self) -> str:
        return f"{self.train}→{self.test}"

    def text(self) -> str:
        if math.isnan(self.auc):
            return f"{self.name} n/a"
        return f"{self.name} {self.auc:.2f} [{self.ci_low:.2f}, {self.ci_high:.2f}]"


def shows_signal(auc: float, ci_low: float, rules: VerdictConfig) -> bool:
    return not math.isnan(auc) and ci_low > 0.5 and auc >= rules.min_auc


def _cell(cells: pd.DataFrame, candidates: list[tuple[str, str]], best: bool = False) -> Cell | None:
    """The first of ``candidates`` the matrix has an AUC for; with ``best``, the one with the highest CI lower bound."""
    found = []
    for train, test in candidates:
        if (train, test) in cells.index:
            row = cells.loc[(train, test)]
            if not math.isnan(row["auc_mean"]):
                found.append(Cell(train, test, float(row["auc_mean"]), float(row["ci_low"]), float(row["ci_high"])))
    if not found:
        return None
    return max(found, key=lambda cell: cell.ci_low if not math.isnan(cell.ci_low) else -math.inf) if best else found[0]


@dataclass(frozen=True)
class Training:
    """Whether the model of a cell learnt the class: ``state`` "" (it did, or nothing is known), ``"not_kept"`` or
    ``"never"`` (the module's docstring), ``folds`` the folds whose kept weights are at chance, of ``n_folds``."""

    state: str = ""
    folds: tuple[int, ...] = ()
    n_folds: int = 0
    advice: str = ""
    epochs: float = math.nan  # the median number of epochs those folds ran

    def text(self, cell: Cell) -> str:
        which = f"folds {', '.join(map(str, self.folds))}" if len(self.folds) > 1 else f"fold {self.folds[0]}"
        if self.state == "not_kept":
            return (f"the {cell.train} model learnt it on its validation images at an epoch whose weights it did not "
                    f"keep ({which} of {self.n_folds} kept weights at chance for it)")
        return f"the {cell.train} model never rose above chance for it on its validation images ({which} of " \
               f"{self.n_folds})"


def cell_training(cell: Cell | None, training: pd.DataFrame | None) -> Training:
    """How the model of ``cell`` learnt the class, from the class's rows of ``metrics/training``."""
    if cell is None or training is None or not len(training):
        return Training()
    rows = training[(training["train_strategy"] == cell.train) & training["kept_learnt"].notna()]
    at_chance = rows[rows["kept_learnt"] == 0]
    if not len(rows) or 2 * len(at_chance) <= len(rows):
        return Training()
    state = "not_kept" if 2 * int((at_chance["learnt"] == 1).sum()) > len(at_chance) else "never"
    advice = undertraining_advice(pd.DataFrame(undertrained_flags(at_chance)))
    return Training(state, tuple(int(k) for k in at_chance["fold"]), len(rows), advice,
                    float(at_chance["epochs_run"].median()))


def epochs_to_learn(cell: Cell | None, training: pd.DataFrame | None) -> float:
    """The median number of epochs the folds of ``cell``'s model took to learn the class (first epoch above chance,
    counted from 1), over the folds that did; NaN when none did or nothing is known."""
    if cell is None or training is None or not len(training):
        return math.nan
    rows = training[(training["train_strategy"] == cell.train) & (training["first_learnt_epoch"] >= 0)]
    return float((rows["first_learnt_epoch"] + 1).median()) if len(rows) else math.nan


def class_verdict(cells: pd.DataFrame, rules: VerdictConfig, baseline: dict | None = None,
                  attribution: dict | None = None, localization: dict | None = None,
                  evidence_cells: dict | None = None, flags: pd.DataFrame | None = None,
                  training: pd.DataFrame | None = None, words: Reading = Reading()) -> dict:
    """The verdict of one class.

    Parameters
    ----------
    cells : DataFrame indexed by (train_strategy, test_strategy)
        The class's hold-out AUC matrix with columns ``auc_mean``, ``ci_low``, ``ci_high``.
    baseline : dict, optional
        ``auc``, ``ci_low``, ``ci_high`` of the metadata baseline, and ``tests``: for each cell
        (``"train→test"``) a dict with ``difference`` (cell − baseline) and ``p_value`` of DeLong's test.
    attribution : dict, optional
        ``in_roi`` (share of positive attribution inside the ROI), ``roi_area`` and ``ratio``, for full→full.
    localization : dict, optional
        ``sentence``: where the evidence of the class lies in the image (:mod:`maskaudit.analyses.localize`),
        added to the reading as given.
    evidence_cells : dict, optional
        Where each piece of evidence is read: :func:`maskaudit.strategies.evidence_cells` (default), or a
        probed model's :func:`maskaudit.strategies.probe_cells`.
    flags : DataFrame, optional
        The class's :func:`evidence_flags` (the run's tables, ``rules.evidence``); without them, those
        ``cells`` alone give: the hold-out counts (``n_pos``/``n_neg`` columns) and the cells under 0.5.
    training : DataFrame, optional
        The class's rows of ``metrics/training`` (:func:`maskaudit.metrics.training_table`): whether each cell's
        model learnt the class (the module's docstring); without it every model is taken to have learnt it.
    words : Reading
        How the reading is worded (a full audit's by default).

    Returns
    -------
    dict with ``verdict``, ``reading`` (a plain sentence with the numbers, then :func:`verdict_notes`
    where the evidence is weak), ``weak_evidence`` (those notes alone) and the evidence columns.
    """
    evidence_cells = evidence_cells if evidence_cells is not None else default_evidence()
    who = words.who
    evidence = {name: _cell(cells, candidates, best=words.best_inside and name == "inside")
                for name, candidates in evidence_cells.items()}
    signal = {name: cell is not None and shows_signal(cell.auc, cell.ci_low, rules) for name, cell in evidence.items()}
    full, inside, outside, shape = (evidence[n] for n in ("full", "inside", "outside", "shape"))
    leak = _scaling_leak(inside, signal["inside"], baseline.get("scale") if baseline else None, rules)
    if leak:
        signal["inside"] = False
    base_signal = baseline is not None and shows_signal(baseline["auc"], baseline["ci_low"], rules)
    tests = baseline.get("tests", {}) if baseline else {}
    better = [cell for name, cell in evidence.items() if cell is not None and signal[name]
              and tests.get(cell.name, {}).get("p_value", math.nan) < rules.alpha
              and tests[cell.name]["difference"] > 0]

    def seen(cell: Cell | None) -> str:
        return cell.text() if cell else "not in this run"

    label = ""
    if full is None:
        verdict, reading = "undetermined", "The run has no full-image model on full images to compare with."
        label, missing = _no_auc(cells, evidence_cells["full"])
        reading = missing or reading
    elif base_signal and not better:
        verdict = "metadata"
        p_full = tests.get(full.name, {}).get("p_value", math.nan)
        reading = (f"Metadata alone predict it ({_baseline_text(baseline)}) and no image model is significantly "
                   f"better (the full model: {full.text()}, p = {p_full:.3g}).")
    elif not any(signal.values()):
        verdict = "none"
        reading = f"No model shows signal: {full.text()}, inside {seen(inside)}, outside {seen(outside)}."
        if (learnt := cell_training(full, training)).state == "not_kept":
            verdict = "undertrained"
            reading += f" But {learnt.text(full)}: the kept weights cannot show it ({learnt.advice})."
    elif signal["shape"]:
        verdict = "shape"
        reading = (f"The ROI's mask alone predicts it ({shape.text()}): the outline carries the evidence, so "
                   f"masked models (outside {seen(outside)}, inside {seen(inside)}) are confounded by it.")
    elif signal["inside"] and signal["outside"]:
        verdict = "everywhere"
        reading = (f"Visible both inside ({inside.text()}) and outside the ROI ({outside.text()}): "
                   "something outside the ROI travels with the label; a shortcut is possible.")
    elif (learning := _undertrained_verdict(evidence, signal, training)) is not None:
        verdict, reading = "undertrained", learning
    elif signal["outside"]:
        verdict = "outside"
        reading = (f"Shortcut suspected: without the ROI {who} still {words.finds} it ({outside.text()}), "
                   f"with the ROI alone {words.does} not ({seen(inside)}).")
    elif signal["inside"]:
        verdict = "roi"
        reading = (f"The ROI alone suffices ({inside.text()}) and the rest of the image does not "
                   f"({seen(outside)}): {who} {words.relies} on the ROI.")
    else:
        verdict = "unclear"
        reading = (f"{words.subject} finds it ({full.text()}) but neither the ROI alone ({seen(inside)}) nor the "
                   f"rest ({seen(outside)}) suffices: the evidence needs both; read the matrices.")
    if leak and verdict not in ("undetermined", "metadata"):
        reading += f" {leak}"
    if verdict in ("roi", "outside"):
        absent, present = (outside, inside) if verdict == "roi" else (inside, outside)
        learnt, needed = cell_training(absent, training), epochs_to_learn(present, training)
        if learnt.state == "never" and not learnt.epochs > needed:  # NaN `needed`: nothing to compare with
            compared = f" after a median {learnt.epochs:g} epochs, while the {present.train} model learnt it in " \
                       f"{needed:g}" if math.isfinite(needed) else ""
            reading += (f" But {learnt.text(absent)}{compared}: what a model without the evidence gives, or a "
                        f"training cut short; to tell them apart: {learnt.advice}.")
    if base_signal and verdict != "metadata":
        reading += (f" Metadata alone also predict it ({_baseline_text(baseline)}), less well than "
                    f"{better[0].name} (DeLong p = {tests[better[0].name]['p_value']:.3g}).")
    if attribution and full is not None and not math.isnan(attribution.get("ratio", math.nan)):
        reading += (f" Attribution: {attribution['in_roi']:.0%} of the positive attribution of {full.name} lies in "
                    f"the ROI, which covers {attribution['roi_area']:.0%} of the image (×{attribution['ratio']:.2f}).")
    if localization and localization.get("sentence") and verdict not in ("undetermined", "none"):
        reading += f" {localization['sentence']}"
    if flags is None:
        flags = evidence_flags(cells.reset_index(), rules=rules.evidence)
    notes = verdict_notes(flags, [cell.name for cell in evidence.values() if cell is not None], rules.evidence)
    reading += "".join(f" {note}" for note in notes)
    reversed_cells = [cell for cell in (inside, outside) if cell is not None and cell.ci_high < 0.5]
    if words.note_reversed and reversed_cells:
        reading += (f" Masking reverses the model's scores ({' and '.join(c.name for c in reversed_cells)}), "
                    "a sign that these images are outside what it was trained on.")
    if words.caveat and verdict != "undetermined":
        reading += words.caveat
    row = {"verdict": verdict, "label": label or VERDICTS[verdict][0], "reading": reading,
           "weak_evidence": " ".join(notes)}
    for name, cell in evidence.items():
        row[f"{name}_cell"] = cell.name if cell else ""
        row[f"{name}_auc"] = cell.auc if cell else math.nan
        row[f"{name}_ci_low"] = cell.ci_low if cell else math.nan
        row[f"{name}_ci_high"] = cell.ci_high if cell else math.nan
        row[f"{name}_signal"] = signal[name]
    for key in ("auc", "ci_low", "ci_high"):
        row[f"baseline_{key}"] = baseline.get(key, math.nan) if baseline else math.nan
    row["baseline_p_full"] = tests.get(full.name, {}).get("p_value", math.nan) if full else math.nan
    row["baseline_signal"] = base_signal
    row["attribution_ratio"] = attribution.get("ratio", math.nan) if attribution else math.nan
    return row


def _scaling_leak(inside: Cell | None, inside_signal: bool, scale: dict | None, rules: VerdictConfig) -> str:
    """The sentence of the scaling leak (the module's docstring) when it applies to the inside cell, else ""."""
    if inside is None or not inside_signal or not scale or not shows_signal(scale["auc"], scale["ci_low"], rules):
        return ""
    test = scale.get("tests", {}).get(inside.name, {})
    p, difference = test.get("p_value", math.nan), test.get("difference", math.nan)
    if p < rules.alpha and difference > 0:
        return ""
    compared = f"difference {difference:+.2f}, DeLong p = {p:.3g}" if math.isfinite(p) else \
        "no paired test on the same images"
    return (f"The image's own maximum alone predicts it (image_max AUC {scale['auc']:.2f} [{scale['ci_low']:.2f}, "
            f"{scale['ci_high']:.2f}]) and {inside.name} is not significantly better ({compared}): each image was "
            "divided by its own maximum before masking (scale: before_masking, the study's order), so a bright "
            "object outside the ROI lowers every pixel inside it, and the ROI-only signal may be carried by the "
            "scaling; the verdict reads the class from the outside evidence (scale: after_masking removes this "
            "path).")


def _undertrained_verdict(evidence: dict[str, Cell | None], signal: dict[str, bool],
                          training: pd.DataFrame | None) -> str | None:
    """The reading of an ``undertrained`` verdict (the module's docstring), or None when the evidence can be read.

    Called after ``metadata``, ``none``, ``shape`` and ``everywhere`` have been ruled out: the full model or one
    masked model shows signal, not both masked models.
    """
    full = evidence["full"]
    states = {name: cell_training(evidence[name], training) for name in ("full", "inside", "outside")}
    if signal["outside"]:
        decisive = ["inside"]
    elif signal["inside"]:
        decisive = ["outside"]
    else:  # unclear: neither masked model
        decisive = [n for n in ("inside", "outside") if states[n].state]
    if not signal["inside"] and not signal["outside"]:
        unread = [n for n in decisive if states[n].state]
    else:
        unread = [n for n in decisive if states[n].state == "not_kept"]
    if not unread:
        return None
    what = " and ".join(states[n].text(evidence[n]) for n in unread)
    advice = "; ".join(dict.fromkeys(states[n].advice for n in unread if states[n].advice))
    seen = {n: evidence[n].text() if evidence[n] else "not in this run" for n in ("inside", "outside")}
    return (f"The full model ({full.text()}) finds it, inside {seen['inside']}, outside "
            f"{seen['outside']}, but {what}: the run cannot say where its evidence lies until "
            f"{'they learn' if len(unread) > 1 else 'it learns'} it ({advice}).")


def _no_auc(cells: pd.DataFrame, candidates: list[tuple[str, str]]) -> tuple[str, str]:
    """Label and reading of a run that has the full model's cell but no AUC in it (else two empty strings).

    A class with no positive (or no negative) image in the hold-out set has no AUC in any cell: the reading
    says that, from the matrix's ``n_pos``/``n_neg`` (and ``class``, ``reason``) columns, instead of a missing model.
    """
    for train, test in candidates:
        if (train, test) not in cells.index:
            continue
        row = cells.loc[(train, test)]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        name = str(row["class"]) if "class" in row.index else "this class"
        counts = {c: row[c] for c in ("n_pos", "n_neg") if c in row.index and not pd.isna(row[c])}
        for side, column in (("positive", "n_pos"), ("negative", "n_neg")):
            if column in counts and int(counts[column]) == 0:
                return (f"undetermined: no {side} image in the hold-out set",
                        f"No {side} image of {name} in the hold-out set: no AUC, no verdict.")
        reason = str(row["reason"]) if "reason" in row.index and isinstance(row["reason"], str) else ""
        return ("undetermined: no AUC on the hold-out set",
                f"The {train}→{test} cell of {name} has no hold-out AUC{f' ({reason})' if reason else ''}: no verdict.")
    return "", ""


def _baseline_text(baseline: dict) -> str:
    return f"baseline AUC {baseline['auc']:.2f} [{baseline['ci_low']:.2f}, {baseline['ci_high']:.2f}]"
