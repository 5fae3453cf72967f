"""The GPU check (issue 15, part 5): what one GPU does at the study's scale, measured, in one table.

Run on a CUDA machine through ``benchmarks/gpu_check.sh`` (which runs the CUDA-only tests first), or alone:
``python benchmarks/gpu_check.py [--quick] [--device cuda] [--images 512]``. Each row is timed after untimed
warm-up steps, with ``torch.cuda.synchronize()`` around the clock on CUDA:

1. DenseNet-121 at 512 px, training steps (forward, BCE loss, backward, Adam step), images/s: the study's setting
   (batch 2, fp32, ``freeze: study``), alone and as 4 such jobs at once, each its own process (what
   ``local.jobs: 4`` or ``ray.num_gpus: 0.25`` does; their summed images/s), then batch 32 and 64 with AMP (bf16
   where the GPU supports it, else fp16) and channels_last, ``freeze: none``.
2. The loader: images/s of :func:`maskaudit.loader.batches` from a 512-px prepared store of synthetic chest
   X-rays (lungs and heart), batch 32, with 0, 4 and 8 worker processes.
3. Masking and augmentation on the device: images/s of ``no_roi_bbox`` masking plus the study's augmentation
   (rotation 10°, flip, brightness) on batches of 64 already on the GPU.
4. Prediction: images·models/s of :func:`maskaudit.predict.predict_images` (every test strategy of a batch read
   once) for one DenseNet-121 under AMP.
5. SHAP Partition at the study's settings (``max_evals=1000``, ``batch_size=50``): seconds per image.

``--quick`` shrinks everything (64 px, few steps, small_cnn instead of DenseNet-121 for the training rows) so
that the script itself can be smoke-tested on a CPU; its numbers then mean nothing. The last line is
``gpu_check: <training img/s at batch 64 AMP> img/s``; ``--json FILE`` also writes the rates for
``benchmarks/projection.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
try:
    import maskaudit  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from maskaudit.analyses.explain import explain  # noqa: E402
from maskaudit.augment import augment_batch  # noqa: E402
from maskaudit.config import AugmentConfig, ModelConfig, config_from_dict  # noqa: E402
from maskaudit.data.sources.synthetic import SyntheticSource  # noqa: E402
from maskaudit.data.store import prepare_store  # noqa: E402
from maskaudit.loader import batches, mask_spec  # noqa: E402
from maskaudit.masking import apply_strategy  # noqa: E402
from maskaudit.models import build_model  # noqa: E402
from maskaudit.predict import predict_images  # noqa: E402
from maskaudit.train import amp_dtype  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], int], device: torch.device, warmup: int, repeats: int) -> float:
    """Items per second of ``step`` (which returns how many items it processed), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    started, items = time.perf_counter(), 0
    for _ in range(repeats):
        items += step()
    _sync(device)
    return items / (time.perf_counter() - started)


