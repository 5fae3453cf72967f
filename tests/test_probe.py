"""``maskaudit probe``: models trained elsewhere audited as they are, through the whole pipeline.

The model sources themselves (entry point, TorchScript, ONNX, torchxrayvision, the output mapping)
are tested in test_probe_models.py; here a probe runs end to end and is checked against the audit
that trained the model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_pipeline import TINY
from typer.testing import CliRunner

from maskaudit.cli import app
from maskaudit.config import config_from_dict, load_config
from maskaudit.errors import MaskauditError
from maskaudit.kinds import audit_class, open_audit
from maskaudit.models import ModelConfig, build_model, load_checkpoint
from maskaudit.rundir import RunDir


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def _entry_point(file: Path, names: list[str], name: str = "mine") -> dict:
    """A maskaudit-trained small CNN given as a Python entry point and a state-dict file."""
    return {"name": name, "source": "python", "entry_point": "maskaudit.probe:maskaudit_model",
            "arguments": {"arch": "small_cnn", "n_classes": 2, "in_channels": 1}, "file": str(file),
            "output": {"names": names}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny audit whose full/fold_0 model is then probed as if it came from elsewhere."""
    root = tmp_path_factory.mktemp("trained")
    (root / "audit.yaml").write_text(yaml.safe_dump({**TINY, "strategies": ["full", "no_roi"]}))
    _cli("run", str(root / "audit.yaml"), "--out", str(root / "run"))
    return root / "run"


