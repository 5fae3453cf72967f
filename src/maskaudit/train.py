"""One job: a model trained under one masking strategy on one fold (SPEC §4).

Adam (fused: :func:`adam`), ``BCEWithLogitsLoss``, early stopping on the validation loss (the counter grows while
``val_loss + min_delta > best``; the weights of the best validation loss are kept), or with
``train.monitor: val_auc`` on the mean validation AUC over the classes, and never before
``train.min_epochs``; ``job.json`` also keeps each class's best validation AUC and its epoch. Batches
are shuffled from the job's seed, masked, then augmented. After every epoch the job saves
its whole state (``last.pt``), so a killed job resumes at the next epoch and ends with the
same weights as an uninterrupted one: every epoch's randomness is drawn from a stream
named by (seed, strategy, fold, epoch), not from a state carried across epochs.

Each epoch is one line of the log file (``no_roi fold 2 epoch 5/250: train loss 0.3736, val loss
0.3730 (best so far, saved as model.pt)``, or ``(best 0.3650 at epoch 3; 2/25 epochs without an
improvement of more than 0.001)``: the early-stopping count), kept off the console while a stage
display is on (see :mod:`maskaudit.progress`); one step of the stage's display; and a rewrite of
``history.csv``, so that ``maskaudit status`` sees a running job's epochs without its checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from maskaudit.augment import augment_batch
from maskaudit.config import AuditConfig, TrainConfig
from maskaudit.data.splits import Splits
from maskaudit.data.store import Store
from maskaudit.loader import batches, resolve_device
from maskaudit.models import Classifier, build_model
from maskaudit.processes import keep_freed_memory
from maskaudit.progress import DETAIL, active
from maskaudit.rundir import atomic_path, read_json, write_json
from maskaudit.seeds import derive_seed, torch_generator
from maskaudit.stats import auc_ci, class_auc
from maskaudit.strategies import MaskSpec

log = logging.getLogger(__name__)

#: ``history.csv``'s column prefix of each class's DeLong variance of the validation AUC, per epoch: with it, whether a
#: model ever rose above chance on a class is read at any confidence level (:func:`maskaudit.metrics.training_table`)
VAL_VARIANCE = "val_auc_variance_"


@dataclass
class EarlyStopping:
    """The study's rule: stop after ``patience`` epochs without an improvement of more than ``min_delta``.

    ``higher``: the monitored value improves upwards (a validation AUC), else downwards (the study's validation
    loss). It never stops before ``min_epochs`` epochs have run (the study: 0). An epoch whose value is NaN (no AUC
    can be computed) is never an improvement.
    """

    patience: int
    min_delta: float
    best: float = math.inf
    best_epoch: int = -1
    counter: int = 0
    higher: bool = False
    min_epochs: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.higher and self.best == math.inf:
            self.best = -math.inf

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch; True when it is the new best (its weights are to be kept)."""
        self.seen = epoch + 1
        better = (value - self.min_delta > self.best) if self.higher else (value + self.min_delta <= self.best)
        if math.isnan(value) or not better:
            self.counter += 1
            return False
        self.best, self.best_epoch, self.counter = value, epoch, 0
        return True

    @property
    def stop(self) -> bool:
        return self.counter >= self.patience and self.seen >= self.min_epochs


