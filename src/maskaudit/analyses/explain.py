"""SHAP attribution maps (SPEC §6.2) and the share of positive attribution inside the ROI (SPEC §8).

:func:`explain` attributes one class's logit to the pixels of each image with one of :data:`METHODS`:

- ``partition`` (the study's default): SHAP's model-agnostic ``shap.Explainer`` (Partition explainer)
  with a ``shap.maskers.Image`` masker on HWC images, ``max_evals=1000``, ``batch_size=50``. The masker
  fills hidden regions with 0 for gray X-rays (the study's ``maskers.Image(0)``-style fill) and with
  ``blur(S,S)`` for RGB fundus photographs (the study's ``blur(512,512)`` at S = 512).
- ``deep``: ``shap.DeepExplainer`` (DeepLIFT with a background batch), with SHAP's additivity check on:
  the attributions of an image sum to its logit minus the mean logit of the background. shap's
  max-pool rule loses contributions when pooling windows overlap (DenseNet's and ResNet's stem
  ``MaxPool2d(3, 2, 1)``), so the rule is replaced, for the duration of the call, by one that
  accumulates them (:func:`_deeplift_maxpool`); with it the sums hold to float precision.
- ``gradient``: ``shap.GradientExplainer`` (expected gradients), ``max_evals`` samples per image.

The two gradient methods need a model whose forward uses non-in-place ReLU modules; maskaudit's
registry builds every architecture that way (see :mod:`maskaudit.models`). torchvision's stock
DenseNet-121 applies ``F.relu(..., inplace=True)`` functionally and fails under DeepExplainer's hooks
(shap issues #3466, #3565, #3938); :func:`explain` then raises a :class:`MaskauditError` that says so.

The model is left as it was found: its per-module train/eval flags, the torch grad mode and NumPy's
global random state (which SHAP's explainers use) are restored afterwards, and the gradient methods
run on a deep copy, so SHAP's hooks and the tensors it attaches to modules never reach the caller's model.
Each image is explained on its own with the random state seeded by ``seed``, so an image's map does
not depend on the other images of the call (nor on earlier calls: ``partition`` keeps its explainer, whose
masks take seconds to build at 512 px, for the next call with the same masker and image size, but not the
model, and it evaluates the fully masked image afresh for every image).

:func:`attribution_in_roi` turns maps into SPEC §8's numbers, and :func:`attribution_panels` draws
them (image, ROI outline, attribution overlay).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from maskaudit.errors import MaskauditError  # noqa: E402
from maskaudit.progress import active  # noqa: E402

__all__ = [
    "ATTRIBUTION_CMAP",
    "MASKERS",
    "METHODS",
    "attribution_in_roi",
    "attribution_panels",
    "explain",
    "image_masker",
]

log = logging.getLogger(__name__)

#: Attribution methods, the study's first.
METHODS = ("partition", "deep", "gradient")

#: Named values of ``masker`` (besides ``blur(kx,ky)`` and a constant fill such as ``"0.5"``).
MASKERS = ("auto", "zero", "blur", "inpaint_telea", "inpaint_ns")

#: Diverging colour map of the attribution overlay: blue negative, white zero, red positive.
ATTRIBUTION_CMAP = "RdBu_r"

_BLUR = re.compile(r"^blur\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


# ------------------------------------------------------------------------------------------ explain


def explain(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    method: str = "partition",
    *,
    masker: str = "auto",
    max_evals: int = 1000,
    batch_size: int = 50,
    background: torch.Tensor | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Attributions of the class's logit for each image: float32 array (n, S, S), summed over channels.

    Parameters
    ----------
    model : nn.Module
        Maps float images ``(B, C, S, S)`` in [0, 1] to logits ``(B, K)``; run on the device of its
        first parameter (the CPU if it has none) and in eval mode.
    images : torch.Tensor of shape (n, C, S, S)
        Float images in [0, 1]; moved to the model's device.
    class_index : int
        The logit explained, ``0 <= class_index < K``.
    method : {"partition", "deep", "gradient"}
        ``partition``: SHAP's Partition explainer with an image masker (the study's method);
        ``deep``: ``shap.DeepExplainer``; ``gradient``: ``shap.GradientExplainer``.
    masker : str
        ``partition`` only. ``auto``: ``zero`` for 1-channel images, ``blur`` for the others;
        ``zero``: hidden pixels are 0; ``blur``: ``blur(S,S)``, a box blur as wide as the image (the
        study's ``blur(512,512)`` at 512 px); ``blur(kx,ky)``: a box blur of that kernel;
        ``inpaint_telea`` / ``inpaint_ns``: OpenCV inpainting (on the image scaled to 0–255 and
        quantised to 8 bits, as OpenCV requires); a number such as ``"0.5"``: that constant fill.
    max_evals : int
        Model evaluations per image: the Partition explainer's ``max_evals``, or the number of
        samples of ``gradient``. Unused by ``deep``.
    batch_size : int
        Images per forward pass (``partition``, ``gradient``) or images explained per DeepExplainer call.
    background : torch.Tensor of shape (m, C, S, S), optional
        Reference images of ``deep`` and ``gradient`` (a few training images); required by them,
        unused by ``partition``.
    seed : int
        Seeds NumPy's global random state before each image (SHAP's Partition explainer breaks ties
        and GradientExplainer draws its samples with it); the previous state is restored afterwards.

    Returns
    -------
    np.ndarray of shape (n, S, S), float32
        Per-pixel attributions summed over channels. For ``partition`` and ``deep`` an image's map sums
        (up to the explainers' approximations) to its logit minus the logit of the masked image
        (``partition``) or the mean logit of the background (``deep``).

    Raises
    ------
    MaskauditError
        For an unknown masker (``analyses.explain.masker``), or a model SHAP's gradient explainers
        cannot run on (e.g. one that applies ReLU in place; the message says to use ``partition``).
    ValueError, TypeError
        For the caller's mistakes: an unknown method, images that are not a float tensor
        ``(n, C, S, S)``, a class index outside the model's logits, a model that does not return
        logits ``(B, K)``, ``max_evals`` or ``batch_size`` out of range, a missing or mismatched
        background.

    Examples
    --------
    >>> model = build_model(ModelConfig(arch="small_cnn", weights="none"), n_classes=2, in_channels=1)
    >>> explain(model, torch.rand(2, 1, 32, 32), class_index=1, max_evals=100).shape
    (2, 32, 32)
    """
    values = _attributions(
        model,
        images,
        class_index,
        method,
        masker=masker,
        max_evals=max_evals,
        batch_size=batch_size,
        background=background,
        seed=seed,
    )
    return values.sum(axis=1).astype(np.float32)


