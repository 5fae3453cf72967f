"""A data check before hours of training: every problem of a config's data in one report.

``maskaudit check CONFIG`` reads every row of the main dataset and of each external one the way
:func:`maskaudit.data.store.prepare_store` would (the source's records and rejections, repeated
image ids, records without masks, and :meth:`Source.header_problem`, which opens file headers
only), and :func:`summarise` turns the rows into counts, warnings and errors. ``prepare`` runs the
same :func:`summarise` over the store's manifest and keeps the result in the run directory
(:meth:`maskaudit.rundir.RunDir.check`, written by :func:`write_check`), for its log and the report.

The rules (what :func:`summarise` reports):

*Warnings* (the run works, but look):

- a group loses every row (found > 0, kept 0), or more than :data:`REJECTED_SHARE` of its rows
  are rejected and that share is more than :data:`REJECTED_SHARE` above the dataset's own (a
  group that loses no more than the rest is covered by the dataset's warning); a group is a
  value of the official split, of a metadata column with at most :data:`MAX_GROUP_VALUES`
  distinct values, of the two together (``split / camera``: a camera lost from the hold-out
  set alone), or a class label (positive / negative);
- more than :data:`REJECTED_SHARE` of the whole dataset's rows are rejected;
- an external dataset: a class with no kept positive (or negative), which gets no AUC there;
  kept images without masks, which are scored under ``full`` alone;
- found only by ``prepare``, which decodes and hashes every file (``maskaudit check`` reads headers
  only, so it cannot): rows whose image file is byte-identical to an earlier row's (rejected, or
  kept under ``data_checks.duplicate_images: warn``: the same image can then be on both sides of
  the split); kept images whose ROI covers more than ``data_checks.max_roi_fraction`` (95 %) of the
  image, which ``no_roi`` leaves blank, or less than ``min_roi_fraction`` (0.1 %), which ``only_roi``
  leaves blank (the manifest's ``roi_fraction_<roi>``). Each is counted in :attr:`DataCheck.flagged`.

*Errors* (``run`` would fail, or its numbers would mean little):

- no kept image;
- a class with no kept positive, or no kept negative;
- masking strategies while the source has no ROI masks;
- with an official hold-out set (``split == "test"``): a class with no positive or no negative
  in it; the hold-out set losing every row (``split`` would draw its own); a patient on both sides;
  fewer patients, or fewer patients with a positive (negative) image, outside it than folds;
- without one: fewer patients, or fewer patients with a positive (negative) image, than
  ``folds + 1`` (the patient-grouped hold-out set and every fold each need one; see
  :mod:`maskaudit.data.splits`), or too few patients left beside the hold-out set for the folds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from maskaudit.config import AuditConfig
from maskaudit.data.sources import make_source
from maskaudit.data.sources.base import Rejected, Source
from maskaudit.data.store import reason_kind
from maskaudit.errors import MaskauditError
from maskaudit.rundir import read_json, write_json

#: A metadata column with at most this many distinct values is a grouping (camera, projection, sex …).
MAX_GROUP_VALUES = 12
#: More than this share of a group's (or the dataset's) rows rejected is a warning.
REJECTED_SHARE = 0.05
#: The group value of a known row whose value is missing.
BLANK = "(blank)"


@dataclass
class DataCheck:
    """What :func:`summarise` found in one dataset.

    Attributes
    ----------
    dataset : str
        ``"main"`` or the external dataset's name.
    external : bool
        An external dataset (scored, never trained on).
    source : str
        The source, as it describes itself.
    found, kept, rejected : int
        Rows the source offered, and how many of them would be kept and rejected.
    kept_no_masks : int
        Kept rows without masks (external datasets only: scored under ``full`` alone).
    reasons : dict of str to int
        Rejected rows per kind of reason (:func:`maskaudit.data.store.reason_kind`), most first.
    groups : list of dict
        One row per group: ``group`` (split, a metadata column or a class), ``value``, ``found``,
        ``kept``, ``rejected`` and ``reasons`` (text, e.g. ``"image file not found 3"``).
    balance : list of dict
        Kept images per class and split: ``class``, ``split``, ``positives``, ``negatives``,
        ``positive_patients``, ``negative_patients``.
    warnings, errors : list of str
        In plain words, with the numbers; any error makes ``maskaudit check`` exit 1.
    flagged : dict of str to int
        Rows behind the warnings that only ``prepare`` finds (see the module's docstring), by what
        they are, e.g. ``{"ROI lungs covers more than 95 %": 3}``.
    """

    dataset: str
    external: bool = False
    source: str = ""
    found: int = 0
    kept: int = 0
    rejected: int = 0
    kept_no_masks: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    balance: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    flagged: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataCheck:
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------- reading


def source_frame(source: Source, external: bool = False) -> pd.DataFrame:
    """Every row of ``source`` as ``prepare`` would judge it, before decoding any pixel.

    A record is rejected, in the order of :func:`~maskaudit.data.store.prepare_store`, for having
    no masks (``Record.no_masks`` as the reason; an external dataset keeps it), for a repeated image
    id (``duplicate image id``), or for what :meth:`Source.header_problem` says.

    Returns
    -------
    DataFrame
        The manifest's columns: ``image_id``, ``patient_id`` (missing where the source rejected a
        row without knowing it), ``status``, ``reason``, ``row``, ``split``, one nullable Int8 column per class,
        one column per metadata column, and ``no_masks`` (text, empty when the record has masks).
    """
    classes, metadata = list(source.classes), list(source.metadata_columns)
    ids, patients, statuses, reasons, rows, splits, no_masks = [], [], [], [], [], [], []
    labels: dict[str, list[Any]] = {c: [] for c in classes}
    values: dict[str, list[Any]] = {c: [] for c in metadata}
    first_seen: dict[str, int] = {}
    for position, item in enumerate(source.records()):
        ids.append(item.image_id)
        rows.append(item.row)
        if isinstance(item, Rejected):  # with what the source could read of its row (its group)
            patients.append(item.patient_id)
            statuses.append("rejected")
            reasons.append(item.reason)
            splits.append(item.split)
            no_masks.append("")
            for name, column in labels.items():
                column.append(item.labels.get(name))
            for name, column in values.items():
                column.append(item.metadata.get(name))
            continue
        if item.no_masks and (not external or not source.rois):
            reason = item.no_masks
        elif item.image_id in first_seen:
            reason = f"duplicate image id: {item.image_id!r} (first at input {first_seen[item.image_id]})"
        else:
            first_seen[item.image_id] = position
            reason = source.header_problem(item)
        patients.append(item.patient_id)
        statuses.append("rejected" if reason else "kept")
        reasons.append(reason)
        splits.append(item.split)
        no_masks.append(item.no_masks)
        for name, column in labels.items():
            column.append(item.labels.get(name))
        for name, column in values.items():
            column.append(item.metadata.get(name))
    return pd.DataFrame({
        "image_id": pd.Series(ids, dtype=object), "patient_id": pd.Series(patients, dtype=object),
        "status": pd.Series(statuses, dtype=object), "reason": pd.Series(reasons, dtype=object),
        "row": pd.array(rows, dtype="Int64"), "split": pd.Series(splits, dtype=object),
        **{c: pd.array(v, dtype="Int8") for c, v in labels.items()},
        **{c: pd.Series(v, dtype=object) for c, v in values.items()},
        "no_masks": pd.Series(no_masks, dtype=object),
    })  # fmt: skip


# --------------------------------------------------------------------------------------- summary


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "0 %"


def _reason_text(kinds: pd.Series) -> str:
    """``"image file not found 3, duplicate image id 1"``: rejected rows per kind, most first."""
    counts = kinds.value_counts()
    return ", ".join(f"{kind or 'no reason given'} {n}" for kind, n in counts.items())


def _group_text(values: pd.Series) -> pd.Series:
    """Group values as text: whole floats without ``.0``, missing ones :data:`BLANK`."""
    def text(value: Any) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return BLANK
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).strip() or BLANK

    return values.astype(object).map(text)


def _groupings(frame: pd.DataFrame, classes: Sequence[str], metadata_columns: Sequence[str],
               known: pd.Series) -> dict[str, pd.Series]:
    """Each grouping's value per row (missing for rows of unknown context)."""
    groupings: dict[str, pd.Series] = {}
    split = frame["split"] if "split" in frame else pd.Series(None, index=frame.index, dtype=object)
    if split[known].notna().any():
        groupings["split"] = _group_text(split).str.lower().where(known)
    else:
        groupings["split"] = pd.Series("all", index=frame.index, dtype=object)
    official = groupings["split"].nunique() > 1
    for name in metadata_columns:
        if name in frame and 2 <= frame.loc[known, name].nunique(dropna=False) <= MAX_GROUP_VALUES:
            groupings[name] = _group_text(frame[name]).where(known)
            if official:  # e.g. "test / Remidio": a camera lost from the hold-out set alone
                groupings[f"split / {name}"] = groupings["split"] + " / " + groupings[name]
    for name in classes:
        label = frame[name].astype("Float64")
        side = pd.Series(None, index=frame.index, dtype=object)
        side[label.eq(1).fillna(False)] = "positive"
        side[label.eq(0).fillna(False)] = "negative"
        groupings[name] = side
    return groupings


