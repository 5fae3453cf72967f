"""The masking strategies of SPEC §2, applied to batches of tensors.

The ROI of a run at spread ``k`` is read off one signed taxicab distance map per mask:
``k`` iterations of OpenCV's 3x3 ``MORPH_ELLIPSE`` (the plus-shaped cross) dilate a mask to
the pixels within taxicab distance ``k`` of it, and erode it to the pixels whose taxicab
distance to the background is more than ``k``. Every spread is therefore one comparison.

On top of that ROI, :func:`apply_strategy` builds the image a model is fed under each strategy
(``full``, ``no_roi``, ``no_roi_bbox``, ``only_roi``, ``only_roi_bbox``, and the shape-leakage
control ``roi_shape`` of SPEC §8), with the removed pixels filled with zero (the study), a
constant (the dataset mean) or seeded Gaussian noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from maskaudit.strategies import FILLS, REFERENCE_SIZE, STRATEGIES, SWEEP_SPREADS

__all__ = [
    "DEFAULT_NOISE_STD",
    "FAR",
    "FILLS",
    "REFERENCE_SIZE",
    "STRATEGIES",
    "SWEEP_SPREADS",
    "apply_strategy",
    "bounding_box",
    "distance_map",
    "roi_at_spread",
    "scale_spread",
    "signed_taxicab_distance",
    "taxicab_distance",
]

#: Distances are stored as int16; farther than this counts as "infinitely far".
FAR = np.iinfo(np.int16).max


def signed_taxicab_distance(mask: np.ndarray) -> np.ndarray:
    """Signed city-block distance map of a binary mask, as int16.

    Outside the mask: the taxicab distance to the nearest mask pixel (>= 1).
    Inside the mask: ``1 - d`` where ``d`` is the taxicab distance to the nearest pixel
    outside the mask (<= 0). Then ``dist <= k`` is the mask after spread ``k``
    (k > 0 dilates, k < 0 erodes, k = 0 is the mask itself). Pixels beyond the image
    border count as neither, as in OpenCV's default border handling of dilate/erode.
    An empty mask is ``FAR`` everywhere; a full mask ``-FAR`` everywhere.
    """
    roi = np.asarray(mask).astype(bool)
    if roi.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {roi.shape}")
    out = np.empty(roi.shape, dtype=np.int16)
    if not roi.any():
        out.fill(FAR)
        return out
    if roi.all():
        out.fill(-FAR)
        return out
    to_roi = ndimage.distance_transform_cdt(~roi, metric="taxicab")
    to_background = ndimage.distance_transform_cdt(roi, metric="taxicab")
    signed = np.where(roi, 1 - to_background, to_roi)
    np.clip(signed, -FAR, FAR, out=signed)
    out[...] = signed
    return out


def _nearest_along(far: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[i] = min_j (far[j] + |i - j|)`` along ``dim``: a 1-D distance pass, as two prefix minima.

    ``min_{j<=i} (far[j] + i - j) = i + cummin(far - j)`` from the start, and the mirror image from the end.
    """
    n = far.shape[dim]
    shape = [1] * far.dim()
    shape[dim] = n
    index = torch.arange(n, device=far.device, dtype=far.dtype).view(shape)
    forward = torch.cummin(far - index, dim=dim).values + index
    backward = torch.flip(torch.cummin(torch.flip(far + index, [dim]), dim=dim).values, [dim]) - index
    return torch.minimum(forward, backward)


def _taxicab_to(mask: torch.Tensor) -> torch.Tensor:
    """Taxicab distance of every pixel to the nearest pixel of ``mask`` (bool (..., H, W)), int32; ``FAR`` or more
    where ``mask`` is empty. The city-block metric is separable: a pass along the rows, then along the columns."""
    far = torch.where(mask, 0, 2 * int(FAR)).to(torch.int32)
    return _nearest_along(_nearest_along(far, far.dim() - 1), far.dim() - 2)