def _attributions(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    method: str = "partition",
    *,
    masker: str = "auto",
    max_evals: int = 1000,
    batch_size: int = 50,
    background: torch.Tensor | None = None,
    seed: int = 0,
) -> np.ndarray:
    """What :func:`explain` computes, before the sum over channels: float64 array (n, C, S, S)."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; known: {', '.join(METHODS)}")
    _check_images(images, "images")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 3:
        raise ValueError(f"max_evals must be an integer >= 3, got {max_evals!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if method != "partition":
        if background is None:
            raise ValueError(
                f"method={method!r} needs a background batch (a few training images, (m, C, S, S)); "
                "pass background=... or use method='partition'"
            )
        _check_images(background, "background")
        if background.shape[0] == 0 or tuple(background.shape[1:]) != tuple(images.shape[1:]):
            raise ValueError(
                f"background must hold at least one image shaped like the images {tuple(images.shape[1:])}, "
                f"got {tuple(background.shape)}"
            )
    device = _model_device(model)
    images = images.detach().to(device=device, dtype=torch.float32)
    if images.shape[0] == 0:
        return np.zeros(tuple(images.shape), dtype=np.float64)
    with _model_state_kept(model):
        model.eval()
        class_index = _check_class_index(model, images[:1], class_index)
        log.debug("explaining %d images, class %d, method %s", images.shape[0], class_index, method)
        if method == "partition":
            return _partition(model, images, class_index, masker, max_evals, batch_size, seed)
        background = background.detach().to(device=device, dtype=torch.float32)  # type: ignore[union-attr]
        return _gradient_method(model, images, class_index, method, background, max_evals, batch_size, seed)


def _check_images(images: object, name: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (n, C, S, S), got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (n, C, S, S), got {images.dtype} {tuple(images.shape)}")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _model_state_kept(model: nn.Module) -> Iterator[None]:
    """Restore each module's train/eval flag, the grad mode and NumPy's global random state on exit."""
    modes = [(module, module.training) for module in model.modules()]
    rng = np.random.get_state()
    try:
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            yield
    finally:
        for module, training in modes:
            module.training = training
        np.random.set_state(rng)


def _check_class_index(model: nn.Module, first: torch.Tensor, class_index: int) -> int:
    with torch.no_grad():
        logits = model(first)
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits (B, K), got shape {tuple(logits.shape)}")
    n_classes = logits.shape[1]
    if isinstance(class_index, bool) or not isinstance(class_index, int | np.integer):
        raise TypeError(f"class_index must be an integer, got {class_index!r}")
    if not 0 <= class_index < n_classes:
        raise ValueError(f"class_index={class_index} but the model has {n_classes} logits (0..{n_classes - 1})")
    return int(class_index)


# ------------------------------------------------------------------------------------------ partition


def image_masker(masker: str, shape: tuple[int, int, int]) -> tuple[object, float]:
    """The ``shap.maskers.Image`` that ``masker`` names for HWC images of ``shape``, with the input scale.

    Parameters
    ----------
    masker : str
        See :func:`explain`.
    shape : tuple of int
        ``(S, S, C)``.

    Returns
    -------
    shap.maskers.Image
        The masker (a subclass that masks constant fills and blurs faster, with the same values:
        :func:`_fast_image_masker`).
    float
        What the images are multiplied by before masking: 255 for OpenCV inpainting (8-bit images),
        else 1. The model function divides by it again.

    Raises
    ------
    MaskauditError
        For a value that is none of :data:`MASKERS`, ``blur(kx,ky)`` with positive kernel sizes, or a
        finite number.
    """
    image = _fast_image_masker()
    height, width, channels = shape
    name = masker.strip() if isinstance(masker, str) else masker
    if name == "auto":
        name = "zero" if channels == 1 else "blur"
    if name == "zero":
        return image(0.0, shape), 1.0
    if name == "blur":
        name = f"blur({width},{height})"  # cv2.blur's kernel is (width, height)
    if isinstance(name, str):
        match = _BLUR.match(name)
        if match and int(match.group(1)) > 0 and int(match.group(2)) > 0:
            return image(f"blur({int(match.group(1))},{int(match.group(2))})", shape), 1.0
        if name in ("inpaint_telea", "inpaint_ns"):
            return image(name, shape), 255.0
        try:
            value = float(name)
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return image(value, shape), 1.0
    raise MaskauditError(
        f"unknown masker {masker!r}; use one of {', '.join(MASKERS)}, 'blur(kx,ky)' with positive kernel "
        "sizes, or a constant fill value such as '0.5'"
    )


@functools.cache
def _fast_image_masker() -> type:
    """``shap.maskers.Image`` with a faster ``__call__`` for constant fills and blurs (built on first use:
    importing shap is slow).

    shap's masker copies the image and assigns the fill through two boolean indexings per masked sample
    (``out[~mask] = fill[~mask]``, the fill in float64), and keys its blur cache on ``id()`` of a
    temporary view, so the image's blur may be recomputed for every sample. This one selects with one
    ``np.where`` against the fill in the image's dtype (the values shap's assignment casts to) and blurs
    each image once, keyed on the image object itself (held, so that its id cannot be reused): the
    masked samples are bit for bit shap's. Inpainting, tensors and other inputs go to shap's own code.

    ``fixed_background`` is off, so that the Partition explainer evaluates the fully masked image for
    every image instead of keeping the first image's value for the explainer's lifetime: the same
    value for a constant fill (one forward of one image more per image), and no value of another model
    can be reused when :func:`_partition` reuses an explainer.
    """
    import shap

    class FastImage(shap.maskers.Image):
        def __init__(self, mask_value: object, shape: tuple[int, ...] | None = None) -> None:
            super().__init__(mask_value, shape)
            self.fixed_background = False
            self._fills: dict[np.dtype, np.ndarray] = {}
            self._blurred: tuple[np.ndarray, np.ndarray] | None = None  # (image, its blur)

        def __call__(self, mask: object, x: object) -> tuple[np.ndarray]:
            fast = (
                isinstance(x, np.ndarray)
                and isinstance(mask, np.ndarray)
                and mask.dtype == bool
                and mask.shape == (x.size,)
                and x.size == self.shape[1]
                and (self.blur_kernel is not None or not isinstance(self.mask_value, str))
            )
            if not fast:
                return super().__call__(mask, x)
            fill = self._fill(x)
            out = np.where(mask, x.reshape(-1), fill)
            return (out.reshape(1, *x.shape),)

        def _fill(self, x: np.ndarray) -> np.ndarray:
            if self.blur_kernel is not None:
                if self._blurred is None or self._blurred[0] is not x:
                    import cv2

                    blurred = cv2.blur(x.reshape(self.input_shape), self.blur_kernel).ravel()
                    self._blurred = (x, blurred)
                return self._blurred[1]
            fill = self._fills.get(x.dtype)
            if fill is None:
                fill = self._fills[x.dtype] = np.asarray(self.mask_value).astype(x.dtype)
            return fill

    return FastImage


class _ModelSlot:
    """The model function of a reusable explainer: SHAP holds the slot, each call sets its ``fn``."""

    fn: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert self.fn is not None, "explainer used outside _partition"
        return self.fn(batch)


#: The last idle Partition explainer, by (masker, image shape): building one (the masker's partition tree
#: and the explainer's mask matrix) takes seconds at 512 px (about 1 s gray, 6 s RGB), once per call of
#: :func:`explain`. A call takes it out while it runs (a concurrent call builds its own) and leaves it
#: here afterwards, without the model. Holds the masks of one image size (about 40 MB gray, 150 MB RGB
#: at 512 px).
_IDLE_EXPLAINERS: dict[tuple[str, tuple[int, int, int]], tuple[object, _ModelSlot, float]] = {}


def _logit_function(
    model: nn.Module, class_index: int, device: torch.device, batch_size: int, shape: tuple[int, int, int], scale: float
) -> Callable[[np.ndarray], np.ndarray]:
    """SHAP's view of the model: HWC float batches (scaled by ``scale``) → the class logit, shape (n,)."""

    def logit(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32).reshape(-1, *shape)
        out = np.empty(batch.shape[0], dtype=np.float64)
        with torch.no_grad():
            for start in range(0, batch.shape[0], batch_size):
                chunk = np.ascontiguousarray(batch[start : start + batch_size].transpose(0, 3, 1, 2))
                x = torch.from_numpy(chunk).to(device)
                if scale != 1.0:
                    x = x / scale
                out[start : start + chunk.shape[0]] = model(x)[:, class_index].double().cpu().numpy()
        return out

    return logit


