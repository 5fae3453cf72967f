"""The analyses of SPEC §6/§8 and the verdict: unit checks, then a run whose truth is known."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from maskaudit.analyses.baseline import baseline_predictions, encode
from maskaudit.analyses.embeddings import cosine_table, tsne_points
from maskaudit.analyses.reader_selection import blinded_name, select_cases
from maskaudit.analyses.verdict import class_verdict
from maskaudit.cli import app
from maskaudit.config import VerdictConfig
from maskaudit.probe_audit import PROBE_CAVEAT, PROBE_READING
from maskaudit.rundir import read_json
from maskaudit.strategies import probe_cells

RULES = VerdictConfig()


def _cells(values: dict[tuple[str, str], float], half_width: float = 0.05) -> pd.DataFrame:
    rows = [{"train_strategy": t, "test_strategy": s, "auc_mean": a, "ci_low": a - half_width,
             "ci_high": a + half_width} for (t, s), a in values.items()]
    return pd.DataFrame(rows).set_index(["train_strategy", "test_strategy"])


GRID = {"full": ("full", "full"), "out": ("no_roi_bbox", "no_roi_bbox"), "in": ("only_roi", "only_roi"),
        "shape": ("roi_shape", "roi_shape")}


def _grid(full: float, out: float, inside: float, shape: float) -> pd.DataFrame:
    return _cells({GRID["full"]: full, GRID["out"]: out, GRID["in"]: inside, GRID["shape"]: shape})


@pytest.mark.parametrize(("aucs", "expected"), [
    ((0.95, 0.52, 0.97, 0.50), "roi"),
    ((0.95, 0.96, 0.51, 0.48), "outside"),
    ((0.99, 0.98, 0.97, 0.52), "everywhere"),
    ((0.92, 0.55, 0.98, 0.99), "shape"),
    ((0.53, 0.49, 0.51, 0.50), "none"),
    ((0.85, 0.55, 0.52, 0.50), "unclear"),
])
def test_verdict_rules(aucs, expected):
    assert class_verdict(_grid(*aucs), RULES)["verdict"] == expected


def test_a_small_edge_over_chance_is_not_evidence():
    # CI above 0.5 but AUC under min_auc (0.6), and AUC above min_auc with a CI reaching 0.5
    assert class_verdict(_cells({GRID["full"]: 0.58, GRID["in"]: 0.58}, half_width=0.03), RULES)["verdict"] == "none"
    assert class_verdict(_cells({GRID["full"]: 0.65, GRID["in"]: 0.65}, half_width=0.2), RULES)["verdict"] == "none"


def test_metadata_verdict_needs_the_baseline_to_match_the_images():
    cells = _grid(0.80, 0.78, 0.52, 0.5)
    close = {"auc": 0.79, "ci_low": 0.74, "ci_high": 0.84,
             "tests": {"full→full": {"p_value": 0.6, "difference": 0.01},
                       "no_roi_bbox→no_roi_bbox": {"p_value": 0.9, "difference": -0.01}}}
    assert class_verdict(cells, RULES, baseline=close)["verdict"] == "metadata"
    beaten = {**close, "tests": {**close["tests"], "full→full": {"p_value": 0.001, "difference": 0.12}}}
    row = class_verdict(cells, RULES, baseline=beaten)
    assert row["verdict"] == "outside" and "Metadata alone also predict it" in row["reading"]
    # a cell that beats the baseline but shows no signal itself does not count
    worse = {**close, "tests": {**close["tests"], "only_roi→only_roi": {"p_value": 0.001, "difference": 0.3}}}
    assert class_verdict(cells, RULES, baseline=worse)["verdict"] == "metadata"
    no_images = class_verdict(_grid(0.5, 0.5, 0.5, 0.5), RULES, baseline=close)
    assert no_images["verdict"] == "metadata" and "0.79" in no_images["reading"]


@pytest.mark.parametrize(("aucs", "expected"), [
    ((0.95, 0.93, 0.51), "outside"),
    ((0.95, 0.52, 0.97), "roi"),
    ((0.99, 0.98, 0.97), "everywhere"),
    ((0.95, 0.50, 0.03), "unclear"),
    ((0.52, 0.50, 0.50), "none"),
])
def test_probe_verdict_reads_the_probed_models_own_cells(aucs, expected):
    full, outside, inside = aucs
    cells = _cells({("m", "full"): full, ("m", "no_roi_bbox"): outside, ("m", "only_roi"): inside,
                    ("full", "full"): 0.5, ("no_roi_bbox", "no_roi_bbox"): 0.99, ("roi_shape", "roi_shape"): 0.99})
    row = class_verdict(cells, RULES, evidence_cells=probe_cells("m"), words=PROBE_READING)
    assert row["verdict"] == expected and row["full_cell"] == "m→full" and row["shape_cell"] == ""
    assert row["reading"].endswith(PROBE_CAVEAT)
    assert ("below chance" in row["reading"]) == (inside < 0.45)  # a reversed masked cell is pointed out


def test_probe_inside_evidence_is_the_better_of_the_two_roi_maskings():
    """Signal that survives either ROI-only masking is evidence: the demo's opacity probe (only_roi 0.63
    [0.49, 0.76], only_roi_bbox 0.85) reads as roi, not unclear; outside keeps no_roi_bbox first."""
    cells = _cells({("m", "full"): 0.99, ("m", "only_roi"): 0.63, ("m", "only_roi_bbox"): 0.85,
                    ("m", "no_roi_bbox"): 0.43, ("m", "no_roi"): 0.95}, half_width=0.13)
    row = class_verdict(cells, RULES, evidence_cells=probe_cells("m"), words=PROBE_READING)
    assert (row["verdict"], row["inside_cell"], row["outside_cell"]) == ("roi", "m→only_roi_bbox", "m→no_roi_bbox")


def test_verdict_falls_back_to_the_full_model_on_masked_images_and_says_which_cell():
    cells = _cells({("full", "full"): 0.95, ("full", "only_roi"): 0.51, ("full", "no_roi"): 0.93})
    row = class_verdict(cells, RULES)
    assert row["verdict"] == "outside"
    assert row["outside_cell"] == "full→no_roi" and row["inside_cell"] == "full→only_roi"
    assert class_verdict(_cells({("no_roi", "no_roi"): 0.9}), RULES)["verdict"] == "undetermined"


def test_attribution_is_reported_not_used():
    row = class_verdict(_grid(0.95, 0.52, 0.97, 0.50), RULES,
                        attribution={"in_roi": 0.8, "roi_area": 0.25, "ratio": 3.2})
    assert row["verdict"] == "roi" and row["attribution_ratio"] == 3.2 and "80%" in row["reading"]


# ------------------------------------------------------------------------------------------ baseline


def test_encoding_learns_scale_and_categories_from_training_rows_only():
    frame = pd.DataFrame({"age": [20, 40, 60, 100], "sex": ["F", "M", "F", "X"]})
    train = np.array([True, True, True, False])
    features, names = encode(frame, train)
    assert names == ["age", "sex=F", "sex=M"]
    np.testing.assert_allclose(features[:, 0], [0.0, 0.5, 1.0, 2.0])  # the test row is scaled with training's range
    np.testing.assert_array_equal(features[3, 1:], [0, 0])  # an unseen category is all zeros


def test_baseline_finds_a_label_carried_by_metadata_and_counts_dropped_rows():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    kept = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)],
                         "sex": np.where(rng.random(n) < 0.9, np.where(y == 1, "M", "F"), "F"),
                         "age": rng.normal(50, 10, n).round()})
    kept.loc[[3, 250], "age"] = np.nan
    labels = np.stack([y, rng.integers(0, 2, n)], axis=1).astype(np.float32)
    train = {0: np.arange(0, 200)}
    predictions, fits = baseline_predictions(kept, labels, ["carried", "noise"], ["sex", "age"], train,
                                             np.arange(200, n))
    fit = fits.set_index("class").loc["carried"]
    assert fit["dropped_train"] == 1 and fit["dropped_test"] == 1 and fit["n_test"] == 99
    from maskaudit.stats import auc_ci

    carried = predictions[predictions["class"] == "carried"]
    assert auc_ci(carried["label"], carried["probability"]).ci_low > 0.8
    noise = predictions[predictions["class"] == "noise"]
    assert auc_ci(noise["label"], noise["probability"]).auc < 0.7


# ------------------------------------------------------------------------------------------ reader, embeddings


def test_reader_selection_takes_the_nearest_rank_percentiles_of_the_positives():
    probabilities = np.linspace(0.05, 0.95, 10)
    predictions = pd.DataFrame({"dataset": "main", "split": "test", "train_strategy": "no_roi", "fold": 1,
                                "test_strategy": "no_roi", "image_id": [f"p{k}" for k in range(10)] + ["n0"],
                                "class": "a", "label": [1.0] * 10 + [0.0],
                                "probability": [*probabilities, 0.99]})
    cases = select_cases(predictions, [("no_roi", "no_roi")], ["a"], fold=1, percentiles=[25, 50, 75])
    # positions round(p/100 * 9) = 2, 5 (4.5 rounds half up), 7 of the positives sorted by probability
    assert cases["image_id"].tolist() == ["p2", "p5", "p7"]
    assert "n0" not in set(cases["image_id"])
    name = blinded_name(1907, "no_roi", "a", "p2")
    assert name.endswith(".png") and "p2" not in name and "no_roi" not in name
    assert name == blinded_name(1907, "no_roi", "a", "p2") != blinded_name(1908, "no_roi", "a", "p2")


def test_cosine_table_and_tsne_perplexity_limit():
    full = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    embeddings = {"full": full, "no_roi": np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])}
    labels = np.array([[1.0], [0.0], [1.0]])
    table = cosine_table(embeddings, labels, ["a"]).set_index(["strategy", "group"])
    assert table.loc[("no_roi", "all images"), "n"] == 2  # the zero vector has no direction
    assert table.loc[("no_roi", "all images"), "mean"] == pytest.approx(0.5)
    assert table.loc[("no_roi", "a"), "mean"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    points, used = tsne_points({"full": rng.normal(size=(4, 8)), "no_roi": rng.normal(size=(4, 8))}, 10.0, 0)
    assert points.shape == (8, 2) and used == pytest.approx(7 / 3)


# ------------------------------------------------------------------------------------------ a run with known truth

PLANTED = {
    "opacity": ("roi", {"signal": "roi"}),
    "device": ("outside", {"signal": "outside"}),
    "scanner": ("everywhere", {"signal": "global"}),
    "cardiomegaly": ("shape", {"signal": "shape"}),
    "noise": ("none", {"signal": "none"}),
    "insured": ("metadata", {"signal": "none"}),
}


@pytest.mark.slow
def test_every_planted_signal_gets_its_verdict(tmp_path: Path):
    """The demo's recipe, smaller: each planted kind of signal (and one carried by metadata alone)."""
    from maskaudit.cli import demo_config

    config = demo_config("cxr")
    config["data"]["classes"] = {name: {**spec, "strength": 1.0, "prevalence": 0.4}
                                 for name, (_, spec) in PLANTED.items()}
    config["data"]["metadata"] = {"sex": {"correlates_with": "insured", "strength": 1.0}, "age": {}}
    config.update(strategies=["full", "no_roi_bbox", "only_roi", "roi_shape"], folds=3, workers=1)
    config["analyses"] = {"explain": {"max_evals": 60, "images_per_class": 2, "batch_size": 64},
                          "sweep": {"spreads": [0, 50, 500]}, "embed": {"max_images": 40}}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    verdict = pd.read_csv(out / "analyses" / "verdict" / "verdict.csv").set_index("class")
    wrong = {name: verdict.loc[name, "verdict"] for name, (want, _) in PLANTED.items()
             if verdict.loc[name, "verdict"] != want}
    assert not wrong, f"{wrong}\n{verdict[['verdict', 'reading']].to_string()}"

    baseline = pd.read_csv(out / "analyses" / "baseline" / "baseline_auc.csv")
    mean = baseline[baseline["fold"] == "mean"].set_index("class")
    assert mean.loc["insured", "ci_low"] > 0.7 and mean.loc["opacity", "auc"] < 0.7

    shares = pd.read_csv(out / "analyses" / "explain" / "attribution_in_roi.csv")
    full = shares[(shares["train_strategy"] == "full") & (shares["test_strategy"] == "full")].set_index("class")
    assert full.loc["opacity", "ratio"] > full.loc["device", "ratio"]  # attribution follows the planted place

    sweep = pd.read_csv(out / "analyses" / "sweep" / "sweep.csv")
    device = sweep[(sweep["class"] == "device") & (sweep["test_strategy"] == "only_roi")].set_index("spread")
    assert device.loc[500, "auc_mean"] > device.loc[0, "auc_mean"] + 0.2  # dilating the lungs uncovers the marker

    cosine = pd.read_csv(out / "analyses" / "embed" / "cosine.csv")
    assert set(cosine["strategy"]) == {"no_roi_bbox", "only_roi", "roi_shape"}
    selection = pd.read_csv(out / "analyses" / "reader" / "selection.csv")
    assert len(selection) and all((out / "analyses" / "reader" / "images" / f).is_file() for f in selection["file"])
    first = Image.open(out / "analyses" / "reader" / "images" / selection["file"].iloc[0])
    assert first.size == (64, 64)
    for figure in ("tsne.png", "sweep_full.png", "explain_full_full_opacity.png"):
        assert (out / "figures" / figure).is_file()

    stages = read_json(out / "stages.json")
    assert all(name in stages for name in ("baseline", "explain", "embed", "sweep", "reader", "verdict"))
    before = (out / "analyses" / "verdict" / "verdict.parquet").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["analyse", "--out", str(out)])
    assert result.exit_code == 0 and (out / "analyses" / "verdict" / "verdict.parquet").stat().st_mtime_ns == before
    assert not math.isnan(verdict.loc["opacity", "full_auc"])


def test_analyses_on_a_tiny_run_without_metadata(tmp_path: Path):
    """Every analysis runs on a tiny grid; no metadata is said plainly; a gradient explainer runs in the stage."""
    from test_pipeline import TINY

    config = {**TINY, "analyses": {"explain": {"method": "deep", "background": 4, "images_per_class": 1},
                                   "sweep": {"spreads": [0, 100]}, "reader": {"percentiles": [50]}}}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    stages = read_json(out / "stages.json")
    assert stages["baseline"]["status"] == "this data has no metadata: no baseline"
    assert stages["explain"]["method"] == "deep"
    verdict = pd.read_csv(out / "analyses" / "verdict" / "verdict.csv")
    assert set(verdict["class"]) == {"opacity", "device"} and verdict["baseline_auc"].isna().all()
    report = (out / "report.html").read_text()
    assert "Verdict per class" in report and "this data has no metadata" in report
    bad = CliRunner().invoke(app, ["analyse", "bogus", "--out", str(out)])
    assert bad.exit_code == 1 and "unknown analysis 'bogus'" in bad.output
