"""Masking strategies, spreads and bounding boxes (SPEC §2, §6.4, §8), checked on real masks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from maskaudit import config
from maskaudit.masking import (
    FAR,
    STRATEGIES,
    SWEEP_SPREADS,
    apply_strategy,
    bounding_box,
    roi_at_spread,
    scale_spread,
    signed_taxicab_distance,
)

CROSS = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
SPREADS = (0, 1, 3, 10, 40, 150, -1, -3, -10, -25)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _read_mask(path: Path) -> np.ndarray:
    return (np.asarray(Image.open(path).convert("L")) > 0).astype(np.uint8)


def _opencv_spread(mask: np.ndarray, spread: int) -> np.ndarray:
    """The study's way: |spread| iterations of the 3x3 MORPH_ELLIPSE, dilate (> 0) or erode (< 0)."""
    if spread == 0:
        return mask.astype(bool)
    op = cv2.dilate if spread > 0 else cv2.erode
    return op(mask.astype(np.uint8), CROSS, iterations=abs(spread)).astype(bool)


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


@pytest.fixture(scope="module")
def real_masks(cxr_dir: Path, fundus_dir: Path) -> dict[str, np.ndarray]:
    """Lung and disc masks, native and resized to 256 px, plus crops whose ROI touches the border."""
    lungs = sorted((cxr_dir / "masks").glob("*.png"))
    discs = sorted((fundus_dir / "masks" / "disc").glob("*.png"))
    assert len(lungs) >= 6 and len(discs) >= 3, "real masks missing from ../shared/data"
    masks: dict[str, np.ndarray] = {}
    for path in lungs[:: max(1, len(lungs) // 5)][:5]:
        native = _read_mask(path)
        masks[f"lung-native:{path.name}"] = native
        masks[f"lung-256:{path.name}"] = cv2.resize(native, (256, 256), interpolation=cv2.INTER_NEAREST)
        h, w = native.shape
        masks[f"lung-crop:{path.name}"] = native[h // 3 :, : w // 3]  # cuts through the right lung
    for path in discs[:3]:
        native = _read_mask(path)
        masks[f"disc-native:{path.name}"] = native
        ys, xs = np.nonzero(native)
        masks[f"disc-crop:{path.name}"] = native[ys.min() + 5 : ys.max() - 5, xs.min() + 5 :]
    return masks


# ------------------------------------------------------------------------------ distance map vs OpenCV


def test_real_masks_cover_the_border_cases(real_masks: dict[str, np.ndarray]) -> None:
    touching = [name for name, mask in real_masks.items() if _touches_border(mask)]
    assert len(touching) >= 5
    assert any(name.startswith("disc-crop") for name in touching)
    assert all(mask.any() and not mask.all() for mask in real_masks.values())


@pytest.mark.parametrize("spread", SPREADS)
def test_distance_threshold_equals_opencv_iterations(real_masks: dict[str, np.ndarray], spread: int) -> None:
    for name, mask in real_masks.items():
        dist = signed_taxicab_distance(mask)
        expected = _opencv_spread(mask, spread)
        got = dist <= spread
        differ = int(np.sum(got != expected))
        assert differ == 0, f"{name} at spread {spread}: {differ} pixels differ from OpenCV"


def test_roi_at_spread_on_a_batch_of_real_masks(real_masks: dict[str, np.ndarray]) -> None:
    resized = [m for name, m in real_masks.items() if name.startswith("lung-256")]
    square = [cv2.resize(m, (256, 256), interpolation=cv2.INTER_NEAREST) for m in real_masks.values()]
    batch = resized + square[-4:]
    dist = torch.from_numpy(np.stack([signed_taxicab_distance(m) for m in batch]))[:, None]
    assert dist.dtype == torch.int16 and dist.shape == (len(batch), 1, 256, 256)
    for spread in SPREADS:
        roi = roi_at_spread(dist, spread)
        assert roi.dtype == torch.bool and roi.shape == dist.shape
        expected = np.stack([_opencv_spread(m, spread) for m in batch])[:, None]
        assert np.array_equal(roi.numpy(), expected), f"spread {spread}"
        # (B, S, S) works the same way
        assert torch.equal(roi_at_spread(dist[:, 0], spread), roi[:, 0])


def test_roi_at_spread_extremes_keep_empty_and_full_masks() -> None:
    empty = torch.from_numpy(signed_taxicab_distance(np.zeros((8, 8), bool)))
    full = torch.from_numpy(signed_taxicab_distance(np.ones((8, 8), bool)))
    for spread in (0, 5, 500, int(FAR), 10**6):
        assert not roi_at_spread(empty, spread).any()
        assert roi_at_spread(full, -spread).all()
    dot = np.zeros((9, 9), bool)
    dot[4, 4] = True
    dist = torch.from_numpy(signed_taxicab_distance(dot))
    assert roi_at_spread(dist, 10**6).all()
    assert not roi_at_spread(dist, -1).any()
    with pytest.raises(TypeError):
        roi_at_spread(dist.float(), 1)


@CUDA
def test_roi_at_spread_on_cuda(real_masks: dict[str, np.ndarray]) -> None:
    mask = next(m for name, m in real_masks.items() if name.startswith("lung-256"))
    dist = torch.from_numpy(signed_taxicab_distance(mask))[None, None]
    for spread in (-10, 0, 40):
        roi = roi_at_spread(dist.cuda(), spread)
        assert roi.is_cuda
        assert torch.equal(roi.cpu(), roi_at_spread(dist, spread))


# ------------------------------------------------------------------------------------------ bbox


def _batch(*masks: list[list[int]]) -> torch.Tensor:
    return torch.tensor(masks, dtype=torch.bool)[:, None]


def test_bbox_includes_last_row_and_column() -> None:
    roi = _batch([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    box = bounding_box(roi)
    expected = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    expected[..., 1:4, 1:4] = True  # rows 1..3 and columns 1..3, both ends included
    assert box.dtype == torch.bool and box.shape == roi.shape
    assert torch.equal(box, expected)


def test_bbox_empty_single_pixel_and_corners() -> None:
    empty = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    assert not bounding_box(empty).any()
    single = empty.clone()
    single[0, 0, 3, 5] = True  # bottom-right corner pixel
    assert torch.equal(bounding_box(single), single)
    corners = empty.clone()
    corners[0, 0, 0, 0] = corners[0, 0, 3, 5] = True
    assert bounding_box(corners).all()


def test_bbox_batch_of_different_rois_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((7, 1, 12, 10), bool)
    masks[0, 0, 2:5, 3:9] = True
    masks[1, 0, 11, 0] = True
    # image 2 empty
    masks[3] = rng.random((1, 12, 10)) > 0.97
    masks[4, 0, 0, :] = True
    masks[5, 0, :, 9] = True
    masks[6, 0, 5, 2] = masks[6, 0, 8, 7] = True
    box = bounding_box(torch.from_numpy(masks))
    for b, mask in enumerate(masks[:, 0]):
        expected = np.zeros_like(mask)
        if mask.any():
            ys, xs = np.nonzero(mask)
            expected[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        assert np.array_equal(box[b, 0].numpy(), expected), f"image {b}"
        assert box[b, 0].numpy()[mask].all()


@CUDA
def test_bbox_on_cuda() -> None:
    roi = torch.rand(5, 1, 64, 64) > 0.999
    assert torch.equal(bounding_box(roi.cuda()).cpu(), bounding_box(roi))


# ------------------------------------------------------------------------------------ strategies

X = torch.tensor(
    [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 0.15, 0.25], [0.35, 0.45, 0.55, 0.65]]
)
ROI = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
BOX = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    return X[None, None].clone(), ROI[None, None].clone()


@pytest.mark.parametrize(
    ("strategy", "keep"),
    [("no_roi", ~ROI), ("no_roi_bbox", ~BOX), ("only_roi", ROI), ("only_roi_bbox", BOX)],
)
def test_strategy_zero_fill_on_a_tiny_image(strategy: str, keep: torch.Tensor) -> None:
    images, roi = _tiny()
    out = apply_strategy(images, roi, strategy)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out[0, 0], torch.where(keep, X, torch.zeros(())))
    assert torch.equal(images[0, 0], X), "the input must not be modified"


def test_study_formulas() -> None:
    images, roi = _tiny()
    r, box = roi.float(), BOX[None, None].float()
    assert torch.equal(apply_strategy(images, roi, "full"), images)
    assert torch.allclose(apply_strategy(images, roi, "no_roi"), images * (1 - r))
    assert torch.allclose(apply_strategy(images, roi, "only_roi"), images * r)
    assert torch.allclose(apply_strategy(images, roi, "no_roi_bbox"), images * (1 - box))
    assert torch.allclose(apply_strategy(images, roi, "only_roi_bbox"), images * box)


def test_roi_shape_is_the_silhouette_in_every_channel() -> None:
    images = torch.rand(2, 3, 4, 4)
    roi = torch.stack([ROI, BOX])[:, None]
    out = apply_strategy(images, roi, "roi_shape", fill="noise", noise_seeds=torch.tensor([1, 2]))
    assert out.shape == (2, 3, 4, 4) and out.dtype == images.dtype
    for c in range(3):
        assert torch.equal(out[:, c], roi[:, 0].float())


def test_multichannel_images() -> None:
    images = torch.rand(3, 3, 4, 4)
    roi = torch.stack([ROI, BOX, torch.zeros_like(ROI)])[:, None]
    out = apply_strategy(images, roi, "only_roi")
    assert torch.equal(out, images * roi)  # roi broadcast over channels
    out = apply_strategy(images, roi, "no_roi_bbox")
    assert torch.equal(out[2], images[2])  # empty ROI: empty box, nothing removed
    assert torch.equal(out[1], images[1] * ~BOX)
    means = apply_strategy(images, roi, "no_roi", fill="mean", fill_value=[0.2, 0.5, 0.7])
    for c, value in enumerate((0.2, 0.5, 0.7)):
        assert torch.all(means[:, c][roi[:, 0]] == torch.tensor(value))
        assert torch.equal(means[:, c][~roi[:, 0]], images[:, c][~roi[:, 0]])


def test_mean_fill() -> None:
    images, roi = _tiny()
    out = apply_strategy(images, roi, "only_roi", fill="mean", fill_value=0.42)
    assert torch.equal(out[0, 0], torch.where(ROI, X, torch.tensor(0.42)))
    out = apply_strategy(images, roi, "no_roi_bbox", fill="mean", fill_value=0.42)
    assert torch.equal(out[0, 0], torch.where(~BOX, X, torch.tensor(0.42)))
    with pytest.raises(ValueError, match="fill_value"):
        apply_strategy(images, roi, "only_roi", fill="mean", fill_value=[0.1, 0.2])


def test_noise_fill_is_deterministic_per_image_and_batch_independent() -> None:
    images = torch.rand(4, 1, 32, 32)
    roi = torch.zeros(4, 1, 32, 32, dtype=torch.bool)
    roi[:, :, 8:24, 8:24] = True
    seeds = torch.tensor([11, 22, 33, 2**40], dtype=torch.int64)
    out = apply_strategy(images, roi, "no_roi", fill="noise", fill_value=0.5, noise_seeds=seeds)
    again = apply_strategy(images, roi, "no_roi", fill="noise", fill_value=0.5, noise_seeds=seeds)
    assert torch.equal(out, again)
    # kept pixels untouched; filled pixels are noise in [0, 1]
    assert torch.equal(out[~roi.expand_as(out)], images[~roi.expand_as(images)])
    filled = out[roi.expand_as(out)]
    assert filled.min() >= 0 and filled.max() <= 1 and filled.std() > 0.05
    assert abs(filled.mean().item() - 0.5) < 0.05
    # the same image with the same seed gets the same noise in another batch, alone or reordered
    alone = apply_strategy(
        images[2:3], roi[2:3], "no_roi", fill="noise", fill_value=0.5, noise_seeds=seeds[2:3]
    )
    assert torch.equal(alone[0], out[2])
    order = torch.tensor([3, 1, 0])
    shuffled = apply_strategy(
        images[order], roi[order], "no_roi", fill="noise", fill_value=0.5, noise_seeds=seeds[order]
    )
    assert torch.equal(shuffled, out[order])
    # different seeds: different noise; the same seed on different images: the same noise
    assert not torch.equal(out[0][roi[0].expand(1, -1, -1)], out[1][roi[1].expand(1, -1, -1)])
    same = apply_strategy(
        images, roi, "no_roi", fill="noise", fill_value=0.5, noise_seeds=torch.full((4,), 7)
    )
    assert torch.equal(same[0][roi[0]], same[3][roi[3]])


def test_noise_fill_mean_std_and_channels() -> None:
    images = torch.zeros(1, 3, 64, 64)
    roi = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    out = apply_strategy(
        images,
        roi,
        "no_roi",
        fill="noise",
        fill_value=[0.3, 0.5, 0.7],
        noise_seeds=torch.tensor([5]),
        noise_std=0.05,
    )
    for c, value in enumerate((0.3, 0.5, 0.7)):
        assert abs(out[0, c].mean().item() - value) < 0.01
        assert abs(out[0, c].std().item() - 0.05) < 0.01
    assert not torch.equal(out[0, 0] - 0.3, out[0, 1] - 0.5), "channels get independent noise"
    flat = apply_strategy(
        images, roi, "no_roi", fill="noise", fill_value=0.5, noise_seeds=torch.tensor([5]), noise_std=0
    )
    assert torch.all(flat == 0.5)


def test_noise_needs_seeds_and_unknown_names_are_errors() -> None:
    images, roi = _tiny()
    with pytest.raises(ValueError, match="noise_seeds"):
        apply_strategy(images, roi, "no_roi", fill="noise", fill_value=0.5)
    with pytest.raises(ValueError, match="noise_seeds"):
        apply_strategy(images, roi, "no_roi", fill="noise", noise_seeds=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="only_roi_bbox") as err:
        apply_strategy(images, roi, "NoLung")
    assert all(name in str(err.value) for name in STRATEGIES)
    with pytest.raises(ValueError, match="zero, mean, noise"):
        apply_strategy(images, roi, "no_roi", fill="blur")
    with pytest.raises(ValueError, match="roi must be"):
        apply_strategy(images, roi[..., :3], "no_roi")


@CUDA
def test_strategies_on_cuda_match_cpu() -> None:
    images = torch.rand(3, 3, 16, 16)
    roi = torch.rand(3, 1, 16, 16) > 0.7
    seeds = torch.tensor([1, 2, 3])
    for strategy in STRATEGIES:
        for fill in ("zero", "mean", "noise"):
            cpu = apply_strategy(images, roi, strategy, fill=fill, fill_value=0.4, noise_seeds=seeds)
            gpu = apply_strategy(
                images.cuda(), roi.cuda(), strategy, fill=fill, fill_value=0.4, noise_seeds=seeds
            )
            assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu), (strategy, fill)


def test_strategies_come_from_config() -> None:
    assert STRATEGIES is config.STRATEGIES
    images, roi = _tiny()
    for strategy in STRATEGIES:
        assert apply_strategy(images, roi, strategy).shape == images.shape


# ------------------------------------------------------------------------------------- scale_spread


def test_scale_spread() -> None:
    assert SWEEP_SPREADS == (0, 5, 10, 25, 50, 100, 150, 200, 300, 400, 500)
    assert [scale_spread(k, 512) for k in SWEEP_SPREADS] == list(SWEEP_SPREADS)
    assert [scale_spread(k, 256) for k in SWEEP_SPREADS] == [0, 3, 5, 13, 25, 50, 75, 100, 150, 200, 250]
    assert [scale_spread(k, 1024) for k in SWEEP_SPREADS] == [2 * k for k in SWEEP_SPREADS]
    assert scale_spread(0, 64) == 0
    assert scale_spread(-25, 256) == -13 and scale_spread(25, 256) == 13  # halves away from zero
    assert scale_spread(1, 64) == 1 and scale_spread(-1, 64) == -1  # the sign is kept, never 0
    assert scale_spread(10, 224) == 4  # 4.375
    with pytest.raises(ValueError):
        scale_spread(5, 0)


# ------------------------------------------------------------------------------ the distance computed per batch


def test_taxicab_distance_on_tensors_equals_scipys(real_masks: dict[str, np.ndarray]) -> None:
    """The store keeps bit-packed masks; the distance a spread reads is computed per batch, exactly."""
    from maskaudit.masking import distance_map, taxicab_distance

    rng = np.random.default_rng(0)
    masks = [np.asarray(m).astype(bool) for m in real_masks.values()]
    masks += [rng.random((int(h), int(w))) < p for h, w, p in zip(rng.integers(1, 48, 40), rng.integers(1, 48, 40),
                                                                   rng.random(40) * 0.3, strict=True)]
    masks += [np.zeros((9, 13), bool), np.ones((9, 13), bool)]
    for mask in masks:
        expected = signed_taxicab_distance(mask)
        np.testing.assert_array_equal(taxicab_distance(torch.from_numpy(mask)).numpy(), expected)
        np.testing.assert_array_equal(distance_map(torch.from_numpy(mask)[None, None]).numpy()[0, 0], expected)
    batch = torch.from_numpy(np.stack([masks[0], masks[0][::-1]]))[:, None]
    np.testing.assert_array_equal(taxicab_distance(batch).numpy(), distance_map(batch).numpy())
    with pytest.raises(TypeError, match="bool"):
        taxicab_distance(torch.zeros(4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_taxicab_distance_on_cuda_equals_cpu(real_masks: dict[str, np.ndarray]) -> None:
    from maskaudit.masking import distance_map

    batch = torch.from_numpy(np.stack([np.asarray(m).astype(bool) for m in list(real_masks.values())[:2]]))[:, None]
    np.testing.assert_array_equal(distance_map(batch.cuda()).cpu().numpy(), distance_map(batch).numpy())