def _partition(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    masker: str,
    max_evals: int,
    batch_size: int,
    seed: int,
) -> np.ndarray:
    import shap

    n, channels, height, width = images.shape
    shape = (height, width, channels)
    key = (masker, shape)
    idle = _IDLE_EXPLAINERS.pop(key, None)
    if idle is None:
        image_masker_, scale = image_masker(masker, shape)
        slot = _ModelSlot()
        explainer = shap.Explainer(slot, image_masker_, algorithm="partition")
    else:
        explainer, slot, scale = idle
    slot.fn = _logit_function(model, class_index, images.device, batch_size, shape, scale)
    # C-contiguous HWC: the masker flattens each image for every masked sample (a copy if it is not).
    hwc = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy(), dtype=np.float32)
    if scale != 1.0:
        hwc *= np.float32(scale)
    out = np.empty((n, channels, height, width), dtype=np.float64)
    try:
        for i in range(n):
            # shap's own blur code (which the masker falls back to for inputs it does not take) caches the
            # blurred image under id() of a temporary view, which the next image's view can reuse: forget it.
            explainer.masker.last_xid = None
            np.random.seed(seed)  # the Partition explainer breaks ties with np.random
            explanation = explainer(hwc[i : i + 1], max_evals=max_evals, batch_size=batch_size, silent=True)
            values = np.asarray(explanation.values, dtype=np.float64).reshape(1, height, width, channels)
            out[i] = values[0].transpose(2, 0, 1)
            active().step()
    finally:
        slot.fn = None  # the model is not kept
        explainer.masker._blurred = None
    _IDLE_EXPLAINERS.clear()
    _IDLE_EXPLAINERS[key] = (explainer, slot, scale)
    return out