def summarise(
    frame: pd.DataFrame,
    classes: Sequence[str],
    metadata_columns: Sequence[str] = (),
    *,
    dataset: str = "main",
    external: bool = False,
    source: str = "",
    folds: int = 5,
    test_fraction: float = 0.2,
    has_masks: bool = True,
    masked_strategies: Sequence[str] = (),
    min_roi_fraction: float = 0.001,
    max_roi_fraction: float = 0.95,
) -> DataCheck:
    """Counts, warnings and errors of one dataset's rows (the rules are in the module's docstring).

    Parameters
    ----------
    frame : DataFrame
        One row per input, with the columns of a store's manifest: ``image_id``, ``patient_id``,
        ``status`` ("kept"/"rejected"), ``reason``, ``split``, the 0/1 class columns and the
        metadata columns; optionally ``no_masks`` (text). A rejected row with no patient, split
        or metadata (its source could read none of them) counts in the totals but in no group.
    classes, metadata_columns : sequence of str
        The source's classes and metadata columns.
    dataset : str
        ``"main"`` or the external dataset's name, for the messages.
    external : bool
        An external dataset: no split or fold rules; a class without positives and images
        without masks are warnings.
    source : str
        The source's description, kept in the result.
    folds, test_fraction : int, float
        The config's ``folds`` and ``test_fraction``.
    has_masks : bool
        Whether the source has ROI masks at all.
    masked_strategies : sequence of str
        The config's training and test strategies other than ``full``.
    min_roi_fraction, max_roi_fraction : float
        ``data_checks``' bounds of a kept image's ROI share (the ``roi_fraction_<roi>`` columns, which
        only a prepared store's manifest has).

    Returns
    -------
    DataCheck
    """
    n = len(frame)
    kept = frame["status"].eq("kept").to_numpy()
    kinds = frame["reason"].fillna("").map(reason_kind)
    no_masks = frame["no_masks"].fillna("").astype(str) if "no_masks" in frame else pd.Series("", index=frame.index)
    context = ["patient_id", "split", *(c for c in metadata_columns if c in frame)]
    known = frame[[c for c in context if c in frame]].notna().any(axis=1) | pd.Series(kept, index=frame.index)
    check = DataCheck(dataset=dataset, external=external, source=source, found=n, kept=int(kept.sum()),
                      rejected=int(n - kept.sum()), kept_no_masks=int((kept & no_masks.ne("")).sum()))
    check.reasons = {str(k): int(v) for k, v in kinds[~kept].value_counts().items()}
    warn, fail = check.warnings.append, check.errors.append
    if check.rejected / max(n, 1) > REJECTED_SHARE and check.kept:
        first = str(frame.loc[~kept, "reason"].iloc[0])
        warn(f"{dataset}: {check.rejected} of {n} rows rejected ({_percent(check.rejected, n)}): "
             f"{_reason_text(kinds[~kept])}; the first: {first}")

    # every group: rows found, kept, rejected by reason; a warning where it loses more than the rest
    overall = check.rejected / max(n, 1)
    groupings = _groupings(frame, classes, metadata_columns, known)
    for name, values in groupings.items():
        part = pd.DataFrame({"value": values, "kept": kept, "kind": kinds}).dropna(subset=["value"])
        for value, rows in part.groupby("value", sort=True):
            found, rows_kept = len(rows), int(rows["kept"].sum())
            reasons = _reason_text(rows.loc[~rows["kept"], "kind"])
            check.groups.append({"group": name, "value": str(value), "found": found, "kept": rows_kept,
                                 "rejected": found - rows_kept, "reasons": reasons})
            if name == "split" and value == "all":
                continue  # the dataset itself
            label = f"{dataset}: {name} {value}" if external else f"{name} {value}"
            share = (found - rows_kept) / found
            if found and not rows_kept:
                warn(f"{label}: all {found} rows rejected: {reasons}")
            elif share > REJECTED_SHARE and share > overall + REJECTED_SHARE:
                warn(f"{label}: {found - rows_kept} of {found} rows rejected "
                     f"({_percent(found - rows_kept, found)}, the dataset {_percent(check.rejected, n)}): {reasons}")

    if not check.kept:
        fail(f"{dataset}: no image kept of {n} rows" + (f" ({_reason_text(kinds)})" if n else ""))
        return check
    if not has_masks and masked_strategies and not external:
        fail(f"{dataset}: the data has no ROI masks, but strategies {', '.join(masked_strategies)} need them; "
             "set `data.mask_column` or use `strategies: [full]`")
    _prepare_findings(check, frame, kept, kinds, dataset if external else "", min_roi_fraction, max_roi_fraction)
    if external and check.kept_no_masks and masked_strategies:
        warn(f"{dataset}: {check.kept_no_masks} of {check.kept} kept images have no masks "
             f"({_reason_text(no_masks[kept & no_masks.ne('')].map(reason_kind))}); they are scored under full only")

    # positives and negatives per class and split, among the kept rows
    rows = frame.loc[kept]
    split = groupings["split"][kept].fillna(BLANK)
    for name in classes:
        label = rows[name].astype("Float64")
        for value in sorted(split.unique()):
            here = split.eq(value)
            pos, neg = here & label.eq(1).fillna(False), here & label.eq(0).fillna(False)
            check.balance.append({"class": name, "split": value, "positives": int(pos.sum()),
                                  "negatives": int(neg.sum()),
                                  "positive_patients": int(rows.loc[pos, "patient_id"].nunique()),
                                  "negative_patients": int(rows.loc[neg, "patient_id"].nunique())})
        for side, count in (("positive", int(label.eq(1).sum())), ("negative", int(label.eq(0).sum()))):
            if not count:
                if external:
                    warn(f"{dataset}: class {name} has no {side} kept image, so no AUC on this dataset")
                else:
                    fail(f"class {name}: no {side} kept image (of {check.kept})")
    if not external:
        _split_rules(check, rows, split, classes, folds, test_fraction, groupings["split"])
    return check