@dataclass
class JobState:
    """Everything needed to continue a job after its last finished epoch."""

    epoch: int = 0
    stopper: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _evaluate(model: Classifier, store: Store, indices: np.ndarray, strategy: str, spec: MaskSpec, config: AuditConfig,
              device: torch.device, loss_fn: nn.Module, amp: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, probabilities and labels of ``indices`` under ``strategy`` (no augmentation)."""
    model.eval()
    total, probs, labels = 0.0, [], []
    with torch.no_grad(), _autocast(device, amp):
        for batch in batches(store, indices, spec, config.predict.batch_size, device,
                             num_workers=config.train.num_workers):
            logits = model(batch.masked(strategy, spec)).float()
            total += float(loss_fn(logits, batch.labels).sum())
            probs.append(torch.sigmoid(logits).cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
    n_values = max(1, len(indices) * store.labels.shape[1])
    return total / n_values, np.concatenate(probs), np.concatenate(labels)


def adam(params: list[nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """The study's optimiser (Adam, PyTorch's defaults but the learning rate) with its fused kernel: one kernel updates
    every parameter, instead of a loop of a few small kernels per parameter tensor, which at the study's batch of 2
    costs as much as the backward pass (``benchmarks/bench_job.py``). The same update up to floating-point rounding
    (https://pytorch.org/docs/stable/generated/torch.optim.Adam.html: ``fused``, CPU and CUDA since PyTorch 2.4)."""
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def amp_dtype(device: torch.device) -> torch.dtype:
    """Mixed precision's type on ``device``: bfloat16 where the GPU computes in it (Ampere and later: fp32's range, so
    no loss scaling), else float16 with :class:`torch.amp.GradScaler`."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp and device.type == "cuda")


def train_job(config: AuditConfig, store: Store, splits: Splits, spec: MaskSpec, strategy: str, fold: int,
              job_dir: Path, fingerprint: str, *, start: nn.Module | None = None, settings: TrainConfig | None = None,
              masking: str | None = None) -> dict:
    """Train the model of (``strategy``, ``fold``) into ``job_dir``; returns the job summary.

    Files: ``model.pt`` (best weights), ``history.csv`` (per epoch: losses, per-class AUC),
    ``tb/`` (TensorBoard), ``job.json`` (written last: the summary and ``fingerprint``).

    The probe's adapted jobs (:mod:`maskaudit.adapt`) give three more: ``start``, the model to train instead of
    ``config.model``'s (its weights are where training starts, its ``requires_grad`` says what is trained; it takes
    [0, 1] images and returns logits); ``settings``, the training settings instead of ``config.train``; ``masking``,
    the strategy the images are masked with when the job's name ``strategy`` is not one (``m+only_roi``).
    """
    from torch.utils.tensorboard import SummaryWriter

    started = time.perf_counter()
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        keep_freed_memory()  # a step's tensors reuse the last step's memory, not new pages (about 1.25x a step)
    classes = store.classes
    train_idx, val_idx = splits.train(fold), splits.val(fold)
    job_seed = derive_seed(config.seed, "train", strategy, fold)
    torch.manual_seed(job_seed)
    t = settings if settings is not None else config.train
    masking = masking or strategy
    model = (start if start is not None else
             build_model(config.model, n_classes=len(classes), in_channels=store.channels)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, t.lr, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms for the job's fixed input size
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp and device.type == "cuda"
                                  and amp_dtype(device) == torch.float16)
    forward = torch.compile(model) if t.compile else model  # the same module's weights: model.state_dict() as ever
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    stopper = EarlyStopping(t.patience, t.min_delta, higher=t.monitor == "val_auc", min_epochs=t.min_epochs)
    state = JobState()

    last = job_dir / "last.pt"
    if last.is_file():
        saved = torch.load(last, map_location=device, weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state = JobState(epoch=saved["epoch"], stopper=saved["stopper"], history=saved["history"])
            stopper = EarlyStopping(**state.stopper)
            log.info("%s fold %d: resuming after epoch %d", strategy, fold, state.epoch)
    writer = SummaryWriter(str(job_dir / "tb"), purge_step=state.epoch)
    shown = active()
    shown.steps(t.epochs, "epochs", done=state.epoch, exact=False)  # early stopping may end it sooner

    for epoch in range(state.epoch, t.epochs):
        if stopper.stop:
            break
        model.train()
        shuffle = torch_generator(config.seed, "shuffle", strategy, fold, epoch)
        augment = torch_generator(config.seed, "augment", strategy, fold, epoch)
        train_loss, seen = 0.0, 0
        for batch in batches(store, train_idx, spec, t.batch_size, device,
                             generator=shuffle, num_workers=config.train.num_workers):
            x = augment_batch(batch.masked(masking, spec), t.augment, augment)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, t.amp):
                loss = loss_fn(forward(x).float(), batch.labels).mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            train_loss += float(loss.detach()) * len(batch.index)
            seen += len(batch.index)
        val_loss, probs, labels = _evaluate(model, store, val_idx, masking, spec, config, device, loss_fn, t.amp)
        row = {"epoch": epoch, "train_loss": train_loss / max(seen, 1), "val_loss": val_loss}
        for k, name in enumerate(classes):
            row[f"val_auc_{name}"] = class_auc(labels[:, k], probs[:, k])[0]
        for k, name in enumerate(classes):  # after the AUCs: history.csv's columns keep their order
            row[f"{VAL_VARIANCE}{name}"] = auc_ci(labels[:, k], probs[:, k]).variance
        aucs = [row[f"val_auc_{name}"] for name in classes]
        mean_auc = float(np.nanmean(aucs)) if not all(math.isnan(a) for a in aucs) else math.nan
        improved = stopper.step(val_loss if t.monitor == "val_loss" else mean_auc, epoch)
        named = "" if t.monitor == "val_loss" else "AUC "  # what the early-stopping numbers are
        row["best"] = improved
        state.history.append(row)
        for key, value in row.items():
            if key not in ("epoch", "best") and not key.startswith(VAL_VARIANCE) \
                    and not (isinstance(value, float) and math.isnan(value)):
                writer.add_scalar(key.replace("val_auc_", "val_auc/"), value, epoch)
        if improved:
            save_checkpoint(model.state_dict(), job_dir / "model.pt")
        save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "stopper": asdict(stopper), "history": state.history}, last)
        _write_history(job_dir, state.history)
        if improved:
            standing = "best so far, saved as model.pt"
        else:
            standing = (f"best {named}{stopper.best:.4f} at epoch {stopper.best_epoch + 1}; {stopper.counter}/"
                        f"{stopper.patience} epochs without an improvement of more than {stopper.min_delta:g}")
        log.info("%s fold %d epoch %d/%d: train loss %.4f, val loss %.4f (%s)", strategy, fold, epoch + 1,
                 t.epochs, row["train_loss"], val_loss, standing, extra=DETAIL)
        shown.step(note=f"improved: val {named}{stopper.best:.4f}" if improved else
                   f"best val {named}{stopper.best:.4f} (epoch {stopper.best_epoch + 1})")
    writer.close()

    history = _write_history(job_dir, state.history)
    summary = {
        "strategy": strategy,
        "fold": fold,
        "fingerprint": fingerprint,
        "seed": job_seed,
        "epochs_run": len(history),
        "best_epoch": stopper.best_epoch,
        "monitor": t.monitor,
        "best_monitored": stopper.best,
        "best_val_loss": state.history[stopper.best_epoch - state.history[0]["epoch"]]["val_loss"]
        if stopper.best_epoch >= 0 else math.nan,
        "best_val_auc": best_val_aucs(history, classes),
        "stopped_early": stopper.stop,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "trainable_parameters": int(sum(p.numel() for p in params)),
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(job_dir / "job.json", summary)
    last.unlink(missing_ok=True)
    return summary


#: what a checkpoint takes beyond its tensors' bytes, at most: zip records and pickled structure, and per tensor
CHECKPOINT_OVERHEAD, TENSOR_OVERHEAD = 64 << 10, 1 << 10


def _checkpoint_bytes(obj: object) -> int:
    """At most what ``torch.save`` writes for a (nested) checkpoint object: its tensors' bytes and the overheads."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() + TENSOR_OVERHEAD
    if isinstance(obj, dict):
        return sum(_checkpoint_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_checkpoint_bytes(v) for v in obj)
    return 0


