"""The model registry, the study's DenseNet-121 head and freeze policy, weights loading, export."""

from __future__ import annotations

import importlib.util
import re
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import densenet121, resnet18

from maskaudit.config import ModelConfig
from maskaudit.errors import MaskauditError
from maskaudit.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODELS,
    Classifier,
    build_model,
    load_checkpoint,
    load_weights_file,
    register,
    trainable_parameter_names,
)

S = 64
ARCHS = ("densenet121", "resnet18", "small_cnn")
FEATURE_DIM = {"densenet121": 1024, "resnet18": 512, "small_cnn": 64}


def make(arch: str = "densenet121", n_classes: int = 3, in_channels: int = 1, **kwargs: str) -> Classifier:
    return build_model(ModelConfig(arch=arch, weights="none", **kwargs), n_classes, in_channels)


@pytest.fixture(scope="module")
def densenet() -> Classifier:
    """A study-frozen DenseNet-121 in eval mode; tests that train build their own."""
    torch.manual_seed(0)
    return make().eval()


def images(n: int = 2, channels: int = 1, size: int = S, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def old_style(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key format of torchvision's downloadable DenseNet files: ``denselayer1.norm.1.weight``."""
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$"
    )
    renamed = {pattern.sub(r"\1.\2.\3", key): value for key, value in state.items()}
    assert any(".norm.1." in key for key in renamed)
    return renamed


class NotAWeight:
    """An arbitrary object: ``torch.load(weights_only=True)`` must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = "anything"


# --------------------------------------------------------------------------------------------- registry


def test_unknown_arch_lists_the_known_ones() -> None:
    with pytest.raises(MaskauditError, match="unknown model.arch 'vgg16'") as info:
        build_model(ModelConfig(arch="vgg16", weights="none"), 2, 1)
    for arch in ARCHS:
        assert arch in str(info.value)


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("densenet121")(lambda config, n_classes, in_channels: make())
    name = "test_only_tiny"
    try:
        register(name)(lambda config, n_classes, in_channels: make("small_cnn", n_classes, in_channels))
        assert name in MODELS
        model = build_model(ModelConfig(arch=name, weights="none"), 2, 3)
        assert model(images(channels=3)).shape == (2, 2)
        with pytest.raises(ValueError, match=name):
            register(name)(MODELS["small_cnn"])
    finally:
        MODELS.pop(name, None)


def test_bad_sizes_are_programming_errors() -> None:
    """No data source gives these sizes: a caller's mistake (ValueError, with its traceback), not a user's."""
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make(in_channels=2)
    with pytest.raises(ValueError, match="at least one class"):
        make("small_cnn", n_classes=0)
    with pytest.raises(ValueError, match="built for 1-channel"):
        make("small_cnn")(images(channels=3))


# --------------------------------------------------------------------------------------------- densenet


def test_densenet_head_is_the_studys(densenet: Classifier) -> None:
    assert (densenet.arch, densenet.in_channels, densenet.n_classes, densenet.feature_dim) == (
        "densenet121",
        1,
        3,
        1024,
    )
    head = densenet.classifier
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert isinstance(head[0], nn.Flatten) and isinstance(head[1], nn.Linear)
    assert (head[1].in_features, head[1].out_features) == (1024, 3)
    x = images()
    with torch.no_grad():
        logits, features = densenet(x), densenet.embed(x)
        assert logits.shape == (2, 3) and features.shape == (2, 1024)
        assert torch.allclose(head[1](features), logits, atol=1e-5)
        assert (features >= 0).all()  # after ReLU and average pooling


def test_study_freeze_leaves_denselayer16_and_head(densenet: Classifier) -> None:
    names = [name for name, _ in densenet.named_parameters()]
    expected = [
        name
        for name in names
        if name.startswith("features.denseblock4.denselayer16.") or name.startswith("classifier.")
    ]
    assert trainable_parameter_names(densenet) == expected
    assert expected == [
        "features.denseblock4.denselayer16.norm1.weight",
        "features.denseblock4.denselayer16.norm1.bias",
        "features.denseblock4.denselayer16.conv1.weight",
        "features.denseblock4.denselayer16.norm2.weight",
        "features.denseblock4.denselayer16.norm2.bias",
        "features.denseblock4.denselayer16.conv2.weight",
        "classifier.1.weight",
        "classifier.1.bias",
    ]
    assert not densenet.features.norm5.weight.requires_grad  # frozen in the study too
    everything = make(freeze="none")
    assert trainable_parameter_names(everything) == names


def test_frozen_batchnorm_still_updates_running_stats_in_train_mode() -> None:
    model = make().train()
    norm0 = model.features.norm0
    assert not norm0.weight.requires_grad
    before = norm0.running_mean.clone(), norm0.num_batches_tracked.clone()
    model(images(n=2))
    assert not torch.equal(norm0.running_mean, before[0])
    assert norm0.num_batches_tracked.item() == before[1].item() + 1


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_study_freeze_records_no_autograd_graph_through_the_frozen_trunk(arch: str) -> None:
    """With ``freeze: study`` the training forward saves for backward only what the trainable layers need: autograd
    records no operation before the first trainable parameter (its inputs need no gradient), so the frozen trunk's
    activations are freed as the forward goes, not kept for a backward that never reaches them."""

    def saved_bytes(model: Classifier) -> int:
        """Bytes of activations autograd keeps for backward (the weights it keeps are not activations)."""
        total, weights = 0, {p.data_ptr() for p in model.parameters()}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if tensor.data_ptr() not in weights:
                total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.train()(images(n=2)).sum().backward()
        return total

    torch.manual_seed(0)
    frozen, whole = saved_bytes(make(arch, freeze="study")), saved_bytes(make(arch, freeze="none"))
    assert 0 < frozen < whole / 10


def test_gray_input_equals_the_rgb_repeat(densenet: Classifier) -> None:
    rgb = make(in_channels=3).eval()
    rgb.load_state_dict(densenet.state_dict())  # the adapter has no state: the same checkpoint fits both
    x = images()
    with torch.no_grad():
        assert torch.equal(densenet(x), rgb(x.repeat(1, 3, 1, 1)))
        assert torch.equal(densenet.embed(x), rgb.embed(x.repeat(1, 3, 1, 1)))


def test_imagenet_normalisation_is_optional_and_off_by_default(densenet: Classifier) -> None:
    x = images()
    assert torch.equal(densenet.adapt(x), x.repeat(1, 3, 1, 1))
    normed = make(normalize="imagenet")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(normed.adapt(x), (x.repeat(1, 3, 1, 1) - mean) / std)
    assert set(normed.state_dict()) == set(densenet.state_dict())  # checkpoints do not depend on it


@pytest.mark.parametrize("arch", ARCHS)
def test_no_in_place_op_breaks_full_backward_hooks(arch: str) -> None:
    """What SHAP's DeepExplainer and captum do: a full backward hook on every leaf module."""
    model = make(arch).train()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    seen: dict[str, int] = {"relu": 0, "all": 0}

    def hook(module: nn.Module, grad_in: object, grad_out: object) -> None:
        seen["all"] += 1
        seen["relu"] += isinstance(module, nn.ReLU)

    handles = [m.register_full_backward_hook(hook) for m in model.modules() if not list(m.children())]
    x = images().requires_grad_(True)
    model(x)[:, 0].sum().backward()
    for handle in handles:
        handle.remove()
    assert seen["relu"] >= len(relus) and seen["all"] > seen["relu"]
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_torchvisions_own_densenet_fails_that_hook_test() -> None:
    """Why the forward is written out: torchvision's functional in-place ReLU breaks the hooks."""
    net = densenet121(weights=None)
    for module in net.modules():
        if not list(module.children()):
            module.register_full_backward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="inplace"):
        net(torch.rand(1, 3, S, S, requires_grad=True)).sum().backward()


