"""The masking strategies of SPEC §2, applied to batches of tensors.

The ROI of a run at spread ``k`` is read off one signed taxicab distance map per mask:
``k`` iterations of OpenCV's 3x3 ``MORPH_ELLIPSE`` (the plus-shaped cross) dilate a mask to
the pixels within taxicab distance ``k`` of it, and erode it to the pixels whose taxicab
distance to the background is more than ``k``. Every spread is therefore one comparison.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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
