"""The study's PadChest grid, projected from measured rates (issue 15, part 7): wall time on G GPUs and store size.

Run: ``python benchmarks/projection.py --rates gpu_check.json [--gpus 1 8] [--images 100000] [--epochs 60]``, the
rates written by ``benchmarks/gpu_check.py --json gpu_check.json`` on the GPU the audit will run on (or given one by
one: ``--train``, ``--train-packed`` with ``--packed-jobs``, ``--predict``, ``--shap``). ``--quick`` is
``benchmarks/gpu_check.py --quick --json`` then this script on its rates (a smoke test; the numbers mean nothing).

The grid (SPEC §4–§6), with N images, a hold-out of h = 20 % of them, K = 5 folds, M = 5 trained strategies and
T = 5 test strategies:

- training images per job and epoch ``N_train = N (1 - h) (K - 1) / K``, validation images ``N_val = N (1 - h) / K``;
- one job: ``E (N_train / r_train + N_val / r_predict)`` seconds, E the mean number of epochs a job runs (the study:
  at most 250, early stopping with patience 25; read it from your ``history.csv`` files, the default 60 is a guess);
  ``r_train`` the training images/s of one job at batch 2 fp32, or with P jobs packed on a GPU
  (``ray.num_gpus: 1/P``) each at ``r_packed / P``;
- training: ``ceil(M K / (G P))`` rounds of one job (P = 1 unpacked);
- prediction: ``M K T (N h + N_val) / (G r_predict)`` (every model on the hold-out and its validation fold under
  every test strategy; ``r_predict`` images·maskings/s);
- the dilation sweep: ``11 · 2 · K · N h / (G r_predict)`` (the full model's folds, ``only_roi`` and ``no_roi``,
  11 spreads);
- SHAP: ``pairs · images · s_shap / G`` (``--shap-images`` positives explained per (model, masking) pair);
- the store: ``N · 0.36 MB`` (512 px, lungs, heart and their union, ``benchmarks/bench_scale.py``).

The last line is ``projection: <hours on the first --gpus count>h``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

HOLDOUT, FOLDS, STRATEGIES, TEST_STRATEGIES, SPREADS = 0.2, 5, 5, 5, 11
STORE_MB_PER_IMAGE = 0.36


def project(rates: dict, images: int, epochs: float, gpus: int, shap_images: int, pairs: int) -> dict[str, float]:
    """Seconds of each part of the grid on ``gpus`` GPUs, the training packed when that is faster."""
    n_train = images * (1 - HOLDOUT) * (FOLDS - 1) / FOLDS
    n_val = images * (1 - HOLDOUT) / FOLDS
    n_test = images * HOLDOUT
    jobs = STRATEGIES * FOLDS
    r_predict = rates["predict"]

    def training(rate: float, packed: int) -> float:
        job = epochs * (n_train / rate + n_val / (r_predict / packed))
        return math.ceil(jobs / (gpus * packed)) * job

    options = {"train (one job per GPU)": training(rates["train_batch2"], 1)}
    if rates.get("train_batch2_packed"):
        packed = int(rates["packed_jobs"])
        options[f"train ({packed} jobs per GPU)"] = training(rates["train_batch2_packed"] / packed, packed)
    name = min(options, key=options.get)
    return {
        name: options[name],
        "predict": jobs * TEST_STRATEGIES * (n_test + n_val) / (gpus * r_predict),
        "dilation sweep": SPREADS * 2 * FOLDS * n_test / (gpus * r_predict),
        "SHAP": pairs * shap_images * rates["shap_seconds"] / gpus,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=Path, help="gpu_check.py --json output")
    parser.add_argument("--quick", action="store_true", help="gpu_check.py --quick's rates, here (a smoke test)")
    parser.add_argument("--train", type=float, help="training img/s, one job, batch 2 fp32")
    parser.add_argument("--train-packed", type=float, help="training img/s of --packed-jobs jobs at once, summed")
    parser.add_argument("--packed-jobs", type=int, default=4)
    parser.add_argument("--predict", type=float, help="prediction images·maskings/s")
    parser.add_argument("--shap", type=float, help="SHAP Partition seconds per image")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--epochs", type=float, default=60.0, help="mean epochs a job runs")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shap-images", type=int, default=100, help="images explained per (model, masking) pair")
    parser.add_argument("--pairs", type=int, default=STRATEGIES, help="(model, masking) pairs explained")
    args = parser.parse_args(argv)
    rates: dict = {}
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rates.json"
            subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_check.py")), "--quick", "--json",
                            str(out)], check=True, stdout=subprocess.DEVNULL)
            rates = json.loads(out.read_text())
    elif args.rates:
        rates = json.loads(args.rates.read_text())
    given = {"train_batch2": args.train, "train_batch2_packed": args.train_packed, "predict": args.predict,
             "shap_seconds": args.shap}
    rates.update({k: v for k, v in given.items() if v is not None})
    if args.train_packed is not None:
        rates["packed_jobs"] = args.packed_jobs
    missing = [k for k in ("train_batch2", "predict", "shap_seconds") if k not in rates]
    if missing:
        parser.error(f"no rate for {', '.join(missing)}: give --rates gpu_check.json or --train/--predict/--shap")

    print(f"{args.images:,} images, {STRATEGIES} strategies × {FOLDS} folds, {TEST_STRATEGIES} test strategies, "
          f"{args.epochs:g} epochs a job; rates of {rates.get('device', 'the arguments')}: training "
          f"{rates['train_batch2']:.1f} img/s at batch 2"
          + (f" ({rates['train_batch2_packed']:.1f} with {rates['packed_jobs']} packed)"
             if rates.get("train_batch2_packed") else "")
          + f", prediction {rates['predict']:.1f} images·maskings/s, SHAP {rates['shap_seconds']:.1f} s/image")
    print(f"store: {args.images * STORE_MB_PER_IMAGE / 1000:.1f} GB")
    first = None
    for gpus in args.gpus:
        parts = project(rates, args.images, args.epochs, gpus, args.shap_images, args.pairs)
        total = sum(parts.values()) / 3600
        first = total if first is None else first
        print(f"{gpus} GPU{'s' if gpus != 1 else ''}: {total:,.1f} h = "
              + " + ".join(f"{name} {seconds / 3600:,.1f} h" for name, seconds in parts.items()))
    print(f"projection: {first:,.1f}h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
