"""Reader-study selection (SPEC §6.5): the images a clinician reads, as each model saw them.

For each strategy's own model (one fold: the study's fold 1) on the hold-out images masked
with that same strategy (a probe: each probed model on each test masking), and for each class,
the positive images are sorted by the model's
probability and the images at the chosen percentiles (25th, 50th, 75th) are taken: the
nearest rank ``round(p / 100 * (n - 1))`` of the sorted positives. Each is saved as the masked
image the model was fed (the run's spread and fill), as an 8- or 16-bit PNG at the store's
resolution, under a blinded name: a keyed hash of the run's seed and the case, so the name
tells nothing about the image, strategy or class and stays the same when the stage is rerun.
``selection.csv`` is the key: blinded file, image id, strategy (the masking shown), model
(its training strategy, or the probed model), fold, class, percentile, probability and every
label of the image.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from maskaudit.config import AuditConfig
from maskaudit.data.store import Store
from maskaudit.loader import batches
from maskaudit.metrics import prediction_sets
from maskaudit.rundir import atomic_path
from maskaudit.strategies import MaskSpec


def study_fold(config: AuditConfig) -> int:
    """The fold whose models a full audit's reader reads: ``analyses.reader.fold``, else 1 as the study (0 with one
    fold)."""
    chosen = config.analyses.reader.fold
    return chosen if chosen is not None else min(1, config.folds - 1)


def blinded_name(seed: int, strategy: str, class_name: str, image_id: str, model: str | None = None) -> str:
    key = hashlib.sha256(f"maskaudit-reader-{seed}".encode()).digest()
    case = f"{strategy}\0{class_name}\0{image_id}" + ("" if model in (None, strategy) else f"\0{model}")
    return hmac.new(key, case.encode(), hashlib.sha256).hexdigest()[:16] + ".png"


def select_cases(predictions: pd.DataFrame, pairs: list[tuple[str, str]], classes: list[str], fold: int,
                 percentiles: list[float]) -> pd.DataFrame:
    """Per (model, masking) pair and class, the positives at each percentile of the model's probability.

    Returns
    -------
    DataFrame
        ``strategy`` (the masking), ``model``, ``fold``, ``class``, ``percentile``, ``image_id``,
        ``probability``, ``n_positives``; a pair and class without positives give no row.
    """
    rows = []
    for model, strategy in pairs:
        for name in classes:
            frame = prediction_sets(predictions, name, model, strategy).get(fold)
            if frame is None:
                continue
            positives = frame[frame["label"] == 1].sort_values(["probability", "image_id"], kind="stable")
            n = len(positives)
            for p in percentiles:
                if n == 0:
                    continue
                pick = positives.iloc[int(np.floor(p / 100 * (n - 1) + 0.5))]
                rows.append({"strategy": strategy, "model": model, "fold": fold, "class": name, "percentile": p,
                             "image_id": pick["image_id"], "probability": float(pick["probability"]),
                             "n_positives": n})
    return pd.DataFrame(rows, columns=["strategy", "model", "fold", "class", "percentile", "image_id", "probability",
                                       "n_positives"])


def export_cases(cases: pd.DataFrame, store: Store, spec: MaskSpec, seed: int, out: Path) -> pd.DataFrame:
    """Write each case's masked image into ``out/images`` and return the key table (one row per case)."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    row_of = {image_id: i for i, image_id in enumerate(store.kept["image_id"])}
    key = cases.copy()
    key["file"] = [blinded_name(seed, s, c, i, m)
                   for s, c, i, m in zip(key["strategy"], key["class"], key["image_id"], key["model"], strict=True)]
    for name in store.classes:
        key[f"label_{name}"] = [store.labels[row_of[i], store.classes.index(name)] for i in key["image_id"]]
    for strategy, part in key.groupby("strategy", sort=False):
        indices = np.array([row_of[i] for i in part["image_id"]], dtype=np.int64)
        files = part["file"].tolist()
        done = 0
        for batch in batches(store, indices, spec, 64, torch.device("cpu")):
            masked = batch.masked(strategy, spec).clamp(0, 1).numpy()
            for image in masked:
                _save_png(image, store.image_max, images_dir / files[done])
                done += 1
    return key[["file", "image_id", "strategy", "model", "fold", "class", "percentile", "probability", "n_positives",
                *[f"label_{n}" for n in store.classes]]]


def _save_png(image: np.ndarray, image_max: int, path: Path) -> None:
    """A (C, S, S) image in [0, 1] as a gray or RGB PNG with the store's bit depth."""
    dtype = np.uint16 if image_max > 255 else np.uint8
    pixels = np.round(image * image_max).astype(dtype)
    picture = Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