# ------------------------------------------------------------------------------------------ deep, gradient


def _deeplift_maxpool(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
    """DeepLIFT's max-pool rule, routing with a scatter-add: shap's own ``maxpool`` rule routes with
    ``max_unpool``, which assigns instead of summing, so with overlapping windows (``kernel_size >
    stride``, e.g. DenseNet's and ResNet's stem ``MaxPool2d(3, 2, 1)``) an input that wins several
    windows keeps one contribution and the attributions no longer sum to the output change
    (the same bug and fix as jmschrei/tangermeme#95). Identical to shap's rule when windows do not overlap.

    As in shap, the module's forward hook saved its input ``x`` and output ``y`` on the batch
    ``[observed; reference]``; the change of each output is routed to the argmax of the observed half
    (``max(y, y_ref) - y_ref``) and of the reference half (``y - max(y, y_ref)``), then divided by the
    change of the input.
    """
    x, y = module.x, module.y
    half = x.shape[0] // 2
    delta_in = x[:half] - x[half:]
    y_obs, y_ref = torch.chunk(y, 2)
    cross = torch.max(y_obs, y_ref)
    diffs = torch.cat([cross - y_ref, y_obs - cross], 0)
    with torch.no_grad():
        pool = _MAX_POOLS[type(module).__name__]
        _, indices = pool(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True)
        routed = torch.zeros_like(x).flatten(2)
        routed.scatter_add_(2, indices.flatten(2), (grad_output[0] * diffs).flatten(2))
        obs_pos, ref_pos = routed.view_as(x).chunk(2)
        multiplier = torch.where(delta_in.abs() < 1e-7, torch.zeros_like(delta_in), (obs_pos + ref_pos) / delta_in)
    return (multiplier.repeat(2, *([1] * (x.dim() - 1))),) + tuple(None for _ in grad_input[1:])


# shap saves a module's input and output only for rules named "maxpool" or "nonlinear_1d".
_deeplift_maxpool.__name__ = "maxpool"

_MAX_POOLS = {"MaxPool1d": F.max_pool1d, "MaxPool2d": F.max_pool2d, "MaxPool3d": F.max_pool3d}


@contextmanager
def _shap_maxpool_fixed() -> Iterator[None]:
    """Use :func:`_deeplift_maxpool` for shap's DeepExplainer inside the block; restore shap's rules after."""
    from shap.explainers._deep import deep_pytorch

    saved = {name: deep_pytorch.op_handler.get(name) for name in _MAX_POOLS}
    try:
        for name in _MAX_POOLS:
            deep_pytorch.op_handler[name] = _deeplift_maxpool
        yield
    finally:
        for name, rule in saved.items():
            if rule is None:
                deep_pytorch.op_handler.pop(name, None)
            else:
                deep_pytorch.op_handler[name] = rule


class _ClassLogit(nn.Module):
    """The model restricted to one logit, kept 2-D ``(B, 1)`` as SHAP's PyTorch explainers expect."""

    def __init__(self, model: nn.Module, class_index: int) -> None:
        super().__init__()
        self.model = model
        self.class_index = class_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.class_index : self.class_index + 1]


