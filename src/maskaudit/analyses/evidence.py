"""Where the evidence behind a number is weak: flags the report shows beside it and the verdict adds to its reading.

Weak evidence (:func:`evidence_flags`) is said beside the number in the report and at the end of the
verdict's reading; it never changes a verdict. The flags are computed once from the tables the
metrics and baseline stages write (``auc_matrix``, ``auc_by_fold``, ``baseline_auc``, ``fits``), with
the thresholds of ``analyses.verdict.evidence``:

``few_images``      a class with fewer than ``min_class_count`` (10) positives or negatives in the
                    hold-out set, an external set, or a fold's validation set: its AUCs rest on
                    them, their CIs are wide (one image of 7 moves an AUC by up to 1/7).
``reversed``        an AUC whose CI upper bound is below 0.5: the scores are reversed, the model ranks
                    negatives above positives.
``below_chance``    an AUC under 0.5 − ``chance_margin`` whose CI still reaches 0.5: reversed scores or
                    chance, the images cannot tell which (the COVID hold-out's 0.29 [0.07, 0.51]).
``val_chance``      a fold's full model at chance on its validation images (only the full model: a masked
                    model at chance is what removing the evidence gives, the finding itself, as long as
                    the full model learnt the class): the CI's
                    lower bound is at most 0.5, *or* the AUC is below 0.5 + ``chance_margin`` (0.05). The
                    CI catches small validation sets, where a model that learnt nothing can score 0.67;
                    the margin catches large ones, where a CI excludes 0.5 at 0.53 although fewer than
                    53 % of positive–negative pairs are ranked right, a model that in practice learnt
                    nothing. Either way that model's hold-out AUCs enter the fold mean all the same.
``undertrained``    a fold's model (any strategy) whose kept weights are at chance for a class on its own
                    validation images (CI lower bound at most 0.5; ``metrics/training``, from the job's
                    per-epoch history): either it never rose above chance in any epoch, or it did, at a
                    later epoch than the one whose weights it kept (the best summed validation loss, the
                    study's rule, can be an early epoch once the model starts to fit a class that has no
                    signal). It replaces ``val_chance`` for the jobs whose history says so, and gives the
                    advice that fits (more epochs, ``train.min_epochs``, a larger ``train.patience``,
                    ``train.monitor: val_auc``; for a probe's adapted copies, ``adapt``'s keys). A masked
                    model that did not learn a class is what removing the class's evidence gives, *or* a
                    training cut short: a cell whose model did not learn is not read as evidence of absence
                    where that decides the verdict (:mod:`maskaudit.analyses.verdict`, ``undertrained``).
``baseline_fewer``  the metadata baseline scored on fewer hold-out images, or fitted on fewer training
                    images, than the image models it is compared with (rows without metadata are
                    dropped): both counts are given.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from maskaudit.config import EvidenceConfig
from maskaudit.metrics import TRAIN_SETTINGS

#: Columns of the table of weak-evidence flags (:func:`evidence_flags`); ``short`` is the flag in a few words
#: for lists that gather several (a fold's count, a fold's AUC); ``advice``, what to change (``undertrained`` only).
FLAG_COLUMNS = ["kind", "dataset", "split", "class", "train_strategy", "test_strategy", "fold", "auc", "ci_low",
                "ci_high", "short", "text", "advice"]

#: flag kind → what the report calls it
FLAG_KINDS = {
    "few_images": "few images",
    "reversed": "scores reversed",
    "below_chance": "under 0.5, CI reaches 0.5",
    "val_chance": "validation AUC at chance",
    "undertrained": "did not learn the class",
    "baseline_fewer": "baseline on fewer images",
}

#: the dataset of the run's own images (as :data:`maskaudit.metrics.MAIN`)
_MAIN = "main"


def _finite(value: object) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _where(dataset: str, split: str, fold: object = None) -> str:
    if split == "val":
        return f"fold {fold}'s validation set"
    if split == "external" or dataset != _MAIN:
        return f"the external set {dataset}"
    return "the hold-out set"


def _auc_text(auc: float, low: float, high: float) -> str:
    return f"{auc:.2f} [{low:.2f}, {high:.2f}]" if _finite(low) and _finite(high) else f"{auc:.2f}"


def _flag(kind: str, dataset: str, split: str, name: str, text: str, short: str = "", train: str = "",
          test: str = "", fold: object = "", auc: float = math.nan, low: float = math.nan,
          high: float = math.nan, advice: str = "") -> dict:
    return {"kind": kind, "dataset": dataset, "split": split, "class": name, "train_strategy": train,
            "test_strategy": test, "fold": "" if fold is None else str(fold), "auc": auc, "ci_low": low,
            "ci_high": high, "short": short or text, "text": text, "advice": advice}


def _few(counts: pd.DataFrame, keys: list[str], rules: EvidenceConfig) -> list[dict]:
    """``few_images`` flags from a table with ``n_pos``/``n_neg``: the most any cell of a group was scored on."""
    if counts is None or not len(counts) or not {"n_pos", "n_neg"} <= set(counts.columns):
        return []
    flags = []
    known = counts[counts["n_pos"].notna() & counts["n_neg"].notna()]
    for key, group in known.groupby(keys, sort=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        n_pos, n_neg = int(group["n_pos"].max()), int(group["n_neg"].max())
        few = [_plural(n, w) for n, w in ((n_pos, "positive"), (n_neg, "negative")) if n < rules.min_class_count]
        if not few:
            continue
        split, fold = row.get("split", "test"), row.get("fold")
        where = _where(row.get("dataset", _MAIN), split, fold)
        counted = " and ".join(few)
        if split == "val":
            consequence = "that fold's early stopping and validation AUCs rest on them"
        else:
            consequence = "every AUC of the class there rests on them and its CI is wide"
        flags.append(_flag("few_images", row.get("dataset", _MAIN), split, row.get("class", ""),
                           f"Few images: {counted} in {where} (fewer than {rules.min_class_count}); {consequence}.",
                           short=f"fold {fold}: {counted}" if split == "val" else counted, fold=fold))
    return flags


def _cell_name(row: pd.Series) -> str:
    return "the metadata baseline" if row["train_strategy"] == "metadata" else \
        f"{row['train_strategy']}→{row['test_strategy']}"


def _below(matrix: pd.DataFrame, rules: EvidenceConfig) -> list[dict]:
    """``reversed`` and ``below_chance`` flags of the cells of an AUC matrix (fold means)."""
    flags = []
    for _, r in matrix.iterrows():
        auc, low, high = r["auc_mean"], r["ci_low"], r["ci_high"]
        if not _finite(auc):
            continue
        dataset, split = r.get("dataset", _MAIN), r.get("split", "test")
        prefix = "Validation: " if split == "val" else f"External set {dataset}: " if dataset != _MAIN else ""
        cell = f"{_cell_name(r)} {_auc_text(auc, low, high)}"
        common = dict(train=r["train_strategy"], test=r["test_strategy"], auc=float(auc),
                      low=float(low) if _finite(low) else math.nan, high=float(high) if _finite(high) else math.nan)
        if _finite(high) and high < 0.5:
            flags.append(_flag("reversed", dataset, split, r.get("class", ""),
                               f"{prefix}{cell} is below chance: scores reversed: the model ranks negatives above "
                               "positives here.", short=cell, **common))
        elif auc < 0.5 - rules.chance_margin:
            flags.append(_flag("below_chance", dataset, split, r.get("class", ""),
                               f"{prefix}{cell} is under 0.5 but its CI reaches 0.5: the scores may be reversed or "
                               "at chance, and these images cannot tell which.", short=cell, **common))
    return flags


def at_chance(auc: float, ci_low: float, rules: EvidenceConfig) -> bool:
    """A validation AUC at (or below) chance: its CI's lower bound at most 0.5, or the AUC below 0.5 + margin."""
    return _finite(auc) and ((_finite(ci_low) and ci_low <= 0.5) or auc < 0.5 + rules.chance_margin)


