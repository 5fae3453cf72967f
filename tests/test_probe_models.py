"""Probed models (maskaudit.probe): each source loads, preprocesses alike and maps its outputs onto the classes.

A small CNN trained a few steps by maskaudit is probed through its Python entry point, as TorchScript and as
ONNX, on real chest X-rays from ../shared/data; a torchxrayvision DenseNet-121 (untrained: no download here)
checks xrv's input convention and output names. The end-to-end probe is tested in test_probe.py.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from torch import nn

from maskaudit.config import ModelConfig, ProbedModelConfig, ProbeOutput, config_from_dict
from maskaudit.errors import MaskauditError
from maskaudit.models import build_model
from maskaudit.probe import ProbedModel, load_probed_model, match_outputs

CPU = torch.device("cpu")
NAMES = ["opacity", "device", "effusion"]
#: A non-trivial input block: another size, 1 → 3 channels, a range and per-channel mean/std.
INPUT = {"size": 48, "channels": 3, "range": (-1.0, 2.0), "mean": [0.1, 0.2, 0.3], "std": [0.9, 1.1, 1.3]}
ENTRY = {"entry_point": "maskaudit.probe:maskaudit_model",
         "arguments": {"arch": "small_cnn", "n_classes": 3, "in_channels": 3}}

HELPERS = '''
import torch
from torch import nn


class Fixed(nn.Module):
    """Outputs the same values for every image (plus 0 * the image, so it stays a function of it)."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", torch.tensor(values))
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        return self.values.expand(x.shape[0], -1) + 0.0 * x.mean(dim=(1, 2, 3)).unsqueeze(1)


def fixed(values):
    return Fixed(values)


def not_a_module():
    return {"weights": 1}
