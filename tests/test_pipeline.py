"""End to end: the CLI on tiny synthetic and real data, skipping, and resuming after a real kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from maskaudit.cli import app
from maskaudit.rundir import read_json

TINY = {
    "data": {
        "source": "synthetic",
        "kind": "cxr",
        "n_patients": 24,
        "images_per_patient": [1, 2],
        "classes": {"opacity": {"signal": "roi"}, "device": {"signal": "outside"}},
    },
    "image_size": 32,
    "strategies": ["full", "no_roi", "only_roi"],
    "folds": 2,
    "seed": 7,
    "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "patience": 2},
    "workers": 1,
    "analyses": {"run": []},  # the analyses have tests of their own (test_analyses.py)
}


def _write(tmp_path: Path, config: dict, name: str = "audit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_run_end_to_end_then_skip(tmp_path: Path):
    cfg, out = _write(tmp_path, TINY), tmp_path / "run"
    _cli("run", str(cfg), "--out", str(out))
    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["dataset", "split", "train_strategy", "fold", "test_strategy", "image_id", "class",
                                   "label", "probability"]
    test = preds[preds["split"] == "test"]
    n_test = len(read_json(out / "splits.json")["test"]["images"])
    assert len(test) == 3 * 2 * 3 * n_test * 2  # train strategies x folds x test strategies x images x classes
    by_fold = pd.read_csv(out / "metrics" / "auc_by_fold.csv")
    assert {"train_strategy", "test_strategy", "class", "fold", "auc", "n_pos", "n_neg"} <= set(by_fold.columns)
    for name in ("opacity", "device"):
        assert (out / "figures" / f"auc_{name}.png").is_file()
    html = (out / "report.html").read_text()
    # two AUC heatmaps and the training curves, inlined; nothing fetched from elsewhere
    assert "Rows: the masking a model was trained with" in html and "models on the hold-out test set" in html
    assert html.count("data:image/png;base64,") == 3 and "http://" not in html.replace("http://www.w3", "")
    for job in ("full/fold_0", "only_roi/fold_1"):
        history = pd.read_csv(out / "jobs" / job / "history.csv")
        assert {"train_loss", "val_loss", "val_auc_opacity"} <= set(history.columns)
        assert not (out / "jobs" / job / "last.pt").exists()
    stamps = read_json(out / "stages.json")
    _cli("run", str(cfg), "--out", str(out))
    assert read_json(out / "stages.json") == stamps  # nothing redone


def test_stage_commands_alone(tmp_path: Path):
    cfg, out = _write(tmp_path, {**TINY, "strategies": ["full", "no_roi"]}), tmp_path / "run"
    _cli("prepare", "--config", str(cfg), "--out", str(out))
    assert (out / "prepared" / "manifest.parquet").is_file()
    _cli("split", "--out", str(out))
    _cli("train", "--out", str(out), "--strategy", "full", "--fold", "0")
    assert (out / "jobs" / "full" / "fold_0" / "model.pt").is_file()
    assert not (out / "jobs" / "no_roi").exists()
    _cli("train", "--out", str(out))
    _cli("predict", "--out", str(out))
    _cli("metrics", "--out", str(out))
    _cli("report", "--out", str(out))
    assert (out / "report.html").is_file()


def test_changed_training_config_retrains_and_keeps_the_store(tmp_path: Path):
    cfg, out = _write(tmp_path, {**TINY, "strategies": ["full"]}), tmp_path / "run"
    _cli("run", str(cfg), "--out", str(out))
    before = read_json(out / "stages.json")
    changed = {**TINY, "strategies": ["full"], "train": {**TINY["train"], "lr": 0.001}}
    _cli("run", str(_write(tmp_path, changed)), "--out", str(out))
    after = read_json(out / "stages.json")
    assert after["prepare"] == before["prepare"] and after["split"] == before["split"]
    assert after["train"]["fingerprint"] != before["train"]["fingerprint"]


def test_user_error_is_one_line(tmp_path: Path):
    cfg = _write(tmp_path, {**TINY, "train": {"learning_rate": 1}})
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "unknown key 'train.learning_rate'" in result.output


def _maskaudit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-m", "maskaudit", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_predictions(tmp_path: Path):
    config = {**TINY, "strategies": ["full", "no_roi"], "train": {**TINY["train"], "epochs": 4, "patience": 4}}
    cfg = _write(tmp_path, config)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _maskaudit("run", str(cfg), "--out", str(whole)).wait(timeout=600) == 0

    proc = _maskaudit("run", str(cfg), "--out", str(killed))
    deadline = time.time() + 300
    # kill in the middle of the training grid: once a job has saved an epoch and another has finished
    while time.time() < deadline:
        if list(killed.glob("jobs/*/fold_*/last.pt")) and list(killed.glob("jobs/*/fold_*/job.json")):
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "predictions.parquet").exists()
    assert _maskaudit("run", str(cfg), "--out", str(killed)).wait(timeout=600) == 0

    a = pd.read_parquet(whole / "predictions.parquet")
    b = pd.read_parquet(killed / "predictions.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_real_chest_xrays_through_the_folder_source(tmp_path: Path, cxr_dir: Path):
    config = {
        "data": {
            "source": "folder",
            "labels_csv": str(cxr_dir / "labels.csv"),
            "image_column": "image",
            "mask_column": "mask",
            "patient_column": "patient_id",
            "id_column": "image_id",
            "classes": ["covid"],
            "metadata_columns": ["sex", "age", "projection"],
        },
        "image_size": 48,
        "strategies": ["full", "no_roi", "only_roi_bbox"],
        "folds": 2,
        "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
        "train": {"epochs": 1, "batch_size": 16},
    }
    out = tmp_path / "run"
    _cli("run", str(_write(tmp_path, config)), "--out", str(out))
    manifest = pd.read_parquet(out / "prepared" / "manifest.parquet")
    assert len(manifest) == 182 and (manifest["status"] == "kept").all()
    splits = read_json(out / "splits.json")
    test_patients = set(splits["test"]["patients"])
    assert all(not (test_patients & set(f["patients"])) for f in splits["folds"])
    by_fold = pd.read_csv(out / "metrics" / "auc_by_fold.csv")
    assert by_fold["auc"].notna().all()


def test_real_fundus_with_two_rois_and_the_official_split(tmp_path: Path, fundus_dir: Path):
    config = {
        "data": {
            "source": "folder",
            "labels_csv": str(fundus_dir / "labels.csv"),
            "mask_column": "mask",
            "mask_columns": {"cup": "mask_cup"},
            "id_column": "image_id",
            "split_column": "split",
            "classes": ["glaucoma"],
            "color": "rgb",
        },
        "roi": "roi+cup",
        "image_size": 48,
        "strategies": ["full", "only_roi"],
        "folds": 2,
        "model": {"arch": "small_cnn", "weights": "none", "freeze": "none"},
        "train": {"epochs": 1, "batch_size": 16},
    }
    out = tmp_path / "run"
    _cli("run", str(_write(tmp_path, config)), "--out", str(out))
    splits = read_json(out / "splits.json")
    labels = pd.read_csv(fundus_dir / "labels.csv")
    assert sorted(splits["test"]["images"]) == sorted(labels.loc[labels["split"] == "test", "image_id"])
    assert (out / "prepared" / "mask_roi+cup.npy").is_file()


@pytest.mark.slow
def test_demo_finds_what_was_planted(tmp_path: Path):
    """The demo's recipe on a smaller grid: ROI evidence needs the ROI, outside evidence does without it."""
    from maskaudit.cli import demo_config

    config = demo_config("cxr")
    config["data"]["classes"] = {k: v for k, v in config["data"]["classes"].items() if k in ("opacity", "device")}
    config["data"]["metadata"] = {}
    config.update(strategies=["full", "no_roi", "only_roi"], folds=3, workers=1)
    out = tmp_path / "run"
    _cli("run", str(_write(tmp_path, config)), "--out", str(out))
    matrix = pd.read_csv(out / "metrics" / "auc_matrix.csv")
    auc = matrix[matrix["split"] == "test"].set_index(["class", "train_strategy", "test_strategy"])["auc_mean"]
    assert auc["opacity", "full", "full"] > 0.85
    assert auc["opacity", "only_roi", "only_roi"] > 0.85
    assert auc["opacity", "no_roi", "no_roi"] < 0.65
    assert auc["device", "full", "full"] > 0.85
    assert auc["device", "no_roi", "no_roi"] > 0.85
    assert auc["device", "only_roi", "only_roi"] < 0.65


