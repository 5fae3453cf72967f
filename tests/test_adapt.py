"""Light cross-masking (issue 17): a probed model adapted to each masking reaches the full audit's verdicts.

A full-image model of the demo's data (``maskaudit demo``: its data, its recipe with half the epochs, fold 0;
trained here alone) is probed with ``adapt`` on the first of the demo's five folds, and the probe's verdict table
must be the full audit's: the demo's, whose verdicts are the planted truth (opacity in the lungs, a device outside
them, cardiomegaly in the lung silhouette, a scanner everywhere; README, "Audit your own model", gives the
demo-scale measurement with every fold). The parameter selection of ``adapt.layers`` is pinned for each source
that can be adapted (python, TorchScript, torchxrayvision), and what cannot be adapted (ONNX, a frozen
TorchScript module) says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from maskaudit.adapt import AdaptedModel, ShapeModel, head_module, select_trainable, trainable_names
from maskaudit.cli import app, demo_config
from maskaudit.config import ProbedModelConfig, config_from_dict
from maskaudit.errors import MaskauditError
from maskaudit.kinds import audit_class, create_audit
from maskaudit.models import ModelConfig, build_model
from maskaudit.probe import load_probed_model
from maskaudit.rundir import RunDir

CPU = torch.device("cpu")

#: The full audit's verdict table of the demo (``maskaudit demo``): the planted truth, found by its 30 models.
FULL_AUDIT = {"opacity": "roi", "device": "outside", "cardiomegaly": "shape", "scanner": "everywhere"}
#: The full audit's opacity only_roi→only_roi (the demo): an adapted cell within 0.05 of it.
FULL_OPACITY_ONLY_ROI = 1.00
#: The demo probe's adapt (configs/probe-demo-adapt.yaml) on the first of the five folds.
ADAPT = {"strategies": ["no_roi_bbox", "only_roi", "roi_shape"], "layers": "all", "epochs": 4, "lr": 0.001,
         "folds": 1, "shape": {"size": 32, "epochs": 8, "lr": 0.003}}
DATA = {"source": "synthetic", "kind": "cxr", "n_patients": 24, "images_per_patient": [1, 1],
        "classes": {"opacity": {"signal": "roi"}, "cardiomegaly": {"signal": "shape"}}}


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's full model of fold 0 with 8 of its 16 epochs (cheaper, and weaker: device and cardiomegaly only
    half learnt, so the adapted cells, not the probed model, must find them); the other 29 jobs are not needed."""
    raw = demo_config("cxr")
    config = config_from_dict({**raw, "train": {**raw["train"], "epochs": 8}, "strategies": ["full"], "workers": 1})
    audit = create_audit(tmp_path_factory.mktemp("demo") / "run", config)
    audit.prepare()
    audit.split()
    audit.train(only=[("full", 0)])
    return audit.run.job("full", 0) / "model.pt"


