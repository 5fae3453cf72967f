"""Building the CheXmask index on a PadChest-size table: rows/s and peak memory, flat in the file's size.

CheXmask's ``OriginalResolution/Padchest.csv`` is several GB: one record per image whose
``Landmarks`` cell is a numpy array printed over many lines (the publisher writes it with pandas'
``to_csv``; see ``maskaudit.data.sources.chexmask``), then three RLE strings. This script writes
a table of that shape (``--rows`` records, default 100,000; about ``--rle-kb`` KB of RLE each,
default 25), then builds :class:`~maskaudit.data.sources.chexmask.ChexmaskTable` on it in a
child process per size, and prints the rows/s and that process's peak RSS. Sizes 10 %, 50 %
and 100 % of ``--rows`` are indexed, so a flat memory shows as the same peak at every size. The last line is
``bench_chexmask_index: <ratio>x``, the peak RSS at 100 % of ``--rows`` over that at 10 % (flat memory: about 1).

Run: ``python benchmarks/bench_chexmask_index.py [--rows N] [--rle-kb K] [--dir DIR]``
(the 100,000-row file is ~2.9 GB; ``--dir`` defaults to a temporary folder, removed after); ``--quick``: 10,000
rows (a ~0.3 GB file).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEADER = ["ImageID", "Dice RCA (Mean)", "Dice RCA (Max)", "Landmarks", "Left Lung", "Right Lung", "Heart",
          "Height", "Width"]  # fmt: skip


def write_table(path: Path, rows: int, rle_kb: int, seed: int = 0) -> None:
    """``rows`` records in the published form: pandas' quoting, multi-line Landmarks, ~rle_kb KB of RLE."""
    rng = np.random.default_rng(seed)
    variants = []
    for _ in range(16):  # a few distinct records, repeated under distinct ids: the scan's work is the same
        landmarks = str(rng.integers(0, 3000, size=(120, 2)))  # what pandas' to_csv writes for an array cell
        rle = " ".join(map(str, rng.integers(1, 9_000_000, size=rle_kb * 1024)))
        rle = rle[: rle.rfind(" ", 0, rle_kb * 1024 // 3)]  # each of the three RLE cells: a third of the bytes
        variants.append((landmarks, rle))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")  # pandas' defaults: minimal quoting, \n
        writer.writerow(HEADER)
        for i in range(rows):
            landmarks, rle = variants[i % len(variants)]
            writer.writerow([f"{i:012d}.png", 0.85, 0.9, landmarks, rle, rle, rle, 2800, 2500])


def index_in_child(path: Path) -> tuple[float, int, int]:
    """Seconds, rows indexed and peak RSS (KiB) of building the index in a fresh process."""
    code = (
        "import sys, time\n"
        "from maskaudit.data.sources.chexmask import ChexmaskTable\n"
        "t = time.perf_counter(); table = ChexmaskTable(sys.argv[1], 'ImageID')\n"
        "print(time.perf_counter() - t, len(table.rows))\n"
        "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    first, second = out.stdout.strip().splitlines()[-2:]
    seconds, n = first.split()
    return float(seconds), int(n), int(second)


def baseline_rss() -> int:
    code = "import maskaudit.data.sources.chexmask, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 rows")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rle-kb", type=int, default=25)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = 10_000
    folder = args.dir or Path(tempfile.mkdtemp(prefix="chexmask-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    peaks = []
    try:
        print(f"imports alone: peak RSS {baseline_rss() / 1024:.0f} MiB")
        print(f"{'rows':>8} {'file GB':>8} {'write s':>8} {'index s':>8} {'rows/s':>8} {'MB/s':>7} "
              f"{'peak RSS MiB':>13}")
        for rows in sorted({max(1, args.rows // 10), max(1, args.rows // 2), args.rows}):
            path = folder / f"Padchest_{rows}.csv"
            start = time.perf_counter()
            write_table(path, rows, args.rle_kb)
            written = time.perf_counter() - start
            os.sync()  # the written file on disk before it is read: the scan does not race the write-back
            size = path.stat().st_size
            seconds, n, rss = index_in_child(path)
            assert n == rows, (n, rows)
            peaks.append(rss)
            print(f"{rows:>8} {size / 1e9:>8.2f} {written:>8.1f} {seconds:>8.1f} {rows / seconds:>8.0f} "
                  f"{size / 1e6 / seconds:>7.0f} {rss / 1024:>13.0f}")
            path.unlink()
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"bench_chexmask_index: {peaks[-1] / peaks[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
