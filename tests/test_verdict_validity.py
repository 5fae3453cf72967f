"""The verdict-validity benchmark's tables on a hand-made verdict table (no training)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from maskaudit.analyses.verdict import VERDICTS
from maskaudit.config import config_from_dict

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "verdict_validity.py"
_spec = importlib.util.spec_from_file_location("verdict_validity", _PATH)
vv = importlib.util.module_from_spec(_spec)
sys.modules["verdict_validity"] = vv
_spec.loader.exec_module(vv)


def _table(verdicts: dict[str, str], run: str = "cxr-strong-n80-seed1", **extra) -> list[dict]:
    return [{"run": run, "class": name, "verdict": verdict, "reading": f"reading of {name}", **extra}
            for name, verdict in verdicts.items()]


RIGHT = {name: vv.EXPECTED[truth] for name, (truth, _, _) in vv.CLASSES.items()}


def test_every_truth_has_an_expected_verdict_the_verdict_knows():
    assert {truth for truth, _, _ in vv.CLASSES.values()} == set(vv.EXPECTED)
    assert set(vv.EXPECTED.values()) <= set(VERDICTS)
    assert {t for t, _ in vv.DANGEROUS} <= set(vv.EXPECTED) and {v for _, v in vv.DANGEROUS} <= set(VERDICTS)


@pytest.mark.parametrize("kind", ["cxr", "fundus"])
def test_run_config_is_valid_and_plants_each_truth(kind: str):
    run = vv.Run(kind, "weak", 80, 2)
    config = config_from_dict(vv.run_config(run, epochs=3))
    assert config.seed == 2 and config.data.n_patients == 80 and config.train.epochs == 3
    assert config.analyses.run == ["baseline", "verdict"] and config.strategies == vv.STRATEGIES
    signal, meta = vv.STRENGTHS["weak"]
    for name, (_truth, place, column) in vv.CLASSES.items():
        cls = config.data.classes[name]
        assert cls.signal == place and cls.strength == (signal if place != "none" else 1.0)
        if column:
            column = column.format(meta=vv.IMAGE_COLUMN[kind])
            assert config.data.metadata[column].correlates_with == name
            assert config.data.metadata[column].strength == meta
    assert len(config.data.metadata) == 2  # only the columns that follow a class: no other baseline signal


def test_confusion_counts_unknown_states_as_their_own_column():
    rows = _table(RIGHT) + _table({**RIGHT, "c_outside": "roi", "c_roi": "undertrained", "c_none": "zzz_new"},
                                  run="cxr-strong-n80-seed2")
    table = vv.verdict_table(rows)
    matrix = vv.confusion(table)
    assert list(matrix.index) == list(vv.EXPECTED)
    assert list(matrix.columns)[:6] == ["roi", "outside", "everywhere", "shape", "none", "metadata"]
    assert matrix.columns[-1] == "zzz_new" and "undertrained" in matrix.columns
    assert matrix.loc["outside", "roi"] == 1 and matrix.loc["outside", "outside"] == 1
    assert matrix.loc["metadata", "metadata"] == 4 and int(matrix.to_numpy().sum()) == len(rows)
    errors = vv.error_rates(matrix)
    assert ("outside", "roi", 1, 2) in errors and ("roi", "undertrained", 1, 2) in errors and len(errors) == 3


def test_summary_lines_and_dangerous_count(tmp_path: Path):
    rows = _table(RIGHT, kind="cxr", strength="strong", n_patients=80)
    rows += _table({**RIGHT, "c_meta_patient": "roi", "c_shape": "everywhere"}, run="fundus-weak-n160-seed1",
                   kind="fundus", strength="weak", n_patients=160)
    table = vv.verdict_table(rows)
    lines = vv.summary(table)
    assert lines[-1] == "dangerous errors: 1 of 6"  # 2 runs x (1 outside + 2 metadata classes)
    text = "\n".join(lines)
    assert "right: 12 of 14 (86%)" in text
    assert "  metadata → roi: 1 of 4 (25%)" in text and "  shape → everywhere: 1 of 2 (50%)" in text
    assert "accuracy per strength: strong 7/7 (100%), weak 5/7 (71%)" in text
    assert "fundus-weak-n160-seed1 c_meta_patient (truth metadata) → roi: reading of c_meta_patient" in text
    vv.write_tables(table, tmp_path)
    assert pd.read_csv(tmp_path / "confusion.csv", index_col=0).loc["metadata", "roi"] == 1
    markdown = (tmp_path / "confusion.md").read_text()
    assert "| metadata | 1 | 0 | 0 | 0 | 0 | **3** | 4 |" in markdown


def test_empty_table_still_ends_with_the_dangerous_line():
    assert vv.summary(vv.verdict_table([]))[-1] == "dangerous errors: 0 of 0"


def test_declined_verdicts_are_shown_apart():
    table = vv.verdict_table(_table({**RIGHT, "c_roi": "undertrained", "c_none": "undertrained"}))
    assert "declined (undertrained / undetermined): 2; right among the other verdicts: 5 of 5 (100%)" in \
        vv.summary(table)


def test_evidence_text_names_the_cells_read():
    row = pd.Series({"inside_cell": "only_roi→only_roi", "inside_auc": 0.714, "inside_ci_low": 0.55,
                     "inside_ci_high": 0.86, "outside_cell": "", "outside_auc": float("nan"),
                     "baseline_auc": 0.61, "baseline_ci_low": 0.5, "baseline_ci_high": 0.7, "reading": "r"})
    assert vv.evidence_text(row) == "inside only_roi→only_roi 0.71 [0.55, 0.86]; baseline metadata 0.61 [0.50, 0.70]"