def taxicab_distance(mask: torch.Tensor) -> torch.Tensor:
    """:func:`signed_taxicab_distance` of a batch of masks on their device: int16 of the masks' shape.

    ``mask``: bool (..., H, W). Exact (the same integers as SciPy's ``distance_transform_cdt`` with the taxicab
    metric, tested): outside a mask the distance to it, inside ``1 - `` the distance to the background, clipped to
    ``±FAR``; an empty mask is ``FAR`` everywhere, a full one ``-FAR``. Four prefix minima per image, so the store
    keeps bit-packed masks and computes the map per batch where a spread other than 0 needs it.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() < 2:
        raise ValueError(f"mask must have at least 2 dimensions (H, W), got shape {tuple(mask.shape)}")
    signed = torch.where(mask, 1 - _taxicab_to(~mask), _taxicab_to(mask))
    return signed.clamp_(-int(FAR), int(FAR)).to(torch.int16)


def distance_map(mask: torch.Tensor) -> torch.Tensor:
    """Signed taxicab distance maps of a batch of masks (bool (..., H, W)), int16, on the masks' device.

    On a GPU :func:`taxicab_distance` (prefix minima, exact); on the CPU SciPy's chamfer transform per mask
    (:func:`signed_taxicab_distance`, about 12× faster there); the same integers either way.
    """
    if mask.device.type != "cpu":
        return taxicab_distance(mask)
    flat = mask.reshape(-1, *mask.shape[-2:]).numpy()
    out = np.stack([signed_taxicab_distance(m) for m in flat]) if len(flat) else np.zeros(flat.shape, np.int16)
    return torch.from_numpy(out.reshape(mask.shape))


# ------------------------------------------------------------------------------------ spread & sweep


def roi_at_spread(dist: torch.Tensor, spread: int) -> torch.Tensor:
    """The ROI after spread ``spread``: ``dist <= spread``, as a bool tensor of ``dist``'s shape.

    ``dist`` is a signed taxicab distance map (:func:`signed_taxicab_distance`), int16, of any
    shape — typically (B, 1, S, S) or (B, S, S) — on any device; the result stays on that device.
    ``spread > 0`` dilates by that many 3x3-cross iterations, ``spread < 0`` erodes, 0 is the mask.
    Spreads beyond the int16 range are clamped so that an empty mask stays empty at any
    dilation and a full mask stays full at any erosion.
    """
    if not isinstance(dist, torch.Tensor):
        raise TypeError(f"dist must be a torch.Tensor, got {type(dist).__name__}")
    if dist.dtype.is_floating_point or dist.dtype.is_complex or dist.dtype == torch.bool:
        raise TypeError(f"dist must be an integer distance map (int16), got {dist.dtype}")
    limit = int(FAR) - 1
    return dist <= max(-limit, min(limit, int(spread)))


def scale_spread(spread_at_512: int, image_size: int) -> int:
    """A spread given at S = 512 (SPEC §6.4), scaled to ``image_size``.

    ``spread * image_size / 512``, rounded to the nearest integer with halves away from zero, so
    that ``scale_spread(-k, S) == -scale_spread(k, S)``. The sign is kept: 0 stays 0, and a
    non-zero spread never rounds to 0 (it becomes at least 1 in magnitude), so a dilation or
    erosion that was asked for is never silently dropped at a small image size.
    """
    spread, size = int(spread_at_512), int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if spread == 0:
        return 0
    magnitude = (2 * abs(spread) * size + REFERENCE_SIZE) // (2 * REFERENCE_SIZE)
    return (1 if spread > 0 else -1) * max(1, magnitude)


# ------------------------------------------------------------------------------------------ strategies

#: Standard deviation of the ``noise`` fill when the caller gives none: about the within-image
#: standard deviation of a max-scaled chest X-ray (0.21 on the shared ieee8023 set).
DEFAULT_NOISE_STD = 0.2


def bounding_box(roi: torch.Tensor) -> torch.Tensor:
    """The filled bounding box of each ROI of a batch: bool (B, 1, S, S) → bool (B, 1, S, S).

    The smallest axis-aligned box that contains every ROI pixel, its last row and column
    included (the study's slice ``[min_r:max_r, min_c:max_c]`` drops them: a bug we do not copy).
    An empty ROI gives an empty box. Vectorised over the batch (and any leading dimensions)
    and computed on the ROI's device: a row is inside the box when some ROI row lies at or above
    it and some at or below it, and likewise for columns.
    """
    if roi.ndim < 2:
        raise ValueError(f"roi must have at least 2 dimensions (..., H, W), got shape {tuple(roi.shape)}")
    roi = roi if roi.dtype == torch.bool else roi != 0
    rows = roi.any(dim=-1).to(torch.int32)  # (..., H)
    cols = roi.any(dim=-2).to(torch.int32)  # (..., W)

    def _between(hits: torch.Tensor) -> torch.Tensor:
        before = hits.cumsum(dim=-1) > 0
        after = hits.flip(-1).cumsum(dim=-1).flip(-1) > 0
        return before & after

    return _between(rows).unsqueeze(-1) & _between(cols).unsqueeze(-2)


def _check_batch(images: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, S, S), got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
    b, _, h, w = images.shape
    if roi.ndim != 4 or roi.shape[1] != 1 or roi.shape[0] != b or tuple(roi.shape[2:]) != (h, w):
        raise ValueError(
            f"roi must be (B, 1, S, S) matching images {tuple(images.shape)}, got shape {tuple(roi.shape)}"
        )
    roi = roi if roi.dtype == torch.bool else roi != 0
    return roi.to(images.device)


def _channel_values(value: float | Sequence[float], channels: int) -> torch.Tensor:
    """``value`` as a float32 (C, 1, 1) tensor on the CPU: one scalar for all channels, or one each."""
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() == 1:
        values = values.expand(channels)
    elif values.numel() != channels:
        raise ValueError(f"fill_value needs 1 or {channels} values (one per channel), got {values.numel()}")
    return values.reshape(channels, 1, 1)


def _noise(
    shape: tuple[int, int, int, int], seeds: torch.Tensor, mean: torch.Tensor, std: float
) -> torch.Tensor:
    """Per-image seeded noise N(mean, std²) clipped to [0, 1], float32 on the CPU, (B, C, H, W)."""
    out = torch.empty(shape, dtype=torch.float32)
    generator = torch.Generator(device="cpu")
    for b, seed in enumerate(seeds.tolist()):
        generator.manual_seed(int(seed))
        torch.randn(shape[1:], generator=generator, out=out[b])
    return out.mul_(std).add_(mean).clamp_(0.0, 1.0)


def apply_strategy(
    images: torch.Tensor,
    roi: torch.Tensor,
    strategy: str,
    fill: str = "zero",
    fill_value: float | Sequence[float] = 0.0,
    noise_seeds: torch.Tensor | None = None,
    *,
    noise_std: float = DEFAULT_NOISE_STD,
    rescale: bool = False,
) -> torch.Tensor:
    """The images a model is fed under ``strategy`` (SPEC §2 and §8).

    ``images``: float (B, C, S, S) in [0, 1]; ``roi``: bool (B, 1, S, S), the ROI after spread
    (moved to the images' device). With ``keep`` the pixels the strategy keeps:

    - ``full``: ``images`` itself (returned as is, not copied);
    - ``no_roi``: keep outside the ROI; ``no_roi_bbox``: keep outside :func:`bounding_box`;
    - ``only_roi``: keep inside the ROI; ``only_roi_bbox``: keep inside the bounding box;
    - ``roi_shape``: the ROI silhouette alone, 1.0 inside and 0.0 outside, in every channel
      (the shape-leakage control; ``fill`` does not apply).

    Every other pixel is filled according to ``fill``:

    - ``zero`` (the study): 0.0, exactly ``images * keep``;
    - ``mean``: the constant ``fill_value`` — the dataset's mean intensity, one value or one per
      channel — so the removed region is no longer darker than the image around it;
    - ``noise``: independent Gaussian noise per pixel and channel with mean ``fill_value`` and
      standard deviation ``noise_std`` (pass the dataset's pixel standard deviation to match the
      image's first two moments), clipped to [0, 1] so the input stays a valid image (clipping
      pulls the mean towards 0.5 when ``fill_value`` lies within ~2 ``noise_std`` of 0 or 1). The
      noise of image ``b`` is drawn on the CPU by a ``torch.Generator`` seeded with
      ``noise_seeds[b]`` and then moved to the images' device, so an image gets the same noise
      whatever batch it sits in and on any device; ``noise_seeds`` (int64, shape (B,)) is required.

    With ``rescale`` (``scale: after_masking``) the kept pixels of each image are first divided by their own
    maximum (over every channel; an image that keeps only zeros stays as it is), so that they span [0, 1] whatever
    lies outside them. The stored images were divided by their own maximum at preparation (SPEC §1, the study's
    order); dividing again by the kept maximum gives exactly the kept pixels divided by their own maximum in the
    source's units: a bright marker outside the ROI, which set the stored image's maximum and so lowered every
    pixel inside the ROI, no longer reaches them. What remains is the stored quantisation (8-bit stores keep fewer
    levels inside a ROI darkened by a bright outside object). ``full`` and ``roi_shape`` are not rescaled: the
    first keeps every pixel (its maximum is already 1), the second is binary.

    The result has the images' dtype and device. Unknown strategies or fills are a ValueError
    naming the known ones.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known strategies: {', '.join(STRATEGIES)}")
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; known fills: {', '.join(FILLS)}")
    roi = _check_batch(images, roi)
    entry = STRATEGIES[strategy]
    if entry.image is not None:  # full (the image as is), roi_shape (the silhouette): no fill
        return entry.image(images, roi)
    keep = entry.keep(roi, bounding_box)
    if rescale:
        peak = (images * keep).amax(dim=(1, 2, 3), keepdim=True)
        images = images / torch.where(peak > 0, peak, torch.ones_like(peak))

    if fill == "zero":
        return images * keep
    b, c = images.shape[:2]
    mean = _channel_values(fill_value, c)
    if fill == "mean":
        filler = mean.to(device=images.device, dtype=images.dtype)
    else:
        if noise_seeds is None:
            raise ValueError("fill='noise' needs noise_seeds: one int64 seed per image, shape (B,)")
        seeds = torch.as_tensor(noise_seeds).flatten()
        if seeds.numel() != b or seeds.dtype.is_floating_point:
            raise ValueError(
                f"noise_seeds must be {b} integer seeds (one per image), got {seeds.numel()} of {seeds.dtype}"
            )
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        noise = _noise(tuple(images.shape), seeds.cpu(), mean, float(noise_std))
        filler = noise.to(device=images.device, dtype=images.dtype)
    return torch.where(keep, images, filler)
