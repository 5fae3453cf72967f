"""SHAP attributions (SPEC §6.2), the share of positive attribution inside the ROI (SPEC §8), panels."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torchvision.models import densenet121

from maskaudit.analyses.explain import (
    METHODS,
    _attributions,
    attribution_in_roi,
    attribution_panels,
    explain,
    image_masker,
)
from maskaudit.config import ModelConfig
from maskaudit.errors import MaskauditError
from maskaudit.models import Classifier, build_model

S = 32
SQUARE = (slice(8, 16), slice(8, 16))  # aligned with the Image masker's halving partition of 32 px


class SquareMean(nn.Module):
    """Logit 1 is the mean of the pixels in ``SQUARE`` (all channels), logit 0 its negative; no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :, SQUARE[0], SQUARE[1]].mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def small_cnn(in_channels: int = 1) -> Classifier:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="small_cnn", weights="none", freeze="none"), 2, in_channels).eval()


def square_roi(n: int, rows: slice, cols: slice) -> np.ndarray:
    roi = np.zeros((n, S, S), dtype=bool)
    roi[:, rows, cols] = True
    return roi


def images(n: int, channels: int = 1, size: int = S, low: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (1 - low) * torch.rand(n, channels, size, size, generator=g)


# ------------------------------------------------------------------------------------------ partition


@pytest.mark.parametrize("channels", [1, 3])
def test_partition_puts_the_attribution_where_the_logit_looks(channels: int) -> None:
    x = 0.5 * images(2, channels)
    x[:, :, SQUARE[0], SQUARE[1]] += 0.5  # brighter than the rest: above zero fill and above the blur
    values = explain(SquareMean(), x, class_index=1, max_evals=300)  # auto: zero fill (1 ch) or blur (3 ch)
    assert values.shape == (2, S, S) and values.dtype == np.float32

    inside = attribution_in_roi(values, square_roi(2, *SQUARE))
    area = 64 / S**2
    assert (inside["positive_in_roi"] > 0.95).all()
    assert np.allclose(inside["roi_area"], area)
    assert (inside["ratio"] > 0.9 / area).all()  # ~16: all the positive mass in 1/16 of the image

    elsewhere = attribution_in_roi(values, square_roi(2, slice(20, 28), slice(20, 28)))
    assert (elsewhere["positive_in_roi"] < 0.05).all() and (elsewhere["ratio"] < 1).all()
    whole = attribution_in_roi(values, np.ones((2, S, S), dtype=bool))
    assert np.allclose(whole["ratio"], 1.0)


def test_partition_zero_fill_sums_to_the_logit_minus_the_blank_image_logit() -> None:
    model, x = SquareMean(), images(2, low=0.5)
    values = explain(model, x, class_index=1, masker="zero", max_evals=300)
    with torch.no_grad():
        expected = (model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]).numpy()
    np.testing.assert_allclose(values.sum(axis=(1, 2)), expected, rtol=1e-4)


def test_partition_is_deterministic_and_independent_of_the_other_images() -> None:
    model, x = small_cnn(), images(3)
    first = explain(model, x, 1, max_evals=100, batch_size=16, seed=3)
    again = explain(model, x, 1, max_evals=100, batch_size=16, seed=3)
    alone = explain(model, x[2:], 1, max_evals=100, batch_size=16, seed=3)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[2:], alone)


def test_a_reused_explainer_gives_what_a_fresh_one_gives() -> None:
    """The Partition explainer is kept between calls (its masks take seconds at 512 px), never its model: model B
    after model A (another class, another fully masked value) gives exactly B's result on a fresh explainer."""
    from maskaudit.analyses import explain as module

    for channels, masker in ((1, "zero"), (3, "blur"), (1, "0.5")):
        x = images(2, channels)
        a, b = small_cnn(channels), SquareMean()
        explain(a, x, 0, masker=masker, max_evals=80, batch_size=16)
        reused = explain(b, x, 1, masker=masker, max_evals=80, batch_size=16)
        module._IDLE_EXPLAINERS.clear()
        fresh = explain(b, x, 1, masker=masker, max_evals=80, batch_size=16)
        np.testing.assert_array_equal(reused, fresh)


@pytest.mark.parametrize("masker", ["zero", "0.5", "blur(4,6)"])
def test_the_fast_masker_masks_as_shap_s_image_masker(masker: str) -> None:
    """maskaudit's subclass of ``shap.maskers.Image`` returns shap's own masked samples, bit for bit."""
    import shap

    shape = (S, S, 3)
    ours, _ = image_masker(masker, shape)
    theirs = shap.maskers.Image(ours.mask_value, shape)
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    for _ in range(3):
        mask = rng.random(x.size) < 0.5
        np.testing.assert_array_equal(ours(mask, x)[0], theirs(mask, x)[0])


