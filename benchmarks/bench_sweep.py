"""Dilation sweep cost: one distance map per mask, then ``dist <= k``, against iterated ``cv2.dilate``.

SPEC §2 and §6.4: the sweep spreads the ROI by 0 … 500 iterations of OpenCV's 3x3 cross. The study
dilates with ``cv2.dilate(mask, cross, iterations=k)`` for every spread; maskaudit computes one
signed taxicab distance map per mask and reads every spread off it with one comparison.

Run: ``python benchmarks/bench_sweep.py [--n-masks N] [--repeats R] [--data DIR]``; ``--quick``: 4 masks, 1
timing run each. Uses real lung masks from ``../shared/data/cxr_covid_ieee8023/masks`` (beside the repository),
resized (nearest) to 512x512. Asserts that both ways give identical masks at every spread, then prints per-spread
milliseconds per mask for (a) the distance map (``dist <= k`` in NumPy, and ``roi_at_spread`` on the whole batch
as a torch tensor, divided by the batch size) and (b) OpenCV, with their ratio. The last line is
``bench_sweep: <(b)/(a)>x``: the study's sweep (``SWEEP_SPREADS``) by OpenCV over the same sweep read off the
distance map, the map's cost included.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
try:
    from maskaudit.masking import SWEEP_SPREADS, roi_at_spread, signed_taxicab_distance
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))
    from maskaudit.masking import SWEEP_SPREADS, roi_at_spread, signed_taxicab_distance

DEFAULT_DATA = REPO.parent / "shared" / "data"
SIZE = 512
CROSS = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
#: Beyond the study's sweep: small spreads, in-between ones, beyond 500, and erosions.
EXTRA_SPREADS = (1, 3, 20, 75, 250, 750, -1, -5, -10, -25, -50)


def load_masks(data: Path, n_masks: int) -> list[np.ndarray]:
    """``n_masks`` lung masks spread over the set, resized (nearest) to SIZE x SIZE, as uint8 0/1."""
    paths = sorted((data / "cxr_covid_ieee8023" / "masks").glob("*.png"))
    if not paths:
        raise SystemExit(f"no lung masks under {data / 'cxr_covid_ieee8023' / 'masks'}")
    step = max(1, len(paths) // n_masks)
    masks = []
    for path in paths[::step][:n_masks]:
        mask = (np.asarray(Image.open(path).convert("L")) > 0).astype(np.uint8)
        masks.append(cv2.resize(mask, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST))
    return masks


def opencv_spread(mask: np.ndarray, spread: int) -> np.ndarray:
    """The study's way: ``|spread|`` iterations of the 3x3 cross, dilate (> 0) or erode (< 0)."""
    if spread == 0:
        return mask
    op = cv2.dilate if spread > 0 else cv2.erode
    return op(mask, CROSS, iterations=abs(spread))


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn``, in milliseconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 masks, 1 timing run each")
    parser.add_argument("--n-masks", type=int, default=16, help="lung masks to sweep (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per mask, best kept (default 3)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_masks, args.repeats = 4, 1

    masks = load_masks(args.data, args.n_masks)
    n = len(masks)
    spreads = sorted(set(SWEEP_SPREADS) | set(EXTRA_SPREADS), key=lambda k: (k < 0, abs(k)))
    print(
        f"{n} lung masks from {args.data / 'cxr_covid_ieee8023'} at {SIZE}x{SIZE}; "
        f"OpenCV {cv2.__version__} with {cv2.getNumThreads()} threads, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; best of {args.repeats} per mask"
    )

    dist_ms = [best_ms(lambda m=m: signed_taxicab_distance(m), args.repeats) for m in masks]
    dists = [signed_taxicab_distance(m) for m in masks]
    batch = torch.from_numpy(np.stack(dists))[:, None]
    dist_per_mask = float(np.mean(dist_ms))
    print(f"(a) distance map, once per mask (amortised over the sweep): {dist_per_mask:.3f} ms per mask\n")

    header = f"{'spread':>7} {'(a) dist<=k':>12} {'(a) torch':>10} {'(b) cv2':>10} {'(b)/(a)':>9}"
    print(header + "\n" + "-" * len(header))
    totals = {"numpy": 0.0, "torch": 0.0, "cv2": 0.0}
    study_totals = {"numpy": 0.0, "cv2": 0.0}
    for spread in spreads:
        for mask, dist in zip(masks, dists, strict=True):
            if not np.array_equal(dist <= spread, opencv_spread(mask, spread).astype(bool)):
                raise AssertionError(f"spread {spread}: the distance map and cv2 disagree")
        got = roi_at_spread(batch, spread).numpy()[:, 0]
        expected = np.stack([opencv_spread(m, spread).astype(bool) for m in masks])
        assert np.array_equal(got, expected), f"spread {spread}: roi_at_spread and cv2 disagree"

        a = float(np.mean([best_ms(lambda d=d, k=spread: d <= k, args.repeats) for d in dists]))
        t = best_ms(lambda k=spread: roi_at_spread(batch, k), args.repeats) / n
        b = float(np.mean([best_ms(lambda m=m, k=spread: opencv_spread(m, k), args.repeats) for m in masks]))
        totals["numpy"] += a
        totals["torch"] += t
        totals["cv2"] += b
        if spread in SWEEP_SPREADS:
            study_totals["numpy"] += a
            study_totals["cv2"] += b
        ratio = f"{b / a:>8.0f}x" if spread else f"{'(no-op)':>9}"
        print(f"{spread:>7} {a:>12.3f} {t:>10.3f} {b:>10.3f} {ratio}")

    print("\nall spreads: masks identical between (a) and (b) for every mask")
    print("\nwhole sweep, ms per mask:")
    headline = study_totals["cv2"] / (study_totals["numpy"] + dist_per_mask)
    for label, tot in (
        (f"SWEEP_SPREADS ({len(SWEEP_SPREADS)} spreads)", study_totals),
        (f"all {len(spreads)} spreads above", totals),
    ):
        with_map = tot["numpy"] + dist_per_mask
        print(
            f"  {label}: (a) {tot['numpy']:.2f} thresholds + {dist_per_mask:.2f} distance map "
            f"= {with_map:.2f}; (b) {tot['cv2']:.2f}; "
            f"ratio (b)/(a) = {tot['cv2'] / with_map:.1f}x with the map, "
            f"{tot['cv2'] / tot['numpy']:.0f}x thresholds only"
        )
    print(f"bench_sweep: {headline:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