def _gradient_method(
    model: nn.Module,
    images: torch.Tensor,
    class_index: int,
    method: str,
    background: torch.Tensor,
    max_evals: int,
    batch_size: int,
    seed: int,
) -> np.ndarray:
    import shap

    # SHAP registers hooks on every leaf module, attaches tensors to them (DeepExplainer does not always
    # remove them), calls zero_grad() and sets eval mode: let it do so on a copy.
    wrapped = _ClassLogit(copy.deepcopy(model), class_index).eval()
    parts = []
    try:
        with torch.enable_grad():
            if method == "deep":
                explainer = shap.DeepExplainer(wrapped, background)
                for start in range(0, images.shape[0], batch_size):
                    with _shap_maxpool_fixed():
                        values = explainer.shap_values(images[start : start + batch_size], check_additivity=True)
                    parts.append(np.asarray(values, dtype=np.float64).reshape(-1, *images.shape[1:]))
                    active().step(parts[-1].shape[0])
            else:
                explainer = shap.GradientExplainer(wrapped, background, batch_size=batch_size)
                for i in range(images.shape[0]):
                    values = explainer.shap_values(images[i : i + 1], nsamples=max_evals, rseed=seed)
                    parts.append(np.asarray(values, dtype=np.float64).reshape(1, *images.shape[1:]))
                    active().step()
    except (RuntimeError, AssertionError) as exc:
        arch = getattr(model, "arch", type(model).__name__)
        name = "shap.DeepExplainer" if method == "deep" else "shap.GradientExplainer"
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        hint = (
            "; it applies an operation in place that SHAP's hooks cannot follow (torchvision's DenseNet calls "
            "F.relu(inplace=True); shap issues #3466, #3565, #3938): build it with maskaudit.models, or use "
            "method='partition'"
            if "inplace" in detail or "in-place" in detail or "in place" in detail
            else "; use method='partition', which needs only the model's outputs"
        )
        raise MaskauditError(f"{name} failed on {arch}: {detail}{hint}") from exc
    return np.concatenate(parts, axis=0)


