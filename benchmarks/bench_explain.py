"""SHAP Partition attributions per image (issue 15, part 4): the study's call against maskaudit's path.

Run: ``python benchmarks/bench_explain.py [--arch densenet121] [--size 128] [--images 3] [--max-evals 1000]
[--batch-size 50] [--repeats 1] [--class-index 1] [--seed 0] [--data cxr|fundus] [--synthetic] [--study-no-grad]
[--device cpu]`` (about 5 minutes on 2 CPU cores); ``--quick``: ``small_cnn`` at 64 px, 2 images, 2 repeats (under
a minute). One freshly initialised model (``weights="none"``, seeded), in eval mode; ``--data cxr`` (default):
gray chest X-rays from ``shared/data/cxr_covid_ieee8023/images``, ``--data fundus``: RGB fundus photographs from
``shared/data/fundus_drishti_gs1/images`` (the first ``--images`` in name order, resized to ``--size``; X-rays
with ``--synthetic`` or a checkout without them: the synthetic store of ``gpu_check.make_store``). Two ways, on
the same model, images, class and seed, SHAP's Partition explainer at the study's settings (``max_evals=1000``,
``batch_size=50``; zero fill for X-rays, ``blur(S,S)`` for fundus, the study's ``blur(512,512)`` at 512 px):

(a) the study's call: ``shap.Explainer(f, shap.maskers.Image(fill, shape))`` with ``f`` the plain wrapper of the
    study's notebooks (SHAP's PyTorch image example): the NHWC numpy batch made a tensor, permuted to NCHW, moved
    to the device, the model run (in grad mode, as in that example; ``--study-no-grad``: under
    ``torch.no_grad()``) and the logits of every class returned as numpy; the explainer built once and called on
    each image with ``outputs=[class]``, NumPy's random state seeded with ``seed`` before each image (as
    maskaudit does, so that the tie-breaking draws match);
(b) maskaudit's path: :func:`maskaudit.analyses.explain.explain` on the image batch (``method="partition"``,
    ``masker="zero"`` or ``"blur"``); it keeps its explainer between calls (as in a run, where it is called once
    per class), so after the warm-up it does not rebuild the masker's partition tree, while (a) builds its
    explainer once per call, as the notebooks did once per batch.

Each way is timed ``--repeats`` times in turn (median), after one untimed warm-up on one image with 20
evaluations (numba compiles SHAP's helpers, oneDNN and CUDA initialise, (b) builds its explainer). Asserts that
(a) and (b) give equal attributions (summed over channels; bit for bit on gray X-rays; on RGB to 1e-4 of the
largest value, as the study's wrapper feeds the model a channels-last view), prints seconds per image of each,
and the last line ``bench_explain: <(a) s/img ÷ (b) s/img>x`` (above 1: maskaudit's path is faster).
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

from maskaudit.analyses.explain import explain  # noqa: E402
from maskaudit.config import ModelConfig  # noqa: E402
from maskaudit.models import build_model  # noqa: E402

DATA = {"cxr": ("cxr_covid_ieee8023", "*.png", "L"), "fundus": ("fundus_drishti_gs1", "*.jpg", "RGB")}


def real_images(data: str, n: int, size: int) -> torch.Tensor | None:
    """The first ``n`` images of a shared collection (gray X-rays or RGB fundus photographs), resized to ``size``
    px, (n, C, S, S) in [0, 1]; None if absent."""
    from PIL import Image

    name, pattern, mode = DATA[data]
    folder = next((p for p in (REPO.parent / "shared" / "data" / name / "images",
                               REPO / "shared" / "data" / name / "images") if p.is_dir()), None)
    files = sorted(folder.glob(pattern))[:n] if folder is not None else []
    if len(files) < n:
        return None
    arrays = [np.asarray(Image.open(f).convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
              for f in files]
    stacked = np.stack(arrays)
    return torch.from_numpy(stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2).copy())


def synthetic_cxr(n: int, size: int) -> torch.Tensor:
    """``n`` synthetic chest X-rays from the store of :func:`gpu_check.make_store`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import make_store

    from maskaudit.loader import batches, mask_spec

    with tempfile.TemporaryDirectory() as root:
        store = make_store(Path(root), max(n, 4), size)  # the synthetic source wants 4 patients or more
        spec = mask_spec(store, "lungs", 0, "zero", 0)
        batch = next(iter(batches(store, np.arange(n), spec, n, torch.device("cpu"))))
        return batch.images.clone()


