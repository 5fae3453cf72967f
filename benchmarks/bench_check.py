"""How fast ``maskaudit check`` reads a folder source: rows per second, headers only.

Run: ``python benchmarks/bench_check.py [--rows 20000] [--repeats 3] [--data DIR]``; ``--quick``: 2,000 rows,
one run each. Copies the 182 real X-rays and lung masks of ``../shared/data/cxr_covid_ieee8023`` (beside the
repository) into a temporary folder and writes a labels CSV that lists them ``--rows`` times over with distinct
image ids (as ``id_column``), then times :func:`maskaudit.data.check.check_config` on it: the folder source's rows,
its :meth:`header_problem` per record, and :func:`summarise`. Prints the best of ``--repeats`` runs, and the same
with a stand-in header check (PIL opens the image and the mask and compares their sizes, no decoding). The last
line is ``bench_check: <ratio>x``, the rows/s of the folder source's own check over the PIL stand-in's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
try:
    import maskaudit  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from maskaudit.config import config_from_dict  # noqa: E402
from maskaudit.data.check import check_config, check_source  # noqa: E402
from maskaudit.data.sources.base import Record, Source  # noqa: E402
from maskaudit.data.sources.folder import FolderSource  # noqa: E402


class PILHeaders(FolderSource):
    """The folder source with a stand-in header check: image and mask sizes from PIL's lazy open."""

    def header_problem(self, record: Record) -> str:
        from PIL import Image

        try:
            with Image.open(record.key.image) as image:
                size = image.size
            for _, mask_path in record.key.masks:
                with Image.open(mask_path) as mask:
                    if mask.size != size:
                        return f"mask size mismatch: {mask_path}"
        except OSError as exc:
            return f"unreadable image or mask: {exc}"
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows, one run each")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr_covid_ieee8023")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 2_000, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("images", "masks"):
            shutil.copytree(args.data / folder, root / folder)
        labels = pd.read_csv(args.data / "labels.csv")
        many = labels.iloc[[i % len(labels) for i in range(args.rows)]].reset_index(drop=True)
        many["image_id"] = [f"{image_id}-{i}" for i, image_id in enumerate(many["image_id"])]
        many.to_csv(root / "labels.csv", index=False)
        config = config_from_dict({"data": {
            "source": "folder", "labels_csv": str(root / "labels.csv"), "image_column": "image",
            "mask_column": "mask", "id_column": "image_id", "patient_column": "patient_id", "classes": ["covid"],
            "metadata_columns": ["sex", "age", "projection"]}})

        def best(run) -> tuple[float, int]:
            times, kept = [], 0
            for _ in range(args.repeats):
                started = time.perf_counter()
                kept = run()
                times.append(time.perf_counter() - started)
            return min(times), kept

        own = FolderSource.header_problem is not Source.header_problem
        seconds, kept = best(lambda: check_config(config)[0].kept)
        print(f"check_config, folder source ({'its own' if own else 'no'} header check): {args.rows} rows "
              f"in {seconds:.2f} s = {args.rows / seconds:,.0f} rows/s ({kept} kept)")
        pil_seconds, kept = best(lambda: check_source(PILHeaders(config.data), config).kept)
        print(f"with a PIL stand-in header check (image + mask): {args.rows} rows in {pil_seconds:.2f} s = "
              f"{args.rows / pil_seconds:,.0f} rows/s ({kept} kept)")
    print(f"bench_check: {pil_seconds / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