@pytest.fixture(scope="module")
def probed(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three models probed in one run: the trained model through its entry point and as TorchScript, and the
    same model with its outputs renamed (devices, opacities): device found through an alias, opacity not at all."""
    root = tmp_path_factory.mktemp("probe")
    weights = trained / "jobs" / "full" / "fold_0" / "model.pt"
    classes = load_config(trained / "config.yaml").classes  # the trained model's outputs, in order
    model = build_model(ModelConfig(arch="small_cnn", weights="none"), n_classes=2, in_channels=1)
    load_checkpoint(model, weights)
    torch.jit.trace(model.eval(), torch.rand(2, 1, 32, 32)).save(str(root / "model.ts"))
    config = {key: value for key, value in TINY.items() if key not in ("model", "train")}
    config |= {
        "strategies": ["full", "no_roi", "only_roi"],
        "models": [_entry_point(weights, classes),
                   {"name": "scripted", "source": "torchscript", "file": str(root / "model.ts"),
                    "output": {"names": classes}},
                   _entry_point(weights, [f"{c}s" for c in classes], name="renamed")
                   | {"output": {"names": [f"{c}s" for c in classes], "aliases": {"device": ["devices"]}}}],
        "external": [{"name": "ext", "data": {**TINY["data"], "n_patients": 8}}],
        "analyses": {"explain": {"max_evals": 40, "images_per_class": 1, "batch_size": 40},
                     "sweep": {"spreads": [0, 100]}, "reader": {"percentiles": [50]}},
    }
    (root / "probe.yaml").write_text(yaml.safe_dump(config))
    _cli("probe", str(root / "probe.yaml"), "--out", str(root / "run"))
    return root / "run"


def test_probe_reproduces_the_audits_own_predictions(trained: Path, probed: Path):
    """Probing the full model gives, image by image, the probabilities the audit itself computed."""
    own = pd.read_parquet(trained / "predictions.parquet")
    own = own[(own["train_strategy"] == "full") & (own["fold"] == 0) & (own["split"] == "test")]
    probe = pd.read_parquet(probed / "predictions.parquet")
    external = probe[probe["dataset"] == "ext"]
    assert set(external["split"]) == {"external"} and set(external["train_strategy"]) == {"mine", "scripted",
                                                                                           "renamed"}
    assert (probed / "figures" / "auc_ext_device.png").is_file()
    probe = probe[probe["dataset"] == "main"]
    assert set(probe["split"]) == {"test"} and set(probe["fold"]) == {0}
    assert set(probe["train_strategy"]) == {"mine", "scripted", "renamed"}
    keys = ["test_strategy", "image_id", "class"]
    for name in ("mine", "scripted"):
        both = own.merge(probe[probe["train_strategy"] == name], on=keys, suffixes=("_own", "_probe"))
        assert len(both) == len(own) > 0  # every hold-out image under full and no_roi
        np.testing.assert_allclose(both["probability_probe"], both["probability_own"], atol=1e-6)
        assert (both["label_own"] == both["label_probe"]).all()
    assert not (probed / "jobs" / "mine" / "fold_0" / "model.pt").exists()  # nothing was trained


def test_a_class_the_model_does_not_predict_is_reported_not_guessed(probed: Path):
    """'renamed' has outputs named devices/opacities: device matches through its alias, opacity matches nothing."""
    probe = pd.read_parquet(probed / "predictions.parquet")
    probe = probe[probe["dataset"] == "main"]
    mine, renamed = (probe[probe["train_strategy"] == m].set_index(["test_strategy", "image_id", "class"])
                     for m in ("mine", "renamed"))
    device = renamed.xs("device", level="class")["probability"]
    np.testing.assert_array_equal(device, mine.xs("device", level="class")["probability"].loc[device.index])
    assert renamed.xs("opacity", level="class")["probability"].isna().all()
    matrix = pd.read_csv(probed / "metrics" / "auc_matrix.csv")
    cell = matrix[(matrix["train_strategy"] == "renamed") & (matrix["class"] == "opacity")]
    assert cell["auc_mean"].isna().all() and cell["reason"].str.contains("not predicted").all()
    verdict = pd.read_csv(probed / "analyses" / "verdict" / "verdict.csv")
    row = verdict[(verdict["model"] == "renamed") & (verdict["class"] == "opacity")].iloc[0]
    assert row["verdict"] == "not_predicted" and "aliases" in row["reading"]


def test_probe_runs_every_analysis_and_says_what_a_probe_can_show(probed: Path):
    verdict = pd.read_csv(probed / "analyses" / "verdict" / "verdict.csv")
    assert len(verdict) == 3 * 2 and set(verdict["model"]) == {"mine", "scripted", "renamed"}
    shown = verdict[verdict["verdict"] != "not_predicted"]
    assert shown["reading"].str.contains("A probe trains nothing on masked images").all()
    assert set(shown["full_cell"]) <= {"mine→full", "scripted→full", "renamed→full"}
    attribution = pd.read_csv(probed / "analyses" / "explain" / "attribution_in_roi.csv")
    assert {(t, s) for t, s in zip(attribution["train_strategy"], attribution["test_strategy"], strict=True)} == {
        ("mine", "full"), ("scripted", "full"), ("renamed", "full")}
    sweep = pd.read_csv(probed / "analyses" / "sweep" / "sweep.csv")
    assert set(sweep["train_strategy"]) == {"mine", "scripted", "renamed"}
    assert (probed / "analyses" / "embed" / "cosine.csv").is_file()
    selection = pd.read_csv(probed / "analyses" / "reader" / "selection.csv")
    assert {"model", "strategy", "fold"} <= set(selection.columns) and set(selection["fold"]) == {0}
    html = (probed / "report.html").read_text()
    assert "This is a probe" in html and "Probed models" in html and "Training curves" not in html
    assert "Rows: the probed model; columns" in html and "trained with" not in html.split("Rows:")[1][:60]
    for name in ("mine", "scripted", "renamed"):
        assert f">{name}<" in html


def test_a_probe_run_again_is_skipped_and_a_changed_weights_file_redoes_it(trained: Path, probed: Path):
    stamps = (probed / "stages.json").read_text()
    _cli("probe", str(probed.parent / "probe.yaml"), "--out", str(probed))
    assert (probed / "stages.json").read_text() == stamps  # nothing redone
    audit = open_audit(probed)
    assert audit.is_done("predict")
    weights = trained / "jobs" / "full" / "fold_0" / "model.pt"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert not audit.is_done("predict")  # new weights in the same file: the probe is stale


def test_probe_and_run_refuse_each_others_configs(tmp_path: Path):
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump({**TINY, "model": {"source": "torchxrayvision", "weights": "densenet121-res224-all",
                                                       "pretrained": False}}))
    assert "use `maskaudit probe`" in _cli("run", str(path), "--out", str(tmp_path / "r"), code=1)
    path.write_text(yaml.safe_dump(TINY))
    assert "names no model to probe" in _cli("probe", str(path), "--out", str(tmp_path / "r"), code=1)


def test_probe_config_errors_name_the_key():
    with pytest.raises(MaskauditError, match="only a probe"):
        config_from_dict({**TINY, "predict": {"images": "all"}})
    with pytest.raises(MaskauditError, match="needs `entry_point`"):
        config_from_dict({**TINY, "models": [{"name": "m", "source": "python", "output": {"names": ["a"]}}]})
    with pytest.raises(MaskauditError, match="output.names"):
        config_from_dict({**TINY, "models": [{"name": "m", "source": "python", "entry_point": "a:b"}]})
    with pytest.raises(MaskauditError, match="strategy's name"):
        config_from_dict({**TINY, "models": [{"name": "full", "source": "torchxrayvision", "weights": "x"}]})
    one = config_from_dict({**TINY, "model": {"source": "torchxrayvision", "weights": "densenet121-res224-all"}})
    plan = audit_class(one)(RunDir(Path("unused")), one).plan()
    assert one.kind == "probe" and plan.models == ["densenet121-res224-all"] and plan.model_folds == [0]
    assert one.models[0].input.size == 224 and one.models[0].input.range == (-1024, 1024)  # xrv's, written out
    assert plan.embed_model == "densenet121-res224-all" and plan.sweep_models == plan.models
    sealed = config_from_dict({**TINY, "models": [{"name": "m", "source": "onnx", "file": __file__,
                                                   "output": {"names": ["a"]}}]})
    # nothing to hook: the embed analysis says so instead of failing
    assert audit_class(sealed)(RunDir(Path("unused")), sealed).plan().embed_model is None


def test_torchxrayvision_densenet_probes_real_xrays_end_to_end(cxr_dir: Path, tmp_path: Path):
    """A torchxrayvision DenseNet-121 (untrained: weights cannot be downloaded here) on 24 real X-rays: its
    own 224 px, 1-channel, [-1024, 1024] input made from each masking; covid read from its Pneumonia output."""
    pytest.importorskip("torchxrayvision")
    labels = pd.read_csv(cxr_dir / "labels.csv").groupby("covid").head(12)
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for image_id in labels["image_id"]:
            shutil.copy(cxr_dir / sub / f"{image_id}.png", root / sub / f"{image_id}.png")
    pd.DataFrame({"image": "images/" + labels["image_id"] + ".png", "mask": "masks/" + labels["image_id"] + ".png",
                  "patient": labels["patient_id"], "covid": labels["covid"]}).to_csv(root / "labels.csv", index=False)
    config = {"data": {"source": "folder", "labels_csv": str(root / "labels.csv"), "patient_column": "patient",
                       "classes": ["covid"]},
              "image_size": 128, "strategies": ["full", "no_roi", "only_roi"], "folds": 2, "workers": 1,
              "predict": {"images": "all", "batch_size": 8},
              "model": {"source": "torchxrayvision", "weights": "densenet121-res224-all", "pretrained": False,
                        "output": {"aliases": {"covid": ["Pneumonia"]}}},
              "analyses": {"run": ["verdict"]}}
    (tmp_path / "xrv.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    _cli("probe", str(tmp_path / "xrv.yaml"), "--out", str(tmp_path / "run"))
    probe = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert len(probe) == 3 * len(labels) and probe["probability"].between(0, 1).all()
    assert set(probe["train_strategy"]) == {"densenet121-res224-all"}
    seen = yaml.safe_load((tmp_path / "run" / "jobs" / "densenet121-res224-all" / "fold_0" / "probe.json").read_text())
    assert "Pneumonia" in seen["outputs"] and "224" in seen["input"]
    assert (tmp_path / "run" / "report.html").is_file()
