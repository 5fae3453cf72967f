"""Run-length encoding of binary masks, as CheXmask writes it (SPEC §1).

A mask is flattened row-major (C order) into ``height * width`` pixels; the RLE text is
``"start length start length ..."`` with 1-based starts. Decoding is vectorised (no Python
loop over runs): a 3520×4280 mask decodes in milliseconds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _tokens(rle: str) -> np.ndarray:
    text = rle.strip()
    if not text:
        return np.zeros(0, dtype=np.int64)
    try:
        return np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((t for t in text.split() if not t.lstrip("-").isdigit()), text[:20])
        raise ValueError(f"RLE holds a token that is not an integer: {bad!r}") from None


def decode_rle(rle: Any, height: int, width: int) -> np.ndarray:
    """Decode CheXmask RLE text into a bool (height, width) mask.

    Parameters
    ----------
    rle : str
        ``"start length ..."`` pairs, starts 1-based over the row-major flattened image.
        An empty string, ``None`` or NaN is an empty mask.
    height, width : int
        The mask's size (CheXmask's ``Height`` and ``Width``).

    Raises
    ------
    ValueError
        For an odd number of values, a non-integer value, a start below 1, a negative length,
        or a run that ends past ``height * width``.
    """
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    n = height * width
    if rle is None or (isinstance(rle, float) and math.isnan(rle)):
        return np.zeros((height, width), dtype=bool)
    values = _tokens(str(rle))
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size}); expected start/length pairs")
    starts, lengths = values[0::2] - 1, values[1::2]
    if starts.size == 0:
        return np.zeros((height, width), dtype=bool)
    if starts.min() < 0:
        raise ValueError(f"RLE start {int(starts.min()) + 1} is below 1 (starts are 1-based)")
    if lengths.min() < 0:
        raise ValueError(f"RLE has a negative run length {int(lengths.min())}")
    ends = starts + lengths
    if ends.max() > n:
        raise ValueError(f"RLE run ends at pixel {int(ends.max())}, past the {height}x{width} = {n} pixels")
    if starts.size == 1 or bool(np.all(starts[1:] >= ends[:-1])):
        # sorted, non-overlapping runs (CheXmask's case): one np.repeat of alternating 0/1
        gaps = np.empty(starts.size, dtype=np.int64)
        gaps[0] = starts[0]
        gaps[1:] = starts[1:] - ends[:-1]
        counts = np.empty(2 * starts.size + 1, dtype=np.int64)
        counts[0:-1:2], counts[1::2], counts[-1] = gaps, lengths, n - ends[-1]
        pattern = np.zeros(counts.size, dtype=bool)
        pattern[1::2] = True
        flat = np.repeat(pattern, counts)
    else:
        # any order, overlaps allowed: +1 at each start, -1 at each end, running sum
        step = np.bincount(starts, minlength=n + 1) - np.bincount(ends, minlength=n + 1)
        flat = np.cumsum(step[:n]) > 0
    return flat.reshape(height, width)


def encode_rle(mask: np.ndarray) -> str:
    """Encode a 2-D mask (nonzero = inside) as CheXmask RLE: 1-based starts, row-major, sorted runs."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {array.shape}")
    flat = np.concatenate([[False], array.astype(bool).ravel(order="C"), [False]])
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # 1-based positions where runs start / end+1
    runs = changes.reshape(-1, 2)
    runs[:, 1] -= runs[:, 0]
    return " ".join(map(str, runs.ravel().tolist()))