def study_explain(model: torch.nn.Module, images: torch.Tensor, class_index: int, max_evals: int, batch_size: int,
                  seed: int, device: torch.device, no_grad: bool = False) -> np.ndarray:
    """(a): the study's ``shap.Explainer`` call, per image; attributions (n, S, S) summed over channels."""
    import shap

    def f(x: np.ndarray) -> np.ndarray:  # the notebook's wrapper: NHWC numpy -> NCHW tensor -> logits numpy
        tmp = torch.Tensor(x.copy()).permute(0, 3, 1, 2).to(device)
        with torch.set_grad_enabled(not no_grad and torch.is_grad_enabled()):
            return model(tmp).detach().cpu().numpy()

    X = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())  # NHWC float32, as notebooks feed SHAP
    size = X.shape[1]
    masker = shap.maskers.Image(0 if X.shape[-1] == 1 else f"blur({size},{size})", X[0].shape)
    explainer = shap.Explainer(f, masker)
    out = []
    for i in range(len(X)):
        np.random.seed(seed)
        shap_values = explainer(X[i : i + 1], max_evals=max_evals, batch_size=batch_size, outputs=[class_index],
                                silent=True)
        out.append(np.asarray(shap_values.values)[0, ..., 0].sum(axis=-1))  # (S, S, C, 1) -> (S, S)
    return np.stack(out).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small_cnn at 64 px, 2 images")
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--max-evals", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--class-index", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=sorted(DATA), default="cxr", help="gray X-rays or RGB fundus photographs")
    parser.add_argument("--synthetic", action="store_true", help="synthetic X-rays instead of the shared ones")
    parser.add_argument("--study-no-grad", action="store_true", help="(a) runs the model under torch.no_grad()")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.size, args.images, args.repeats = "small_cnn", 64, 2, 2
    device = torch.device(args.device)
    images = None if args.synthetic and args.data == "cxr" else real_images(args.data, args.images, args.size)
    source = "shared chest X-rays" if args.data == "cxr" else "shared fundus photographs"
    if images is None and args.data == "fundus":
        parser.error(f"--data fundus needs {args.images} images in shared/data/{DATA['fundus'][0]}/images")
    if images is None:
        images, source = synthetic_cxr(args.images, args.size), "synthetic chest X-rays"
    channels = images.shape[1]
    masker = "zero" if channels == 1 else "blur"
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=args.arch, weights="none", freeze="none"), n_classes=2,
                        in_channels=channels).to(device).eval()
    images = images.to(device)

    def way_a(x: torch.Tensor, max_evals: int = args.max_evals) -> np.ndarray:
        return study_explain(model, x, args.class_index, max_evals, args.batch_size, args.seed, device,
                             args.study_no_grad)

    def way_b(x: torch.Tensor, max_evals: int = args.max_evals) -> np.ndarray:
        return explain(model, x, args.class_index, "partition", masker=masker, max_evals=max_evals,
                       batch_size=args.batch_size, seed=args.seed)

    study = "(a) study's shap.Explainer call" + (", no_grad" if args.study_no_grad else "")
    ways = {study: way_a, "(b) maskaudit explain(partition)": way_b}
    for way in ways.values():
        way(images[:1], 20)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, way in ways.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            results[name] = way(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - started)

    a_values, b_values = results.values()
    exact = np.array_equal(a_values, b_values)
    scale = float(np.abs(a_values).max())
    if channels == 1:
        np.testing.assert_array_equal(b_values, a_values)  # bit for bit
    else:
        # the study's wrapper hands the model a channels-last view (a permute without a copy), which the
        # convolutions round differently from maskaudit's contiguous batch
        np.testing.assert_allclose(b_values, a_values, rtol=1e-4, atol=1e-4 * scale)

    print(f"{args.arch} at {args.size} px, {len(images)} {source}, class {args.class_index}, "
          f"{'zero fill' if masker == 'zero' else f'blur({args.size},{args.size})'}, "
          f"max_evals={args.max_evals}, batch_size={args.batch_size}, seed {args.seed}, {device}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    per_image = {name: statistics.median(values) / len(images) for name, values in seconds.items()}
    for name, value in per_image.items():
        print(f"  {name:<45} {value:>8.3f} s/image")
    difference = "identical" if exact else (
        f"equal up to {np.abs(a_values - b_values).max() / scale:.1e} × the largest |value| (float rounding)")
    print(f"  attributions of (a) and (b): {difference}; largest |value| {scale:.3g}")
    a, b = per_image.values()
    print(f"bench_explain: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