# --------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("key_format", ["current", "old"])
def test_local_densenet_state_dict_round_trip(tmp_path: Path, key_format: str) -> None:
    torch.manual_seed(1)
    reference = densenet121(weights=None)
    state = reference.state_dict()
    path = tmp_path / "densenet121-local.pth"
    torch.save(old_style(state) if key_format == "old" else state, path)
    model = build_model(ModelConfig(weights=str(path)), n_classes=5, in_channels=1)
    loaded = model.features.state_dict()
    assert set(loaded) == set(reference.features.state_dict())
    for key, value in reference.features.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert model.classifier[1].out_features == 5  # the head is always new


def test_imagenet_weights_use_torchvisions_url_and_remap_old_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    reference = densenet121(weights=None)
    urls: list[str] = []

    def fake_download(url: str, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        urls.append(url)
        return old_style(reference.state_dict())

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fake_download)
    model = build_model(ModelConfig(weights="imagenet"), n_classes=2, in_channels=1)
    assert urls and urls[0].endswith("densenet121-a639ec97.pth")
    assert torch.equal(model.features.conv0.weight, reference.features.conv0.weight)
    assert torch.equal(
        model.features.denseblock1.denselayer1.norm1.running_var,
        reference.features.denseblock1.denselayer1.norm1.running_var,
    )