def _share(value: float) -> str:
    """``95 %``, ``0.1 %``: a share as the warnings write it."""
    return f"{100 * value:g} %"


def _count(n: int, noun: str) -> str:
    """``1 image``, ``3 images``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _examples(ids: pd.Series, limit: int = 3) -> str:
    shown = ", ".join(map(str, ids.iloc[:limit]))
    return shown + (", …" if len(ids) > limit else "")


def _prepare_findings(check: DataCheck, frame: pd.DataFrame, kept: Any, kinds: pd.Series, dataset: str,
                      min_roi_fraction: float, max_roi_fraction: float) -> None:
    """The warnings only a prepared store's manifest can give: the same image file twice, a ROI that covers
    (almost) the whole image or almost none of it. Counted in ``check.flagged``."""
    warn = check.warnings.append
    label = f"{dataset}: " if dataset else ""
    ids = frame["image_id"].astype(str)
    twice = kinds.eq("duplicate image file").to_numpy() & ~kept
    if twice.any():
        n = check.flagged["rejected: same image file as an earlier row"] = int(twice.sum())
        warn(f"{label}{_count(n, 'row')} rejected: {'its' if n == 1 else 'their'} image file is byte-identical to "
             f"an earlier row's ({frame.loc[twice, 'reason'].iloc[0]}{', …' if n > 1 else ''}); "
             "`data_checks.duplicate_images: warn` keeps such rows")
    if "same_file_as" in frame:
        same = frame["same_file_as"].fillna("").astype(str)
        kept_twice = kept & same.ne("").to_numpy()
        if kept_twice.any():
            n = check.flagged["kept: same image file as an earlier row"] = int(kept_twice.sum())
            first = f"{ids[kept_twice].iloc[0]!r} is the file of {same[kept_twice].iloc[0]}"
            warn(f"{label}{_count(n, 'kept image')} {'is' if n == 1 else 'are'} the same image file as an earlier "
                 f"row ({first}{', …' if n > 1 else ''}; data_checks.duplicate_images: warn): the same image may be "
                 "in both the hold-out set and the training images")
    for column in [c for c in frame.columns if str(c).startswith("roi_fraction_")]:
        roi = str(column).removeprefix("roi_fraction_")
        share = pd.to_numeric(frame[column], errors="coerce")
        for bound, over, strategy, blank in ((max_roi_fraction, True, "no_roi", "blank"),
                                             (min_roi_fraction, False, "only_roi", "(almost) blank")):
            flagged = kept & (share.gt(bound) if over else share.lt(bound)).fillna(False).to_numpy()
            if flagged.any():
                n = check.flagged[f"ROI {roi} covers {'more' if over else 'less'} than {_share(bound)}"] = \
                    int(flagged.sum())
                warn(f"{label}{_count(n, 'image')} whose ROI {roi} covers {'more' if over else 'less'} than "
                     f"{_share(bound)} of the image: {strategy} leaves {'it' if n == 1 else 'them'} {blank} "
                     f"({_examples(ids[flagged])})")


def _split_rules(check: DataCheck, rows: pd.DataFrame, split: pd.Series, classes: Sequence[str], folds: int,
                 test_fraction: float, all_splits: pd.Series) -> None:
    """The errors of the hold-out set and folds :func:`maskaudit.data.splits.make_splits` would make."""
    fail = check.errors.append
    patients = rows["patient_id"].astype(str)
    test = split.eq("test").to_numpy()
    if all_splits.eq("test").any() and not test.any():
        fail(f"the official hold-out set (split test) lost all its {int(all_splits.eq('test').sum())} rows; "
             "`split` would draw a hold-out set of its own instead")
    if test.any():
        crossing = sorted(set(patients[test]) & set(patients[~test]))
        if crossing:
            fail(f"the official split puts {len(crossing)} patient(s) in both test and train, e.g. "
                 f"{', '.join(crossing[:3])}")
        rest = patients[~test]
        if rest.nunique() < folds:
            fail(f"only {rest.nunique()} patients outside the official hold-out set for {folds} folds")
        for name in classes:
            label = rows[name].astype("Float64")
            for side, value in (("positive", 1), ("negative", 0)):
                is_side = label.eq(value).fillna(False).to_numpy()
                if not (is_side & test).any():
                    fail(f"class {name}: no {side} image in the official hold-out set (split test, "
                         f"{int(test.sum())} images), so no hold-out AUC")
                outside = patients[is_side & ~test].nunique()
                if 0 < outside < folds:
                    fail(f"class {name}: {side} images outside the hold-out set come from only {outside} "
                         f"patient(s); each of the {folds} folds needs one")
        return
    n_patients = patients.nunique()
    beside = n_patients - math.ceil(test_fraction * n_patients)
    if n_patients < 2 or beside < folds:
        fail(f"only {n_patients} patients: after a hold-out set of {test_fraction:g} of them, {max(beside, 0)} "
             f"remain for {folds} folds")
        return
    for name in classes:
        label = rows[name].astype("Float64")
        for side, value in (("positive", 1), ("negative", 0)):
            count = patients[label.eq(value).fillna(False).to_numpy()].nunique()
            if 0 < count < folds + 1:
                fail(f"class {name}: {side} images come from only {count} patient(s); the hold-out set and "
                     f"each of the {folds} folds need one (at least {folds + 1})")


# ---------------------------------------------------------------------------------------- config


def _describe(description: dict[str, Any]) -> str:
    """``folder /data/labels.csv``: a source's name and the file or folder it reads."""
    where = next((description[k] for k in ("labels_csv", "root") if description.get(k)), "")
    return f"{description.get('name', '')} {where}".strip()


