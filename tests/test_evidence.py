"""Weak evidence said where it is (few images, reversed scores, folds at chance, a baseline on fewer images),
and the AUC colour scale that shows below chance."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from maskaudit.analyses.evidence import FLAG_COLUMNS, evidence_flags, verdict_notes
from maskaudit.analyses.verdict import class_verdict
from maskaudit.cli import app
from maskaudit.config import EvidenceConfig, VerdictConfig

RULES = VerdictConfig()


def _matrix(cells: dict[tuple[str, str], tuple[float, float, float]], n_pos: int = 30, n_neg: int = 30,
            split: str = "test", name: str = "covid") -> pd.DataFrame:
    return pd.DataFrame([{"dataset": "main", "split": split, "class": name, "train_strategy": t, "test_strategy": s,
                          "auc_mean": a, "ci_low": lo, "ci_high": hi, "n_pos": n_pos, "n_neg": n_neg}
                         for (t, s), (a, lo, hi) in cells.items()])


def _val(rows: list[tuple[str, int, float, float, float, int, int]], name: str = "covid") -> pd.DataFrame:
    """by_fold rows of validation AUCs: (train strategy, fold, auc, ci_low, ci_high, n_pos, n_neg)."""
    return pd.DataFrame([{"dataset": "main", "split": "val", "train_strategy": t, "test_strategy": t, "class": name,
                          "fold": k, "auc": a, "ci_low": lo, "ci_high": hi, "n_pos": p, "n_neg": n, "reason": ""}
                         for t, k, a, lo, hi, p, n in rows])


def _kinds(flags: pd.DataFrame) -> list[str]:
    return sorted(flags["kind"])


# ------------------------------------------------------------------------------------------ the rules


def test_few_images_in_the_hold_out_set_and_in_a_validation_fold():
    flags = evidence_flags(_matrix({("full", "full"): (0.8, 0.7, 0.9)}, n_pos=24, n_neg=7),
                           _val([("full", 0, 0.9, 0.8, 1.0, 12, 4), ("full", 1, 0.9, 0.8, 1.0, 12, 12)]))
    few = flags[flags["kind"] == "few_images"]
    assert list(few["split"]) == ["test", "val"] and list(few["fold"]) == ["", "0"]
    assert "7 negatives in the hold-out set (fewer than 10)" in few["text"].iloc[0]
    assert "24 positives" not in few["text"].iloc[0]  # only the side that is short
    assert "4 negatives in fold 0's validation set" in few["text"].iloc[1]
    # the threshold is a config value
    assert evidence_flags(_matrix({("full", "full"): (0.8, 0.7, 0.9)}, n_pos=24, n_neg=7),
                          rules=EvidenceConfig(min_class_count=5)).empty
    assert "24 positives and 7 negatives" in evidence_flags(
        _matrix({("full", "full"): (0.8, 0.7, 0.9)}, n_pos=24, n_neg=7),
        rules=EvidenceConfig(min_class_count=30))["text"].iloc[0]


def test_reversed_scores_need_the_whole_ci_below_chance():
    flags = evidence_flags(_matrix({("full", "full"): (0.29, 0.07, 0.51), ("full", "no_roi"): (0.24, 0.1, 0.38),
                                    ("no_roi", "no_roi"): (0.47, 0.3, 0.64)}))
    by_cell = flags.set_index(flags["train_strategy"] + "→" + flags["test_strategy"])
    assert by_cell.loc["full→no_roi", "kind"] == "reversed"
    assert "scores reversed: the model ranks negatives above positives here" in by_cell.loc["full→no_roi", "text"]
    assert by_cell.loc["full→full", "kind"] == "below_chance"  # the COVID hold-out: under 0.5, CI reaching 0.5
    assert "0.29 [0.07, 0.51]" in by_cell.loc["full→full", "text"]
    assert "no_roi→no_roi" not in by_cell.index  # within chance_margin of 0.5: nothing to say


@pytest.mark.parametrize(("auc", "low", "high", "flagged"), [
    (0.67, 0.38, 0.96, True),    # the COVID fold: a CI reaching 0.5
    (0.53, 0.51, 0.55, True),    # a large set: CI above 0.5, but within the margin of chance
    (0.30, 0.05, 0.45, True),    # below chance
    (0.70, 0.60, 0.80, False),
    (0.56, 0.52, 0.60, False),
])
def test_a_fold_at_chance_on_its_validation_images(auc, low, high, flagged):
    flags = evidence_flags(None, _val([("full", 1, auc, low, high, 30, 30)]))
    assert (list(flags["kind"]) == ["val_chance"]) == flagged
    if flagged:
        assert flags["text"].iloc[0].startswith("Fold 1's full model is ")


def test_a_masked_model_at_chance_is_the_finding_not_weak_evidence():
    """A no_roi model at chance on validation is what a class with its evidence inside the ROI gives."""
    flags = evidence_flags(None, _val([("full", 0, 0.95, 0.9, 1.0, 30, 30), ("no_roi", 0, 0.5, 0.35, 0.65, 30, 30)]))
    assert flags.empty


def test_the_validation_chance_margin_is_a_config_value():
    val = _val([("full", 0, 0.58, 0.52, 0.64, 40, 40)])
    assert evidence_flags(None, val).empty
    assert _kinds(evidence_flags(None, val, rules=EvidenceConfig(chance_margin=0.1))) == ["val_chance"]


def test_baseline_on_fewer_images_gives_both_counts():
    matrix = _matrix({("full", "full"): (0.8, 0.7, 0.9)}, n_pos=24, n_neg=12)
    baseline = pd.DataFrame([{"class": "covid", "fold": "0", "auc": 0.6, "ci_low": 0.4, "ci_high": 0.8, "n_pos": 22,
                              "n_neg": 11, "reason": ""},
                             {"class": "covid", "fold": "mean", "auc": 0.6, "ci_low": 0.4, "ci_high": 0.8,
                              "n_pos": 22, "n_neg": 11, "reason": ""}])
    fits = pd.DataFrame([{"class": "covid", "fold": k, "n_train": 80 + k, "n_train_all": 85 + k} for k in range(3)])
    (flag,) = evidence_flags(matrix, baseline_auc=baseline, fits=fits).itertuples()
    assert flag.kind == "baseline_fewer"
    assert "scored on 33 of the 36 hold-out images the image models were scored on (3 lack metadata)" in flag.text
    assert "fitted on 80–82 of the 85–87 training images per fold" in flag.text
    complete = fits.assign(n_train=fits["n_train_all"])
    assert evidence_flags(_matrix({("full", "full"): (0.8, 0.7, 0.9)}, n_pos=22, n_neg=11), baseline_auc=baseline,
                          fits=complete).empty


def test_nothing_weak_gives_an_empty_table():
    flags = evidence_flags(_matrix({("full", "full"): (0.9, 0.85, 0.95)}), _val([("full", 0, 0.9, 0.8, 1.0, 40, 40)]))
    assert flags.empty and list(flags.columns) == FLAG_COLUMNS
    assert evidence_flags(None).empty


# ------------------------------------------------------------------------------------------ the verdict's reading


def test_verdict_reading_ends_with_the_weak_evidence_of_the_cells_it_read():
    matrix = _matrix({("full", "full"): (0.29, 0.07, 0.51), ("no_roi_bbox", "no_roi_bbox"): (0.24, 0.05, 0.43),
                      ("only_roi", "only_roi"): (0.6, 0.3, 0.9), ("roi_shape", "no_roi"): (0.2, 0.1, 0.3)},
                     n_pos=24, n_neg=7)
    cells = matrix.set_index(["train_strategy", "test_strategy"])
    row = class_verdict(cells, RULES)  # the hold-out counts and the cells under 0.5 come with the matrix
    assert row["verdict"] == "none"
    assert "7 negatives in the hold-out set" in row["reading"]
    assert "no_roi_bbox→no_roi_bbox 0.24 [0.05, 0.43] is below chance: scores reversed" in row["reading"]
    assert "full→full 0.29 [0.07, 0.51] is under 0.5 but its CI reaches 0.5" in row["reading"]
    assert "roi_shape→no_roi" not in row["reading"]  # a cell the verdict did not read
    assert row["weak_evidence"] and row["reading"].endswith(row["weak_evidence"])
    val = _val([("full", 0, 0.67, 0.38, 0.96, 8, 3), ("only_roi", 2, 0.9, 0.8, 1.0, 8, 12)])
    flags = evidence_flags(matrix, val)
    with_val = class_verdict(cells, RULES, flags=flags)
    assert "Not clearly above chance on their own validation images" in with_val["reading"]
    assert "full fold 0 0.67 [0.38, 0.96]" in with_val["reading"]
    assert "fold 0: 8 positives and 3 negatives" in with_val["reading"]
    assert verdict_notes(flags, ["full→full"])[0].startswith("Few images: 7 negatives")


def test_a_verdict_on_strong_evidence_says_nothing_more():
    cells = _matrix({("full", "full"): (0.95, 0.9, 1.0), ("only_roi", "only_roi"): (0.95, 0.9, 1.0),
                     ("no_roi_bbox", "no_roi_bbox"): (0.52, 0.45, 0.59)}).set_index(["train_strategy",
                                                                                     "test_strategy"])
    row = class_verdict(cells, RULES)
    assert row["verdict"] == "roi" and row["weak_evidence"] == "" and "⚠" not in row["reading"]


# ------------------------------------------------------------------------------------------ colours


def test_colour_scale_is_centred_on_chance_and_shows_below_it():
    from maskaudit.report.figures import AUC_CMAP, auc_colour

    chance, low, lower, high = (auc_colour(v)[0] for v in (0.5, 0.24, 0.0, 0.9))
    assert len({chance, low, lower, high}) == 4  # 0.24 is not painted like 0.50 any more
    centre = matplotlib.colors.to_hex(matplotlib.colormaps[AUC_CMAP](0.5))
    assert chance == centre  # 0.5 is the diverging scale's neutral midpoint…
    r, g, b = matplotlib.colors.to_rgb(chance)
    assert min(r, g, b) > 0.7  # …a pale colour, between the red below chance and the green above it
    below, above = (matplotlib.colors.to_rgb(auc_colour(v)[0]) for v in (0.2, 0.8))
    assert below[0] > below[1] and above[1] > above[0]  # red below chance, green above it (the study's direction)
    assert auc_colour(float("nan"))[0] == "#d9d9d9"


def test_heatmap_pixels_of_0_24_and_0_50_differ():
    from maskaudit.report.figures import auc_colour, auc_heatmap

    mean = pd.DataFrame([[0.24, 0.50]], index=["full"], columns=["full", "no_roi"])
    fig = auc_heatmap(mean, None, "test")
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    ax = fig.axes[0]
    seen = []
    for column in (0, 1):
        x, y = ax.transData.transform((column + 0.35, 0.35))  # off the printed value, inside the cell
        seen.append(pixels[int(round(pixels.shape[0] - y)), int(round(x))])
    assert np.abs(seen[0].astype(int) - seen[1].astype(int)).sum() > 60
    for colour, value in zip(seen, (0.24, 0.50), strict=True):
        expected = np.array(matplotlib.colors.to_rgb(auc_colour(value)[0])) * 255
        assert np.abs(colour - expected).max() <= 3  # the figure and the HTML tables share the colours


# ------------------------------------------------------------------------------------------ through the report


def _predictions_with_a_reversed_cell() -> pd.DataFrame:
    """full→full separates the classes, full→no_roi ranks them the wrong way round, 20 + 20 hold-out images."""
    rng = np.random.default_rng(3)
    labels = np.array([1] * 20 + [0] * 20, dtype=float)
    rows = []
    for fold in (0, 1):
        for test, sign in (("full", 1.0), ("no_roi", -1.0)):
            scores = 1 / (1 + np.exp(-sign * (2.5 * (labels - 0.5) + rng.normal(0, 0.5, labels.size))))
            rows += [("main", "test", "full", fold, test, f"i{i}", "covid", y, p)
                     for i, (y, p) in enumerate(zip(labels, scores, strict=True))]
    return pd.DataFrame(rows, columns=["dataset", "split", "train_strategy", "fold", "test_strategy", "image_id",
                                       "class", "label", "probability"])


def test_a_reversed_cell_carries_the_warning_in_the_report(tmp_path: Path, cxr_dir: Path):
    """Predictions and nothing else (no prepared store): metrics, then a report that names the reversed cell."""
    config = {"data": {"source": "folder", "labels_csv": str(cxr_dir / "labels.csv"), "classes": ["covid"],
                       "patient_column": "patient_id"},
              "image_size": 32, "strategies": ["full", "no_roi"], "folds": 2, "analyses": {"run": []}}
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    for args in (["metrics", "--config", str(path), "--out", str(out)], ["report", "--out", str(out)]):
        if args[0] == "metrics":
            out.mkdir()
            _predictions_with_a_reversed_cell().to_parquet(out / "predictions.parquet")
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output + repr(result.exception)
    matrix = pd.read_parquet(out / "metrics" / "auc_matrix.parquet").set_index("test_strategy")
    assert matrix.loc["no_roi", "ci_high"] < 0.5 and matrix.loc["full", "ci_low"] > 0.5
    assert (matrix["n_pos"] == 20).all() and (matrix["n_neg"] == 20).all()
    html = (out / "report.html").read_text()
    cell = re.search(r'<td title="full→no_roi: AUC [^"]*"[^>]*>[0-9.]+<span class="weak-mark"> ⚠</span></td>', html)
    assert cell and "scores reversed: the model ranks negatives above positives here" in cell.group(0)
    assert re.search(r"<li>⚠ full→no_roi 0\.\d\d \[[0-9., ]+\] is below chance: scores reversed", html)
    assert not re.search(r'title="full→full: AUC [^"]*"[^>]*>[0-9.]+<span class="weak-mark">', html)
    assert "not prepared yet" in html  # the data section, without a prepared store


def test_flags_ignore_nan_aucs():
    matrix = _matrix({("full", "full"): (math.nan, math.nan, math.nan)})
    assert evidence_flags(matrix).empty