@pytest.mark.parametrize(("channels", "same_as"), [(1, "zero"), (3, "blur")])
def test_auto_masker_is_zero_for_gray_and_blur_for_rgb(channels: int, same_as: str) -> None:
    model, x = small_cnn(channels), images(1, channels)
    auto = explain(model, x, 0, masker="auto", max_evals=60)
    np.testing.assert_array_equal(auto, explain(model, x, 0, masker=same_as, max_evals=60))
    other = "blur" if same_as == "zero" else "zero"
    assert not np.array_equal(auto, explain(model, x, 0, masker=other, max_evals=60))


def test_image_masker_names() -> None:
    zero, scale = image_masker("auto", (S, S, 1))
    assert isinstance(zero.mask_value, np.ndarray) and not zero.mask_value.any() and scale == 1.0
    assert image_masker("auto", (S, S, 3))[0].mask_value == f"blur({S},{S})"
    assert image_masker("blur", (S, S, 1))[0].mask_value == f"blur({S},{S})"
    assert image_masker("blur(4, 6)", (S, S, 3))[0].blur_kernel == (4, 6)
    assert image_masker("inpaint_telea", (S, S, 3))[1] == 255.0
    assert np.all(image_masker("0.5", (S, S, 1))[0].mask_value == 0.5)
    for bad in ("mean", "blur(0,4)", "nan", "blu"):
        with pytest.raises(MaskauditError, match="unknown masker"):
            image_masker(bad, (S, S, 1))


@pytest.mark.parametrize("masker", ["inpaint_telea", "blur(8,8)", "0.5"])
def test_other_maskers_run(masker: str) -> None:
    values = explain(small_cnn(3), images(1, 3), 1, masker=masker, max_evals=40)
    assert values.shape == (1, S, S) and np.isfinite(values).all()


# ------------------------------------------------------------------------------------------ deep, gradient


def test_deep_explainer_is_additive_on_our_densenet121() -> None:
    """DeepLIFT attributions of our DenseNet-121 sum to logit(image) - mean logit(background).

    This needs maskaudit's non-in-place ReLU modules and the scatter-add max-pool rule (DenseNet's stem
    pools 3x3 with stride 2; shap's own rule drops contributions of overlapping windows).
    """
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="densenet121", weights="none", freeze="none"), 2, 1).eval()
    x, background = images(1, size=64, seed=1), images(2, size=64, seed=2)
    values = _attributions(model, x, 1, "deep", background=background)
    assert values.shape == (1, 1, 64, 64)
    with torch.no_grad():
        expected = (model(x)[:, 1] - model(background)[:, 1].mean()).item()
    assert abs(expected) > 1e-3  # a real change to explain
    assert values.sum() == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_deep_explainer_max_pool_rule_handles_overlapping_windows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).eval()  # fmt: skip
    x, background = images(3, size=16, seed=1), images(3, size=16, seed=2)
    values = _attributions(model, x, 0, "deep", background=background)
    with torch.no_grad():
        expected = (model(x)[:, 0] - model(background)[:, 0].mean()).numpy()
    np.testing.assert_allclose(values.sum(axis=(1, 2, 3)), expected, rtol=1e-3, atol=1e-6)
    from shap.explainers._deep import deep_pytorch

    assert deep_pytorch.op_handler["MaxPool2d"].__module__ == deep_pytorch.__name__  # shap's rule is back


def test_deep_explainer_on_stock_torchvision_densenet_says_why_it_fails() -> None:
    torch.manual_seed(0)
    stock = densenet121(weights=None, num_classes=2).eval()  # forward calls F.relu(inplace=True)
    with pytest.raises(MaskauditError, match=r"DeepExplainer failed on DenseNet.*in place"):
        explain(stock, images(1, 3), 1, "deep", background=images(1, 3, seed=1))
    assert all(not m._forward_hooks and not m._backward_hooks for m in stock.modules())


def test_gradient_explainer_shape_and_determinism() -> None:
    model, x, background = small_cnn(), images(2), images(4, seed=1)
    values = explain(model, x, 1, "gradient", background=background, max_evals=20, batch_size=10, seed=5)
    assert values.shape == (2, S, S) and values.dtype == np.float32 and np.isfinite(values).all()
    again = explain(model, x, 1, "gradient", background=background, max_evals=20, batch_size=10, seed=5)
    np.testing.assert_array_equal(values, again)