def masked_strategies(config: AuditConfig) -> list[str]:
    """The config's training and test strategies that need masks (all but ``full``), as ``split`` tests."""
    return sorted((set(config.strategies) | set(config.eval_strategies)) - {"full"})


def check_source(source: Source, config: AuditConfig, dataset: str = "main", external: bool = False) -> DataCheck:
    """Read every row of ``source`` (headers only) and :func:`summarise` them under ``config``'s rules.

    Headers only: the same image file on two rows and a ROI covering (almost) all or none of its image are
    found by ``prepare``, which decodes every file (its check, :func:`check_store`, says them)."""
    frame = source_frame(source, external)
    return summarise(frame, source.classes, source.metadata_columns, dataset=dataset, external=external,
                     source=_describe({"name": source.name, **source.describe()}), folds=config.folds,
                     test_fraction=config.test_fraction,
                     has_masks=bool(source.rois), masked_strategies=masked_strategies(config))


def check_config(config: AuditConfig) -> list[DataCheck]:
    """Check the main dataset and each external one of ``config``; nothing is written.

    A dataset whose source cannot be built (a missing column, an unreadable table) becomes a
    :class:`DataCheck` with that one error, and the others are still checked.
    """
    datasets = [("main", config, False)]
    datasets += [(ext.name, config.for_dataset(ext.name), True) for ext in config.external]  # as prepare
    checks = []
    for name, dataset_config, external in datasets:
        try:
            checks.append(check_source(make_source(dataset_config), dataset_config, name, external))
        except MaskauditError as exc:
            checks.append(DataCheck(dataset=name, external=external, errors=[str(exc)]))
    return checks


