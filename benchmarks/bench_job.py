"""Training at the study's settings: a study-style pipeline against maskaudit, one job and the grid of 5 folds.

Run: ``python benchmarks/bench_job.py [--epochs 3] [--folds 5] [--size 64] [--arch resnet18] [--strategy no_roi]
[--data DIR]``; ``--quick``: 1 epoch, 2 folds, small_cnn (about 2 minutes here). Data: the 182 real chest X-rays and
lung masks of ``../shared/data/cxr_covid_ieee8023`` (label ``covid``), one maskaudit run directory (prepared store,
patient-grouped hold-out and folds) whose splits both pipelines use. The study's settings: batch 2, fp32, Adam at
1e-4, BCE, no augmentation here (in neither pipeline), a validation pass each epoch, every epoch run (patience
larger than the epochs), the same initial weights (each job's seed).

(a) The study-style pipeline, written here as the study's code works: a torch ``Dataset`` that, for every sample
    of every epoch, decodes the image PNG and its mask PNG, resizes both with padding, masks with OpenCV
    (``benchmarks/bench_loading.py``'s :class:`DecodingDataset`), a ``DataLoader`` without shuffling, PyTorch's
    default Adam (a loop over the parameter tensors on the CPU), the jobs one after the other.
(b) maskaudit at the same settings: ``Audit.train`` on the local executor (jobs one after the other): the store
    read per batch, masking on tensors, shuffled batches, the fused Adam (:func:`maskaudit.train.adam`).
(c) maskaudit at batch 2 with the grid packed: ``local.jobs: 2``, two jobs at once in processes of their own
    sharing the cores (one torch thread each while both run, both for the last one alone; on a GPU:
    ``local.jobs: 4`` runs four on it); each job is the same job.
(d) one job at maskaudit's fast settings for a CPU: batch 16, the learning rate scaled by sqrt(16 / 2).
(e) (not with ``--quick``) the grid packed on Ray: ``executor: ray`` with ``ray.num_cpus: 1`` on a Ray started
    before the clock (a cluster is up before its jobs), two jobs at once.

Prints, per way: seconds of training, training images/s and the mean test AUC of its folds (each fold's kept
weights on the hold-out set under the strategy), one job's ratio (a)/(b), and the grid's ratio (a)/(c) as the last
line: ``bench_job: <ratio>x`` (the target: 2 or more, with the test AUCs within noise).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
try:
    import maskaudit  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from bench_loading import DecodingDataset  # noqa: E402

from maskaudit.config import config_from_dict  # noqa: E402
from maskaudit.loader import resolve_device  # noqa: E402
from maskaudit.models import build_model  # noqa: E402
from maskaudit.pipeline import Audit  # noqa: E402
from maskaudit.predict import predict_images  # noqa: E402
from maskaudit.seeds import derive_seed  # noqa: E402
from maskaudit.stats import class_auc  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr_covid_ieee8023"


def audit_config(args: argparse.Namespace, **train: object) -> dict:
    """The audit of the benchmark: one strategy, its folds, the study's training settings (``train`` overrides)."""
    return {
        "data": {"source": "folder", "labels_csv": str(args.data / "labels.csv"), "id_column": "image_id",
                 "patient_column": "patient_id", "classes": ["covid"]},
        "image_size": args.size, "strategies": [args.strategy], "test_strategies": [args.strategy],
        "folds": args.folds, "seed": 0, "workers": 1,
        "model": {"arch": args.arch, "weights": "none", "freeze": "none"},
        "train": {"epochs": args.epochs, "batch_size": 2, "lr": 1e-4, "patience": args.epochs + 1,
                  "augment": False, "device": "cpu", **train},
        "analyses": {"run": []},
    }  # fmt: skip


# ------------------------------------------------------------------------------ (a) the study-style pipeline


def study_job(audit: Audit, fold: int, args: argparse.Namespace) -> tuple[float, float, int]:
    """One job as the study's code trains it; (seconds, test AUC, training images)."""
    ctx = audit.context("train")
    config, store, splits = audit.config, ctx.store, ctx.splits
    files = store.kept.reset_index(drop=True)
    root = args.data

    def dataset(indices: np.ndarray) -> DecodingDataset:
        rows = files.iloc[indices]
        return DecodingDataset([root / "images" / Path(p).name for p in rows["source_path"]],
                               [root / "masks" / Path(p).name for p in rows["source_path"]],
                               store.labels[indices], config.image_size, args.strategy, 0)

    train_idx, val_idx = splits.train(fold), splits.val(fold)
    torch.manual_seed(derive_seed(config.seed, "train", args.strategy, fold))  # maskaudit's job seed: same weights
    model = build_model(config.model, n_classes=1, in_channels=1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    train_data = DataLoader(dataset(train_idx), batch_size=2, shuffle=False)
    val_data = DataLoader(dataset(val_idx), batch_size=config.predict.batch_size, shuffle=False)
    best, best_state = math.inf, None
    started = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for x, y in train_data:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = sum(float(loss_fn(model(x), y)) * len(y) for x, y in val_data) / len(val_idx)
        if val_loss < best:
            best, best_state = val_loss, copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(x)) for x, _ in DataLoader(dataset(splits.test), batch_size=32)])
    return seconds, class_auc(store.labels[splits.test, 0], probs[:, 0].numpy())[0], len(train_idx)


