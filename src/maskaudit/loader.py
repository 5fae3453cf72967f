"""Batches of masked images from the prepared store, for training and prediction.

Workers only slice the memory-mapped store (integers: pixels and bit-packed masks); the
conversion to float, the unpacking of the masks, the ROI at the run's spread (a distance map computed
for the batch when the spread is not 0) and the masking strategy happen on the device, on the whole
batch (SPEC §2: masking before augmentation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.masking import apply_strategy, distance_map, roi_at_spread
from maskaudit.metrics import MAIN
from maskaudit.processes import take_cores
from maskaudit.seeds import derive_seed
from maskaudit.strategies import MaskSpec


def roi_key(roi: str | None, store: Store, required: bool = True) -> str | None:
    """The ROI a run masks: ``roi`` (the config's: a name or a union ``a+b``) or the store's first ROI.

    ``None`` for data without masks (only ``full`` can be scored there); a ``roi`` the store lacks is an error
    (``required``) or None (an external dataset: its images are then scored under ``full`` alone).
    """
    if not store.rois:
        if roi and required:
            raise MaskauditError(f"roi {roi!r}: this data has no ROI masks")
        return None
    key = roi or store.rois[0]
    unknown = [name for name in key.split("+") if name not in store.rois]
    if unknown:
        if not required:
            return None
        raise MaskauditError(
            f"roi {key!r}: no ROI named {', '.join(map(repr, unknown))}; this data has {', '.join(store.rois)}"
        )
    return key


def mask_spec(store: Store, roi: str | None, spread: int, fill: str, seed: int, dataset: str = MAIN,
              required: bool = True, scale: str = "before_masking") -> MaskSpec:
    """The masking of one dataset, resolved once: the ROI key against its store, the fill's value and noise stream.

    ``spread`` is in pixels at the run's image size; the ``mean`` fill's value is the store's mean intensity; the
    ``noise`` fill's stream is named by the run's seed and the dataset (:func:`maskaudit.seeds.derive_seed`).
    """
    return MaskSpec(roi=roi_key(roi, store, required), spread=int(spread), fill=fill,
                    fill_value=store.mean_intensity, noise_seed=derive_seed(seed, "noise", dataset), scale=scale)


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaskauditError(f"train.device={name!r} but CUDA is not available here; use `auto` or `cpu`")
    return device


@dataclass
class Batch:
    """One batch on the device: raw pixels in [0, 1], the ROI at the run's spread, labels, store indices."""

    images: torch.Tensor  # float (B, C, S, S)
    roi: torch.Tensor | None  # bool (B, 1, S, S); None for data without masks
    labels: torch.Tensor  # float (B, K)
    index: torch.Tensor  # int64 (B,)
    mask: torch.Tensor | None = None  # bool (B, 1, S, S): the ROI as prepared (spread 0)
    _dist: list = field(default_factory=list, repr=False)  # the distance maps, once computed (shared by at_spread)

    @property
    def dist(self) -> torch.Tensor | None:
        """Signed taxicab distance maps of :attr:`mask` (int16 (B, 1, S, S)), computed once per batch; None without
        masks."""
        if self.mask is None:
            return None
        if not self._dist:
            self._dist.append(distance_map(self.mask))
        return self._dist[0]

    def at_spread(self, spread: int) -> Batch:
        """The same images with the ROI at another spread (the dilation sweep): one comparison, no re-read."""
        if self.mask is None:
            raise MaskauditError("this data has no ROI masks, so the ROI has no spread")
        return replace(self, roi=self.mask if spread == 0 else roi_at_spread(self.dist, spread))

    def masked(self, strategy: str, spec: MaskSpec) -> torch.Tensor:
        """The batch as a model trained or tested under ``strategy`` sees it, masked as ``spec`` says."""
        if self.roi is None:
            if strategy != "full":
                raise MaskauditError(f"strategy {strategy!r} needs ROI masks, and this data has none")
            return self.images
        seeds = (self.index + spec.noise_seed) % np.int64(2**62) if spec.fill == "noise" else None
        return apply_strategy(self.images, self.roi, strategy, fill=spec.fill, fill_value=spec.fill_value,
                              noise_seeds=seeds, rescale=spec.scale == "after_masking")


class _StoreRows(Dataset):
    """Rows of the store, fetched a whole batch at a time (``__getitems__``).

    ``unpack``: the masks are unpacked here, with NumPy (``np.unpackbits``, 13× faster than the bitwise AND on
    tensors on a CPU, ``benchmarks/bench_loading.py``), for batches that stay on the CPU; else they travel packed, an
    eighth of the bytes, and are unpacked on the device (:func:`batches`).
    """

    def __init__(self, store: Store, key: str | None, unpack: bool = False) -> None:
        self.store, self.key, self.unpack = store, key, unpack

    def __len__(self) -> int:
        return self.store.n

    def __getitems__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(rows, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # memory maps read fastest in order
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_idx = idx[order]
        images = np.asarray(self.store.images[sorted_idx])[inverse]
        rows = {
            "images": torch.from_numpy(images.astype(np.int32) if images.dtype == np.uint16 else images),
            "labels": torch.from_numpy(self.store.labels[idx]),
            "index": torch.from_numpy(idx),
        }
        if self.key is not None:
            packed = np.asarray(self.store.packed_masks(self.key)[sorted_idx])[inverse]
            if self.unpack:
                rows["roi"] = torch.from_numpy(self.store.unpack(packed)[:, None])
            else:
                rows["mask"] = torch.from_numpy(packed)
        return rows

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:  # pragma: no cover - DataLoader uses __getitems__
        return {k: v[0] for k, v in self.__getitems__([row]).items()}


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def batches(
    store: Store,
    indices: np.ndarray,
    spec: MaskSpec,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Yield the images at ``indices`` in batches, with their ROI at ``spec``'s spread; shuffled when a
    ``generator`` is given. Before each, a job that shares the CPU cores with others running at once takes its
    share of them now (:func:`maskaudit.processes.take_cores`)."""
    indices = np.asarray(indices, dtype=np.int64)
    if generator is not None:
        indices = indices[torch.randperm(len(indices), generator=generator).numpy()]
    chunks = [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    key = spec.roi
    loader = DataLoader(
        _StoreRows(store, key, unpack=device.type == "cpu"),
        batch_sampler=chunks,
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    scale = 1.0 / store.image_max
    bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)  # np.packbits: high first
    size = store.image_size
    for raw in loader:
        take_cores()
        images = raw["images"].to(device, non_blocking=True).float().mul_(scale)
        mask = raw.get("roi")
        if "mask" in raw:
            packed = raw["mask"].to(device, non_blocking=True)
            mask = (packed.unsqueeze(-1) & bits).ne(0).flatten(-2)[..., :size].unsqueeze(1)
        batch = Batch(images=images, roi=mask, labels=raw["labels"].to(device, non_blocking=True), index=raw["index"],
                      mask=mask)
        yield batch.at_spread(spec.spread) if mask is not None and spec.spread != 0 else batch
