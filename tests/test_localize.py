"""Shortcut localisation (issue 16, parts 1 and 5): the grid, the occlusion, the tests, and a run whose truth is known.

The run plants two outside markers at known places (``SyntheticClass.anchors``): ``device`` always in the top-left
corner, ``tag`` in the bottom-left or the bottom-right corner, one drawn per image. The occlusion map must find the
one and both of the other, and name no cell the marker never touches.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from maskaudit.analyses.localize import (
    cell_boxes,
    cell_index,
    cell_tests,
    filled,
    grid_edges,
    hidden_fraction,
    kept_pixels,
    localization_sentence,
    localized_cells,
    occlude,
    occlusion_predictions,
    region_of,
)
from maskaudit.cli import app
from maskaudit.config import SyntheticData, config_from_dict
from maskaudit.data.sources.synthetic import SyntheticSource
from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.loader import Batch, batches
from maskaudit.masking import apply_strategy
from maskaudit.rundir import read_json
from maskaudit.stats import benjamini_hochberg, holm
from maskaudit.strategies import MaskSpec, evidence_cells, probe_cells

# ------------------------------------------------------------------------------------------ the grid


def test_grid_edges_cover_the_image_and_every_pixel_has_one_cell():
    assert grid_edges(64, 8).tolist() == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    assert grid_edges(10, 4).tolist() == [0, 3, 5, 8, 10]  # uneven: 2.5, 5, 7.5 rounded half up
    index = cell_index(10, 4)
    boxes = cell_boxes(10, 4)
    for _, box in boxes.iterrows():
        inside = np.zeros((10, 10), bool)
        inside[box["y0"]:box["y1"], box["x0"]:box["x1"]] = True
        assert (inside == (index == box["cell"])).all()
    assert np.bincount(index.ravel()).sum() == 100 and len(np.unique(index)) == 16
    with pytest.raises(MaskauditError, match="analyses.localize.grid=40: the images are 32 pixels wide"):
        grid_edges(32, 40)


def test_regions_are_named_by_the_third_of_the_image_a_cell_lies_in():
    assert [region_of(0, c, 8) for c in (0, 3, 7)] == ["top-left corner", "top edge", "top-right corner"]
    assert [region_of(r, 0, 8) for r in (2, 3, 4, 5)] == ["top-left corner", "left edge", "left edge",
                                                          "bottom-left corner"]
    assert region_of(4, 4, 8) == "centre" and region_of(7, 7, 8) == "bottom-right corner"
    assert region_of(1, 2, 4) == "centre" and region_of(3, 0, 4) == "bottom-left corner"


def test_hidden_fraction_counts_the_removed_pixels_of_each_cell():
    keep = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    keep[0, 0, :2, :2] = False  # image 0: cell 0 of a 2x2 grid wholly removed
    keep[1, 0, 0, 2] = False  # image 1: one pixel of cell 1
    share = hidden_fraction(keep, torch.from_numpy(cell_index(4, 2)), 4)
    assert share.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0]]


@pytest.mark.parametrize("fill", ["zero", "mean", "noise"])
def test_a_hidden_cell_is_filled_as_the_masking_fills_and_a_removed_pixel_stays_as_it_was(fill: str):
    images = torch.rand(2, 1, 8, 8)
    roi = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    roi[:, :, 2:5, 2:5] = True
    spec = MaskSpec(roi="lungs", fill=fill, fill_value=0.4, noise_seed=11)
    batch = Batch(images=images, roi=roi, labels=torch.zeros(2, 1), index=torch.tensor([3, 9]))
    masked = batch.masked("no_roi_bbox", spec)
    index = torch.from_numpy(cell_index(8, 2))
    out = occlude(masked, filled(batch, spec), index, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 3]))
    # cell 0 (rows and columns 0-3) filled: exactly what no_roi_bbox puts in place of a pixel it removes
    everything = torch.ones_like(roi)
    removed = apply_strategy(images, everything, "no_roi_bbox", fill=fill, fill_value=0.4,
                             noise_seeds=(batch.index + 11) % 2**62)
    assert torch.equal(out[0, :, :4, :4], removed[0, :, :4, :4])
    assert torch.equal(out[1, :, :4, :4], removed[1, :, :4, :4])
    assert torch.equal(out[0, :, 4:, :], masked[0, :, 4:, :]) and torch.equal(out[0, :, :, 4:], masked[0, :, :, 4:])
    gone = ~kept_pixels(roi, "no_roi_bbox")[0]
    assert torch.equal(out[0][gone], masked[0][gone])  # what the masking removed, hiding the cell leaves as it was
    assert torch.equal(out[2, :, :4, :4], masked[1, :, :4, :4])
    assert torch.equal(out[2, :, 4:, 4:], removed[1, :, 4:, 4:])


# ------------------------------------------------------------------------------------------ the tests


def test_holm_and_benjamini_hochberg_against_a_hand_computed_example():
    # sorted: 0.005, 0.01, 0.03, 0.04 (m = 4)
    # Holm: 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06
    # BH: min over j >= i of 4 p_(j) / j: 0.02, 0.02, 0.04, 0.04
    p = [0.01, 0.04, 0.03, 0.005]
    assert np.allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    # an undefined test stays undefined and does not count in m; adjusted values never exceed 1
    assert np.allclose(holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04], equal_nan=True)
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0] and benjamini_hochberg([0.6, 0.7]).tolist() == [0.7, 0.7]
    with pytest.raises(ValueError, match="p-values must lie in"):
        holm([0.2, 1.5])


def test_cell_tests_find_the_cell_that_carries_the_scores_and_skip_the_hidden_ones():
    rng = np.random.default_rng(0)
    labels = np.repeat([0.0, 1.0], 40)
    signal = labels + rng.normal(0, 0.5, (2, 80))  # two folds' models, AUC about 0.9
    occluded = np.repeat(signal[:, None, :], 4, axis=1) + rng.normal(0, 0.01, (2, 4, 80))
    occluded[:, 1] = rng.normal(0, 0.5, (2, 80))  # hiding cell 1 takes the signal away
    hidden = np.zeros((80, 4))
    hidden[:60, 3] = 1.0  # cell 3: hidden by the test masking in 75 % of the images
    table = cell_tests(labels, signal, occluded, hidden)
    assert table["tested"].tolist() == [True, True, True, False]
    assert "hides it in 75% of the images" in table.loc[3, "reason"] and math.isnan(table.loc[3, "p"])
    assert table.loc[1, "drop"] > 0.3 and table.loc[1, "p"] < 1e-6
    assert table.loc[1, "drop_ci_low"] < table.loc[1, "drop"] < table.loc[1, "drop_ci_high"]
    assert (table.loc[[0, 2], "p"] > 0.01).all() and (table.loc[[0, 2], "drop"].abs() < 0.05).all()
    assert (table["auc"].dropna() == table.loc[0, "auc"]).all()  # one unoccluded AUC for every cell
    # identical scores: a drop of 0 with an interval of 0 and p = 1
    same = cell_tests(labels, signal, np.repeat(signal[:, None, :], 2, axis=1), np.zeros((80, 2)))
    assert same["drop"].tolist() == [0.0, 0.0] and same["p"].tolist() == [1.0, 1.0]
    assert same["drop_ci_low"].tolist() == [0.0, 0.0]


def _cells_table(drops: dict[int, float], significant: set[int], grid: int = 4, auc: float = 0.9) -> pd.DataFrame:
    boxes = cell_boxes(32, grid)
    boxes["tested"] = True
    boxes["auc"] = auc
    boxes["drop"] = boxes["cell"].map(drops).fillna(0.0)
    boxes["auc_occluded"] = auc - boxes["drop"]
    boxes["drop_ci_low"], boxes["drop_ci_high"] = boxes["drop"] - 0.05, boxes["drop"] + 0.05
    boxes["p"] = np.where(boxes["cell"].isin(significant), 1e-6, 0.5)
    boxes["significant"] = boxes["cell"].isin(significant)
    boxes["role"], boxes["train_strategy"], boxes["test_strategy"] = "outside", "no_roi_bbox", "no_roi_bbox"
    return boxes


def test_the_sentence_names_the_regions_of_the_significant_cells_or_says_none_is():
    one = localization_sentence(_cells_table({0: 0.36}, {0}), "holm", 0.05, 4)
    assert one == ("Most of the outside signal is in the image's top-left corner: hiding one cell there (pixel rows "
                   "0–7, columns 0–7) takes no_roi_bbox→no_roi_bbox from AUC 0.90 to 0.54; 1 of the 16 cells "
                   "tested is significant (Holm, α = 0.05).")
    two = localization_sentence(_cells_table({3: 0.1, 12: 0.15, 13: 0.02}, {3, 12}), "bh", 0.05, 4)
    assert two.startswith("Most of the outside signal is in the image's bottom-left corner and top-right corner: "
                          "hiding one cell takes no_roi_bbox→no_roi_bbox from AUC 0.90 to 0.75 (bottom-left corner) "
                          "or 0.80 (top-right corner); 2 of the 16 cells tested are significant")
    assert "Benjamini–Hochberg" in two
    assert localization_sentence(_cells_table({5: 0.05}, {5}), "holm", 0.05, 4).startswith("Part of the outside")
    none = localization_sentence(_cells_table({7: 0.04}, set()), "holm", 0.05, 4)
    assert none.startswith("No single cell outside the ROI is significant on its own (none of the 16 cells of the "
                           "4×4 grid tested; Holm, α = 0.05): the outside signal is spread out or redundant")
    assert "the largest drop, 0.04 [-0.01, 0.09], is at the image's right edge" in none
    flat = localization_sentence(_cells_table({7: -0.02}, set()), "holm", 0.05, 4)  # e.g. a global change
    assert flat.endswith("(in several places at once); hiding any one cell lowers the AUC (0.90) by less than 0.005.")


def test_the_localised_cells_are_those_the_verdict_chooses_from():
    models, tests = ["full", "no_roi", "no_roi_bbox", "only_roi"], ["full", "no_roi", "no_roi_bbox", "only_roi"]
    cells = localized_cells({"": evidence_cells()}, ["outside", "inside"], models, tests)
    assert cells == {"": {"outside": [("no_roi_bbox", "no_roi_bbox")], "inside": [("only_roi", "only_roi")]}}
    # without a model trained on masked images, the full model on them
    cells = localized_cells({"": evidence_cells()}, ["outside"], ["full"], ["full", "no_roi"])
    assert cells == {"": {"outside": [("full", "no_roi")]}}
    # a probe reads the better of its inside cells: both may be localised
    probe = localized_cells({"m": probe_cells("m")}, ["outside", "inside"], ["m"],
                            ["full", "no_roi_bbox", "only_roi", "only_roi_bbox"], best_inside=True)
    assert probe == {"m": {"outside": [("m", "no_roi_bbox")], "inside": [("m", "only_roi"), ("m", "only_roi_bbox")]}}


# ------------------------------------------------------------------------------------------ known truth (part 5)

#: ``device`` always top-left, ``tag`` bottom-left or bottom-right; 32 px, a 4x4 grid (8 px cells, the 5 px markers in
#: one cell each), two folds of small CNNs on the full image and without the lungs' box.
KNOWN = {
    "data": {"source": "synthetic", "kind": "cxr", "n_patients": 140, "images_per_patient": [1, 2],
             "classes": {"device": {"signal": "outside", "anchors": ["top_left"]},
                         "tag": {"signal": "outside", "anchors": ["bottom_left", "bottom_right"], "prevalence": 0.5}}},
    "image_size": 32, "strategies": ["full", "no_roi_bbox"], "folds": 2, "test_fraction": 0.35, "seed": 3,
    "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
    "train": {"epochs": 8, "batch_size": 16, "lr": 0.003, "patience": 8,
              "augment": {"rotation": 0, "hflip": 0.0, "brightness": [1.0, 1.0]}},
    "workers": 1,
    "analyses": {"run": ["explain", "localize", "verdict"], "localize": {"grid": 4},
                 "explain": {"method": "gradient", "pairs": [["no_roi_bbox", "no_roi_bbox"]], "images_per_class": 3,
                             "background": 4, "max_evals": 20}},
}


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("localize") / "run"
    path = out.parent / "audit.yaml"
    path.write_text(yaml.safe_dump(KNOWN))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _footprints(out: Path, name: str) -> np.ndarray:
    """Where the class's marker lies in the run's hold-out positives: the pixels its label changes, any image."""
    config = config_from_dict(KNOWN)
    source = SyntheticSource(config.data, seed=config.seed, image_size=config.image_size)
    test = set(read_json(out / "splits.json")["test"]["images"])
    union = np.zeros((32, 32), bool)
    for record in source.records():
        if record.image_id in test and record.labels[name]:
            union |= source.render(record.key).image != source.render(record.key, {name: 0}).image
    return union


def _cells(out: Path, name: str) -> pd.DataFrame:
    cells = pd.read_parquet(out / "analyses" / "localize" / "cells.parquet")
    return cells[cells["class"] == name].sort_values(["p_adjusted", "drop"], ascending=[True, False])


def _touches(box: pd.Series, footprint: np.ndarray) -> bool:
    return bool(footprint[box["y0"]:box["y1"], box["x0"]:box["x1"]].any())


def test_the_most_significant_cell_covers_a_marker_that_stays_in_one_corner(known: Path):
    cells, footprint = _cells(known, "device"), _footprints(known, "device")
    top = cells.iloc[0]
    assert top["significant"] and _touches(top, footprint) and top["region"] == "top-left corner"
    assert top["drop"] > 0.25 and top["drop_ci_low"] > 0
    assert all(_touches(box, footprint) for _, box in cells[cells["significant"]].iterrows())
    assert set(cells.loc[~cells["tested"], "cell"]) == {5, 6, 9, 10}  # the lungs' box: hidden in every image
    assert cells["n_folds"].eq(2).all() and cells["attribution_share"].notna().all()  # explain's maps beside it


def test_a_marker_that_moves_between_two_corners_is_found_in_both(known: Path):
    cells, footprint = _cells(known, "tag"), _footprints(known, "tag")
    significant = cells[cells["significant"]]
    assert {"bottom-left corner", "bottom-right corner"} <= set(significant["region"])
    assert _touches(cells.iloc[0], footprint)
    assert all(_touches(box, footprint) for _, box in significant.iterrows())


def test_the_verdict_reading_says_where_and_the_report_shows_the_map(known: Path):
    verdict = pd.read_parquet(known / "analyses" / "verdict" / "verdict.parquet").set_index("class")
    assert verdict.loc["device", "verdict"] == "outside"
    assert "Most of the outside signal is in the image's top-left corner" in verdict.loc["device", "reading"]
    assert "bottom-left corner" in verdict.loc["tag", "reading"] and "bottom-right" in verdict.loc["tag", "reading"]
    summary = pd.read_csv(known / "analyses" / "localize" / "summary.csv")
    assert set(summary["class"]) == {"device", "tag"} and (summary["n_tested"] == 12).all()
    for name in ("device", "tag"):
        assert (known / "figures" / f"localize_no_roi_bbox_no_roi_bbox_{name}.png").is_file()
    report = (known / "report.html").read_text()
    assert "Where the evidence lies: occlusion maps" in report and "corrected over the class&#39;s cells by Holm" \
        in report and "top-left corner" in report


def test_a_killed_localize_stage_resumes_job_by_job(known: Path):
    job = known / "jobs" / "no_roi_bbox"
    kept = (job / "fold_0" / "localize.parquet").stat().st_mtime_ns
    for done in ("localize.parquet", "localize.json"):  # as if the stage was killed during its second job
        (job / "fold_1" / done).unlink()
    before = pd.read_parquet(known / "analyses" / "localize" / "cells.parquet")
    result = CliRunner().invoke(app, ["analyse", "localize", "--force", "--out", str(known)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (job / "fold_0" / "localize.parquet").stat().st_mtime_ns == kept
    assert (job / "fold_1" / "localize.parquet").is_file()
    after = pd.read_parquet(known / "analyses" / "localize" / "cells.parquet")
    pd.testing.assert_frame_equal(before, after, rtol=1e-5)


def test_occlusion_predictions_read_each_batch_once_and_score_only_visible_pairs(known: Path):
    store = Store.open(known / "prepared")
    spec = MaskSpec(roi="lungs", fill="zero")
    indices = np.arange(12)

    class TopLeft(torch.nn.Module):
        """Scores the top-left 8x8 pixels (the 4x4 grid's cell 0) only; counts the images it is shown."""

        n_classes = len(store.classes)

        def __init__(self) -> None:
            super().__init__()
            self.seen = 0

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.seen += len(images)
            return 20 * images[:, 0, :8, :8].mean(dim=(1, 2))[:, None].repeat(1, self.n_classes) - 2

    model = TopLeft()
    table = occlusion_predictions(model, store, indices, spec, ["no_roi_bbox"], 4, 5, torch.device("cpu"),
                                  "no_roi_bbox", 0)
    one = table[table["class"] == "device"]
    assert len(one) == 12 * 17 and set(one["cell"]) == set(range(-1, 16))
    visible = int((one.loc[one["cell"] >= 0, "hidden"] < 1).sum())
    assert model.seen == 12 + visible < 12 * 17  # every image once as it is, then each pair not wholly hidden
    base = one[one["cell"] == -1].set_index("image_id")["probability"]
    for cell, part in one[one["cell"] >= 0].groupby("cell"):
        moved = (part.set_index("image_id")["probability"] - base).abs().max()
        assert (moved > 0.05) if cell == 0 else (moved == 0), cell
    masked = next(iter(batches(store, indices, spec, 12, torch.device("cpu")))).masked("no_roi_bbox", spec)
    assert np.allclose(base.to_numpy(), torch.sigmoid(model(masked)[:, 0]).numpy())


# ------------------------------------------------------------------------------------------ the synthetic options


def _source(kind: str = "cxr", **options) -> SyntheticSource:
    classes = {"marker": {"signal": "outside", **options.pop("marker", {})}, "inside": {"signal": "roi"}}
    return SyntheticSource(SyntheticData(source="synthetic", kind=kind, n_patients=16, classes=classes, **options),
                           seed=4, image_size=48)


@pytest.mark.parametrize("kind", ["cxr", "fundus"])
def test_anchors_fix_where_the_marker_goes_and_change_nothing_else(kind: str):
    free, fixed = _source(kind), _source(kind, marker={"anchors": ["bottom_right"]})
    moved = 0
    for a, b in zip(free.records(), fixed.records(), strict=True):
        assert a == b  # labels, metadata and keys are drawn the same way
        image, other = fixed.load(b).image, free.load(a).image
        if not a.labels["marker"]:
            assert np.array_equal(image, other)
            continue
        marker = image != fixed.render(b.key, {"marker": 0}).image
        marker = marker.any(axis=-1) if marker.ndim == 3 else marker
        rows, cols = np.nonzero(marker)
        assert rows.min() >= 24 and cols.min() >= 24  # in the bottom-right quarter of the 48 px image
        moved += not np.array_equal(image, other)
    assert moved  # the free marker went elsewhere in some images


def test_anchors_are_checked():
    with pytest.raises(Exception, match="anchors place an outside marker"):
        SyntheticData(source="synthetic", classes={"x": {"signal": "roi", "anchors": ["top"]}})
    with pytest.raises(Exception, match="top is not a place for a fundus marker"):
        SyntheticData(source="synthetic", kind="fundus", classes={"x": {"signal": "outside", "anchors": ["top"]}})
    with pytest.raises(Exception, match="Input should be 'top_left'"):
        SyntheticData(source="synthetic", classes={"x": {"signal": "outside", "anchors": ["left"]}})


@pytest.mark.parametrize("kind", ["cxr", "fundus"])
def test_without_saturation_a_bright_marker_sets_the_maximum(kind: str):
    dim = _source(kind, saturate=False)
    peaks = {0: [], 1: []}
    for record in dim.records():
        peaks[record.labels["marker"]].append(int(dim.load(record).image.max()))
    assert max(peaks[0]) < 230 <= min(peaks[1])  # the anatomy never reaches the marker's brightness
    bright = _source(kind)
    assert all(int(bright.load(r).image.max()) == 255 for r in bright.records())  # the default saturates