def _val_chance(by_fold: pd.DataFrame, rules: EvidenceConfig) -> list[dict]:
    """``val_chance`` flags: each fold's *full* model on its validation images.

    Only the full model's: it says whether the class could be learnt at all with this data and training
    length. A masked model at chance is what a masking that removes the evidence should give (the no_roi
    model of a class whose evidence is inside the ROI): that is the finding, not weak evidence, and is read
    as such as long as the full model learnt the class.
    """
    own = by_fold[(by_fold["split"] == "val") & (by_fold["train_strategy"] == "full")
                  & (by_fold["test_strategy"] == "full")]
    flags = []
    for _, r in own.iterrows():
        if not at_chance(r["auc"], r["ci_low"], rules):
            continue
        if _finite(r["ci_high"]) and r["ci_high"] < 0.5:
            side = "below chance"
        elif r["auc"] < 0.5 - rules.chance_margin:
            side = "at or below chance"
        elif r["auc"] < 0.5 + rules.chance_margin:
            side = "at chance"
        else:
            side = "not distinguishable from chance"
        value = _auc_text(r["auc"], r["ci_low"], r["ci_high"])
        flags.append(_flag(
            "val_chance", r.get("dataset", _MAIN), "val", r["class"],
            f"Fold {r['fold']}'s {r['train_strategy']} model is {side} on its validation images (AUC "
            f"{value}, {_plural(int(r['n_pos']), 'positive')}, {_plural(int(r['n_neg']), 'negative')}); its "
            "hold-out AUCs enter the fold mean all the same.",
            short=f"fold {r['fold']} {value}", train=r["train_strategy"], test=r["test_strategy"], fold=r["fold"],
            auc=float(r["auc"]), low=float(r["ci_low"]) if _finite(r["ci_low"]) else math.nan,
            high=float(r["ci_high"]) if _finite(r["ci_high"]) else math.nan))
    return flags


