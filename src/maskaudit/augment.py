"""The study's training augmentation (SPEC §4), batched on tensors on any device.

Per sample: a random rotation uniform in ±``rotation`` degrees about the image centre (bilinear,
zero fill), a horizontal flip with probability ``hflip``, and a brightness factor uniform in
``[low, high]`` that multiplies the image, which is then clamped to [0, 1] (torchvision's
``ColorJitter(brightness=...)``). The random parameters are drawn on the CPU from the generator the
caller passes, so a job's seed makes its augmentation reproducible on CPU and CUDA alike.

Masking happens before augmentation (SPEC §2): the removed pixels are 0, and zero fill plus bilinear
interpolation keeps them 0 after rotation (the rotated corners are 0 too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from maskaudit.config import AugmentConfig

__all__ = ["augment_batch", "draw_parameters", "rotate_batch"]


def draw_parameters(
    batch: int, config: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw per-sample augmentation parameters on the CPU.

    Always consumes ``3 * batch`` uniform numbers from ``generator`` (angles, flips, brightness, in
    that order), whatever the config, so the generator's stream does not depend on the settings.

    Returns
    -------
    angles : Tensor of shape (batch,)
        Degrees, uniform in [-rotation, rotation]; positive is counter-clockwise.
    flips : Tensor of shape (batch,), bool
        True where the sample is flipped horizontally.
    factors : Tensor of shape (batch,)
        Brightness factors, uniform in [low, high].
    """
    u = torch.rand(3, batch, generator=generator, dtype=torch.float64)
    low, high = config.brightness
    angles = (2.0 * u[0] - 1.0) * config.rotation
    flips = u[1] < config.hflip
    factors = low + (high - low) * u[2]
    return angles, flips, factors


def rotate_batch(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its centre by its own angle, bilinear with zero fill, in one call.

    Parameters
    ----------
    images : Tensor of shape (B, C, H, W)
        Float images, on any device.
    degrees : Tensor of shape (B,)
        Angles in degrees; positive turns the image counter-clockwise as displayed (row 0 on top),
        like ``torchvision.transforms.functional.rotate``; 90 equals ``torch.rot90(images, 1, (-2, -1))``.

    Returns
    -------
    Tensor of shape (B, C, H, W)
    """
    b, _, h, w = images.shape
    rad = degrees.detach().to("cpu", torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # Output pixel p (normalised, x right, y down) samples the input at R(-angle) p; the aspect
    # ratio terms keep the rotation rigid in pixel units when H != W.
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(images: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Apply SPEC §4's training augmentation to a batch, with per-sample random parameters.

    Order: rotation, horizontal flip, brightness. A step whose setting is the identity
    (``rotation=0``, ``hflip=0``, ``brightness=(1, 1)``) is skipped, so the identity config returns
    ``images`` itself, bit for bit.

    Parameters
    ----------
    images : Tensor of shape (B, C, S, S)
        Float images in [0, 1] (C = 1 or 3), on any device; already masked.
    config : AugmentConfig
        ``rotation`` (degrees, uniform in ±rotation), ``hflip`` (probability), ``brightness`` (low, high).
    generator : torch.Generator
        A CPU generator seeded by the job; parameters are drawn from it (see :func:`draw_parameters`).

    Returns
    -------
    Tensor of shape (B, C, S, S)
        On the device of ``images``, in [0, 1] whenever brightness is applied.

    Raises
    ------
    ValueError
        If ``images`` is not a 4-d floating-point tensor (a caller's mistake, not a user's).

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> augment_batch(torch.rand(4, 1, 32, 32), AugmentConfig(), g).shape
    torch.Size([4, 1, 32, 32])
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            "augment_batch expects float images of shape (B, C, S, S), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    angles, flips, factors = draw_parameters(images.shape[0], config, generator)
    low, high = config.brightness
    out = images
    if config.rotation != 0:
        out = rotate_batch(out, angles)
    if config.hflip != 0:
        mask = flips.to(images.device).view(-1, 1, 1, 1)
        out = torch.where(mask, out.flip(-1), out)
    if not (low == 1 and high == 1):
        scale = factors.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
        out = (out * scale).clamp_(0.0, 1.0)
    return out
