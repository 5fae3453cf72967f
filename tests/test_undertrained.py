"""Did each model learn enough to be read? The training table, its flags, and the verdicts that read them
(issue 16, part 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from maskaudit.analyses.evidence import evidence_flags, undertrained_flags, undertraining_advice
from maskaudit.analyses.verdict import class_verdict
from maskaudit.cli import app
from maskaudit.config import VerdictConfig
from maskaudit.metrics import training_table

RULES = VerdictConfig()


def _job(root: Path, strategy: str, fold: int, history: dict[str, list], kept: int, stopped: bool = True,
         monitor: str = "val_loss") -> tuple[tuple[str, int], Path]:
    job_dir = root / strategy / f"fold_{fold}"
    job_dir.mkdir(parents=True)
    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", range(len(frame)))
    frame.to_csv(job_dir / "history.csv", index=False)
    (job_dir / "job.json").write_text(json.dumps({"best_epoch": kept, "stopped_early": stopped, "monitor": monitor}))
    return (strategy, fold), job_dir


def test_training_table_tells_never_learnt_from_learnt_but_not_kept(tmp_path: Path):
    # variance 0.01 → half-width 1.96 * 0.1 = 0.196 at 95 %, 3.89 * 0.1 at 99.99 %
    jobs = dict([
        _job(tmp_path, "only_roi", 0, {"val_auc_a": [0.55, 0.68, 0.75], "val_auc_variance_a": [0.01, 0.01, 0.01],
                                       "val_auc_b": [0.60, 0.62, 0.58], "val_auc_variance_b": [0.01, 0.01, 0.01]},
             kept=0),
        _job(tmp_path, "full", 0, {"val_auc_a": [0.9], "val_auc_b": [0.6]}, kept=0),  # no variances: unknown
    ])
    table = training_table(jobs, ["a", "b"]).set_index(["train_strategy", "class"])
    a = table.loc[("only_roi", "a")]
    assert a["kept_learnt"] == 0 and a["learnt"] == 1 and a["first_learnt_epoch"] == 2 and a["best_epoch"] == 2
    assert a["kept_ci_low"] == pytest.approx(0.55 - 0.196, abs=1e-3)
    # learnt: Bonferroni over the 3 epochs looked at, z = Φ⁻¹(1 − 0.05 / 6) = 2.394
    assert a["best_ci_low"] == pytest.approx(0.75 - 0.2394, abs=1e-3)
    b = table.loc[("only_roi", "b")]
    assert b["learnt"] == 0 and b["kept_learnt"] == 0 and b["first_learnt_epoch"] == -1
    assert pd.isna(table.loc[("full", "a"), "learnt"])  # a history from before variances were recorded
    # a stricter level widens the interval: the same epoch no longer shows the class
    strict = training_table(jobs, ["a"], level=0.9999).set_index(["train_strategy", "class"])
    assert strict.loc[("only_roi", "a"), "learnt"] == 0


def _training(rows: list[tuple[str, int, float, float, bool]], name: str = "covid",
              settings: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows of metrics/training: (strategy, fold, kept_learnt, learnt, stopped_early); ``settings``: strategy → the
    config section its jobs trained with (default ``train``)."""
    settings = settings or {}
    return pd.DataFrame([{"train_strategy": t, "fold": k, "class": name, "epochs_run": 6, "stopped_early": stop,
                          "monitor": "val_loss", "kept_epoch": 1, "kept_auc": 0.51, "kept_ci_low": 0.4,
                          "kept_ci_high": 0.62, "best_auc": 0.8 if learnt else 0.55, "best_epoch": 4,
                          "best_ci_low": 0.6 if learnt else 0.45, "first_learnt_epoch": 4 if learnt else -1,
                          "learnt": float(learnt), "kept_learnt": float(kept), "settings": settings.get(t, "train")}
                         for t, k, kept, learnt, stop in rows])


def test_flags_and_advice_name_each_case():
    flags = pd.DataFrame(undertrained_flags(_training([("no_roi", 0, 0, 1, True), ("no_roi", 1, 0, 0, True),
                                                       ("no_roi", 2, 1, 1, True), ("only_roi", 0, 0, 0, False)])))
    assert len(flags) == 3 and set(flags["kind"]) == {"undertrained"} and set(flags["split"]) == {"val"}
    texts = list(flags["text"])
    assert "learnt covid on its validation images (AUC 0.80 at epoch 5" in texts[0]
    assert "kept the weights of epoch 2 (the best validation loss)" in texts[0]
    assert "never rose above chance for covid on its validation images in its 6 epochs" in texts[1]
    assert "early stopping ended it" in texts[1] and "it ran every epoch of train.epochs" in texts[2]
    advice = undertraining_advice(flags)
    assert "train.monitor: val_auc" in advice and "train.patience" in advice and "train.epochs" in advice
    assert undertraining_advice(flags.iloc[[1]]) == "stop later (a larger train.patience, or train.min_epochs)"


