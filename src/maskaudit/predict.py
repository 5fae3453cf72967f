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

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

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


def predict_images(models: Sequence[torch.nn.Module], store: Store, indices: np.ndarray, test_strategies: list[str],
                   spec: MaskSpec, config: AuditConfig, device: torch.device) -> list[dict[str, np.ndarray]]:
    """Per model, the probabilities (n_images, n_classes) of ``indices`` under each test strategy.

    Each batch is read from the store once and masked once per strategy; every model scores that same tensor.
    """
    for model in models:
        model.eval()
    out: list[dict[str, list[np.ndarray]]] = [{s: [] for s in test_strategies} for _ in models]
    with torch.no_grad():
        for batch in batches(store, indices, spec, config.predict.batch_size, device,
                             num_workers=config.train.num_workers):
            for strategy in test_strategies:
                x = batch.masked(strategy, spec)
                for scores, model in zip(out, models, strict=True):
                    scores[strategy].append(probabilities(model, x).cpu().numpy())
            active().step(len(batch.index) * len(models))  # the stage's display counts images·models scored
    return [{s: np.concatenate(p) if p else np.zeros((0, model.n_classes), np.float32) for s, p in scores.items()}
            for scores, model in zip(out, models, strict=True)]


def predict_parts(models: Sequence[torch.nn.Module], store: Store, indices: np.ndarray, test_strategies: list[str],
                  spec: MaskSpec, config: AuditConfig,
                  device: torch.device) -> list[tuple[np.ndarray, list[dict[str, np.ndarray]]]]:
    """:func:`predict_images` over the images each strategy applies to: (indices, per-model probabilities) per part.

    One part when every image has its masks; else ``full`` on all of them and the masked
    strategies on those with masks (an external set with images that lack a usable mask).
    """
    masked = store.masked[indices]
    others = [s for s in test_strategies if s != "full"]
    if masked.all() or not others:
        return [(indices, predict_images(models, store, indices, test_strategies, spec, config, device))]
    parts = []
    if "full" in test_strategies:
        parts.append((indices, predict_images(models, store, indices, ["full"], spec, config, device)))
    if masked.any():
        parts.append((indices[masked], predict_images(models, store, indices[masked], others, spec, config, device)))
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
    """How many images one job's predictions pass through :func:`predict_images` (for the progress display)."""
    total = sum(len(indices) for indices in parts.values())
    for spec, ext_store in externals.values():
        strategies = scorable_strategies(config, spec)
        masked, others = int(ext_store.masked.sum()), any(s != "full" for s in strategies)
        if masked == ext_store.n or not others:
            total += ext_store.n
        else:  # as predict_parts: full on every image, the masked strategies on those with masks
            total += ext_store.n * ("full" in strategies) + masked
    return total


def memory_budget(device: torch.device) -> int:
    """Bytes of the device's memory the models scored together may take: half of what is free now (CUDA:
    ``torch.cuda.mem_get_info``; the CPU: ``MemAvailable`` of ``/proc/meminfo``, else the free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def model_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


Job = tuple[str, int]


def loaded_groups(ctx: Context, jobs: Sequence[Job], device: torch.device,
                  at_once: int = 0) -> Iterator[dict[Job, torch.nn.Module]]:
    """The jobs' models, loaded on ``device`` as many at a time as fit its :func:`memory_budget` (at most ``at_once``
    when it is not 0; always at least one): each group is scored on one read of the images."""
    budget, group, used = memory_budget(device), {}, 0
    for job in jobs:
        model = ctx.model(*job, device)
        size = model_bytes(model)
        if group and ((at_once and len(group) >= at_once) or used + size > budget):
            yield group
            group, used = {}, 0
        group[job] = model
        used += size
    if group:
        yield group


def predict_jobs(ctx: Context, jobs: Sequence[Job]) -> Iterator[tuple[Job, pd.DataFrame]]:
    """Each job's model on the scored images (the hold-out; a probe: or every image), its validation fold (when the
    plan has one) and every external image, each dataset masked by its own :class:`MaskSpec`.

    The models are loaded in groups (:func:`loaded_groups`, ``predict.models`` at once, 0: as many as fit); a group
    reads each batch of the scored images and of every external set once, and the validation fold once for the
    models of that fold, instead of once per model. Yields (job, its table) as each group ends, so that a killed
    stage keeps the groups it finished. Every job's rows are those it would have alone: the same batches, the same
    tensors.
    """
    config, store, splits = ctx.config, ctx.store, ctx.splits
    device = resolve_device(config.train.device)
    externals = ctx.external_sets()
    for name, (_, ext_store) in externals.items():
        if ext_store.channels != store.channels:
            raise MaskauditError(f"external dataset {name!r} has {ext_store.channels}-channel images, "
                                 f"the models were trained on {store.channels}")
    scored = ctx.scored_images()
    validation = config.predict.validation and ctx.plan.validation
    to_score = sum(_images_to_score({"test": scored, **({"val": splits.val(k)} if validation else {})}, externals,
                                    config) for _, k in jobs)
    active().steps(to_score, "images·models",
                   note=f"{len(jobs)} model{'s' if len(jobs) != 1 else ''}, each image under "
                        f"{len(config.eval_strategies)} maskings")
    for group in loaded_groups(ctx, jobs, device, config.predict.models):
        names, models = list(group), list(group.values())
        frames: dict[Job, list[pd.DataFrame]] = {job: [] for job in names}
        for job, probs in zip(names, predict_images(models, store, scored, config.eval_strategies, ctx.masking,
                                                    config, device), strict=True):
            frames[job].append(long_table(probs, store, scored, store.classes, MAIN, "test", *job))
        if validation:
            for fold in sorted({k for _, k in names}):
                members = [job for job in names if job[1] == fold]
                val = splits.val(fold)
                for job, probs in zip(members, predict_images([group[j] for j in members], store, val,
                                                              config.eval_strategies, ctx.masking, config, device),
                                      strict=True):
                    frames[job].append(long_table(probs, store, val, store.classes, MAIN, "val", *job))
        for name, (spec, ext_store) in externals.items():
            for indices, per_model in predict_parts(models, ext_store, np.arange(ext_store.n),
                                                    scorable_strategies(config, spec), spec, config, device):
                for job, probs in zip(names, per_model, strict=True):
                    frames[job].append(long_table(probs, ext_store, indices, store.classes, name, "external", *job))
        for job in names:
            table = pd.concat(frames[job], ignore_index=True)
            table["label"] = table["label"].astype("float32")
            table["probability"] = table["probability"].astype("float32")
            yield job, table
        del group, models