def test_external_datasets_join_the_prediction_table(tmp_path: Path):
    """An external set is scored by every model under every strategy; a class it lacks has no AUC, with a reason."""
    other = {"source": "synthetic", "kind": "cxr", "n_patients": 8, "images_per_patient": [1, 1],
             "classes": {"opacity": {"signal": "roi"}}}
    config = {**TINY, "strategies": ["full", "only_roi"], "external": [{"name": "other", "data": other}]}
    out = tmp_path / "run"
    _cli("run", str(_write(tmp_path, config)), "--out", str(out))
    preds = pd.read_parquet(out / "predictions.parquet")
    ext = preds[preds["dataset"] == "other"]
    assert set(ext["split"]) == {"external"} and set(ext["test_strategy"]) == {"full", "only_roi"}
    assert len(ext) == 2 * 2 * 2 * 8 * 2  # train strategies x folds x test strategies x images x classes
    by_fold = pd.read_csv(out / "metrics" / "auc_by_fold.csv")
    device = by_fold[(by_fold["dataset"] == "other") & (by_fold["class"] == "device")]
    assert device["auc"].isna().all() and (device["reason"] == "class not labelled in this data").all()
    assert (out / "figures" / "auc_other_opacity.png").is_file()
    assert "external: other" in (out / "report.html").read_text()


