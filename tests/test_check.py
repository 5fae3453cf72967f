"""`maskaudit check`: every row read as `prepare` would, on real images; warnings, errors, the CLI, `prepare`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from maskaudit.cli import app
from maskaudit.config import config_from_dict
from maskaudit.data.check import check_config, check_source, read_check, summarise
from maskaudit.data.sources.base import Record, Rejected
from maskaudit.data.sources.folder import FolderSource
from maskaudit.pipeline import Audit

CXR_DATA = {"source": "folder", "image_column": "image", "mask_column": "mask", "patient_column": "patient_id",
            "classes": ["covid"], "metadata_columns": ["sex", "age", "projection"]}
FUNDUS_DATA = {"source": "folder", "image_column": "image", "mask_column": "mask", "id_column": "image_id",
               "patient_column": "patient_id", "split_column": "split", "classes": ["glaucoma"],
               "metadata_columns": ["notching", "tilt"], "color": "rgb"}


def _config(data: dict, labels_csv: Path, **settings: object) -> dict:
    return {"data": {**data, "labels_csv": str(labels_csv)}, **settings}


def _check(config: dict):
    checks = check_config(config_from_dict(config))
    assert len(checks) == 1
    return checks[0]


def _group(check, group: str, value: str) -> dict:
    return next(g for g in check.groups if g["group"] == group and g["value"] == value)


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def cxr_copy(cxr_dir: Path, tmp_path: Path) -> Path:
    """A copy of the real chest X-rays (labels.csv, images, masks) that a test may damage."""
    root = tmp_path / "cxr"
    root.mkdir()
    shutil.copy(cxr_dir / "labels.csv", root / "labels.csv")
    for folder in ("images", "masks"):
        shutil.copytree(cxr_dir / folder, root / folder)
    return root


@pytest.fixture
def fundus_copy(fundus_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "fundus"
    shutil.copytree(fundus_dir, root, ignore=shutil.ignore_patterns("*.md"))
    return root


# ------------------------------------------------------------------------------------ real data, clean


def test_real_chest_xrays_pass_with_the_counts_of_their_labels_csv(cxr_dir: Path):
    check = _check(_config(CXR_DATA, cxr_dir / "labels.csv"))
    labels = pd.read_csv(cxr_dir / "labels.csv")
    assert (check.found, check.kept, check.rejected) == (len(labels), len(labels), 0)
    assert check.ok and check.warnings == [] and check.reasons == {}
    for value, count in labels["projection"].value_counts().items():
        assert _group(check, "projection", value) == {"group": "projection", "value": value, "found": count,
                                                     "kept": count, "rejected": 0, "reasons": ""}
    assert _group(check, "sex", "(blank)")["found"] == labels["sex"].isna().sum()
    assert _group(check, "sex", "M")["kept"] == (labels["sex"] == "M").sum()
    assert not any(g["group"] == "age" for g in check.groups)  # 40 distinct ages: not a grouping
    assert _group(check, "split", "all")["found"] == len(labels)  # no official split: one group
    assert _group(check, "covid", "positive")["kept"] == (labels["covid"] == 1).sum()
    (balance,) = check.balance
    assert balance == {"class": "covid", "split": "all", "positives": (labels["covid"] == 1).sum(),
                       "negatives": (labels["covid"] == 0).sum(),
                       "positive_patients": labels.loc[labels["covid"] == 1, "patient_id"].nunique(),
                       "negative_patients": labels.loc[labels["covid"] == 0, "patient_id"].nunique()}


def test_real_fundus_with_its_official_split_passes(fundus_dir: Path):
    check = _check(_config(FUNDUS_DATA, fundus_dir / "labels.csv", folds=5))
    labels = pd.read_csv(fundus_dir / "labels.csv")
    assert check.ok and check.warnings == [] and check.kept == len(labels) == 101
    for split, count in labels["split"].value_counts().items():
        assert _group(check, "split", split)["kept"] == count
    expected = labels.groupby("split")["glaucoma"].agg(positives="sum", negatives=lambda s: (s == 0).sum())
    for row in check.balance:
        assert (row["positives"], row["negatives"]) == tuple(expected.loc[row["split"]])
    assert [g["value"] for g in check.groups if g["group"] == "notching"] == sorted(labels["notching"].unique())
    assert not any(g["group"] == "tilt" for g in check.groups)  # one value only ("N"): says nothing


# ---------------------------------------------------------------------------------------- warnings


def test_a_projection_whose_images_are_all_deleted_vanishes(cxr_copy: Path):
    labels = pd.read_csv(cxr_copy / "labels.csv")
    supine = labels[labels["projection"] == "AP Supine"]
    for image in supine["image"]:
        (cxr_copy / image).unlink()
    check = _check(_config(CXR_DATA, cxr_copy / "labels.csv"))
    n = len(supine)
    assert check.ok and check.kept == len(labels) - n and check.reasons == {"image file not found": n}
    assert f"projection AP Supine: all {n} rows rejected: image file not found {n}" in check.warnings
    dataset_warning = (f"main: {n} of {len(labels)} rows rejected ({100 * n / len(labels):.0f} %): "
                       f"image file not found {n}")
    assert any(w.startswith(f"{dataset_warning}; the first: image file not found: images/") for w in check.warnings)
    # the rejected rows keep their sex and label (the source reads them from their CSV row)
    assert _group(check, "sex", "M")["rejected"] == (supine["sex"] == "M").sum()
    assert _group(check, "covid", "positive")["rejected"] == (supine["covid"] == 1).sum()


def test_more_than_5_percent_of_a_group_rejected_is_a_warning(cxr_copy: Path):
    labels = pd.read_csv(cxr_copy / "labels.csv")
    ap = labels[labels["projection"] == "AP"]
    for image in ap["image"][:3]:
        (cxr_copy / image).unlink()
    check = _check(_config(CXR_DATA, cxr_copy / "labels.csv"))
    share = f"{100 * 3 / len(ap):.0f} %"
    assert f"projection AP: 3 of {len(ap)} rows rejected ({share}, the dataset 2 %): image file not found 3" \
        in check.warnings
    assert not any(w.startswith(("main:", "projection PA", "projection AP Supine")) for w in check.warnings)
    assert check.ok  # warnings alone do not fail


def test_a_split_whose_images_are_all_deleted_is_a_warning_and_an_error(fundus_copy: Path):
    labels = pd.read_csv(fundus_copy / "labels.csv")
    for image in labels.loc[labels["split"] == "test", "image"]:
        (fundus_copy / image).unlink()
    check = _check(_config(FUNDUS_DATA, fundus_copy / "labels.csv"))
    assert "split test: all 51 rows rejected: image file not found 51" in check.warnings
    assert any("official hold-out set (split test) lost all its 51 rows" in e for e in check.errors)


# ------------------------------------------------------------------------------------------ errors


def test_a_class_without_positives_in_the_test_split_fails(fundus_copy: Path):
    labels = pd.read_csv(fundus_copy / "labels.csv")
    labels.loc[labels["split"] == "test", "glaucoma"] = 0
    labels.to_csv(fundus_copy / "labels.csv", index=False)
    path = fundus_copy / "audit.yaml"
    path.write_text(yaml.safe_dump(_config(FUNDUS_DATA, fundus_copy / "labels.csv")))
    result = _invoke("check", str(path))
    assert result.exit_code == 1
    assert "error: class glaucoma: no positive image in the official hold-out set (split test, 51 images)" \
        in " ".join(result.output.split())


def test_positives_from_too_few_patients_for_the_folds_fail(cxr_copy: Path):
    labels = pd.read_csv(cxr_copy / "labels.csv")
    few = labels["patient_id"].isin(labels["patient_id"].unique()[:4])
    labels["covid"] = few.astype(int)
    labels.to_csv(cxr_copy / "labels.csv", index=False)
    check = _check(_config(CXR_DATA, cxr_copy / "labels.csv", folds=5))
    assert check.errors == ["class covid: positive images come from only 4 patient(s); the hold-out set and each "
                            "of the 5 folds need one (at least 6)"]
    assert _check(_config(CXR_DATA, cxr_copy / "labels.csv", folds=3)).ok


def test_masking_strategies_without_masks_fail(cxr_dir: Path):
    data = {**CXR_DATA, "mask_column": None}
    check = _check(_config(data, cxr_dir / "labels.csv"))
    assert len(check.errors) == 1 and "no ROI masks" in check.errors[0] and "only_roi" in check.errors[0]
    assert _check(_config(data, cxr_dir / "labels.csv", strategies=["full"])).ok


def test_no_kept_image_and_a_class_without_negatives_fail():
    frame = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["p", "q"], "status": ["rejected", "rejected"],
                          "reason": ["image all zero: a", "image all zero: b"], "split": [None, None],
                          "covid": pd.array([1, 1], dtype="Int8")})
    assert summarise(frame, ["covid"]).errors == ["main: no image kept of 2 rows (image all zero 2)"]
    frame["status"] = "kept"
    frame["reason"] = ""
    errors = summarise(frame, ["covid"], folds=2).errors
    assert "class covid: no negative kept image (of 2)" in errors


def test_a_missing_file_in_the_config_is_one_line(tmp_path: Path):
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(_config(CXR_DATA, tmp_path / "nowhere.csv")))
    result = _invoke("check", str(path))
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert "nowhere.csv" in result.output


def test_an_external_dataset_that_cannot_be_read_is_its_own_error(cxr_dir: Path, fundus_dir: Path):
    config = _config(FUNDUS_DATA, fundus_dir / "labels.csv",
                     external=[{"name": "bad", "data": {**CXR_DATA, "labels_csv": str(cxr_dir / "labels.csv"),
                                                        "classes": ["glaucoma"]}}])
    main, bad = check_config(config_from_dict(config))
    assert main.ok and main.kept == 101
    assert bad.external and len(bad.errors) == 1 and "missing column(s) 'glaucoma'" in bad.errors[0]


# ----------------------------------------------------------------- what a source says from headers alone


class _Repeating(FolderSource):
    """The folder source with a repeated record and some records without masks (``Record.no_masks``, as the
    CheXmask sources say of an image without a usable mask row)."""

    def records(self) -> Iterator[Record | Rejected]:
        items = list(super().records())
        for number, item in enumerate(items):
            if isinstance(item, Record) and number % 10 == 0:
                item = dataclasses.replace(item, no_masks="no usable mask row")
            yield item
        yield items[2]  # the same image id again


def test_header_problems_repeated_ids_and_records_without_masks(cxr_copy: Path):
    """A mask of another size is found from the headers, with the reason `prepare` gives."""
    labels = pd.read_csv(cxr_copy / "labels.csv")
    mask = cxr_copy / labels["mask"][1]
    with Image.open(mask) as image:
        image.resize((image.width // 2, image.height // 2)).save(mask)
    config = config_from_dict(_config(CXR_DATA, cxr_copy / "labels.csv"))
    source = _Repeating(config.data)  # its header_problem: the folder source's
    main = check_source(source, config)
    n_no_masks = len(range(0, len(labels), 10))
    assert main.found == len(labels) + 1
    assert main.reasons == {"no usable mask row": n_no_masks, "mask size mismatch": 1, "duplicate image id": 1}
    assert main.kept == len(labels) - n_no_masks - 1 and main.kept_no_masks == 0
    external = check_source(source, config, "other", external=True)
    assert external.reasons == {"mask size mismatch": 1, "duplicate image id": 1}
    assert external.kept_no_masks == n_no_masks and external.kept == len(labels) - 1
    assert any(f"{n_no_masks} of {external.kept} kept images have no masks" in w for w in external.warnings)


# --------------------------------------------------------------------------------------------- CLI


def test_the_cli_prints_the_tables_and_writes_json(cxr_copy: Path, tmp_path: Path):
    labels = pd.read_csv(cxr_copy / "labels.csv")
    for image in labels.loc[labels["projection"] == "AP", "image"][:3]:
        (cxr_copy / image).unlink()
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(_config(CXR_DATA, cxr_copy / "labels.csv")))
    result = _invoke("check", str(path), "--json", str(tmp_path / "check.json"))
    assert result.exit_code == 0, result.output
    for text in ("rows", "rejected, by kind of reason", "per group", "projection", "AP Supine",
                 "kept images per class and split", "warning: projection AP: 3 of 26 rows rejected", "ok: 179"):
        assert text in result.output
    written = json.loads((tmp_path / "check.json").read_text())
    assert written["ok"] is True
    assert written["datasets"] == [c.to_dict() for c in check_config(config_from_dict(yaml.safe_load(
        path.read_text())))]
    assert {p.name for p in tmp_path.iterdir()} == {"cxr", "audit.yaml", "check.json"}  # nothing else written


# ------------------------------------------------------------------------------------ prepare, report


def test_prepare_keeps_the_same_check_and_the_report_shows_it(cxr_copy: Path, tmp_path: Path):
    labels = pd.read_csv(cxr_copy / "labels.csv")
    for image in [*labels.loc[labels["projection"] == "AP Supine", "image"],
                  *labels.loc[labels["projection"] == "AP", "image"][:3]]:
        (cxr_copy / image).unlink()
    mask = cxr_copy / labels.loc[labels["projection"] == "PA", "mask"].iloc[0]
    with Image.open(mask) as image:
        image.resize((image.width // 2, image.height // 2)).save(mask)  # found from the headers, and by prepare
    unmasked = {**CXR_DATA, "labels_csv": str(cxr_copy / "labels.csv"), "mask_column": None}
    config = config_from_dict(_config(CXR_DATA, cxr_copy / "labels.csv", image_size=32, workers=1,
                                      strategies=["full", "only_roi"], analyses={"run": []},
                                      external=[{"name": "plain", "data": unmasked}]))
    expected = check_config(config)
    audit = Audit.create(tmp_path / "run", config)
    audit.prepare()
    kept = read_check(audit.run.check("main"))
    assert kept is not None and kept.warnings == expected[0].warnings
    assert kept.reasons == expected[0].reasons == {"image file not found": 31, "mask size mismatch": 1}
    assert "projection AP Supine: all 28 rows rejected: image file not found 28" in kept.warnings
    # AP's loss (3 of 26, 12 %) is no more than 5 points above the dataset's (32 of 182, 18 %): no warning of its own
    assert not any(w.startswith("projection AP:") for w in kept.warnings)
    assert (kept.found, kept.kept, kept.reasons, kept.groups, kept.balance) == (
        expected[0].found, expected[0].kept, expected[0].reasons, expected[0].groups, expected[0].balance)
    external = read_check(audit.run.check("plain"))
    assert external is not None and external.dataset == "plain" and external.external
    assert external.warnings == expected[1].warnings
    assert audit.run.check("plain").is_file()
    audit.report()
    html = audit.run.report.read_text()
    for warning in kept.warnings:
        assert f"warning: {warning}" in html
    assert "<b>plain</b> (external)" in html


# ------------------------------------------------------------------------------ a class with no positives


def test_a_hold_out_set_without_positives_warns_at_split_and_its_verdict_says_why(fundus_copy: Path, caplog):
    import logging
    import math
    import types

    import numpy as np

    from maskaudit.analyses.verdict import class_verdict
    from maskaudit.config import VerdictConfig
    from maskaudit.data.splits import Splits
    from maskaudit.pipeline import split_warnings

    labels = pd.read_csv(fundus_copy / "labels.csv")
    labels.loc[labels["split"] == "test", "glaucoma"] = 0  # every hold-out image negative
    labels.to_csv(fundus_copy / "labels.csv", index=False)
    config = config_from_dict(_config(FUNDUS_DATA, fundus_copy / "labels.csv", image_size=16, workers=1,
                                      strategies=["full"], folds=2, analyses={"run": []}))
    audit = Audit.create(fundus_copy.parent / "run", config)
    audit.prepare()
    with caplog.at_level(logging.WARNING, logger="maskaudit.pipeline"):
        audit.split()
    expected = "class glaucoma: no positive image in the hold-out set (51 images): no hold-out AUC, so no verdict"
    # prepare's check already says it as an error of the official split; split says what it means for the run
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("split:")] == [f"split: {expected}"]
    record = json.loads(audit.run.stages.read_text())["split"]
    assert record["warnings"] == [expected]  # the report's table of stages shows it

    # a fold's training images without a positive (or a negative): the fold's models never see one
    store = types.SimpleNamespace(classes=["x", "y"], labels=np.array([[1, 0], [0, 1], [0, 0], [1, 1], [0, 1]],
                                                                      dtype=np.float32))
    splits = Splits(test=np.array([0, 1]), folds=[np.array([2]), np.array([3, 4])], method="")
    assert split_warnings(store, splits) == [
        "class x: no positive image in the training images of fold 1 (1 image): that fold's models never see one",
        "class y: no negative image in the training images of fold 0 (2 images): that fold's models never see one",
        "class y: no positive image in the training images of fold 1 (1 image): that fold's models never see one",
    ]

    # the verdict: what is missing, not "the run lacks the full model"
    cells = pd.DataFrame([{"train_strategy": t, "test_strategy": t, "class": "glaucoma", "auc_mean": math.nan,
                           "ci_low": math.nan, "ci_high": math.nan, "n_pos": 0, "n_neg": 51,
                           "reason": "no positive image"} for t in ("full", "no_roi")]
                         ).set_index(["train_strategy", "test_strategy"])
    row = class_verdict(cells, VerdictConfig())
    assert (row["verdict"], row["label"]) == ("undetermined", "undetermined: no positive image in the hold-out set")
    assert row["reading"].startswith("No positive image of glaucoma in the hold-out set: no AUC, no verdict.")
    missing = class_verdict(cells.drop(index=[("full", "full")]), VerdictConfig())
    assert missing["label"] == "undetermined: the run lacks the full model"  # the run has no full model at all
