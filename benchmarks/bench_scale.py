"""The store at the study's scale (issue 15, part 1): bytes per image, preparation speed and peak memory at 10k, 50k
and 100k images of 512 px with two ROIs.

Run: ``python benchmarks/bench_scale.py [--sizes 10000 50000 100000] [--workers 1 2] [--image-size 512]
[--out DIR]``; ``--quick`` prepares 1k, 2k and 4k images (about 2 minutes here). Each preparation runs in a fresh
process (its peak resident memory, parent and worker processes, is read from ``getrusage``), into ``--out``
(default: a temporary folder beside the repository, deleted afterwards; 100k images take about 36 GB).

The images come from :class:`TiledSource`: 16 synthetic chest X-rays (lungs and heart, from the known-truth
generator) rendered once at the image size, each record one of them rolled by a record-dependent offset, so that
the measurement is the store's cost (resize, pack, write, checkpoint, compact), not the generator's. Prints, per
size and worker count: images/s, bytes per image on disk (the store's files over its images), and peak RSS; then
the ratio of the peak RSS at the largest size to that at the smallest, the last line
``bench_scale: <ratio>x`` (flat memory: about 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, resource, sys, time
    from collections.abc import Iterator
    from pathlib import Path

    import numpy as np

    from maskaudit.config import config_from_dict
    from maskaudit.data.sources.base import Loaded, Record, Source
    from maskaudit.data.sources.synthetic import SyntheticSource
    from maskaudit.data.store import prepare_store


    class TiledSource(Source):
        """``n`` records, each one of 16 synthetic X-rays rolled by a record-dependent offset."""

        name = "tiled"
        rois = ("lungs", "heart")
        channels = 1
        classes = ["opacity"]
        metadata_columns = []

        def __init__(self, n: int, size: int) -> None:
            self.n, self.size, self._tiles = n, size, None

        def __getstate__(self) -> dict:
            return {"n": self.n, "size": self.size, "_tiles": None}  # each worker renders its own tiles, once

        @property
        def tiles(self) -> list[Loaded]:
            if self._tiles is None:
                config = config_from_dict({"data": {"source": "synthetic", "kind": "cxr", "n_patients": 16,
                                                    "images_per_patient": [1, 1]}, "image_size": self.size},
                                          origin="bench_scale")
                synthetic = SyntheticSource.from_config(config)
                self._tiles = [synthetic.load(record) for record in synthetic.records()]
            return self._tiles

        def records(self) -> Iterator[Record]:
            for i in range(self.n):
                yield Record(image_id=f"t{i}", patient_id=f"p{i}", labels={"opacity": i % 2}, key=i)

        def load(self, record: Record) -> Loaded:
            tile = self.tiles[record.key % len(self.tiles)]
            shift = (record.key // len(self.tiles)) % 7
            return Loaded(image=np.roll(tile.image, shift, axis=1),
                          rois={k: np.roll(v, shift, axis=1) for k, v in tile.rois.items()})


    if __name__ == "__main__":
        n, size, workers, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        source = TiledSource(n, size)
        started = time.perf_counter()
        store = prepare_store(source, out, size, roi_keys=("lungs+heart",), workers=workers, progress=False)
        seconds = time.perf_counter() - started
        files = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        print(json.dumps({"n": store.n, "seconds": seconds, "bytes_per_image": files / store.n, "peak_kib": peak}))
''')


def measure(n: int, size: int, workers: int, root: Path) -> dict:
    out, script = root / f"store_{n}_{workers}", root / "bench_scale_worker.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, str(script), str(n), str(size), str(workers), str(out)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin"})
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"preparing {n} images failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k, 2k and 4k images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [1000, 2000, 4000] if args.quick else args.sizes
    root = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.out or REPO.parent))
    ratios = []
    try:
        print(f"{'images':>8} {'workers':>7} {'img/s':>8} {'MB/image':>9} {'peak RSS MB':>12}")
        for workers in args.workers:
            peaks = []
            for n in sizes:
                r = measure(n, args.image_size, workers, root)
                peaks.append(r["peak_kib"])
                print(f"{n:>8} {workers:>7} {n / r['seconds']:>8.1f} {r['bytes_per_image'] / 1e6:>9.3f} "
                      f"{r['peak_kib'] / 1024:>12.0f}", flush=True)
            ratios.append(peaks[-1] / peaks[0])
            print(f"  {workers} worker(s): peak RSS at {sizes[-1]} images / at {sizes[0]}: {ratios[-1]:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"bench_scale: {max(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
