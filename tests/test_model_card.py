"""The model card (issue 17, part 3): ``maskaudit report --out RUN --model-card`` writes model_card.md and .json from
the run directory alone, every number the verdict table's; a run without verdicts is a one-line error.

The run is the session's tracked tiny audit (``test_tracking.tracked_run``), copied before anything is written.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from maskaudit.cli import app
from maskaudit.config import config_from_dict, dump_config
from maskaudit.model_card import EVIDENCE, card_facts, card_markdown
from maskaudit.rundir import RunDir, read_json, write_table, write_text

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import TINY  # noqa: E402
from test_tracking import tracked_run  # noqa: E402


@pytest.fixture()
def run(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A copy of the session's finished tiny audit, its tracking turned off (the card is what is tested here)."""
    copy = tmp_path / "run"
    shutil.copytree(tracked_run(tmp_path_factory), copy, ignore=shutil.ignore_patterns("mlflow"))
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["tracking"] = {"mlflow": None}
    (copy / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy


def _auc(auc: float, low: float, high: float) -> str:
    return f"{auc:.3f} [{low:.3f}, {high:.3f}]"


def _same(card_value: object, table_value: object) -> bool:
    if table_value is None or (isinstance(table_value, float) and math.isnan(table_value)):
        return card_value is None
    return card_value == table_value


def test_the_cli_writes_a_card_whose_verdicts_and_numbers_are_the_verdict_tables(run: Path):
    result = CliRunner().invoke(app, ["report", "--out", str(run), "--model-card"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"model card: {run / 'model_card.md'} (and model_card.json)" in result.output
    markdown = (run / "model_card.md").read_text()
    facts = json.loads((run / "model_card.json").read_text())  # strict JSON: no NaN
    verdicts = pd.read_parquet(run / "analyses" / "verdict" / "verdict.parquet")
    assert len(facts["classes"]) == len(verdicts) == len(TINY["data"]["classes"])
    for row, (_, v) in zip(facts["classes"], verdicts.iterrows(), strict=True):
        assert (row["class"], row["verdict"], row["label"], row["reading"]) == \
            (v["class"], v["verdict"], v["label"], v["reading"])
        assert f"- **{v['class']}: {v['label']}.**" in markdown
        for name in EVIDENCE:
            cell = row["evidence"][name]
            if not v[f"{name}_cell"]:
                assert cell is None
                continue
            assert cell["cell"] == v[f"{name}_cell"] and cell["signal"] == bool(v[f"{name}_signal"])
            for key in ("auc", "ci_low", "ci_high"):
                assert _same(cell[key], v[f"{name}_{key}"]), (v["class"], name, key)
            assert f"{cell['cell']} " in markdown
            assert _auc(v[f"{name}_auc"], v[f"{name}_ci_low"], v[f"{name}_ci_high"]) in markdown
        base = row["baseline"]
        for key in ("auc", "ci_low", "ci_high", "p_full"):
            assert _same(base[key], v[f"baseline_{key}"]), (v["class"], key)
        assert _auc(v["baseline_auc"], v["baseline_ci_low"], v["baseline_ci_high"]) in markdown
        if v["weak_evidence"]:
            assert f"Weak evidence: {v['weak_evidence']}" in markdown
    for section in ("## Bias, Risks, and Limitations", "### Recommendations", "## Evaluation",
                    "### Testing Data, Factors & Metrics", "#### Testing Data", "#### Factors", "#### Metrics",
                    "### Results", "## Technical Specifications", "### Software"):  # the HF template's names
        assert f"\n{section}\n" in markdown, section
    stages = read_json(run / "stages.json")
    assert facts["fingerprint"] == stages["report"]["fingerprint"] and f"`{facts['fingerprint']}`" in markdown
    assert set(facts["software"]) == {"python", "torch", "torchvision", "maskaudit"}
    assert all(f"{name} {version}" in markdown for name, version in facts["software"].items())
    splits = pd.read_parquet(run / "counts" / "splits.parquet")
    test = splits[splits["split"] == "hold-out test"].iloc[0]
    assert f"The hold-out test set: {test['images']} images of {test['patients']} patients" in markdown
    assert facts["data"]["images"] == int(splits["images"].sum()) == read_json(run / "checks" / "main.json")["kept"]
    assert facts["data"]["patients"] == int(splits["patients"].sum())
    assert [s["images"] for s in facts["data"]["splits"]] == list(splits["images"])
    columns = stages["baseline"]["columns"]
    assert sorted(columns) == ["projection", "sex"] and facts["baseline"]["columns"] == columns
    assert f"logistic regression on {', '.join(columns)} alone" in markdown


def test_a_run_without_verdicts_is_a_one_line_error_and_writes_nothing(tmp_path: Path):
    out = tmp_path / "run"
    write_text(RunDir(out).config, dump_config(config_from_dict(TINY)))
    result = CliRunner().invoke(app, ["report", "--out", str(out), "--model-card"])
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line
    assert line == (f"error: {out} has no verdict table (analyses/verdict/verdict.parquet), which the model card is "
                    f"made from: run `maskaudit analyse --out {out} verdict` first (it needs the metrics, missing "
                    f"too: `maskaudit metrics --out {out}`)")
    assert not (out / "model_card.md").exists() and not (out / "report.html").exists()


def test_a_localisation_summary_is_read_when_there_is_one(run: Path):
    where = RunDir(run).analysis("localize")
    write_table(where / "summary.parquet", pd.DataFrame({  # the full audit's rows have no model
        "model": [None], "class": ["opacity"], "sentence": ["Its evidence lies in the lower half of the lungs."]}))
    write_table(where / "cells.parquet", pd.DataFrame({"class": ["opacity"] * 4, "cell": range(4), "auc": 0.5}))
    facts = card_facts(RunDir(run))
    found = {row["class"]: row["localisation"] for row in facts["classes"]}
    assert found == {"opacity": ["Its evidence lies in the lower half of the lungs."], "device": []}
    markdown = card_markdown(facts)
    assert "  Localisation: Its evidence lies in the lower half of the lungs." in markdown  # not in the reading
    assert "\n- opacity: Its evidence lies in the lower half of the lungs.\n" in markdown.split("### Results")[1]
    assert "`analyses/localize/cells.parquet` (4 rows)" in markdown


def test_a_probe_card_has_a_block_per_probed_model(run: Path, tmp_path: Path):
    probe = tmp_path / "probe"
    for name in ("counts", "checks"):
        shutil.copytree(run / name, probe / name)
    shutil.copy(run / "stages.json", probe / "stages.json")
    models = [{"name": name, "source": "torchxrayvision", "weights": "densenet121-res224-all", "pretrained": False}
              for name in ("xrv_a", "xrv_b")]
    config = config_from_dict({**{k: v for k, v in TINY.items() if k not in ("model", "train")}, "models": models},
                              check_files=False)
    write_text(RunDir(probe).config, dump_config(config))
    verdicts = pd.read_parquet(run / "analyses" / "verdict" / "verdict.parquet")
    table = pd.concat([verdicts.assign(model=name) for name in ("xrv_a", "xrv_b")], ignore_index=True)
    write_table(RunDir(probe).analysis("verdict") / "verdict.parquet", table[["model", *verdicts.columns]])
    facts = card_facts(RunDir(probe))
    assert facts["kind"] == "probe" and [m["name"] for m in facts["models"]] == ["xrv_a", "xrv_b"]
    assert [(r["model"], r["class"]) for r in facts["classes"]] == [
        (m, c) for m in ("xrv_a", "xrv_b") for c in verdicts["class"]]
    markdown = card_markdown(facts)
    assert "probe scored the models `xrv_a`, `xrv_b`" in markdown
    assert "Model `xrv_a`:" in markdown and "Model `xrv_b`:" in markdown
    assert "| model | class | verdict |" in markdown and "A probe trains nothing on masked images" in markdown
    facts["adapted"] = {"strategies": ["only_roi", "roi_shape"], "layers": "last_block", "epochs": 4}
    adapted = card_markdown(facts)  # with `adapt`, the card says what the fine-tuned copies add
    assert "A probe trains nothing" not in adapted and "fine-tuned a copy of each model on masked images " \
        "(`only_roi`, `roi_shape`; `adapt`, layers `last_block`, at most 4 epochs)" in adapted


def test_every_verdict_has_a_recommendation():
    from maskaudit.analyses.verdict import VERDICTS
    from maskaudit.model_card import RECOMMENDATIONS

    assert set(RECOMMENDATIONS) == set(VERDICTS)