def _probe_config(weights: Path, adapt: dict) -> dict:
    """configs/probe-demo-adapt.yaml with the demo's model at ``weights`` and ``adapt``."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "probe-demo-adapt.yaml").read_text())
    raw["model"]["file"] = str(weights)
    return {**raw, "adapt": adapt, "workers": 1, "analyses": {"run": ["verdict"]}}


@pytest.fixture(scope="module")
def adapted(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapted")
    (root / "probe.yaml").write_text(yaml.safe_dump(_probe_config(demo_model, ADAPT)))
    _cli("probe", str(root / "probe.yaml"), "--out", str(root / "run"))
    return root / "run"


def test_the_adapted_demo_probe_reaches_the_full_audits_verdict_for_every_class(adapted: Path):
    table = pd.read_parquet(adapted / "analyses" / "verdict" / "verdict.parquet").set_index("class")
    assert table["verdict"].to_dict() == FULL_AUDIT, table["reading"].to_string()
    assert (table["model"] == "my-classifier").all()
    assert set(table["inside_cell"]) == {"my-classifier+only_roi→only_roi"}
    assert set(table["outside_cell"]) == {"my-classifier+no_roi_bbox→no_roi_bbox"}
    assert set(table["shape_cell"]) == {"roi_shape→roi_shape"} and set(table["full_cell"]) == {"my-classifier→full"}
    assert abs(table.loc["opacity", "inside_auc"] - FULL_OPACITY_ONLY_ROI) <= 0.05
    # the reading says which cells came from adaptation
    assert table["reading"].str.contains("Adapted: cells named model+masking", regex=False).all()
    assert table["reading"].str.contains("roi_shape→roi_shape from a small CNN", regex=False).all()


def test_adapted_models_are_rows_of_the_prediction_table_and_train_as_jobs(adapted: Path):
    predictions = pd.read_parquet(adapted / "predictions.parquet")
    folds = predictions.groupby("train_strategy")["fold"].unique().map(sorted).to_dict()
    assert folds == {"my-classifier": [0], "my-classifier+no_roi_bbox": [0], "my-classifier+only_roi": [0],
                     "roi_shape": [0]}
    assert set(predictions["split"]) == {"test"}
    job = adapted / "jobs" / "my-classifier+only_roi" / "fold_0"
    summary = json.loads((job / "job.json").read_text())
    assert summary["strategy"] == "my-classifier+only_roi" and 1 <= summary["epochs_run"] <= ADAPT["epochs"]
    trained = json.loads((job / "adapt.json").read_text())
    assert trained["model"] == "my-classifier" and trained["masking"] == "only_roi" and trained["layers"] == "all"
    assert summary["trainable_parameters"] == sum(p.numel() for p in _small_cnn(4).parameters())
    assert (job / "history.csv").is_file() and not (job / "last.pt").exists()
    assert not (adapted / "jobs" / "my-classifier" / "fold_0" / "model.pt").exists()  # the probed model: given
    stages = json.loads((adapted / "stages.json").read_text())
    assert stages["adapt"]["jobs"] == 3 and "train" not in stages
    from maskaudit.runstatus import run_status

    shown = {stage.name: stage.state for stage in run_status(adapted).stages}
    assert shown["adapt"] == "done" and "train" not in shown  # `maskaudit status` lists the probe's training
    training = pd.read_parquet(adapted / "metrics" / "training.parquet")
    assert set(training["train_strategy"]) == {"my-classifier+no_roi_bbox", "my-classifier+only_roi", "roi_shape"}
    # whose keys its advice names, were a job undertrained: the adapted copies' recipe, the shape control's
    assert dict(zip(training["train_strategy"], training["settings"], strict=False)) == {
        "my-classifier+no_roi_bbox": "adapt", "my-classifier+only_roi": "adapt", "roi_shape": "adapt.shape"}
    html = (adapted / "report.html").read_text()
    assert "light cross-masking" in html and "fine-tuned on only_roi" in html


def test_an_adapted_probe_run_again_retrains_nothing(demo_model: Path, adapted: Path):
    stamps = {p: p.stat().st_mtime_ns for p in adapted.glob("jobs/*/fold_*/model.pt")}
    records = json.loads((adapted / "stages.json").read_text())
    _cli("probe", str(adapted.parent / "probe.yaml"), "--out", str(adapted))
    assert {p: p.stat().st_mtime_ns for p in adapted.glob("jobs/*/fold_*/model.pt")} == stamps
    assert json.loads((adapted / "stages.json").read_text())["adapt"] == records["adapt"]


def test_a_jobs_fingerprint_is_its_recipe_not_which_other_jobs_there_are(tmp_path: Path):
    """More folds or another masking add jobs without retraining the others; a changed recipe retrains them all."""
    weights = tmp_path / "model.pt"
    torch.save(_small_cnn(4).state_dict(), weights)

    def fingerprint(adapt: dict, job: str = "my-classifier+only_roi") -> str:
        config = config_from_dict(_probe_config(weights, adapt))
        return audit_class(config)(RunDir(tmp_path / "run"), config).fingerprint("model", strategy=job, fold=0)

    first = fingerprint(ADAPT)
    assert fingerprint({**ADAPT, "folds": 3}) == first
    assert fingerprint({**ADAPT, "strategies": ["only_roi"]}) == first
    assert fingerprint({**ADAPT, "epochs": 5}) != first and fingerprint({**ADAPT, "layers": "head"}) != first


# ------------------------------------------------------------------------------------------ what is trained


def _small_cnn(n_classes: int = 2) -> torch.nn.Module:
    return build_model(ModelConfig(arch="small_cnn", weights="none"), n_classes=n_classes, in_channels=1)


LAST_BLOCK = ["features.12.weight", "features.13.weight", "features.13.bias", "classifier.1.weight",
              "classifier.1.bias"]


def test_head_and_last_block_of_a_python_and_a_torchscript_model():
    net = _small_cnn()
    scripted = torch.jit.trace(net.eval(), torch.rand(2, 1, 32, 32))
    for model in (net, scripted):
        assert trainable_names(model, "head") == ["classifier.1.weight", "classifier.1.bias"]
        assert trainable_names(model, "last_block") == LAST_BLOCK
        assert trainable_names(model, "all") == [name for name, _ in model.named_parameters()]
    assert select_trainable(scripted, "last_block") == LAST_BLOCK
    assert [n for n, p in scripted.named_parameters() if p.requires_grad] == LAST_BLOCK
    frozen = torch.jit.freeze(torch.jit.script(_small_cnn().eval()))
    with pytest.raises(MaskauditError, match="no parameters to train .*torch.jit.freeze"):
        trainable_names(frozen, "head")


def test_head_and_last_block_of_torchxrayvision_models():
    xrv = pytest.importorskip("torchxrayvision")
    from maskaudit.probe import _xrv_untrained

    labels = list(xrv.models.model_urls["densenet121-res224-all"]["labels"])
    densenet = _xrv_untrained(xrv, "densenet121-res224-all", labels, 224)
    assert trainable_names(densenet, "head") == ["classifier.weight", "classifier.bias"]
    block = trainable_names(densenet, "last_block")
    assert block[0].startswith("features.denseblock4.denselayer1.") and block[-4:] == [
        "features.norm5.weight", "features.norm5.bias", "classifier.weight", "classifier.bias"]
    assert not any(name.startswith("features.transition3") for name in block)
    resnet = _xrv_untrained(xrv, "resnet50-res512-all", labels, 512)
    assert head_module(resnet) == "model.fc"
    assert trainable_names(resnet, "last_block")[0].startswith("model.layer4.0.")


def test_the_training_view_gives_logits_and_leaves_unpredicted_classes_out():
    config = ProbedModelConfig(name="m", source="python", entry_point="maskaudit.probe:maskaudit_model",
                               arguments={"arch": "small_cnn", "n_classes": 2, "in_channels": 1},
                               output={"names": ["a", "b"], "activation": "softmax"})
    probed = load_probed_model(config, ["a", "c"], 1, CPU, 32)
    x = torch.rand(3, 1, 32, 32)
    logits = AdaptedModel(probed)(x)
    assert torch.allclose(torch.sigmoid(logits[:, 0]), probed.probabilities(x)[:, 0], atol=1e-5)
    assert (logits[:, 1] == 0).all()  # class c: not predicted, no gradient, no part in the loss
    shape = ShapeModel(n_classes=2, in_channels=1, size=32)
    assert shape(torch.rand(2, 1, 64, 64)).shape == (2, 2)


# ------------------------------------------------------------------------------------------ what cannot be adapted


def _probe(**more: object) -> dict:
    return {"data": DATA, "image_size": 32, "strategies": ["full", "no_roi_bbox", "only_roi", "roi_shape"],
            "model": {"name": "m", "source": "torchxrayvision", "weights": "densenet121-res224-all",
                      "pretrained": False}, **more}


def test_adapt_config_errors_are_one_line_naming_what_to_do():
    onnx = {**_probe(), "model": {"name": "m", "source": "onnx", "file": __file__, "output": {"names": ["a"]}}}
    cases = [
        ({**onnx, "adapt": {"strategies": ["only_roi"]}}, "source onnx cannot be adapted"),
        ({"data": DATA, "adapt": {"strategies": ["only_roi"]}}, "a full audit trains its own models"),
        (_probe(adapt={"strategies": ["no_roi"]}), "not test maskings"),
        (_probe(adapt={"strategies": ["full"]}), "full is the probed model itself"),
        (_probe(adapt={"strategies": ["only_roi"]}, predict={"images": "all"}), "use predict.images: test"),
        (_probe(adapt={"strategies": ["only_roi"], "folds": 6}), "adapt.folds=6, but the run has folds=5"),
        (_probe(adapt={"strategies": ["only_roi"], "layers": "neck"}), "adapt.layers"),
    ]
    for raw, words in cases:
        with pytest.raises(MaskauditError, match=words) as caught:
            config_from_dict(raw, check_files=False)
        assert "\n" not in str(caught.value).strip() or words == "adapt.layers"
    plain = config_from_dict(_probe(), check_files=False)
    assert plain.adapt.strategies == [] and "adapt" not in audit_class(plain).FLOW[:2]


def test_torchxrayvision_densenet_adapts_through_its_real_loading_path(tmp_path: Path):
    """torchxrayvision's DenseNet-121 (untrained: ``pretrained: false``, no download) fine-tuned on only_roi images
    through its own 224 px, [-1024, 1024] input: one head-only job, scored like the probed model."""
    pytest.importorskip("torchxrayvision")
    config = _probe(data={**DATA, "n_patients": 14}, folds=2, strategies=["full", "only_roi"], workers=1,
                    predict={"batch_size": 16},
                    model={"name": "xrv", "source": "torchxrayvision", "weights": "densenet121-res224-all",
                           "pretrained": False, "output": {"aliases": {"cardiomegaly": ["Cardiomegaly"]}}},
                    adapt={"strategies": ["only_roi"], "layers": "head", "epochs": 1, "folds": 1},
                    analyses={"run": ["verdict"]})
    (tmp_path / "xrv.yaml").write_text(yaml.safe_dump(config))
    _cli("probe", str(tmp_path / "xrv.yaml"), "--out", str(tmp_path / "run"))
    job = tmp_path / "run" / "jobs" / "xrv+only_roi" / "fold_0"
    assert json.loads((job / "adapt.json").read_text())["trained"] == ["classifier"]
    assert json.loads((job / "job.json").read_text())["trainable_parameters"] == 1024 * 18 + 18
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert set(predictions["train_strategy"]) == {"xrv", "xrv+only_roi"}
    scored = predictions[predictions["class"] == "cardiomegaly"]
    assert scored["probability"].between(0, 1).all()
    assert predictions[predictions["class"] == "opacity"]["probability"].isna().all()  # xrv has no such output
    verdict = pd.read_parquet(tmp_path / "run" / "analyses" / "verdict" / "verdict.parquet")
    assert verdict.set_index("class").loc["cardiomegaly", "inside_cell"] == "xrv+only_roi→only_roi"


def test_the_probe_configs_with_adapt_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    xrv = config_from_dict(yaml.safe_load((root / "probe-xrv-padchest.yaml").read_text()), check_files=False)
    assert xrv.adapt.strategies and xrv.predict.images == "test"
    plan = audit_class(xrv)(RunDir(Path("unused")), xrv).plan()
    assert plan.evidence["xrv-all"]["inside"][0] == ("xrv-all+only_roi", "only_roi")
    assert plan.evidence["xrv-all"]["shape"] == [("roi_shape", "roi_shape")]
    demo = config_from_dict(yaml.safe_load((root / "probe-demo-adapt.yaml").read_text()), check_files=False)
    assert demo.adapt.strategies == ["no_roi_bbox", "only_roi", "roi_shape"]