def test_models_scored_on_one_read_predict_what_each_alone_does(tmp_path: Path):
    """``predict.models``: 4 models on one read of each batch, in groups of 3 (a group across two folds, then one
    alone) and one at a time give the same table, row for row and bit for bit, hold-out, validation and external."""
    from maskaudit.pipeline import Audit

    other = {"source": "synthetic", "kind": "cxr", "n_patients": 6, "images_per_patient": [1, 1],
             "classes": {"opacity": {"signal": "roi"}}}
    config = {**TINY, "strategies": ["full", "only_roi"], "external": [{"name": "other", "data": other}]}
    out = tmp_path / "run"
    _cli("run", str(_write(tmp_path, config)), "--out", str(out))
    together = pd.read_parquet(out / "predictions.parquet")
    assert set(together["split"]) == {"test", "val", "external"}
    for at_once in (3, 1):
        _write(tmp_path, {**config, "predict": {"models": at_once}})
        _cli("predict", "--config", str(tmp_path / "audit.yaml"), "--out", str(out), "--force")
        pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), together)
    audit = Audit.open(out)
    assert audit.is_done("predict") and audit.is_done("metrics")  # predict.models changes no fingerprint


def test_the_sweep_of_models_read_together_is_what_each_alone_gives(tmp_path: Path):
    """The dilation sweep scores its models in groups (``predict.models``), each batch read once for the group: the
    4 models of 2 strategies × 2 folds together, in groups of 3, and one at a time give the same table, bit for bit."""
    config = {**TINY, "strategies": ["full", "only_roi"],
              "analyses": {"run": ["sweep"], "sweep": {"train_strategies": ["full", "only_roi"],
                                                        "spreads": [0, 50, 500]}}}
    out = tmp_path / "run"
    _cli("run", str(_write(tmp_path, config)), "--out", str(out))
    together = pd.read_parquet(out / "analyses" / "sweep" / "predictions.parquet")
    assert len(together.groupby(["train_strategy", "fold"])) == 4
    for at_once in (3, 1):
        for table in out.glob("jobs/*/fold_*/sweep.parquet"):
            table.unlink()
        _write(tmp_path, {**config, "predict": {"models": at_once}})
        _cli("analyse", "sweep", "--config", str(tmp_path / "audit.yaml"), "--out", str(out), "--force")
        assert len(list(out.glob("jobs/*/fold_*/sweep.parquet"))) == 4
        pd.testing.assert_frame_equal(pd.read_parquet(out / "analyses" / "sweep" / "predictions.parquet"), together)


def test_external_data_without_masks_is_scored_full_only(tmp_path: Path, cxr_dir: Path):
    data = {"source": "folder", "labels_csv": str(cxr_dir / "labels.csv"), "patient_column": "patient_id",
            "id_column": "image_id", "classes": ["covid"]}
    config = {**TINY, "data": data, "strategies": ["full", "no_roi"], "folds": 2,
              "external": [{"name": "unmasked", "data": {**data, "mask_column": None}}]}
    out = tmp_path / "run"
    _cli("run", str(_write(tmp_path, config)), "--out", str(out))
    preds = pd.read_parquet(out / "predictions.parquet")
    ext = preds[preds["dataset"] == "unmasked"]
    assert set(ext["test_strategy"]) == {"full"} and ext["image_id"].nunique() == 182
    matrix = pd.read_csv(out / "metrics" / "auc_matrix.csv")
    assert matrix.loc[matrix["dataset"] == "unmasked", "auc_mean"].notna().all()


