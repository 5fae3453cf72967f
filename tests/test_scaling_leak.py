"""The scaling leak (issue 16, part 4): each image divided by its own maximum before masking lets a bright object
outside the ROI reach every pixel inside it; ``scale: after_masking`` closes that path, and the verdict says when
the ROI-only signal may be carried by the scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from maskaudit.analyses.baseline import IMAGE_MAX, scale_predictions
from maskaudit.analyses.verdict import class_verdict
from maskaudit.cli import app
from maskaudit.config import VerdictConfig
from maskaudit.masking import apply_strategy


def test_after_masking_divides_the_kept_pixels_by_their_own_maximum():
    images = torch.zeros(2, 1, 4, 4)
    images[:, :, 1:3, 1:3] = torch.tensor([[0.2, 0.4], [0.1, 0.3]])  # the ROI
    images[0, 0, 0, 0] = 1.0  # image 0: a bright marker outside the ROI set its maximum
    images[1, 0, 0, 0] = 0.5
    roi = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    roi[:, :, 1:3, 1:3] = True
    study = apply_strategy(images, roi, "only_roi")
    rescaled = apply_strategy(images, roi, "only_roi", rescale=True)
    assert torch.equal(study, images * roi)  # before masking: the ROI as the outside left it
    assert torch.allclose(rescaled[:, 0, 1:3, 1:3], torch.tensor([[0.5, 1.0], [0.25, 0.75]]).expand(2, 2, 2))
    assert torch.equal(rescaled[0], rescaled[1])  # whatever lies outside, the kept pixels read the same
    assert rescaled[:, :, 0, 0].eq(0).all()
    # the fill is not rescaled; full and roi_shape are returned as they are
    mean = apply_strategy(images, roi, "only_roi", fill="mean", fill_value=0.3, rescale=True)
    assert torch.allclose(mean[:, 0, 0, 0], torch.tensor([0.3, 0.3]))
    assert apply_strategy(images, roi, "full", rescale=True) is images
    no_roi = apply_strategy(images, roi, "no_roi", rescale=True)
    assert torch.allclose(no_roi[1, 0, 0, 0], torch.tensor(1.0))  # 0.5 was image 1's brightest kept pixel
    blank = apply_strategy(torch.zeros(1, 1, 4, 4), roi[:1], "only_roi", rescale=True)
    assert blank.eq(0).all()  # nothing kept above zero: no division by zero


def test_the_scale_predictor_is_oriented_on_the_training_images():
    kept = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], IMAGE_MAX: [9, 8, 7, 6, 1, 2, 3, 4]})
    labels = np.array([[0], [0], [0], [0], [1], [1], [1], [1]], dtype=float)  # positives are the dim images
    table = scale_predictions(kept, labels, ["c"], {0: np.arange(0, 8, 2)}, np.arange(1, 8, 2))
    assert list(table["train_strategy"].unique()) == [IMAGE_MAX] and len(table) == 4
    assert (table["probability"].to_numpy() == -kept[IMAGE_MAX].to_numpy()[1::2]).all()  # the sign that ranks
    assert scale_predictions(kept.drop(columns=IMAGE_MAX), labels, ["c"], {0: np.arange(4)}, np.arange(4, 8)).empty


def _cells(cells):
    return pd.DataFrame([{"train_strategy": t, "test_strategy": s, "class": "marker", "auc_mean": a, "ci_low": lo,
                          "ci_high": hi, "n_pos": 30, "n_neg": 30} for (t, s), (a, lo, hi) in cells.items()]
                        ).set_index(["train_strategy", "test_strategy"])


@pytest.mark.parametrize("p, difference, leak", [(0.4, -0.05, True), (0.01, -0.1, True), (0.01, 0.08, False)])
def test_roi_only_signal_no_better_than_the_scale_factor_is_read_from_the_outside(p, difference, leak):
    cells = _cells({("full", "full"): (0.99, 0.97, 1.0), ("only_roi", "only_roi"): (0.85, 0.75, 0.95),
                    ("no_roi_bbox", "no_roi_bbox"): (0.98, 0.95, 1.0)})
    scale = {"auc": 0.95, "ci_low": 0.9, "ci_high": 1.0,
             "tests": {"only_roi→only_roi": {"difference": difference, "p_value": p}}}
    baseline = {"auc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "tests": {}, "scale": scale}
    row = class_verdict(cells, VerdictConfig(), baseline=baseline)
    assert row["verdict"] == ("outside" if leak else "everywhere")
    assert ("may be carried by the scaling" in row["reading"]) == leak
    assert class_verdict(cells, VerdictConfig())["verdict"] == "everywhere"  # without the predictor: as before


LEAK = {
    "data": {"source": "synthetic", "kind": "cxr", "n_patients": 64, "images_per_patient": [1, 2], "saturate": False,
             "classes": {"marker": {"signal": "outside", "strength": 1.0, "prevalence": 0.4}}},
    "image_size": 32, "strategies": ["full", "no_roi_bbox", "only_roi"], "folds": 2, "seed": 11,
    "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
    "train": {"epochs": 6, "batch_size": 16, "lr": 0.003, "patience": 6},
    "workers": 1, "analyses": {"run": ["baseline", "verdict"]},
}


def _verdict(tmp_path: Path, name: str, **overrides) -> pd.Series:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**LEAK, **overrides}))
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path / name)])
    assert result.exit_code == 0, result.output
    return pd.read_parquet(tmp_path / name / "analyses" / "verdict" / "verdict.parquet").set_index("class").loc[
        "marker"]


def test_a_bright_marker_outside_the_lungs_leaks_through_the_scaling_and_after_masking_closes_it(tmp_path: Path):
    study = _verdict(tmp_path, "before")
    assert study["inside_auc"] > 0.7, "the only_roi model finds the outside marker through the per-image maximum"
    assert study["verdict"] == "outside" and "may be carried by the scaling" in study["reading"]
    rescaled = _verdict(tmp_path, "after", scale="after_masking")
    assert rescaled["inside_auc"] < study["inside_auc"] - 0.2
    assert rescaled["verdict"] == "outside" and "carried by the scaling" not in rescaled["reading"]