def undertrained_flags(training: pd.DataFrame) -> list[dict]:
    """``undertrained`` flags: each job whose kept weights are at chance for a class on its validation images, with
    what to change in its config section (``advice``: :data:`_ADVICE`)."""
    flags = []
    for _, r in training[training["kept_learnt"] == 0].iterrows():
        case = 0 if r["learnt"] == 1 else 1 if r["stopped_early"] else 2
        model = f"Fold {r['fold']}'s {r['train_strategy']} model"
        kept = _auc_text(r["kept_auc"], r["kept_ci_low"], r["kept_ci_high"])
        criterion = "validation AUC" if r["monitor"] == "val_auc" else "validation loss"
        if case == 0:
            text = (f"{model} learnt {r['class']} on its validation images (AUC {r['best_auc']:.2f} at epoch "
                    f"{int(r['best_epoch']) + 1}, CI lower bound {r['best_ci_low']:.2f} corrected for the epochs "
                    "looked at) but kept the weights of "
                    f"epoch {int(r['kept_epoch']) + 1} (the best {criterion}), at chance for it (AUC {kept}).")
            short = (f"fold {r['fold']} kept epoch {int(r['kept_epoch']) + 1}, learnt at epoch "
                     f"{int(r['first_learnt_epoch']) + 1}")
        else:
            ended = "early stopping ended it" if case == 1 else f"it ran every epoch of {_settings(r)}.epochs"
            best = f"best AUC {r['best_auc']:.2f} at epoch {int(r['best_epoch']) + 1}" if _finite(r["best_auc"]) \
                else "no AUC"
            text = (f"{model} never rose above chance for {r['class']} on its validation images in its "
                    f"{_plural(int(r['epochs_run']), 'epoch')} ({best}; {ended}).")
            short = f"fold {r['fold']} never, {_plural(int(r['epochs_run']), 'epoch')}" + \
                (" (stopped early)" if r["stopped_early"] else "")
        flags.append(_flag("undertrained", _MAIN, "val", r["class"], text, short=short, train=r["train_strategy"],
                           test=r["train_strategy"], fold=r["fold"], auc=float(r["kept_auc"]),
                           low=float(r["kept_ci_low"]), high=float(r["kept_ci_high"]),
                           advice=_ADVICE[_settings(r)][case]))
    return flags


#: per config section a model trains with (:func:`maskaudit.metrics.training_table`'s ``settings``), what to set in
#: each case of an ``undertrained`` flag: the kept weights at chance although an epoch learnt the class; early
#: stopping ended it before it learnt; it ran out of epochs. A probe's adapted copies and shape control have neither
#: a monitor nor a minimum of epochs: they keep the weights of their lowest validation loss.
_ADVICE = {
    TRAIN_SETTINGS: ("keep the weights by the validation AUC (train.monitor: val_auc)",
              "stop later (a larger train.patience, or train.min_epochs)", "train longer (train.epochs)"),
    **{section: (f"{section} has no setting for it: its jobs keep the weights of their lowest validation loss",
                 f"stop later (a larger {section}.patience)", f"train longer ({section}.epochs)")
       for section in ("adapt", "adapt.shape")},
}
#: every advice, in the order :func:`undertraining_advice` gives them: by case, then by section
_ADVICE_ORDER = [advice[case] for case in range(3) for advice in _ADVICE.values()]


def _settings(row: pd.Series) -> str:
    """The config section the job of ``row`` trained with (a table from before it was recorded: ``train``)."""
    section = row.get("settings")
    return section if isinstance(section, str) and section else TRAIN_SETTINGS


def undertraining_advice(flags: pd.DataFrame) -> str:
    """What to change in training, from ``undertrained`` flags (:func:`undertrained_flags`): each flag's advice once,
    by case, then by the config section the flagged jobs trained with (:data:`_ADVICE`)."""
    found = {advice for advice in flags["advice"] if advice} if len(flags) else set()
    return "; ".join(sorted(found, key=_ADVICE_ORDER.index))