def test_imagenet_weights_offline_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    for arch in ("densenet121", "resnet18"):
        with pytest.raises(MaskauditError, match="model.weights: none") as info:
            build_model(ModelConfig(arch=arch, weights="imagenet"), 2, 1)
        assert "name resolution" in str(info.value)


def test_local_resnet18_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", weights=str(path)), 2, 3)
    assert torch.equal(model.features.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.features.layer4[1].bn2.running_mean, reference.layer4[1].bn2.running_mean)


def test_a_state_dict_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(MaskauditError, match="missing keys"):
        build_model(ModelConfig(weights=str(path)), 2, 1)


def test_weights_only_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": NotAWeight()}, path)
    with pytest.raises(MaskauditError, match="weights_only=True"):
        load_weights_file(path)
    with pytest.raises(MaskauditError, match="weights_only=True"):
        build_model(ModelConfig(weights=str(path)), 2, 1)
    with pytest.raises(MaskauditError, match="weights_only=True"):
        load_checkpoint(make("small_cnn"), path)


def test_missing_or_unreadable_weights(tmp_path: Path) -> None:
    with pytest.raises(MaskauditError, match="'imagenet', 'none'"):
        build_model(ModelConfig(weights="imagnet"), 2, 1)
    with pytest.raises(MaskauditError, match="not found"):
        load_weights_file(tmp_path / "nothing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(MaskauditError, match="junk.pth"):
        load_weights_file(junk)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(MaskauditError, match="expected a state dict"):
        load_weights_file(tensor)


def test_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    model = make("small_cnn", n_classes=3).eval()
    path = tmp_path / "model.pt"
    with pytest.raises(MaskauditError, match="run `maskaudit train` for this job first"):
        load_checkpoint(model, path)
    torch.save(model.state_dict(), path)
    fresh = make("small_cnn", n_classes=3).eval()
    load_checkpoint(fresh, path)
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(MaskauditError, match="does not fit"):
        load_checkpoint(make("small_cnn", n_classes=4), path)


# --------------------------------------------------------------------------------------------- others


def test_resnet18_head_and_freeze() -> None:
    model = make("resnet18", n_classes=4, in_channels=1)
    linear = model.classifier[1]
    assert (model.feature_dim, linear.in_features, linear.out_features) == (512, 512, 4)
    x = images()
    assert model(x).shape == (2, 4) and model.embed(x).shape == (2, 512)
    names = trainable_parameter_names(model)
    assert names and all(n.startswith("features.layer4.1.") or n.startswith("classifier.") for n in names)
    assert {n for n, _ in model.named_parameters() if n.startswith("features.layer4.1.")} <= set(names)
    assert "features.layer4.0.conv1.weight" not in names
    assert len(trainable_parameter_names(make("resnet18", freeze="none"))) == len(list(model.parameters()))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 48, 96])
def test_small_cnn_any_size_and_channels(channels: int, size: int) -> None:
    model = make("small_cnn", n_classes=2, in_channels=channels)
    x = images(n=3, channels=channels, size=size)
    assert model(x).shape == (3, 2) and model.embed(x).shape == (3, 64)
    assert model.features[0].in_channels == channels  # native, no repeat
    # freeze "study" freezes nothing in a network trained from scratch
    assert trainable_parameter_names(model) == [n for n, _ in model.named_parameters()]


def test_small_cnn_has_no_pretrained_weights() -> None:
    with pytest.raises(MaskauditError, match="weights: none"):
        build_model(ModelConfig(arch="small_cnn", weights="imagenet"), 2, 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ARCHS)
def test_models_trace_and_script(arch: str) -> None:
    model = make(arch, n_classes=2, in_channels=1).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(images(seed=1)), model(images(seed=1)), atol=1e-5)
        assert torch.allclose(traced(x), expected, atol=1e-5)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), expected, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed")
@pytest.mark.parametrize("arch", ARCHS)
def test_models_export_to_onnx(arch: str, tmp_path: Path) -> None:
    model = make(arch, n_classes=2, in_channels=1).eval()
    torch.onnx.export(model, (images(),), str(tmp_path / f"{arch}.onnx"))
    assert (tmp_path / f"{arch}.onnx").stat().st_size > 0


def test_small_cnn_exports_with_torch_export() -> None:
    model = make("small_cnn", n_classes=2, in_channels=3).eval()
    x = images(channels=3)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)