@pytest.mark.parametrize("method", METHODS)
def test_model_grad_mode_and_random_state_are_left_as_found(method: str) -> None:
    model = small_cnn()
    model.train()
    model.features[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    np.random.seed(123)
    rng = np.random.get_state()[1].copy()
    with torch.no_grad():
        explain(model, images(1), 1, method, background=images(2, seed=1), max_evals=20)
        assert not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == modes
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    np.testing.assert_array_equal(np.random.get_state()[1], rng)


def test_errors_name_what_was_expected() -> None:
    model, x = small_cnn(), images(1)
    with pytest.raises(ValueError, match=re.escape(", ".join(METHODS))):  # a caller's mistake: not a user error
        explain(model, x, 1, "lime")
    for method in ("deep", "gradient"):
        with pytest.raises(ValueError, match="needs a background"):
            explain(model, x, 1, method)
    with pytest.raises(ValueError, match="shaped like the images"):
        explain(model, x, 1, "deep", background=images(1, size=16))
    with pytest.raises(ValueError, match="model has 2 logits"):
        explain(model, x, 2)
    with pytest.raises(TypeError, match="must be an integer"):
        explain(model, x, "1")
    with pytest.raises(ValueError, match=r"\(n, C, S, S\)"):
        explain(model, x[0], 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        explain(model, x.numpy(), 1)
    with pytest.raises(MaskauditError, match="unknown masker"):  # analyses.explain.masker: the user's
        explain(model, x, 1, masker="mean")
    assert explain(model, x[:0], 1).shape == (0, S, S)


# ------------------------------------------------------------------------------------------ ROI share


def test_attribution_in_roi_numbers_and_edge_cases() -> None:
    a = np.zeros((4, 4, 4))
    a[0, 0, 0], a[0, 3, 3], a[0, 1, 1] = 3.0, 1.0, -5.0  # negative values do not count
    a[1] = -1.0  # no positive mass
    a[2, 0, 0] = 1.0  # empty ROI
    a[3, 2, 2] = 1.0  # positive mass outside the ROI only
    roi = np.zeros((4, 4, 4), dtype=bool)
    roi[[0, 1, 3], :2, :2] = True
    table = attribution_in_roi(a, roi)
    assert list(table.columns) == ["positive_in_roi", "roi_area", "ratio"]
    assert table.loc[0].tolist() == pytest.approx([0.75, 0.25, 3.0])
    assert np.isnan(table.loc[1, "positive_in_roi"]) and np.isnan(table.loc[1, "ratio"])
    assert table.loc[1, "roi_area"] == 0.25
    assert table.loc[2, "positive_in_roi"] == 0.0 and table.loc[2, "roi_area"] == 0.0
    assert np.isnan(table.loc[2, "ratio"])
    assert table.loc[3].tolist() == pytest.approx([0.0, 0.25, 0.0])
    pd.testing.assert_frame_equal(attribution_in_roi(a, roi.astype(np.uint8)), table)


def test_attribution_in_roi_refuses_bad_input() -> None:
    a, roi = np.zeros((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="both be"):
        attribution_in_roi(a, roi[:1])
    with pytest.raises(ValueError, match="boolean"):
        attribution_in_roi(a, roi + 0.5)
    a[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"images \[1\]"):
        attribution_in_roi(a, roi)


# ------------------------------------------------------------------------------------------ panels


@pytest.mark.parametrize(("channels", "with_rois"), [(1, True), (3, True), (3, False), (1, False)])
def test_attribution_panels(channels: int, with_rois: bool, tmp_path) -> None:
    n = 2
    x = images(n, channels).numpy()
    rois = square_roi(n, *SQUARE) if with_rois else None
    values = np.random.default_rng(0).normal(size=(n, S, S)).astype(np.float32)
    values[1] = 0.0  # an all-zero map still draws
    fig = attribution_panels(x, rois, values, ["image a", "image b"], "small_cnn · class 1 · full")
    columns = 3 if with_rois else 2
    assert len(fig.axes) == n * columns + n  # panels and one colour bar per row
    assert fig.axes[0].get_ylabel() == "image a"
    fig.savefig(tmp_path / "panels.png")
    plt.close(fig)
    with pytest.raises(ValueError, match="captions"):
        attribution_panels(x, rois, values, ["only one"], "t")
    with pytest.raises(ValueError, match="attributions must be"):
        attribution_panels(x, rois, values[:, :4], ["a", "b"], "t")
    plt.close("all")
