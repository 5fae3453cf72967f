"""The README's "Extending maskaudit" examples are real: a strategy is one registration, and it reaches the verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from maskaudit.config import config_from_dict
from maskaudit.kinds import create_audit
from maskaudit.masking import apply_strategy
from maskaudit.strategies import STRATEGIES, MaskStrategy, evidence_cells, register, unregister

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import TINY  # noqa: E402

#: The README's example: hide every image row the ROI touches (a band across the image), keep the rest.
BAND = MaskStrategy("no_roi_band", "the image without the rows the ROI spans",
                    keep=lambda roi, box: ~roi.any(dim=-1, keepdim=True).expand_as(roi),
                    evidence="outside", rank=-1, full_model=True)


@pytest.fixture
def band():
    register(BAND)
    try:
        yield BAND
    finally:
        unregister(BAND.name)


def test_a_registered_strategy_masks_and_is_evidence(band):
    roi = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    roi[0, 0, 2:4, 1:3] = True
    images = torch.ones(1, 1, 6, 6)
    masked = apply_strategy(images, roi, "no_roi_band")
    assert masked[0, 0, 2:4].sum() == 0 and masked[0, 0, [0, 1, 4, 5]].sum() == 24
    assert evidence_cells()["outside"][0] == ("no_roi_band", "no_roi_band")  # rank -1: preferred
    assert ("full", "no_roi_band") in evidence_cells()["outside"]
    with pytest.raises(Exception, match="strategies\\[1\\]: Input should be 'full', .* 'roi_shape' or 'no_roi_band'"):
        config_from_dict({**TINY, "strategies": ["full", "no_roi_ring"]})


def test_a_registered_strategy_reaches_the_verdict_table_with_no_other_edit(band, tmp_path: Path):
    config = config_from_dict({**TINY, "strategies": ["full", "no_roi_band", "only_roi"],
                               "analyses": {"run": ["verdict"]}})
    create_audit(tmp_path / "run", config).run_all()
    matrix = pd.read_parquet(tmp_path / "run" / "metrics" / "auc_matrix.parquet")
    assert {"no_roi_band"} <= set(matrix["train_strategy"]) and {"no_roi_band"} <= set(matrix["test_strategy"])
    verdicts = pd.read_parquet(tmp_path / "run" / "analyses" / "verdict" / "verdict.parquet")
    assert set(verdicts["outside_cell"]) == {"no_roi_band→no_roi_band"}
    assert "no_roi_band" in (tmp_path / "run" / "report.html").read_text()


def test_the_study_strategies_are_registered_in_the_study_order():
    assert list(STRATEGIES)[:6] == ["full", "no_roi", "no_roi_bbox", "only_roi", "only_roi_bbox", "roi_shape"]
    assert evidence_cells() == {
        "full": [("full", "full")],
        "inside": [("only_roi", "only_roi"), ("only_roi_bbox", "only_roi_bbox"), ("full", "only_roi")],
        "outside": [("no_roi_bbox", "no_roi_bbox"), ("no_roi", "no_roi"), ("full", "no_roi_bbox"),
                    ("full", "no_roi")],
        "shape": [("roi_shape", "roi_shape")],
    }


def test_the_analyses_registry_and_the_config_sections_name_the_same_analyses():
    """An analysis is its config section (analyses.<name>) and its registry entry; the stage table has its rows."""
    from maskaudit.analyses.run import ANALYSES
    from maskaudit.config import ANALYSES as SECTIONS
    from maskaudit.pipeline import TABLE

    assert tuple(ANALYSES) == SECTIONS
    for name, analysis in ANALYSES.items():
        assert TABLE[name].reads[0] == f"analyses.{name}"
        assert all(TABLE[part.name].job and TABLE[part.name].output == part.output for part in analysis.parts)