# ------------------------------------------------------------------------------------------ ROI share


def attribution_in_roi(attributions: np.ndarray, roi: np.ndarray) -> pd.DataFrame:
    """Per image: the share of positive attribution inside the ROI against the ROI's share of the image.

    Parameters
    ----------
    attributions : np.ndarray of shape (n, S, S)
        Attribution maps, e.g. from :func:`explain`.
    roi : np.ndarray of shape (n, S, S), bool
        The region of interest of each image (0/1 integers are accepted).

    Returns
    -------
    pd.DataFrame
        One row per image (index 0..n-1, in input order), float columns:

        - ``positive_in_roi``: the positive attribution mass inside the ROI over all positive mass;
          NaN when the map has no positive value (the share is undefined);
        - ``roi_area``: the ROI's share of the image's pixels;
        - ``ratio``: ``positive_in_roi / roi_area``: 1 when positive attribution is spread like the
          ROI's area, above 1 when it concentrates inside the ROI, below 1 when outside; NaN when the
          ROI is empty or ``positive_in_roi`` is NaN.

    Raises
    ------
    ValueError
        If the shapes differ, are not (n, S, S), the ROI is not boolean, or a map holds NaN or infinity.

    Examples
    --------
    >>> a = np.zeros((1, 4, 4)); a[0, 0, 0] = 1.0
    >>> roi = np.zeros((1, 4, 4), bool); roi[0, :2, :2] = True
    >>> attribution_in_roi(a, roi).round(2).to_dict("records")
    [{'positive_in_roi': 1.0, 'roi_area': 0.25, 'ratio': 4.0}]
    """
    attributions = np.asarray(attributions, dtype=np.float64)
    roi = np.asarray(roi)
    if attributions.ndim != 3 or roi.shape != attributions.shape:
        raise ValueError(f"attributions and roi must both be (n, S, S); got {attributions.shape} and {roi.shape}")
    if roi.dtype != bool:
        if not np.issubdtype(roi.dtype, np.integer) or not np.isin(roi, (0, 1)).all():
            raise ValueError(f"roi must be boolean (or 0/1 integers), got dtype {roi.dtype}")
        roi = roi.astype(bool)
    if not np.isfinite(attributions).all():
        bad = np.flatnonzero(~np.isfinite(attributions).all(axis=(1, 2)))
        raise ValueError(f"attributions hold NaN or infinity (images {bad[:5].tolist()})")
    positive = np.clip(attributions, 0.0, None)
    total = positive.sum(axis=(1, 2))
    inside = (positive * roi).sum(axis=(1, 2))
    area = roi.mean(axis=(1, 2), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)
        ratio = np.where(area > 0, share / np.where(area > 0, area, 1.0), np.nan)
    return pd.DataFrame({"positive_in_roi": share, "roi_area": area, "ratio": ratio})


