"""The predict stage against a bare forward pass (issue 15, part 2): what reading, masking and keeping the scores cost.

Run: ``python benchmarks/bench_predict.py [--models 3] [--images 128] [--size 128] [--arch resnet18]
[--repeats 3] [--device cpu]``; ``--quick``: 3 small models on 64 images of 64 px. One process, one prepared store
of synthetic chest X-rays (lungs), ``--models`` freshly initialised models (the folds of one strategy), the test
strategies ``full``, ``no_roi``, ``only_roi``, ``no_roi_bbox`` and ``only_roi_bbox``, batch 32. Three ways, each
timed ``--repeats`` times in turn (median), after one untimed warm-up:

(a) maskaudit's predict stage (:func:`maskaudit.predict.predict_images` with every model): each batch read from the
    store once, masked once per strategy, scored by every model, the probabilities copied back;
(b) the bare forward: the same models on the same masked batches, already in memory as tensors (no read, no
    masking, nothing kept): the ceiling;
(c) one model at a time (the stage before issue 15), each re-reading and re-masking the store.

Prints images·models/s of each and checks that (a) and (b) give the same probabilities. The last line is
``bench_predict: <(a)/(b)>x`` (the target is 0.9 or more).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
try:
    import maskaudit  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))

from gpu_check import make_store  # noqa: E402

from maskaudit.config import ModelConfig, config_from_dict  # noqa: E402
from maskaudit.loader import batches, mask_spec  # noqa: E402
from maskaudit.models import build_model  # noqa: E402
from maskaudit.predict import predict_images  # noqa: E402

STRATEGIES = ["full", "no_roi", "only_roi", "no_roi_bbox", "only_roi_bbox"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 small models, 64 images of 64 px")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.images, args.size, args.arch, args.repeats = 3, 64, 64, "small_cnn", 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = config_from_dict({"data": {"source": "synthetic"}, "image_size": args.size,
                               "predict": {"batch_size": 32}}, origin="bench_predict")
    with tempfile.TemporaryDirectory() as root:
        store = make_store(Path(root), args.images, args.size)
        spec = mask_spec(store, "lungs", 0, "zero", 0)
        indices = np.arange(store.n)
        models = [build_model(ModelConfig(arch=args.arch, weights="none", freeze="none"), n_classes=len(store.classes),
                              in_channels=store.channels).to(device).eval() for _ in range(args.models)]
        preloaded = [batch.masked(s, spec).clone() for batch in
                     batches(store, indices, spec, config.predict.batch_size, device) for s in STRATEGIES]

        def stage() -> list[dict[str, np.ndarray]]:
            return predict_images(models, store, indices, STRATEGIES, spec, config, device)

        def bare() -> list[torch.Tensor]:
            with torch.no_grad():
                return [model(x) for x in preloaded for model in models]

        def one_at_a_time() -> None:
            for model in models:
                predict_images([model], store, indices, STRATEGIES, spec, config, device)

        work = store.n * len(STRATEGIES) * len(models)  # images·models, each image under every strategy
        ways = {"(a) predict stage, one read for all models": stage, "(b) bare forward on preloaded tensors": bare,
                "(c) one model at a time, a read each": one_at_a_time}
        for way in ways.values():
            way()  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                way()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name].append(time.perf_counter() - started)

        scored, logits = stage(), bare()
        per_batch = len(STRATEGIES) * len(models)
        for m in range(len(models)):
            for s, strategy in enumerate(STRATEGIES):
                expected = torch.cat([torch.sigmoid(logits[b * per_batch + s * len(models) + m].float())
                                      for b in range(len(preloaded) // len(STRATEGIES))]).cpu().numpy()
                np.testing.assert_allclose(scored[m][strategy], expected, rtol=0, atol=1e-6)

    print(f"{args.models} × {args.arch} at {args.size} px, {store.n} images × {len(STRATEGIES)} test strategies, "
          f"batch {config.predict.batch_size}, {device}, {torch.get_num_threads()} threads; median of {args.repeats}")
    rates = {name: work / statistics.median(values) for name, values in seconds.items()}
    for name, rate in rates.items():
        print(f"  {name:<46} {rate:>9.1f} images·models/s")
    a, b, c = rates.values()
    print(f"  (a) gives (b)'s probabilities; one read for all models is {a / c:.2f}x one model at a time")
    print(f"bench_predict: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