def test_data_without_masks_refuses_masking_strategies_early(tmp_path: Path, cxr_dir: Path):
    data = {"source": "folder", "labels_csv": str(cxr_dir / "labels.csv"), "mask_column": None,
            "id_column": "image_id", "classes": ["covid"]}
    cfg = _write(tmp_path, {**TINY, "data": data, "image_size": 32})
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "no ROI masks" in result.output
    assert not (tmp_path / "r" / "jobs").exists()
    full_only = _write(tmp_path, {**TINY, "data": data, "image_size": 32, "strategies": ["full"]}, "full.yaml")
    _cli("run", str(full_only), "--out", str(tmp_path / "r"))
    assert set(pd.read_parquet(tmp_path / "r" / "predictions.parquet")["test_strategy"]) == {"full"}


def test_an_edited_labels_csv_prepares_again(tmp_path: Path, fundus_dir: Path):
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(fundus_dir, data_dir)  # a private, writable copy (tmp only, never in the repo)
    config = {**TINY, "data": {"source": "folder", "labels_csv": str(data_dir / "labels.csv"),
                               "id_column": "image_id", "classes": ["glaucoma"], "color": "rgb"},
              "strategies": ["full"], "folds": 2, "image_size": 32}
    cfg, out = _write(tmp_path, config), tmp_path / "run"
    _cli("prepare", "--config", str(cfg), "--out", str(out))
    labels = pd.read_csv(data_dir / "labels.csv")
    labels.iloc[:10].to_csv(data_dir / "labels.csv", index=False)
    _cli("prepare", "--out", str(out))
    assert len(pd.read_parquet(out / "prepared" / "manifest.parquet")) == 10


def test_early_stopping_rules():
    """The study's rule by default; min_epochs holds it off; val_auc improves upwards; NaN never improves."""
    from maskaudit.train import EarlyStopping

    study = EarlyStopping(patience=2, min_delta=0.01)
    assert [study.step(v, e) for e, v in enumerate([1.0, 0.995, 0.98, 0.975])] == [True, False, True, False]
    assert not study.stop and not study.step(0.99, 4) and study.stop and study.best_epoch == 2
    held = EarlyStopping(patience=1, min_delta=0.0, min_epochs=4)
    for epoch, value in enumerate([1.0, 2.0, 3.0]):
        held.step(value, epoch)
    assert held.counter == 2 and not held.stop  # only 3 of 4 epochs run
    held.step(4.0, 3)
    assert held.stop
    auc = EarlyStopping(patience=2, min_delta=0.0, higher=True)
    assert [auc.step(v, e) for e, v in enumerate([0.6, float("nan"), 0.7, 0.65])] == [True, False, True, False]
    assert auc.best == 0.7 and EarlyStopping(**{k: v for k, v in vars(auc).items()}).best == 0.7  # resumable


def test_monitor_val_auc_and_min_epochs_reach_training(tmp_path: Path):
    cfg = _write(tmp_path, {**TINY, "strategies": ["full"], "train": {**TINY["train"], "epochs": 4, "patience": 1,
                                                                     "min_epochs": 3, "monitor": "val_auc"}})
    out = tmp_path / "run"
    _cli("run", str(cfg), "--out", str(out))
    job = read_json(out / "jobs" / "full" / "fold_0" / "job.json")
    history = pd.read_csv(out / "jobs" / "full" / "fold_0" / "history.csv")
    assert job["monitor"] == "val_auc" and job["epochs_run"] >= 3
    means = history[["val_auc_opacity", "val_auc_device"]].mean(axis=1)
    assert job["best_monitored"] == pytest.approx(means.max()) and job["best_epoch"] == int(means.idxmax())
    assert job["best_val_loss"] == pytest.approx(history["val_loss"][job["best_epoch"]])
    for name in ("opacity", "device"):
        best = job["best_val_auc"][name]
        assert best["auc"] == pytest.approx(history[f"val_auc_{name}"].max())
        assert history[f"val_auc_{name}"][best["epoch"]] == pytest.approx(best["auc"])


def test_a_compiled_training_forward_trains_the_same_model(tmp_path: Path):
    """``train.compile``: the job trains through ``torch.compile`` (Inductor, here on the CPU) and keeps the plain
    module's weights (no ``_orig_mod.`` keys): its predictions match the eager job's to float rounding."""
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler")
    base = {**TINY, "strategies": ["full"], "folds": 2, "train": {**TINY["train"], "epochs": 1}}
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        _cli("run", str(_write(tmp_path, {**base, "train": {**base["train"], "compile": compiled}})), "--out", str(out))
        runs[compiled] = pd.read_parquet(out / "predictions.parquet")
    state = __import__("torch").load(tmp_path / "compile_True" / "jobs" / "full" / "fold_0" / "model.pt")
    assert not any(key.startswith("_orig_mod.") for key in state)
    a, b = runs[False]["probability"].to_numpy(), runs[True]["probability"].to_numpy()
    assert abs(a - b).max() < 1e-3