def test_the_advice_names_the_keys_each_job_trained_with(tmp_path: Path):
    # a probe's adapted copy trains with adapt's recipe, its shape control with adapt.shape's: train.* changes neither
    jobs = dict([_job(tmp_path, "m+only_roi", 0, {"val_auc_a": [0.5, 0.5], "val_auc_variance_a": [0.01, 0.01]},
                      kept=0, stopped=False),
                 _job(tmp_path, "roi_shape", 0, {"val_auc_a": [0.5], "val_auc_variance_a": [0.01]}, kept=0)])
    table = training_table(jobs, ["a"], settings={"m+only_roi": "adapt", "roi_shape": "adapt.shape"})
    assert dict(zip(table["train_strategy"], table["settings"], strict=True)) == {"m+only_roi": "adapt",
                                                                                  "roi_shape": "adapt.shape"}
    assert set(training_table(jobs, ["a"])["settings"]) == {"train"}  # a full audit's jobs
    flags = pd.DataFrame(undertrained_flags(table))
    assert "it ran every epoch of adapt.epochs" in flags["text"].iloc[0]
    advice = undertraining_advice(flags)
    assert advice == "stop later (a larger adapt.shape.patience); train longer (adapt.epochs)"
    adapted = {"m+only_roi": "adapt"}
    kept = undertraining_advice(pd.DataFrame(undertrained_flags(_training([("m+only_roi", 0, 0, 1, True)],
                                                                          settings=adapted))))
    assert kept.startswith("adapt has no setting for it") and "train." not in kept
    # both kinds of job at once: each case once, by case, then by section
    both = _training([("no_roi", 0, 0, 0, False), ("m+only_roi", 0, 0, 0, False), ("m+only_roi", 1, 0, 0, False)],
                     settings=adapted)
    assert undertraining_advice(pd.DataFrame(undertrained_flags(both))) == \
        "train longer (train.epochs); train longer (adapt.epochs)"
    # a training table from before the settings were recorded: its jobs trained with train.*
    older = _training([("no_roi", 0, 0, 0, True)]).drop(columns="settings")
    assert undertraining_advice(pd.DataFrame(undertrained_flags(older))) == \
        "stop later (a larger train.patience, or train.min_epochs)"


def test_undertrained_flags_replace_val_chance_for_the_jobs_they_know():
    by_fold = pd.DataFrame([{"dataset": "main", "split": "val", "train_strategy": "full", "test_strategy": "full",
                             "class": "covid", "fold": k, "auc": 0.52, "ci_low": 0.4, "ci_high": 0.64, "n_pos": 30,
                             "n_neg": 30, "reason": ""} for k in (0, 1)])
    assert sorted(evidence_flags(None, by_fold)["kind"]) == ["val_chance", "val_chance"]
    flags = evidence_flags(None, by_fold, training=_training([("full", 0, 0, 0, True)]))
    assert sorted(zip(flags["kind"], flags["fold"], strict=True)) == [("undertrained", "0"), ("val_chance", "1")]


def _cells(cells: dict[tuple[str, str], tuple[float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"train_strategy": t, "test_strategy": s, "class": "covid", "auc_mean": a, "ci_low": lo,
                          "ci_high": hi, "n_pos": 30, "n_neg": 30} for (t, s), (a, lo, hi) in cells.items()]
                        ).set_index(["train_strategy", "test_strategy"])


FULL, HIGH, CHANCE = (0.95, 0.9, 1.0), (0.93, 0.88, 0.98), (0.51, 0.42, 0.6)


def test_an_unclear_class_whose_masked_model_never_learnt_it_is_undertrained():
    cells = _cells({("full", "full"): FULL, ("only_roi", "only_roi"): CHANCE, ("no_roi_bbox", "no_roi_bbox"): CHANCE})
    assert class_verdict(cells, RULES)["verdict"] == "unclear"
    training = _training([("only_roi", k, 0, 0, True) for k in range(3)] + [("full", k, 1, 1, True) for k in range(3)])
    row = class_verdict(cells, RULES, training=training)
    assert row["verdict"] == "undertrained"
    assert "the only_roi model never rose above chance for it on its validation images (folds 0, 1, 2 of 3)" \
        in row["reading"]
    assert "a larger train.patience" in row["reading"]


