"""SPEC §4's training augmentation: batched, seeded, per-sample, and the identity when switched off."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from maskaudit.augment import augment_batch, draw_parameters, rotate_batch
from maskaudit.config import NO_AUGMENT, AugmentConfig

STUDY = AugmentConfig()  # rotation 45, hflip 0.5, brightness (0.7, 1.1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 4, channels: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=gen(seed))


def hand_image(size: int = 16) -> torch.Tensor:
    """An asymmetric 'L': a vertical bar on the left, a foot at the bottom, and a dot top right."""
    img = torch.zeros(1, 1, size, size)
    img[..., 2:14, 3:5] = 1.0
    img[..., 12:14, 3:10] = 0.5
    img[..., 2, 12] = 0.25
    return img


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_config_returns_the_input_bit_for_bit(channels: int) -> None:
    x = batch(channels=channels)
    out = augment_batch(x, NO_AUGMENT, gen())
    assert out is x or torch.equal(out, x)
    assert torch.equal(out, batch(channels=channels))


@pytest.mark.parametrize("channels", [1, 3])
def test_seeded_generator_makes_it_reproducible(channels: int) -> None:
    x = batch(n=6, channels=channels)
    a = augment_batch(x, STUDY, gen(7))
    b = augment_batch(x, STUDY, gen(7))
    c = augment_batch(x, STUDY, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1


def test_the_generator_stream_does_not_depend_on_the_config() -> None:
    g1, g2 = gen(3), gen(3)
    augment_batch(batch(n=5), NO_AUGMENT, g1)
    augment_batch(batch(n=5), STUDY, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_flip_with_probability_one_mirrors_left_right() -> None:
    x = batch(channels=3)
    out = augment_batch(x, AugmentConfig(rotation=0, hflip=1.0, brightness=(1, 1)), gen())
    assert torch.equal(out, x.flip(-1))


def test_flip_is_drawn_per_sample() -> None:
    config = AugmentConfig(rotation=0, hflip=0.5, brightness=(1, 1))
    x = batch(n=64)
    out = augment_batch(x, config, gen(5))
    _, flips, _ = draw_parameters(64, config, gen(5))
    assert 0 < flips.sum() < 64
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if flips[i] else x[i])


def test_brightness_multiplies_within_range_and_clamps() -> None:
    config = AugmentConfig(rotation=0, hflip=0, brightness=(0.5, 0.8))
    x = torch.full((200, 1, 8, 8), 0.5)
    out = augment_batch(x, config, gen(1))
    per_sample = out.flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # one factor per image
    factors = per_sample[:, 0] / 0.5
    assert factors.min() >= 0.5 and factors.max() <= 0.8
    assert factors.max() - factors.min() > 0.2  # spread over the range, not constant
    bright = augment_batch(
        torch.full((4, 3, 8, 8), 0.9), AugmentConfig(rotation=0, hflip=0, brightness=(1.5, 2)), gen()
    )
    assert torch.equal(bright, torch.ones_like(bright))


def test_rotation_by_90_degrees_turns_a_hand_image_counter_clockwise() -> None:
    img = hand_image()
    turned = rotate_batch(img, torch.tensor([90.0]))
    assert torch.allclose(turned, torch.rot90(img, 1, dims=(-2, -1)), atol=1e-5)
    # the dot at the top right (row 2, column 12) goes to the top left (row 3, column 2)
    assert turned[0, 0, 3, 2] == pytest.approx(0.25, abs=1e-5)
    assert torch.allclose(rotate_batch(img, torch.tensor([180.0])), img.flip(-1).flip(-2), atol=1e-5)
    assert torch.allclose(
        rotate_batch(img, torch.tensor([-90.0])), torch.rot90(img, -1, dims=(-2, -1)), atol=1e-5
    )


@pytest.mark.parametrize("angle", [30.0, -17.5])
def test_rotation_matches_torchvision_rotate(angle: float) -> None:
    x = batch(n=2, channels=3, size=24)
    ours = rotate_batch(x, torch.tensor([angle, angle]))
    theirs = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_rotation_angles_are_drawn_per_sample_within_range() -> None:
    config = AugmentConfig(rotation=45, hflip=0, brightness=(1, 1))
    angles, _, _ = draw_parameters(500, config, gen(2))
    assert angles.abs().max() <= 45 and angles.min() < -35 and angles.max() > 35
    x = batch(n=6, channels=3)
    out = augment_batch(x, config, gen(2))
    assert torch.allclose(out, rotate_batch(x, draw_parameters(6, config, gen(2))[0]), atol=1e-6)


def test_masked_zero_pixels_stay_zero_under_rotation() -> None:
    size = 33
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    radius = ((rows - centre) ** 2 + (cols - centre) ** 2).sqrt()
    x = torch.rand(8, 1, size, size, generator=gen(4)) * (radius > 8).float()  # a masked (zeroed) disc
    out = augment_batch(x, AugmentConfig(rotation=45, hflip=0.5, brightness=(0.7, 1.1)), gen(4))
    assert (out[..., radius < 6.5] == 0).all()  # the disc turns into itself: still exactly zero
    assert (augment_batch(torch.zeros(3, 3, 16, 16), STUDY, gen()) == 0).all()
    corners = rotate_batch(torch.ones(1, 1, size, size), torch.tensor([45.0]))[0, 0]
    assert corners[0, 0] == 0 and corners[-1, -1] == 0  # zero fill outside the rotated image


def test_channels_share_the_same_transform() -> None:
    gray = batch(n=5)
    out = augment_batch(gray.repeat(1, 3, 1, 1), STUDY, gen(9))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert torch.allclose(out[:, :1], augment_batch(gray, STUDY, gen(9)), atol=1e-6)


def test_each_sample_gets_its_own_parameters() -> None:
    x = batch(n=1).repeat(8, 1, 1, 1)
    out = augment_batch(x, STUDY, gen(11))
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(out[i], out[j])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, S, S\)"):
        augment_batch(torch.rand(1, 16, 16), STUDY, gen())
    with pytest.raises(ValueError, match="float"):
        augment_batch(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), STUDY, gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    x = batch(n=4, channels=3, size=64)
    on_gpu = augment_batch(x.cuda(), STUDY, gen(6))
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), augment_batch(x, STUDY, gen(6)), atol=1e-5)
