"""What :mod:`maskaudit.data.imaging` and :mod:`maskaudit.data.dicom` share: the colour modes, the widening of
pixel values to uint16, and the one refusal of multi-frame files.

It imports neither of them: :mod:`~maskaudit.data.imaging` imports :mod:`~maskaudit.data.dicom`, and both
import this module, so the dependency goes one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

#: What :func:`maskaudit.data.imaging.read_image` decodes to: one gray channel or three RGB ones.
Color = Literal["gray", "rgb"]


def multi_frame(path: Path | str, frames: int) -> str:
    """Why a multi-frame DICOM file is refused (its decoding and header checks say the same)."""
    return f"{path}: multi-frame DICOM ({frames} frames) is not supported; export each frame as its own file"


def wide_to_uint16(values: np.ndarray) -> np.ndarray:
    """Integer or float pixels wider than 8 bits (a 'wide' Pillow mode, a DICOM file) as uint16.

    Values already in [0, 65535] and integral are kept exactly. Anything else (negative
    values, floats, 32-bit ranges) is mapped linearly from [min, max] onto [0, 65535].
    """
    if values.dtype == np.uint16:
        return values
    if values.size == 0:
        return values.astype(np.uint16)
    low, high = float(values.min()), float(values.max())
    integral = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
    if low >= 0 and high <= 65535 and integral:
        return values.astype(np.uint16)
    span = high - low if high > low else 1.0
    return np.rint((values.astype(np.float64) - low) / span * 65535).astype(np.uint16)