def save_checkpoint(obj: object, path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, flushed to disk, then renamed into place.

    Its size is known up front (its tensors' bytes plus the overheads) and checked against the free
    space; a full, read-only or over-quota disk (``torch.save`` says only ``unexpected pos …``) raises the one-line
    :class:`~maskaudit.errors.DiskError` of :func:`~maskaudit.rundir.atomic_path`, and ``path`` keeps its previous
    epoch's content, so the same command, with space freed, resumes after that epoch.
    """
    with atomic_path(path, needed=_checkpoint_bytes(obj) + CHECKPOINT_OVERHEAD) as tmp:
        with tmp.open("wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())


def best_val_aucs(history: pd.DataFrame, classes: list[str]) -> dict[str, dict]:
    """Per class, the best validation AUC any epoch reached, that epoch (counted from 0) and the AUC's DeLong variance
    there (None without an AUC): whether a model ever learnt a class, beside the epoch whose weights were kept."""
    out = {}
    for name in classes:
        column = pd.to_numeric(history.get(f"val_auc_{name}", pd.Series(dtype=float)), errors="coerce")
        if column.notna().any():
            at = int(column.idxmax())
            variance = pd.to_numeric(history.get(f"{VAL_VARIANCE}{name}", pd.Series(dtype=float)), errors="coerce")
            var = float(variance[at]) if at in variance.index and math.isfinite(variance[at]) else None
            out[name] = {"auc": float(column[at]), "epoch": int(history["epoch"][at]), "variance": var}
        else:
            out[name] = {"auc": None, "epoch": None, "variance": None}
    return out


def _write_history(job_dir: Path, rows: list[dict]) -> pd.DataFrame:
    """``history.csv``: one row per finished epoch (rewritten after each, read by ``maskaudit status``)."""
    history = pd.DataFrame(rows)
    with atomic_path(job_dir / "history.csv") as tmp:
        history.to_csv(tmp, index=False)
    return history


def job_finished(job_dir: Path, fingerprint: str) -> bool:
    """A job is done when its ``job.json`` carries the same fingerprint and its model exists."""
    meta = job_dir / "job.json"
    return meta.is_file() and (job_dir / "model.pt").is_file() and read_json(meta).get("fingerprint") == fingerprint