def test_roi_stands_when_the_outside_model_never_learnt_but_not_when_it_learnt_and_lost_it():
    cells = _cells({("full", "full"): FULL, ("only_roi", "only_roi"): HIGH, ("no_roi_bbox", "no_roi_bbox"): CHANCE})
    never = class_verdict(cells, RULES, training=_training([("no_roi_bbox", k, 0, 0, True) for k in range(3)]))
    assert never["verdict"] == "roi"
    assert "But the no_roi_bbox model never rose above chance" in never["reading"]
    assert "or a training cut short" in never["reading"]
    # the two folds at chance learnt the class at an epoch they did not keep: the outside evidence was there
    lost = class_verdict(cells, RULES, training=_training([("no_roi_bbox", 0, 0, 1, True),
                                                           ("no_roi_bbox", 1, 0, 1, True),
                                                           ("no_roi_bbox", 2, 1, 1, True)]))
    assert lost["verdict"] == "undertrained"
    assert "learnt it on its validation images at an epoch whose weights it did not keep" in lost["reading"]
    assert "train.monitor: val_auc" in lost["reading"]
    # one of the two folds at chance learnt it (a chance blip on a small validation set is not enough): never
    blip = class_verdict(cells, RULES, training=_training([("no_roi_bbox", 0, 0, 1, True),
                                                           ("no_roi_bbox", 1, 0, 0, True),
                                                           ("no_roi_bbox", 2, 1, 1, True)]))
    assert blip["verdict"] == "roi" and "But the no_roi_bbox model never rose above chance" in blip["reading"]
    # a minority of folds at chance: the cell is read
    minority = class_verdict(cells, RULES, training=_training([("no_roi_bbox", 0, 0, 1, True),
                                                               ("no_roi_bbox", 1, 1, 1, True),
                                                               ("no_roi_bbox", 2, 1, 1, True)]))
    assert minority["verdict"] == "roi" and "But the" not in minority["reading"]


def test_none_is_undertrained_when_the_full_model_learnt_at_an_epoch_it_did_not_keep():
    cells = _cells({("full", "full"): CHANCE, ("only_roi", "only_roi"): CHANCE})
    assert class_verdict(cells, RULES, training=_training([("full", 0, 0, 0, True)]))["verdict"] == "none"
    assert class_verdict(cells, RULES, training=_training([("full", 0, 0, 1, True)]))["verdict"] == "undertrained"


TINY = {
    "data": {"source": "synthetic", "kind": "cxr", "n_patients": 24, "images_per_patient": [1, 2],
             "classes": {"opacity": {"signal": "roi"}, "device": {"signal": "outside"}}},
    "image_size": 32, "strategies": ["full", "only_roi"], "folds": 2, "seed": 7,
    "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
    "train": {"epochs": 3, "batch_size": 8, "lr": 0.003, "patience": 1},
    "workers": 1, "analyses": {"run": ["verdict"]},
}


def test_a_run_with_patience_1_flags_its_undertrained_jobs_in_the_report(tmp_path: Path):
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    training = pd.read_parquet(run / "metrics" / "training.parquet")
    assert len(training) == 2 * 2 * 2  # strategies x folds x classes
    assert training["kept_learnt"].notna().all()
    history = pd.read_csv(run / "jobs" / "full" / "fold_0" / "history.csv")
    assert {"val_auc_variance_opacity", "val_auc_variance_device"} <= set(history.columns)
    at_chance = training[training["kept_learnt"] == 0]
    assert len(at_chance), "24 patients, 32 px, patience 1: some job must stop before it learns a class"
    report = (run / "report.html").read_text()
    assert "Models that did not learn a class" in report
    for _, r in at_chance.iterrows():
        assert f"{r['train_strategy']}/fold_{r['fold']}" in report
    verdict = pd.read_parquet(run / "analyses" / "verdict" / "verdict.parquet")
    assert verdict["reading"].str.contains("on their own validation images|on its validation images").any()


def test_an_absent_side_that_trained_longer_than_the_other_needed_is_read_as_absence():
    cells = _cells({("full", "full"): FULL, ("only_roi", "only_roi"): HIGH, ("no_roi_bbox", "no_roi_bbox"): CHANCE})
    training = _training([("no_roi_bbox", k, 0, 0, True) for k in range(3)] + [("only_roi", k, 1, 1, True)
                                                                               for k in range(3)])
    quick = class_verdict(cells, RULES, training=training)  # only_roi learnt it at epoch 5; no_roi_bbox ran 6
    assert quick["verdict"] == "roi" and "But the" not in quick["reading"]
    slow = training.assign(first_learnt_epoch=np.where(training["train_strategy"] == "only_roi", 7, -1))
    row = class_verdict(cells, RULES, training=slow)  # only_roi needed 8 epochs; no_roi_bbox stopped after 6
    assert row["verdict"] == "roi"
    assert "after a median 6 epochs, while the only_roi model learnt it in 8" in row["reading"]
