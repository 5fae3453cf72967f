"""Every random number of a run flows from the config's one seed, through named streams."""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, *parts: str | int) -> int:
    """A 63-bit seed for the stream named by ``parts`` (e.g. ``("train", "no_roi", 3, "epoch", 7)``).

    Stable across processes and Python versions (no ``hash()``), independent streams per name.
    """
    words = [seed & 0xFFFFFFFF] + [zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, *parts: str | int) -> torch.Generator:
    """A CPU generator for the named stream."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