def _span(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}–{high}"


def _baseline_fewer(baseline_auc: pd.DataFrame | None, fits: pd.DataFrame | None,
                    holdout: dict[str, int]) -> list[dict]:
    """``baseline_fewer`` flags: the baseline scored or fitted on fewer images than the image models."""
    flags = []
    means = baseline_auc[baseline_auc["fold"].astype(str) == "mean"] if baseline_auc is not None and len(
        baseline_auc) and "fold" in baseline_auc else None
    for name in dict.fromkeys([*(means["class"] if means is not None else []),
                               *(fits["class"] if fits is not None and len(fits) else [])]):
        parts = []
        row = means[means["class"] == name] if means is not None else None
        scored = None
        if row is not None and len(row) and _finite(row["n_pos"].iloc[0]) and _finite(row["n_neg"].iloc[0]):
            scored = int(row["n_pos"].iloc[0] + row["n_neg"].iloc[0])
        cells = holdout.get(name)
        if scored is not None and cells is not None and scored < cells:
            parts.append(f"scored on {scored} of the {cells} hold-out images the image models were scored on "
                         f"({cells - scored} lack metadata)")
        fit = fits[fits["class"] == name] if fits is not None and len(fits) else None
        if fit is not None and len(fit) and "n_train_all" in fit and (fit["n_train"] < fit["n_train_all"]).any():
            parts.append(f"fitted on {_span(fit['n_train'])} of the {_span(fit['n_train_all'])} training images "
                         "per fold the image models were trained on")
        if not parts:
            continue
        tests = f"; its DeLong tests use the {scored} images both scored" if scored is not None and \
            cells is not None and scored < cells else ""
        flags.append(_flag("baseline_fewer", _MAIN, "test", name,
                           f"The metadata baseline was {' and '.join(parts)}{tests}.",
                           short=" and ".join(parts), train="metadata", test="metadata"))
    return flags


def evidence_flags(matrix: pd.DataFrame | None, by_fold: pd.DataFrame | None = None,
                   baseline_auc: pd.DataFrame | None = None, fits: pd.DataFrame | None = None,
                   rules: EvidenceConfig | None = None, training: pd.DataFrame | None = None) -> pd.DataFrame:
    """Where the evidence is weak (the module's docstring): one row per flag, columns :data:`FLAG_COLUMNS`.

    Parameters
    ----------
    matrix : DataFrame or None
        ``metrics/auc_matrix``: ``reversed``/``below_chance`` per cell, and the hold-out and external
        counts (``n_pos``/``n_neg``; a matrix without them falls back on ``by_fold``'s).
    by_fold : DataFrame, optional
        ``metrics/auc_by_fold``: each fold's validation counts and its models' validation AUCs.
    baseline_auc, fits : DataFrame, optional
        ``analyses/baseline/baseline_auc`` (the baseline's own ``reversed`` flag and the images it was
        scored on) and ``fits`` (the images it was fitted on, of the fold's).
    rules : EvidenceConfig, optional
        ``analyses.verdict.evidence``; its defaults when not given.
    training : DataFrame, optional
        ``metrics/training`` (:func:`maskaudit.metrics.training_table`): the ``undertrained`` flags, in place of
        ``val_chance`` for the jobs it knows.

    Returns
    -------
    DataFrame
        Empty (with the columns) when nothing is weak or nothing was given.
    """
    rules = rules or EvidenceConfig()
    flags: list[dict] = []
    keys = ["dataset", "split", "class"]
    if matrix is not None and len(matrix):
        matrix = matrix.assign(**{k: matrix[k] if k in matrix else v
                                  for k, v in (("dataset", _MAIN), ("split", "test"), ("class", ""))})
        outside_val = matrix[matrix["split"] != "val"]
        counted = outside_val if "n_pos" in matrix and outside_val["n_pos"].notna().any() else (
            by_fold[by_fold["split"] != "val"] if by_fold is not None else None)
        flags += _few(counted, keys, rules)
        flags += _below(matrix, rules)
    known = training[training["kept_learnt"].notna()] if training is not None and len(training) else None
    if by_fold is not None and len(by_fold):
        flags += _few(by_fold[by_fold["split"] == "val"], [*keys, "fold"], rules)
        if known is not None:  # the jobs whose history says whether they learnt: their undertrained flags instead
            read = set(zip(known["train_strategy"], known["fold"].astype(str), known["class"], strict=True))
            by_fold = by_fold[[(t, str(k), c) not in read for t, k, c in zip(
                by_fold["train_strategy"], by_fold["fold"], by_fold["class"], strict=True)]]
        flags += _val_chance(by_fold, rules)
    if known is not None:
        flags += undertrained_flags(known)
    if baseline_auc is not None and len(baseline_auc) and "auc" in baseline_auc:
        means = baseline_auc[baseline_auc["fold"].astype(str) == "mean"]
        flags += _below(means.rename(columns={"auc": "auc_mean"}).assign(
            dataset=_MAIN, split="test", train_strategy="metadata", test_strategy="metadata"), rules)
    if (baseline_auc is not None and len(baseline_auc)) or (fits is not None and len(fits)):
        holdout = {}
        source = matrix if matrix is not None and "n_pos" in matrix else by_fold
        if source is not None and len(source):
            main = source[(source["dataset"] == _MAIN) & (source["split"] == "test")]
            main = main[main["train_strategy"] != "metadata"]
            holdout = (main["n_pos"] + main["n_neg"]).groupby(main["class"]).max().dropna().astype(int).to_dict()
        flags += _baseline_fewer(baseline_auc, fits, holdout)
    return pd.DataFrame(flags, columns=FLAG_COLUMNS)


