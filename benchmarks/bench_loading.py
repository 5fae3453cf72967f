"""Delivering masked training batches: the prepared store against decoding every file every epoch.

ARCHITECTURE.md: images are decoded once into a memory-mapped store; training reads only the
store and masks whole batches as tensors. The obvious alternative (and the study's way) is a
torch ``Dataset`` that, for every sample of every epoch, decodes the image file, resizes it with
padding, decodes and resizes the mask, and masks with OpenCV.

Run: ``python benchmarks/bench_loading.py [--size 256] [--batch 16] [--epochs 3] [--strategy no_roi]
[--spread 0] [--threads 1] [--data DIR]``; ``--quick``: one timed epoch and one preparation (1 worker), for a
smoke run. Uses the 182 real X-rays and lung masks of ``../shared/data/cxr_covid_ieee8023`` (beside the
repository). Prints the one-off cost of ``prepare_store`` (images/s with 1 and 2 worker processes), then images/s
of (a) the store and (b) the per-sample decoding, both through a ``DataLoader`` with ``num_workers=0`` and the
same thread count, each after one untimed warm-up epoch, and their ratio. Both ways deliver the same pixels (up
to the store's 8-bit quantisation); the script checks that on one batch. The last line is
``bench_loading: <(a)/(b)>x`` (the target is 20 or more).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
try:
    import maskaudit  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from maskaudit.config import FolderData  # noqa: E402
from maskaudit.data.sources.folder import FolderSource  # noqa: E402
from maskaudit.data.store import Store, prepare_store  # noqa: E402
from maskaudit.loader import batches, mask_spec  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr_covid_ieee8023"
CROSS = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


# ----------------------------------------------------------------------------- (a) the store


def store_batches(store: Store, batch: int, strategy: str, spread: int, generator: torch.Generator):
    """maskaudit's own path (:func:`maskaudit.loader.batches`): slices of the memory maps, masks unpacked and the ROI
    at ``spread`` computed per batch, masking on tensors."""
    spec = mask_spec(store, "roi", spread, "zero", 0)
    for one in batches(store, np.arange(store.n), spec, batch, torch.device("cpu"), generator=generator):
        yield one.masked(strategy, spec), one.labels


# --------------------------------------------------------------- (b) decode every file, every time


def naive_resize_pad(array: np.ndarray, size: int) -> np.ndarray:
    height, width = array.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(array, (new_w, new_h), interpolation=interpolation)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return cv2.copyMakeBorder(
        resized, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, 0
    )


class DecodingDataset(Dataset):
    """Per sample: read the image and the mask, resize both with padding, mask with OpenCV."""

    def __init__(
        self, images: list[Path], masks: list[Path], labels: np.ndarray, size: int, strategy: str, spread: int
    ) -> None:
        if strategy not in ("no_roi", "only_roi"):
            raise SystemExit(f"the per-sample baseline implements no_roi and only_roi, not {strategy}")
        self.images, self.masks, self.labels = images, masks, labels
        self.size, self.strategy, self.spread = size, strategy, spread

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = cv2.imread(str(self.images[i]), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        image = naive_resize_pad(image, self.size)
        image /= max(float(image.max()), 1e-12)
        mask = (
            naive_resize_pad(
                (cv2.imread(str(self.masks[i]), cv2.IMREAD_GRAYSCALE) > 0).astype(np.float32), self.size
            )
            > 0
        )
        mask = mask.astype(np.uint8)
        if self.spread > 0:
            mask = cv2.dilate(mask, CROSS, iterations=self.spread)
        elif self.spread < 0:
            mask = cv2.erode(mask, CROSS, iterations=-self.spread)
        keep = 1 - mask if self.strategy == "no_roi" else mask
        masked = cv2.bitwise_and(image, image, mask=keep)
        return torch.from_numpy(masked)[None], torch.from_numpy(self.labels[i])


# ------------------------------------------------------------------------------------------- main


def images_per_second(batches, n_images: int, epochs: int) -> float:
    for _ in batches(0):  # warm-up epoch (page cache, allocator)
        pass
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for _ in batches(epoch):
            pass
    return n_images * epochs / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed epoch, one preparation (1 worker)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--strategy", default="no_roi")
    parser.add_argument("--spread", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads, the same for both")
    args = parser.parse_args(argv)
    preparations = (("workers=1", 1), ("workers=2 (starts the fork server)", 2), ("workers=2", 2))
    if args.quick:
        args.epochs, preparations = 1, preparations[:1]
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    config = FolderData(
        source="folder",
        labels_csv=args.data / "labels.csv",
        id_column="image_id",
        patient_column="patient_id",
        classes=["covid"],
    )
    source = FolderSource(config)
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as tmp:
        print(
            f"data: {args.data} | S={args.size} batch={args.batch} epochs={args.epochs} "
            f"strategy={args.strategy} spread={args.spread} threads={args.threads} cpus={os.cpu_count()}"
        )
        print("\none-off preparation (prepare_store: decode, resize, pack the masks, write memmaps)")
        store = None
        for label, workers in preparations:
            out = Path(tmp) / f"prepared_{label.split()[0]}_{time.perf_counter_ns()}"
            start = time.perf_counter()
            store = prepare_store(source, out, args.size, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            print(f"  {label:<36} {store.n / seconds:8.1f} images/s  ({store.n} images in {seconds:.2f} s)")
        assert store is not None

        kept = store.kept
        images = [args.data / p for p in kept["source_path"]]
        masks = [args.data / "masks" / Path(p).name for p in kept["source_path"]]
        labels = np.array(kept[["covid"]].to_numpy(dtype=np.float32))  # writable
        naive = DecodingDataset(images, masks, labels, args.size, args.strategy, args.spread)

        def from_store(epoch: int):
            return store_batches(
                store, args.batch, args.strategy, args.spread, torch.Generator().manual_seed(epoch)
            )

        def from_files(epoch: int):
            return DataLoader(
                naive,
                batch_size=args.batch,
                shuffle=True,
                num_workers=0,
                generator=torch.Generator().manual_seed(epoch),
            )

        # the same pixels both ways (up to 8-bit quantisation): compare the first batch of epoch 0
        order = torch.randperm(store.n, generator=torch.Generator().manual_seed(0))[: args.batch]
        a = next(iter(from_store(0)))[0]
        b = torch.stack([naive[int(i)][0] for i in order])
        print(
            f"\nsame batch both ways: max |a - b| = {float((a - b).abs().max()):.4f} "
            f"(8-bit step {1 / 255:.4f})"
        )

        rate_store = images_per_second(from_store, store.n, args.epochs)
        rate_files = images_per_second(from_files, store.n, args.epochs)
        print("\nmasked training batches (DataLoader, num_workers=0)")
        print(f"  (a) prepared store + batched tensor masking {rate_store:10.1f} images/s")
        print(f"  (b) decode + resize + OpenCV mask per sample {rate_files:9.1f} images/s")
    print(f"bench_loading: {rate_store / rate_files:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