def check_store(store: Any, config: AuditConfig, dataset: str = "main", external: bool = False) -> DataCheck:
    """:func:`summarise` a prepared store's manifest (what ``prepare`` keeps with :func:`write_check`)."""
    return summarise(store.manifest, store.classes, store.metadata_columns, dataset=dataset, external=external,
                     source=_describe(store.source), folds=config.folds, test_fraction=config.test_fraction,
                     has_masks=bool(store.rois), masked_strategies=masked_strategies(config),
                     min_roi_fraction=config.data_checks.min_roi_fraction,
                     max_roi_fraction=config.data_checks.max_roi_fraction)


def write_check(path: Path, check: DataCheck) -> None:
    """Keep ``check`` at ``path``, the run's ``RunDir.check(dataset)`` (what ``prepare`` does)."""
    write_json(path, check.to_dict())


def read_check(path: Path) -> DataCheck | None:
    """The check :func:`write_check` kept at ``path`` (``RunDir.check(dataset)``), or None when there is none."""
    path = Path(path)
    return DataCheck.from_dict(read_json(path)) if path.is_file() else None


# -------------------------------------------------------------------------------------- printing


def print_checks(checks: Sequence[DataCheck], console: Any = None) -> None:
    """Tables per dataset (rows, reasons, groups, positives per class and split), then warnings and errors."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(markup=False, highlight=False)
    for check in checks:
        title = f"{check.dataset}{' (external)' if check.external else ''}"
        console.rule(f"{title}: {check.source}" if check.source else title)
        if check.found or check.kept:
            rows = Table("found", "kept", "rejected", *(["kept, no masks"] if check.external else []),
                         title="rows", title_justify="left")
            rows.add_row(str(check.found), str(check.kept), str(check.rejected),
                         *([str(check.kept_no_masks)] if check.external else []))
            console.print(rows)
        if check.reasons:
            reasons = Table("reason", "rows", title="rejected, by kind of reason", title_justify="left")
            for kind, count in check.reasons.items():
                reasons.add_row(kind or "no reason given", str(count))
            console.print(reasons)
        if check.groups:
            groups = Table("group", "value", "found", "kept", "rejected", "rejected by reason",
                           title="per group", title_justify="left")
            for g in check.groups:
                groups.add_row(g["group"], g["value"], str(g["found"]), str(g["kept"]), str(g["rejected"]),
                               g["reasons"])
            console.print(groups)
        if check.balance:
            balance = Table("class", "split", "positives", "negatives", "patients +", "patients −",
                            title="kept images per class and split", title_justify="left")
            for b in check.balance:
                balance.add_row(b["class"], b["split"], str(b["positives"]), str(b["negatives"]),
                                str(b["positive_patients"]), str(b["negative_patients"]))
            console.print(balance)
        for text in check.warnings:
            console.print(f"warning: {text}", style="yellow")
        for text in check.errors:
            console.print(f"error: {text}", style="bold red")
        if check.ok and not check.warnings:
            console.print("no problems found", style="green")
    errors = sum(len(c.errors) for c in checks)
    if errors:
        console.print(f"{errors} error(s): `maskaudit run` would fail or its numbers would mean little",
                      style="bold red")
    else:
        console.print(f"ok: {sum(c.kept for c in checks)} images would be kept in {len(checks)} dataset(s)",
                      style="green")