# ------------------------------------------------------------------------------------------ panels


def _gray(image: np.ndarray) -> np.ndarray:
    """(C, S, S) in [0, 1] → (S, S): the image itself, or the luminance of an RGB image."""
    if image.shape[0] == 3:
        return np.tensordot(np.array([0.299, 0.587, 0.114]), image, axes=1)
    return image.mean(axis=0)


def _show(ax: plt.Axes, image: np.ndarray) -> None:
    if image.shape[0] == 3:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
    else:
        ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1)


def _outline(ax: plt.Axes, roi: np.ndarray, colour: str) -> None:
    if roi.any() and not roi.all():
        ax.contour(roi.astype(float), levels=[0.5], colors=colour, linewidths=0.9)


def attribution_panels(
    images: np.ndarray, rois: np.ndarray | None, attributions: np.ndarray, captions: list[str], title: str
) -> Figure:
    """One row per image: the image, the image with the ROI outline, and the attribution overlay.

    The overlay draws the attribution with a diverging colour map (:data:`ATTRIBUTION_CMAP`: red
    positive, blue negative) centred at zero with symmetric limits per image (± the image's largest
    absolute attribution), semi-transparent over the gray image, with the ROI outline on top and a
    colour bar. Without ROIs (``rois=None``, data without masks) the ROI column is left out: two
    columns, the image and the overlay.

    Parameters
    ----------
    images : np.ndarray of shape (n, C, S, S)
        Gray (C = 1) or RGB (C = 3) images in [0, 1] (torch tensors are accepted).
    rois : np.ndarray of shape (n, S, S), bool, or None
        The ROI of each image, or None.
    attributions : np.ndarray of shape (n, S, S)
        Attribution maps, e.g. from :func:`explain`.
    captions : list of str
        One per image, written beside its row (e.g. the image id, label and probability).
    title : str
        The figure's title (e.g. model, class and test strategy).

    Returns
    -------
    matplotlib.figure.Figure
        Not saved; pass it to :func:`maskaudit.report.figures.save_figure`.

    Raises
    ------
    ValueError
        If there are no images or the shapes and the number of captions do not agree.
    """
    images = _as_numpy(images)
    attributions = _as_numpy(attributions)
    rois = None if rois is None else _as_numpy(rois).astype(bool)
    n = images.shape[0] if images.ndim == 4 else -1
    if n < 1 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (n, C, S, S) with n >= 1 and C = 1 or 3, got {images.shape}")
    if attributions.shape != (n, *images.shape[2:]):
        raise ValueError(
            f"attributions must be (n, S, S) = {(n, *images.shape[2:])} for images {images.shape}, "
            f"got {attributions.shape}"
        )
    if rois is not None and rois.shape != attributions.shape:
        raise ValueError(f"rois must be (n, S, S) = {attributions.shape}, got {rois.shape}")
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    n_cols = 3 if rois is not None else 2
    fig, axes = plt.subplots(n, n_cols, figsize=(2.3 * n_cols + 0.6, 2.3 * n + 0.5), dpi=150, squeeze=False)
    headers = ["image", "ROI", "attribution"] if rois is not None else ["image", "attribution"]
    for c, header in enumerate(headers):
        axes[0, c].set_title(header, fontsize=8)
    for r in range(n):
        image, values = images[r], attributions[r]
        row = axes[r]
        _show(row[0], image)
        row[0].set_ylabel(captions[r], fontsize=7)
        if rois is not None:
            _show(row[1], image)
            _outline(row[1], rois[r], "#ffd400")
        overlay = row[-1]
        overlay.imshow(_gray(image), cmap="gray", vmin=0, vmax=1)
        finite = values[np.isfinite(values)]
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        limit = limit if limit > 0 else 1.0
        heat = overlay.imshow(values, cmap=ATTRIBUTION_CMAP, vmin=-limit, vmax=limit, alpha=0.6)
        if rois is not None:
            _outline(overlay, rois[r], "black")
        cbar = fig.colorbar(heat, ax=overlay, fraction=0.046, pad=0.04)
        cbar.ax.tick_params(labelsize=6)
        cbar.formatter.set_powerlimits((-2, 3))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