def run_evidence_flags(run, rules: EvidenceConfig | None = None) -> pd.DataFrame:
    """:func:`evidence_flags` of a run directory (a :class:`maskaudit.rundir.RunDir`): whatever tables it has."""

    def read(path: Path) -> pd.DataFrame | None:
        return pd.read_parquet(path) if path.is_file() else None

    baseline = run.analysis("baseline")
    return evidence_flags(read(run.metrics / "auc_matrix.parquet"), read(run.metrics / "auc_by_fold.parquet"),
                          read(baseline / "baseline_auc.parquet"), read(baseline / "fits.parquet"), rules,
                          read(run.metrics / "training.parquet"))


def verdict_notes(flags: pd.DataFrame | None, cells: list[str], rules: EvidenceConfig | None = None) -> list[str]:
    """The sentences a class's verdict adds to its reading: the flags of the evidence it read.

    Parameters
    ----------
    flags : DataFrame or None
        :func:`evidence_flags` of the class (rows of other classes are not filtered out here).
    cells : list of str
        The cells the verdict read, as ``"train→test"``, the full model's first: its ``undertrained`` flags are
        noted here; a masked model that did not learn the class is read by the verdict's own rules
        (:mod:`maskaudit.analyses.verdict`) and listed in the report's Training section.

    Returns
    -------
    list of str
        The hold-out counts, the cells under 0.5, the validation sets' counts and the folds' models at chance
        (gathered in one sentence each) and the baseline's counts, in that order.
    """
    if flags is None or not len(flags):
        return []
    rules = rules or EvidenceConfig()
    main = flags[flags["dataset"] == _MAIN]
    read = main["train_strategy"] + "→" + main["test_strategy"]
    notes = list(main.loc[(main["kind"] == "few_images") & (main["split"] == "test"), "text"])
    notes += list(main.loc[main["kind"].isin(["reversed", "below_chance"]) & (main["split"] == "test")
                           & read.isin(cells), "text"])
    few_val = main[(main["kind"] == "few_images") & (main["split"] == "val")]
    if len(few_val):
        notes.append(f"Few images in the validation sets (fewer than {rules.min_class_count}): "
                     f"{'; '.join(few_val['short'])}; those folds' early stopping rests on them.")
    models = {cell.split("→")[0] for cell in cells}

    def per_model(kind: str) -> tuple[pd.DataFrame, str]:
        chosen = main[(main["kind"] == kind) & main["train_strategy"].isin(models)]
        return chosen, "; ".join(f"{model} {', '.join(part['short'])}"
                                 for model, part in chosen.groupby("train_strategy", sort=False))

    chance, listed = per_model("val_chance")
    if len(chance):
        notes.append(f"Not clearly above chance on their own validation images (CI lower bound at most 0.5 or "
                     f"AUC below {0.5 + rules.chance_margin:.2f}): {listed}; their hold-out AUCs enter the fold "
                     "means all the same.")
    models = {cells[0].split("→")[0]} if cells else set()  # the masked models' are read by the verdict's rules
    undertrained, listed = per_model("undertrained")
    if len(undertrained):
        notes.append(f"Kept weights at chance on their own validation images (CI lower bound at most 0.5): "
                     f"{listed}. To tell a class these models cannot see from one they had no time to learn: "
                     f"{undertraining_advice(undertrained)}.")
    notes += list(main.loc[main["kind"] == "baseline_fewer", "text"])
    return notes