'''


def xrays(cxr_dir: Path, n: int = 4, size: int = 64) -> torch.Tensor:
    """``n`` real chest X-rays, gray, resized to ``size`` px, in [0, 1]."""
    ids = pd.read_csv(cxr_dir / "labels.csv")["image_id"].head(n)
    arrays = [np.asarray(Image.open(cxr_dir / "images" / f"{i}.png").convert("L").resize((size, size),
                                                                                       Image.BILINEAR))
              for i in ids]
    return torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32) / 255.0)


def config(**fields) -> ProbedModelConfig:
    return ProbedModelConfig(**{"name": "m", **fields})


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory):
    """An importable module ``probe_helpers_mod`` with hand-made models for python entry points."""
    root = tmp_path_factory.mktemp("helpers")
    (root / "probe_helpers_mod.py").write_text(HELPERS)
    sys.path.insert(0, str(root))
    yield "probe_helpers_mod"
    sys.path.remove(str(root))
    sys.modules.pop("probe_helpers_mod", None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small CNN (3-channel input, 3 classes) after a few SGD steps, as a state dict, TorchScript and ONNX."""
    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="small_cnn", weights="none"), n_classes=3, in_channels=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(torch.rand(8, 3, 48, 48)), torch.rand(8, 3).round()).backward()
        optimizer.step()
    model.eval()
    torch.save(model.state_dict(), root / "model.pt")  # as maskaudit's training writes model.pt
    example = torch.rand(2, 3, 48, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example).save(str(root / "model.ts"))
        if importlib.util.find_spec("onnxscript") is not None:
            torch.onnx.export(model, (example,), str(root / "model.onnx"), input_names=["x"], output_names=["y"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
        else:  # the TorchScript-based exporter
            torch.onnx.export(model, (example,), str(root / "model.onnx"), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    return {"model": model, "pt": root / "model.pt", "ts": root / "model.ts", "onnx": root / "model.onnx"}


def reference_input(x: torch.Tensor) -> torch.Tensor:
    """INPUT's preprocessing written out independently of maskaudit.probe."""
    x = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False, antialias=True).repeat(1, 3, 1, 1)
    x = x * 3.0 - 1.0
    return (x - torch.tensor(INPUT["mean"]).view(1, 3, 1, 1)) / torch.tensor(INPUT["std"]).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------ sources


def test_entry_point_torchscript_and_onnx_give_the_same_probabilities(exported: dict, cxr_dir: Path):
    pytest.importorskip("onnxruntime")
    x = xrays(cxr_dir)
    classes = ["effusion", "opacity", "covid"]
    with torch.no_grad():
        logits = exported["model"](reference_input(x))
    expected = torch.full((len(x), 3), math.nan)
    expected[:, 0], expected[:, 1] = torch.sigmoid(logits[:, 2]), torch.sigmoid(logits[:, 0])
    sources = {"python": {**ENTRY, "file": exported["pt"]}, "torchscript": {"file": exported["ts"]},
               "onnx": {"file": exported["onnx"]}}
    got = {}
    for source, fields in sources.items():
        model = load_probed_model(config(source=source, input=INPUT, output={"names": NAMES}, **fields),
                                  classes, in_channels=1, device=CPU, image_size=64)
        assert isinstance(model, ProbedModel) and not model.training
        assert model.n_classes == 3 and model.activation == "sigmoid"
        assert model.predicted == ["effusion", "opacity"] and model.not_predicted == ["covid"]
        assert model.output_index == {"effusion": 2, "opacity": 0, "covid": None}
        with torch.no_grad():
            got[source] = model.probabilities(x)
            scores = model(x)
        assert got[source].shape == (len(x), 3) and torch.isnan(got[source][:, 2]).all()
        torch.testing.assert_close(got[source], expected, atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(torch.sigmoid(scores), got[source], atol=1e-6, rtol=0, equal_nan=True)
    assert not torch.equal(got["python"][:, 0], got["python"][:, 1])  # real, distinct scores


def test_torch_sources_are_differentiable_and_onnx_is_not(exported: dict, cxr_dir: Path):
    pytest.importorskip("onnxruntime")
    x = xrays(cxr_dir, n=2).requires_grad_(True)
    python = load_probed_model(config(source="python", input=INPUT, output={"names": NAMES}, file=exported["pt"],
                                      **ENTRY), ["opacity"], 1, CPU)
    python(x)[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    onnx = load_probed_model(config(source="onnx", input=INPUT, output={"names": NAMES}, file=exported["onnx"]),
                             ["opacity"], 1, CPU)
    assert not onnx(x).requires_grad


def test_embeddings_need_a_python_or_xrv_model(exported: dict, cxr_dir: Path):
    x = xrays(cxr_dir, n=2)
    python = load_probed_model(config(source="python", input=INPUT, output={"names": NAMES}, file=exported["pt"],
                                      **ENTRY), ["opacity"], 1, CPU)
    assert python.embedding_layer() is python.net.classifier[0]  # the Flatten before the last Linear
    with torch.no_grad():
        torch.testing.assert_close(python.embed(x), exported["model"].embed(reference_input(x)), atol=1e-5, rtol=0)
    named = load_probed_model(config(source="python", input=INPUT, output={"names": NAMES}, file=exported["pt"],
                                     layer="pool", **ENTRY), ["opacity"], 1, CPU)
    assert named.embedding_layer() is named.net.pool and named.embed(x).shape == (2, 64)
    wrong = load_probed_model(config(source="python", input=INPUT, output={"names": NAMES}, file=exported["pt"],
                                     layer="nope", **ENTRY), ["opacity"], 1, CPU)
    with pytest.raises(MaskauditError, match="no module named layer='nope'"):
        wrong.embedding_layer()
    scripted = load_probed_model(config(source="torchscript", input=INPUT, output={"names": NAMES},
                                        file=exported["ts"]), ["opacity"], 1, CPU)
    with pytest.raises(MaskauditError, match="embeddings need a python or torchxrayvision model"):
        scripted.embedding_layer()


def test_torchxrayvision_densenet_gets_xrv_input_and_names(cxr_dir: Path):
    pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    x = xrays(cxr_dir, n=2)
    classes = ["pleural effusion", "cardiomegaly", "pleural-thickening", "no such finding"]
    model = load_probed_model(config(source="torchxrayvision", weights="densenet121-res224-all", pretrained=False,
                                     output={"aliases": {"pleural effusion": ["Effusion"]}}),
                              classes, in_channels=1, device=CPU, image_size=64)
    assert model.activation == "sigmoid"  # untrained: no xrv calibration, the outputs are logits
    assert model.output_names[7] == "Effusion" and len(model.output_names) == 18
    assert model.output_index == {"pleural effusion": 7, "cardiomegaly": 10, "pleural-thickening": 9,
                                  "no such finding": None}
    assert model.not_predicted == ["no such finding"]
    assert (model.input_config.size, model.input_config.channels, model.input_config.range) == (224, 1, (-1024, 1024))
    fed: list[torch.Tensor] = []
    model.net.register_forward_pre_hook(lambda _m, args: fed.append(args[0].detach().clone()))
    model.net.register_forward_hook(lambda _m, _args, out: fed.append(out.detach().clone()))
    with torch.no_grad():
        probs = model.probabilities(x)
    logits = fed[-1]
    assert fed[-2].shape == (2, 1, 224, 224)
    assert fed[-2].min() >= -1024 and fed[-2].max() <= 1024 and fed[-2].min() < -500 and fed[-2].max() > 500
    assert probs.shape == (2, 4) and torch.isfinite(probs[:, :3]).all() and torch.isnan(probs[:, 3]).all()
    assert ((probs[:, :3] >= 0) & (probs[:, :3] <= 1)).all()  # untrained on [-1024, 1024]: often saturated
    torch.testing.assert_close(probs[:, :3], torch.sigmoid(logits[:, [7, 10, 9]]), atol=1e-6, rtol=0)
    assert model.embedding_layer() is model.net.features.norm5
    seen = model.describe()
    assert seen["input"] == "224 px, 1 channel, [0, 1] → [-1024, 1024]" and seen["activation"] == "sigmoid"
    assert seen["outputs"] == "pleural effusion → Effusion (#7); cardiomegaly → Cardiomegaly (#10); " \
                              "pleural-thickening → Pleural_Thickening (#9)"
    assert seen["not_predicted"] == ["no such finding"]
    with torch.no_grad():
        assert model.embed(x).shape == (2, 1024)


def test_torchxrayvision_calibrated_outputs_are_probabilities(monkeypatch: pytest.MonkeyPatch, cxr_dir: Path):
    """Pretrained xrv models calibrate their outputs (op_threshs): activation auto is none, a NaN threshold
    (a constant 0.5) leaves its output unnamed, and an explicit sigmoid turns the calibration off."""
    xrv = pytest.importorskip("torchxrayvision")
    info = xrv.models.model_urls["densenet121-res224-all"]

    def get_model(weights: str) -> nn.Module:  # no download here: the same model, untrained, calibrated
        torch.manual_seed(0)
        net = xrv.models.DenseNet(weights=None, num_classes=len(info["labels"]))
        net.targets = net.pathologies = list(info["labels"])
        net.op_threshs = torch.tensor(info["op_threshs"])
        net.op_threshs[7] = math.nan  # Effusion
        net.input_resolution = info["input_resolution"]
        return net.eval()

    monkeypatch.setattr(xrv.models, "get_model", get_model)
    x = xrays(cxr_dir, n=2)
    classes = ["effusion", "cardiomegaly"]
    calibrated = load_probed_model(config(source="torchxrayvision", weights="densenet121-res224-all"), classes, 1, CPU)
    assert calibrated.activation == "none" and calibrated.output_names[7] == ""
    assert calibrated.not_predicted == ["effusion"] and calibrated.output_index["cardiomegaly"] == 10
    logits = load_probed_model(config(source="torchxrayvision", weights="densenet121-res224-all",
                                      output={"activation": "sigmoid"}), classes, 1, CPU)
    assert logits.activation == "sigmoid" and logits.net.op_threshs is None and logits.output_index["effusion"] == 7
    with torch.no_grad():
        expected = xrv.models.op_norm(torch.sigmoid(logits.outputs(x)), calibrated.net.op_threshs)[:, 10]
        torch.testing.assert_close(calibrated.probabilities(x)[:, 1], expected)


def test_torchxrayvision_fills_only_the_input_fields_left_unset(cxr_dir: Path):
    pytest.importorskip("torchxrayvision")
    model = load_probed_model(config(source="torchxrayvision", weights="densenet121-res224-all", pretrained=False,
                                     input={"size": 96}, output={"activation": "none"}),
                              ["effusion"], in_channels=3, device=CPU)
    assert (model.input_config.size, model.input_config.channels, model.input_config.range) == (96, 1, (-1024, 1024))
    assert model.activation == "none" and model.output_index == {"effusion": 7}
    rgb = xrays(cxr_dir, n=2).repeat(1, 3, 1, 1)
    assert model.preprocess(rgb).shape == (2, 1, 96, 96)  # RGB → luminance


# ------------------------------------------------------------------------------------------ outputs


class Permuted(nn.Module):
    def __init__(self, model: nn.Module, order: list[int]) -> None:
        super().__init__()
        self.model, self.order = model, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.order]


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_permuted_outputs_declared_in_their_order_give_the_same_probabilities(exported: dict, cxr_dir: Path,
                                                                             tmp_path: Path, activation: str):
    x = xrays(cxr_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Permuted(exported["model"], [2, 0, 1]), torch.rand(2, 3, 48, 48)).save(str(tmp_path / "p.ts"))
    classes = ["device", "effusion", "opacity"]
    base = load_probed_model(config(source="python", file=exported["pt"], input=INPUT,
                                    output={"names": NAMES, "activation": activation}, **ENTRY), classes, 1, CPU)
    permuted_names = [NAMES[i] for i in (2, 0, 1)]
    right = load_probed_model(config(source="torchscript", file=tmp_path / "p.ts", input=INPUT,
                                     output={"names": permuted_names, "activation": activation}), classes, 1, CPU)
    wrong = load_probed_model(config(source="torchscript", file=tmp_path / "p.ts", input=INPUT,
                                     output={"names": NAMES, "activation": activation}), classes, 1, CPU)
    with torch.no_grad():
        expected = base.probabilities(x)
        torch.testing.assert_close(right.probabilities(x), expected, atol=1e-6, rtol=0)
        assert (wrong.probabilities(x) - expected).abs().max() > 1e-3


def test_activations_on_a_hand_made_model(helpers: str):
    values = [2.0, -1.0, 0.5]
    x = torch.rand(2, 1, 32, 32)
    classes = ["c", "a", "zzz"]
    logits = torch.tensor(values)
    expected = {"sigmoid": (torch.sigmoid(logits), logits),
                "softmax": (torch.softmax(logits, 0), torch.log_softmax(logits, 0)),
                "none": (logits, logits)}
    for activation, (probs, scores) in expected.items():
        model = load_probed_model(config(source="python", entry_point=f"{helpers}:fixed",
                                         arguments={"values": values},
                                         output={"names": ["a", "b", "c"], "activation": activation}),
                                  classes, 1, CPU)
        assert model.activation == activation
        with torch.no_grad():
            got_probs, got_scores = model.probabilities(x), model(x)
        want = torch.stack([probs[2], probs[0]]).expand(2, 2)
        torch.testing.assert_close(got_probs[:, :2], want)
        torch.testing.assert_close(got_scores[:, :2], torch.stack([scores[2], scores[0]]).expand(2, 2))
        assert torch.isnan(got_probs[:, 2]).all() and torch.isnan(got_scores[:, 2]).all()
    auto = load_probed_model(config(source="python", entry_point=f"{helpers}:fixed", arguments={"values": values},
                                    output={"names": ["a", "b", "c"]}), classes, 1, CPU)
    assert auto.activation == "sigmoid"


def test_match_outputs():
    names = ["Effusion", "", "Pleural_Thickening", "Lung Opacity", ""]
    assert match_outputs(names, ["pleural thickening", "lung-opacity", "EFFUSION", "covid"], {}) == {
        "pleural thickening": 2, "lung-opacity": 3, "EFFUSION": 0, "covid": None}
    assert match_outputs(names, ["fluid", "covid"], {"Fluid": ["effusion"], "covid": ["pneumonia"]}) == {
        "fluid": 0, "covid": None}
    assert match_outputs(names, ["x", ""], {"x": [""]}) == {"x": None, "": None}  # empty names never match
    with pytest.raises(MaskauditError, match=r"class 'opacity' matches 2 model outputs \(#0 'Opacity', #1 'opacity'"):
        match_outputs(["Opacity", "opacity"], ["opacity"], {})
    with pytest.raises(MaskauditError, match="matches 2 model outputs"):
        match_outputs(["Effusion", "Lung Opacity"], ["effusion"], {"effusion": ["lung_opacity"]})
    with pytest.raises(MaskauditError, match="output.aliases names 'edema', not among the dataset's classes"):
        match_outputs(names, ["effusion"], {"edema": ["Edema"]})


# ------------------------------------------------------------------------------------------ errors


def one_line_naming_the_model(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "'m'" in message, message
    return message


def test_load_errors_are_one_line_naming_the_model(helpers: str, exported: dict, tmp_path: Path):
    names = {"output": {"names": NAMES}}
    with pytest.raises(MaskauditError, match="cannot import 'no_such_package_xyz.models'") as excinfo:
        load_probed_model(config(source="python", entry_point="no_such_package_xyz.models:net", **names),
                          NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)
    with pytest.raises(MaskauditError, match="returned a dict, not a torch.nn.Module") as excinfo:
        load_probed_model(config(source="python", entry_point=f"{helpers}:not_a_module", **names), NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)
    with pytest.raises(MaskauditError, match="has no 'nothing_here'") as excinfo:
        load_probed_model(config(source="python", entry_point=f"{helpers}:nothing_here", **names), NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)

    state = torch.load(exported["pt"], weights_only=True)
    del state["features.0.weight"]
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(MaskauditError, match=r"partial.pt does not fit .*1 missing keys \(e.g. features.0.weight\)") \
            as excinfo:
        load_probed_model(config(source="python", file=tmp_path / "partial.pt", **ENTRY, **names), NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)
    four = {**ENTRY, "arguments": {**ENTRY["arguments"], "n_classes": 4}}
    with pytest.raises(MaskauditError, match=r"shape mismatches \(e.g. classifier.1.weight \(3, 64\) != \(4, 64\)"):
        load_probed_model(config(source="python", file=exported["pt"], **four, output={"names": NAMES + ["x"]}),
                          NAMES, 1, CPU)

    with pytest.raises(MaskauditError, match=r"returned outputs of shape \(2, 3\), but output.names lists 2") \
            as excinfo:
        load_probed_model(config(source="python", file=exported["pt"], **ENTRY, input=INPUT,
                                 output={"names": NAMES[:2]}), NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)
    with pytest.raises(MaskauditError, match="predicts none of the dataset's classes") as excinfo:
        load_probed_model(config(source="torchscript", file=exported["ts"], **names), ["covid"], 1, CPU)
    one_line_naming_the_model(excinfo)
    (tmp_path / "junk.ts").write_text("not a model")
    with pytest.raises(MaskauditError, match="not a readable TorchScript file") as excinfo:
        load_probed_model(config(source="torchscript", file=tmp_path / "junk.ts", **names), NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)


def test_missing_onnx_file_and_unknown_xrv_weights(tmp_path: Path):
    missing = {"name": "m", "source": "onnx", "file": str(tmp_path / "absent.onnx"), "output": {"names": NAMES}}
    with pytest.raises(ValidationError, match="model 'm': file not found"):
        ProbedModelConfig(**missing)
    with pytest.raises(MaskauditError, match="model 'm': file not found") as excinfo:
        config_from_dict({"data": {"source": "synthetic"}, "models": [missing]})
    one_line_naming_the_model(excinfo)
    unchecked = ProbedModelConfig.model_construct(name="m", source="onnx", file=tmp_path / "absent.onnx",
                                                  output=ProbeOutput(names=NAMES))
    with pytest.raises(MaskauditError, match="file not found") as excinfo:
        load_probed_model(unchecked, NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)
    pytest.importorskip("torchxrayvision")
    with pytest.raises(MaskauditError, match="unknown torchxrayvision weights 'densenet121-res224-nope'; known: "
                                             ".*densenet121-res224-all.*resnet50-res512-all") as excinfo:
        load_probed_model(config(source="torchxrayvision", weights="densenet121-res224-nope", pretrained=False),
                          NAMES, 1, CPU)
    one_line_naming_the_model(excinfo)


def test_every_probed_model_source_of_the_config_has_a_loader():
    from typing import get_args

    from maskaudit.config import ProbedModelConfig
    from maskaudit.probe import PROBE_SOURCES

    assert set(PROBE_SOURCES) == set(get_args(ProbedModelConfig.model_fields["source"].annotation))