def training_rate(arch: str, freeze: str, batch: int, size: int, amp: bool, device: torch.device, warmup: int,
                  repeats: int) -> float:
    """Training images/s of one model: forward, BCE, backward, Adam, on random images (the loader is row 2)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, weights="none", freeze=freeze), n_classes=4, in_channels=1).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)
    loss_fn = nn.BCEWithLogitsLoss()
    images = torch.rand(batch, 1, size, size, device=device)
    if amp:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(batch, 4, device=device) > 0.5).float()
    model.train()

    def step() -> int:
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            loss = loss_fn(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return batch

    return timed(step, device, warmup, repeats)


def _packed_rate(args: tuple) -> float:
    """One of the packed jobs (a spawned process): its training images/s, timed after the others are ready."""
    barrier, arch, size, device, warmup, repeats = args
    barrier.wait()
    return training_rate(arch, "study", 2, size, False, torch.device(device), warmup, repeats)


def packed_training_rate(jobs: int, arch: str, size: int, device: torch.device, warmup: int, repeats: int) -> float:
    """Training images/s of ``jobs`` batch-2 jobs at once on one device, each its own process (as Ray's fractional
    ``local.jobs`` and Ray's fractional ``ray.num_gpus`` place them): the sum of their rates, started together."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(jobs) as pool:
        barrier = manager.Barrier(jobs)
        return sum(pool.map(_packed_rate, [(barrier, arch, size, str(device), warmup, repeats)] * jobs))


def make_store(root: Path, n_images: int, size: int):
    """A prepared store of ``n_images`` synthetic chest X-rays at ``size`` px with lungs and heart."""
    config = config_from_dict({
        "data": {"source": "synthetic", "kind": "cxr", "n_patients": n_images, "images_per_patient": [1, 1],
                 "classes": {"opacity": {"signal": "roi"}, "device": {"signal": "outside"},
                             "cardiomegaly": {"signal": "shape"}, "scanner": {"signal": "global"}}},
        "image_size": size,
    }, origin="gpu_check")
    source = SyntheticSource.from_config(config)
    return prepare_store(source, root, size, workers=0, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to smoke-test the script on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=512, help="images in the 512-px store (loader, prediction)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the rates here, for benchmarks/projection.py")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick
    size = 64 if quick else 512
    arch = "small_cnn" if quick else "densenet121"
    warmup, repeats = (1, 2) if quick else (3, 10)
    n_images = 32 if quick else args.images
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    rows: list[tuple[str, str]] = []
    rates: dict[str, float] = {"image_size": size}

    def row(label: str, value: float, unit: str, key: str | None = None) -> None:
        rows.append((label, f"{value:,.1f} {unit}"))
        print(f"{label}: {value:,.1f} {unit}", flush=True)
        if key:
            rates[key] = value

    row(f"{arch} {size} px training, batch 2, fp32, freeze study",
        training_rate(arch, "study", 2, size, False, device, warmup, repeats), "img/s", "train_batch2")
    packed = 2 if quick else 4
    row(f"{arch} {size} px training, batch 2, fp32, freeze study, {packed} jobs at once (one process each; "
        f"local.jobs: {packed} or ray.num_gpus: {1 / packed:g})",
        packed_training_rate(packed, arch, size, device, warmup, repeats), "img/s", "train_batch2_packed")
    rates["packed_jobs"] = packed
    best = 0.0
    for batch in (32, 64):
        rate = training_rate(arch, "none", batch if not quick else 8, size, True, device, warmup, repeats)
        best = rate
        row(f"{arch} {size} px training, batch {batch if not quick else 8}, AMP {str(amp_dtype(device))[6:]} + "
            "channels_last, freeze none", rate, "img/s", f"train_amp_batch{batch}")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        store = make_store(Path(tmp) / "store", n_images, size)
        row(f"preparing a {size}-px store ({n_images} synthetic images, lungs + heart, 1 process)",
            n_images / (time.perf_counter() - started), "img/s")
        spec = mask_spec(store, "lungs", 0, "zero", 0)
        indices = np.arange(store.n)
        for workers in (0, 4, 8) if not quick else (0,):
            def read(workers: int = workers) -> int:
                count = 0
                for batch in batches(store, indices, spec, 32, device, num_workers=workers):
                    count += len(batch.index)
                _sync(device)
                return count
            row(f"loader, batch 32, {workers} workers", timed(read, device, 1, 2), "img/s")

        batch = next(iter(batches(store, indices[:64], spec, 64, device)))
        generator = torch.Generator().manual_seed(0)
        augment = AugmentConfig(rotation=10, hflip=0.5, brightness=(0.9, 1.05))

        def mask_and_augment() -> int:
            augment_batch(apply_strategy(batch.images, batch.roi, "no_roi_bbox"), augment, generator)
            return len(batch.index)
        row("masking (no_roi_bbox) + augmentation on the device, batch 64", timed(mask_and_augment, device, 2,
                                                                                  repeats), "img/s")

        model = build_model(ModelConfig(arch="densenet121" if not quick else "small_cnn", weights="none",
                                        freeze="none"), n_classes=4, in_channels=1).to(device).eval()
        config = config_from_dict({"data": {"source": "synthetic"}, "image_size": size,
                                   "predict": {"batch_size": 64}}, origin="gpu_check")
        strategies = list(config.eval_strategies)

        def predict() -> int:
            with torch.autocast(device.type, dtype=amp_dtype(device), enabled=device.type == "cuda"):
                predict_images([model], store, indices, strategies, spec, config, device)
            return store.n * len(strategies)
        row(f"prediction, 1 model x {len(strategies)} test maskings, batch 64 (images·maskings/s)",
            timed(predict, device, 1, 1 if quick else 2), "img/s", "predict")

        image = batch.images[:1]
        started = time.perf_counter()
        explain(model, image, 0, "partition", max_evals=100 if quick else 1000, batch_size=50)
        _sync(device)
        row(f"SHAP Partition, max_evals {100 if quick else 1000}, batch_size 50", time.perf_counter() - started,
            "s/image", "shap_seconds")

    print(f"\n| {name} | |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, **rates}, indent=1))
    print(f"\ngpu_check: {best:.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