# ------------------------------------------------------------------------------------------------ maskaudit


def maskaudit_grid(root: Path, config: dict, folds: list[int]) -> tuple[float, list[float], int]:
    """Prepare and split (untimed: the store is made once per dataset), then time the train stage; (seconds, test
    AUC per fold, training images)."""
    audit = Audit.create(root, config_from_dict(config, origin="bench_job"))
    audit.prepare()
    audit.split()
    ctx = audit.context("train")
    strategy = audit.config.strategies[0]
    jobs = [(strategy, k) for k in folds]
    started = time.perf_counter()
    audit.train(only=jobs)
    seconds = time.perf_counter() - started
    device = resolve_device("cpu")
    aucs = []
    for _, k in jobs:
        model = audit.load_model(ctx.store, strategy, k, device)
        probs = predict_images([model], ctx.store, ctx.splits.test, [strategy], ctx.masking, audit.config, device)
        aucs.append(class_auc(ctx.store.labels[ctx.splits.test, 0], probs[0][strategy][:, 0])[0])
    return seconds, aucs, sum(len(ctx.splits.train(k)) for k in folds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2 folds, small_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--strategy", default="no_roi", choices=["no_roi", "only_roi"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.folds, args.arch = 1, 2, "small_cnn"
    cv2.setNumThreads(1)
    os.environ.setdefault("MASKAUDIT_PROGRESS", "off")
    folds = list(range(args.folds))
    with tempfile.TemporaryDirectory(prefix="bench_job_") as tmp:
        tmp = Path(tmp)
        b_seconds, b_aucs, images = maskaudit_grid(tmp / "b", audit_config(args), folds)
        audit = Audit.open(tmp / "b")
        study = [study_job(audit, k, args) for k in folds]
        a_seconds, a_aucs = sum(s for s, _, _ in study), [auc for _, auc, _ in study]
        c_seconds, c_aucs, _ = maskaudit_grid(tmp / "c", {**audit_config(args), "local": {"jobs": 2}}, folds)
        d_seconds, d_aucs, d_images = maskaudit_grid(tmp / "d", audit_config(args, batch_size=16,
                                                                             lr=1e-4 * math.sqrt(8)), folds[:1])
        rows = [("(a) study-style, jobs one after the other", a_seconds, images, a_aucs),
                ("(b) maskaudit, local executor", b_seconds, images, b_aucs),
                ("(c) maskaudit, local.jobs: 2 (2 jobs at once)", c_seconds, images, c_aucs),
                ("(d) maskaudit, one job, batch 16", d_seconds, d_images, d_aucs)]
        if not args.quick:
            import ray

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
            try:
                e_seconds, e_aucs, _ = maskaudit_grid(tmp / "e", {**audit_config(args), "executor": "ray",
                                                                  "ray": {"num_cpus": 1}}, folds)
            finally:
                ray.shutdown()
            rows.append(("(e) maskaudit on Ray, ray.num_cpus: 1 (2 jobs at once)", e_seconds, images, e_aucs))
    print(f"{args.arch} at {args.size} px, strategy {args.strategy}, {args.folds} folds × {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads; training images per grid: {images * args.epochs}")
    print(f"  {'':<56} {'seconds':>8} {'img/s':>7}  mean test AUC (folds)")
    for name, seconds, n, aucs in rows:
        print(f"  {name:<56} {seconds:>8.1f} {n * args.epochs / seconds:>7.1f}  {np.mean(aucs):.3f} "
              f"({', '.join(f'{a:.3f}' for a in aucs)})")
    print(f"  one job at the study's settings, (a) over (b): {a_seconds / len(folds):.1f} s against "
          f"{b_seconds / len(folds):.1f} s a job, {a_seconds / b_seconds:.2f}x")
    print(f"bench_job: {a_seconds / c_seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
