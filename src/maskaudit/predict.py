"""Cross-masking predictions (SPEC §5): every job's model on every test strategy → the long table.

The table has one row per (train strategy, fold, test strategy, image, class), with the
image's label and the model's probability, a ``dataset`` column (``main`` for the run's own
data, else the external dataset's name) and a ``split`` column: ``test`` for the hold-out
set, ``val`` for the job's own validation fold, ``external`` for every image of an
external dataset. External images are scored under every test strategy their masks allow:
``full`` for every image, the masked strategies for those that have masks
(:attr:`Store.masked`; none when the external data has no ROI); a class the external data does not label gets NaN
labels, so its AUC is reported missing with the reason. Each job writes its part into its
folder (so a killed prediction stage resumes job by job); the run's
``predictions.parquet`` is their concatenation, the single source of every metric.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from maskaudit.config import AuditConfig
from maskaudit.context import Context
from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.loader import batches, resolve_device
from maskaudit.metrics import MAIN
from maskaudit.models import build_model, load_checkpoint
from maskaudit.progress import active
from maskaudit.rundir import RunDir
from maskaudit.strategies import MaskSpec

COLUMNS = ["dataset", "split", "train_strategy", "fold", "test_strategy", "image_id", "class", "label", "probability"]


def probabilities(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities: a probed model applies its own activation; maskaudit's models emit logits."""
    if hasattr(model, "probabilities"):
        return model.probabilities(images).float()
    return torch.sigmoid(model(images).float())


def predict_images(model: torch.nn.Module, store: Store, indices: np.ndarray, test_strategies: list[str],
                   spec: MaskSpec, config: AuditConfig, device: torch.device) -> dict[str, np.ndarray]:
    """Probabilities (n_images, n_classes) of ``indices`` under each test strategy; one read per batch."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {s: [] for s in test_strategies}
    with torch.no_grad():
        for batch in batches(store, indices, spec, config.predict.batch_size, device,
                             num_workers=config.train.num_workers):
            for strategy in test_strategies:
                out[strategy].append(probabilities(model, batch.masked(strategy, spec)).cpu().numpy())
            active().step(len(batch.index))  # the stage's display counts images scored
    n_classes = model.n_classes
    return {s: np.concatenate(p) if p else np.zeros((0, n_classes), np.float32) for s, p in out.items()}


def predict_parts(model: torch.nn.Module, store: Store, indices: np.ndarray, test_strategies: list[str],
                  spec: MaskSpec, config: AuditConfig,
                  device: torch.device) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """:func:`predict_images` over the images each strategy applies to: (indices, probabilities) per part.

    One part when every image has its masks; else ``full`` on all of them and the masked
    strategies on those with masks (an external set with images that lack a usable mask).
    """
    masked = store.masked[indices]
    others = [s for s in test_strategies if s != "full"]
    if masked.all() or not others:
        return [(indices, predict_images(model, store, indices, test_strategies, spec, config, device))]
    parts = []
    if "full" in test_strategies:
        parts.append((indices, predict_images(model, store, indices, ["full"], spec, config, device)))
    if masked.any():
        parts.append((indices[masked], predict_images(model, store, indices[masked], others, spec, config, device)))
    return parts


def long_table(probs: dict[str, np.ndarray], store: Store, indices: np.ndarray, classes: list[str],
               dataset: str, split: str, train_strategy: str, fold: int) -> pd.DataFrame:
    """Turn per-strategy probability matrices (one column per model class) into rows of the long table."""
    image_ids = store.kept["image_id"].to_numpy()[indices]
    missing = np.full(len(indices), np.nan, dtype=np.float32)
    frames = []
    for test_strategy, matrix in probs.items():
        for k, name in enumerate(classes):
            labels = store.labels[indices, store.classes.index(name)] if name in store.classes else missing
            frames.append(pd.DataFrame({
                "dataset": dataset,
                "split": split,
                "train_strategy": train_strategy,
                "fold": fold,
                "test_strategy": test_strategy,
                "image_id": image_ids,
                "class": name,
                "label": labels,
                "probability": matrix[:, k],
            }))
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def scorable_strategies(config: AuditConfig, spec: MaskSpec) -> list[str]:
    """The test strategies a dataset's images can be scored under: all of them, or ``full`` without a ROI."""
    return list(config.eval_strategies) if spec.roi is not None else ["full"]


def load_trained(config: AuditConfig, store: Store, run: RunDir, strategy: str, fold: int,
                 device: torch.device) -> torch.nn.Module:
    """The model trained by job (strategy, fold), in eval mode on ``device``."""
    model = build_model(config.model.model_copy(update={"weights": "none"}), n_classes=len(store.classes),
                        in_channels=store.channels)
    load_checkpoint(model, run.job(strategy, fold) / "model.pt")
    return model.to(device).eval()


def _images_to_score(parts: dict[str, np.ndarray], externals: dict[str, tuple[MaskSpec, Store]],
                     config: AuditConfig) -> int:
    """How many images :func:`predict_job` passes through :func:`predict_images` (for the progress display)."""
    total = sum(len(indices) for indices in parts.values())
    for spec, ext_store in externals.values():
        strategies = scorable_strategies(config, spec)
        masked, others = int(ext_store.masked.sum()), any(s != "full" for s in strategies)
        if masked == ext_store.n or not others:
            total += ext_store.n
        else:  # as predict_parts: full on every image, the masked strategies on those with masks
            total += ext_store.n * ("full" in strategies) + masked
    return total


def predict_job(ctx: Context, strategy: str, fold: int) -> pd.DataFrame:
    """The job's model on the scored images (the hold-out; a probe: or every image), its validation fold (when the
    plan has one) and every external image, each dataset masked by its own :class:`MaskSpec`."""
    config, store, splits = ctx.config, ctx.store, ctx.splits
    device = resolve_device(config.train.device)
    model = ctx.model(strategy, fold, device)
    externals = ctx.external_sets()
    parts = {"test": ctx.scored_images()}
    if config.predict.validation and ctx.plan.validation:
        parts["val"] = splits.val(fold)
    active().steps(_images_to_score(parts, externals, config), "images",
                   note=f"each under {len(config.eval_strategies)} maskings")
    frames = []
    for split, indices in parts.items():
        probs = predict_images(model, store, indices, config.eval_strategies, ctx.masking, config, device)
        frames.append(long_table(probs, store, indices, store.classes, MAIN, split, strategy, fold))
    for name, (spec, ext_store) in externals.items():
        if ext_store.channels != store.channels:
            raise MaskauditError(f"external dataset {name!r} has {ext_store.channels}-channel images, "
                                 f"the models were trained on {store.channels}")
        for indices, probs in predict_parts(model, ext_store, np.arange(ext_store.n),
                                            scorable_strategies(config, spec), spec, config, device):
            frames.append(long_table(probs, ext_store, indices, store.classes, name, "external", strategy, fold))
    table = pd.concat(frames, ignore_index=True)
    table["label"] = table["label"].astype("float32")
    table["probability"] = table["probability"].astype("float32")
    return table
