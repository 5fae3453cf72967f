"""Fixtures in the publishers' own file forms, written the way the publishers wrote them.

CheXmask's ``OriginalResolution/*.csv`` come from pandas' ``to_csv`` of rows whose
``Landmarks`` cell is a numpy integer array (ngaggion/CheXmask-Database,
``DataPostprocessing/ReversePreprocessing/back_padchest.py``), so here too: a DataFrame with
numpy arrays in that column, written by pandas. ``Preprocessed/`` files hold the points on one
comma-joined line (``np.array(eval(row["Landmarks"]))`` reads them back in the same script).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from maskaudit.data.rle import encode_rle

#: points per organ in CheXmask's landmarks: right lung, left lung, heart (back_padchest.py: [:44], [44:94], [94:])
POINTS = (44, 50, 26)


def contour_points(mask: np.ndarray, n: int) -> np.ndarray:
    """``n`` (x, y) integer points along the outer contour of ``mask`` (a stand-in for HybridGNet's landmarks)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((n, 2), dtype=np.int64)
    outline = max(contours, key=len)[:, 0, :]
    pick = np.linspace(0, len(outline) - 1, n).round().astype(int)
    return outline[pick].astype(np.int64)


def chexmask_row(id_column: str, image_id: str, left: np.ndarray, right: np.ndarray, heart: np.ndarray,
                 dice: float = 0.9, form: str = "original", height: int | None = None,
                 width: int | None = None) -> dict:
    """One CheXmask row; ``form`` "original" (numpy array landmarks, multi-line) or "preprocessed" (one line)."""
    landmarks = np.concatenate([contour_points(m, k) for m, k in zip((right, left, heart), POINTS, strict=True)])
    h, w = left.shape
    return {
        id_column: image_id, "Dice RCA (Mean)": dice, "Dice RCA (Max)": min(1.0, dice + 0.05),
        "Landmarks": landmarks if form == "original" else str(landmarks.reshape(-1).tolist()),
        "Left Lung": encode_rle(left), "Right Lung": encode_rle(right), "Heart": encode_rle(heart),
        "Height": h if height is None else height, "Width": w if width is None else width,
    }  # fmt: skip


def write_chexmask(rows: list[dict], path: Path) -> Path:
    """The CSV as the publisher wrote it: ``pd.DataFrame(rows).to_csv(path, index=False)``."""
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
