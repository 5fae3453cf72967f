"""Classifiers built from a name, with the study's head, freeze policy and input adapter (SPEC §4).

A registry maps an architecture name to a builder (``@register("densenet121")``); :func:`build_model`
looks the name up, builds the network, loads its backbone weights and applies the freeze policy.
Every model is a :class:`Classifier` with the same interface:

- ``forward(x)`` takes float images ``(B, C_in, S, S)`` in [0, 1] (``C_in`` = 1 for X-rays, 3 for
  fundus photographs) and returns logits ``(B, K)``;
- ``embed(x)`` returns the penultimate features ``(B, F)``, the flattened input of the last Linear
  (DenseNet-121: the 1024-d vector of SPEC §6.3);
- the first step of both is an input adapter: a 1-channel image is repeated to 3 channels for an
  ImageNet backbone, then optionally normalised with ImageNet's mean and std (``normalize: imagenet``;
  the study feeds [0, 1] images unnormalised, which is the default).

The parameter names follow torchvision's (``features.denseblock4.denselayer16...``) and the head is
always ``classifier = Sequential(Flatten(), Linear(F, K))``, so a maskaudit checkpoint reads like the
study's model. No module computes in place: torchvision's ``DenseNet.forward`` applies
``F.relu(..., inplace=True)`` functionally, which breaks SHAP's DeepExplainer and captum's hook-based
explainers (shap issues #3466, #3565, #3938). Our forward is written out with non-in-place
``nn.ReLU`` modules instead, and ResNet's shared ReLU and in-place residual add are split, so
gradient explainers and ``register_full_backward_hook`` work on every architecture here. (SHAP's
DeepExplainer also needs a correct DeepLIFT rule for the stems' overlapping max-pooling, which
shap's own rule is not: :mod:`maskaudit.analyses.explain` supplies one.)

Weights are data about an architecture, kept apart from it: ``weights: imagenet`` downloads
torchvision's ImageNet weights (or reads them from torch.hub's cache), ``weights: none`` starts from
random initialisation, and any other value is a path to a local state dict of the torchvision model
(e.g. ``densenet121-a639ec97.pth``). Files are always read with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import DenseNet121_Weights, ResNet18_Weights, densenet121, resnet18
from torchvision.models.resnet import BasicBlock

from maskaudit.config import ModelConfig
from maskaudit.errors import MaskauditError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "Builder",
    "Classifier",
    "build_model",
    "load_checkpoint",
    "load_weights_file",
    "register",
    "trainable_parameter_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: A builder makes the network for ``(config, n_classes, in_channels)`` and loads its backbone weights;
#: :func:`build_model` validates the arguments first and applies the freeze policy afterwards.
Builder = Callable[[ModelConfig, int, int], "Classifier"]

#: Architecture name → builder, filled by :func:`register`.
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register a model builder under ``name``.

    Parameters
    ----------
    name : str
        The value of ``model.arch`` in the config that selects this builder.

    Returns
    -------
    decorator
        Returns the builder unchanged after recording it in :data:`MODELS`.

    Raises
    ------
    ValueError
        If ``name`` is already registered (a programming error, not a user error).

    Examples
    --------
    >>> @register("my_net")                                    # doctest: +SKIP
    ... def build_my_net(config, n_classes, in_channels): ...
    """

    def decorator(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered (by {MODELS[name].__qualname__})")
        MODELS[name] = builder
        return builder

    return decorator


# ------------------------------------------------------------------------------------------ classifier


class Classifier(nn.Module):
    """A backbone ``features``, ReLU + global average pooling, and ``classifier = Flatten → Linear``.

    Parameters
    ----------
    arch : str
        The registry name, kept for reports and checkpoints.
    features : nn.Module
        Maps the adapted input ``(B, backbone_channels, S, S)`` to feature maps ``(B, F, h, w)``.
    feature_dim : int
        ``F``, the width of the penultimate vector.
    n_classes : int
        ``K``, the number of logits.
    in_channels : int
        Channels of the images the model is fed: 1 (X-ray) or 3 (fundus).
    backbone_channels : int
        Channels the backbone expects; a 1-channel input is repeated when this is 3.
    normalize : {"none", "imagenet"}
        Whether the adapter subtracts ImageNet's mean and divides by its std.
    final_relu : bool
        Whether a (non-in-place) ReLU follows ``features``, as in DenseNet.
    study_trainable : tuple of str or None
        Parameter-name prefixes left trainable by the freeze policy ``study``; None: nothing frozen.

    Attributes
    ----------
    arch, in_channels, n_classes, feature_dim : as above.
    """

    def __init__(
        self,
        arch: str,
        features: nn.Module,
        feature_dim: int,
        n_classes: int,
        in_channels: int,
        backbone_channels: int = 3,
        normalize: str = "none",
        final_relu: bool = False,
        study_trainable: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.feature_dim = feature_dim
        self.repeat_channels = in_channels == 1 and backbone_channels == 3
        self.normalize = normalize == "imagenet"
        self.study_trainable = study_trainable
        channels = backbone_channels if self.repeat_channels else in_channels
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if channels == 1:  # a gray backbone (small_cnn) normalised with ImageNet: the channel average
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        # Not persistent: checkpoints do not depend on the normalisation setting.
        self.register_buffer("mean", mean.view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, channels, 1, 1), persistent=False)
        self.features = features
        self.relu = nn.ReLU(inplace=False) if final_relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(feature_dim, n_classes))

    def adapt(self, x: Tensor) -> Tensor:
        """The input adapter: channel repeat for ImageNet backbones, then optional normalisation."""
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(
                    f"{self.arch} was built for {self.in_channels}-channel images (B, C, S, S), "
                    f"got a tensor of shape {tuple(x.shape)}"
                )
        if self.repeat_channels:
            x = x.repeat(1, 3, 1, 1)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x

    def _pooled(self, x: Tensor) -> Tensor:
        return self.pool(self.relu(self.features(self.adapt(x))))

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, F)``: the flattened input of the last Linear (SPEC §6.3)."""
        return torch.flatten(self._pooled(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K)`` for float images ``(B, in_channels, S, S)`` in [0, 1]."""
        return self.classifier(self._pooled(x))

    def apply_freeze(self, policy: str) -> None:
        """``study``: freeze every parameter but the ``study_trainable`` prefixes; ``none``: train all.

        BatchNorm layers keep updating their running statistics in train mode either way, as in the study.
        """
        if policy not in ("study", "none"):
            raise ValueError(f"model.freeze={policy!r}; expected 'study' or 'none'")
        keep = self.study_trainable
        for name, param in self.named_parameters():
            param.requires_grad_(policy == "none" or keep is None or name.startswith(keep))


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``, in registration order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


# ------------------------------------------------------------------------------------------ weights


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Read a state dict with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Parameters
    ----------
    path : str or Path
        A file written by ``torch.save(model.state_dict(), path)``.

    Returns
    -------
    dict
        The mapping stored in the file.

    Raises
    ------
    MaskauditError
        If the file is missing, is not a PyTorch file, holds something other than a mapping, or
        holds pickled objects that ``weights_only=True`` refuses (the message says what to do).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MaskauditError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaskauditError(
            f"{path}: refused by torch.load(weights_only=True) because it pickles more than tensors "
            f"({first}). Re-save only the weights with `torch.save(model.state_dict(), path)` in a "
            "trusted environment; maskaudit never unpickles arbitrary objects"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise MaskauditError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    if not isinstance(state, Mapping):
        raise MaskauditError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}"
        )
    return dict(state)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a maskaudit checkpoint (a state dict written by training) into ``model``, strictly.

    Raises
    ------
    MaskauditError
        If the file is missing ("run `maskaudit train` for this job first"), refused, or does not
        match the model (another architecture or number of classes).
    """
    path = Path(path)
    if not path.is_file():
        raise MaskauditError(f"no checkpoint at {path}; run `maskaudit train` for this job first")
    state = load_weights_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        arch = getattr(model, "arch", type(model).__name__)
        raise MaskauditError(
            f"{path} does not fit the configured model ({arch}): {_first_lines(str(exc))}. "
            "Was it trained with another model.arch or class list? Retrain with `maskaudit train`"
        ) from exc


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:n]) + (" ..." if len(lines) > n else "")


def state_mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Any]) -> str:
    """How ``state`` fails to fit a module whose state dict is ``expected`` ("" when it fits): counts of missing
    and unexpected keys and of shape mismatches, each with up to three examples."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if isinstance(state.get(k), Tensor) and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
    return "; ".join(parts)


def _load_backbone(
    features: nn.Module, state: Mapping[str, Tensor], rename: Callable[[str], str | None], source: str
) -> None:
    """Load a torchvision state dict into ``features``.

    ``rename`` maps each key to its name inside ``features``, or to None for a head key (dropped).
    """
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        new = rename(key)
        if new is not None:
            mapped[new] = value
    problems = state_mismatch(features.state_dict(), mapped)
    if problems:
        raise MaskauditError(f"{source} is not a state dict of this architecture's torchvision model: {problems}")
    features.load_state_dict(mapped, strict=True)


def _backbone_state(config: ModelConfig, imagenet: Any) -> tuple[dict[str, Tensor], str] | None:
    """The state dict ``config.weights`` names, with where it came from; None for ``weights: none``."""
    if config.weights == "none":
        return None
    if config.weights == "imagenet":
        try:
            state = imagenet.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet.url).name
            raise MaskauditError(
                f"could not get the ImageNet weights of {config.arch} ({imagenet}) from {imagenet.url}: "
                f"{exc}. Offline, set `model.weights: none`, or download that file elsewhere and set "
                f"`model.weights: /path/to/{Path(imagenet.url).name}` (or copy it to {cached})"
            ) from exc
        return state, f"{imagenet} ({imagenet.url})"
    path = Path(config.weights).expanduser()
    if not path.is_file():
        raise MaskauditError(
            f"model.weights={config.weights!r}: no such file; use 'imagenet', 'none' or the path of a "
            f"local state dict of torchvision's {config.arch}"
        )
    return load_weights_file(path), str(path)


def _require_channels(arch: str, in_channels: int) -> None:
    if in_channels not in (1, 3):
        raise ValueError(f"{arch}: images must have 1 or 3 channels, got {in_channels}")


# ------------------------------------------------------------------------------------------ densenet

#: torchvision's pre-0.4 DenseNet checkpoints (the ones it still downloads) name the layers of a
#: dense layer ``norm.1``/``conv.2``; torchvision's ``_load_state_dict`` renames them with this pattern.
_OLD_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_key(key: str) -> str | None:
    match = _OLD_DENSE_KEY.match(key)
    if match:
        key = match.group(1) + match.group(2)
    if key.startswith("classifier."):
        return None  # the head is always new
    return key.removeprefix("features.") if key.startswith("features.") else key


@register("densenet121")
def build_densenet121(config: ModelConfig, n_classes: int, in_channels: int) -> Classifier:
    """DenseNet-121 as in the study (SPEC §4): torchvision's backbone, ReLU, global average pooling,
    ``classifier = Sequential(Flatten(), Linear(1024, K))``.

    Freeze ``study`` leaves ``features.denseblock4.denselayer16.*`` and ``classifier.*`` trainable.
    Every ``nn.ReLU`` is made non-in-place and the final ReLU is a module, not torchvision's functional
    in-place call, so SHAP's DeepExplainer and captum's hook-based methods run on it.
    """
    _require_channels(config.arch, in_channels)
    net = densenet121(weights=None)
    loaded = _backbone_state(config, DenseNet121_Weights.IMAGENET1K_V1)
    if loaded is not None:
        _load_backbone(net.features, loaded[0], _densenet_key, loaded[1])
    _no_inplace(net.features)
    return Classifier(
        config.arch,
        net.features,
        feature_dim=net.classifier.in_features,
        n_classes=n_classes,
        in_channels=in_channels,
        backbone_channels=3,
        normalize=config.normalize,
        final_relu=True,
        study_trainable=("features.denseblock4.denselayer16.", "classifier."),
    )


def _no_inplace(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.ReLU):
            sub.inplace = False


# ------------------------------------------------------------------------------------------ resnet


class _HookSafeBasicBlock(BasicBlock):
    """torchvision's BasicBlock with its one ReLU module split in two and an out-of-place residual add.

    The state dict is unchanged (ReLU has no parameters); module hooks see each ReLU call once.
    """

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu2(out + identity)


def _resnet_key(key: str) -> str | None:
    return None if key.startswith("fc.") else key


@register("resnet18")
def build_resnet18(config: ModelConfig, n_classes: int, in_channels: int) -> Classifier:
    """ResNet-18 (torchvision) with head ``Flatten → Linear(512, K)``.

    Freeze ``study`` leaves the last BasicBlock (``features.layer4.1.*``) and ``classifier.*`` trainable.
    """
    _require_channels(config.arch, in_channels)
    net = resnet18(weights=None)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    features = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))
    loaded = _backbone_state(config, ResNet18_Weights.IMAGENET1K_V1)
    if loaded is not None:
        _load_backbone(features, loaded[0], _resnet_key, loaded[1])
    for block in features.modules():
        if isinstance(block, BasicBlock):
            block.__class__ = _HookSafeBasicBlock
            block.relu2 = nn.ReLU(inplace=False)
    _no_inplace(features)
    last = len(net.layer4) - 1
    return Classifier(
        config.arch,
        features,
        feature_dim=net.fc.in_features,
        n_classes=n_classes,
        in_channels=in_channels,
        backbone_channels=3,
        normalize=config.normalize,
        final_relu=False,
        study_trainable=(f"features.layer4.{last}.", "classifier."),
    )


# ------------------------------------------------------------------------------------------ small cnn

SMALL_CNN_WIDTHS = (16, 32, 64, 64)


@register("small_cnn")
def build_small_cnn(config: ModelConfig, n_classes: int, in_channels: int) -> Classifier:
    """A small, fast CNN for CPU runs, tests and demos; no pretrained weights.

    Four ``Conv3x3 → BatchNorm → ReLU → MaxPool2x2`` blocks (16, 32, 64, 64 channels), global average
    pooling and ``Flatten → Linear(64, K)``. It takes 1 or 3 channels natively (no repeat) and works
    for any S >= 32 (the last feature map is S/16). Freeze ``study`` freezes nothing: the network is
    trained from scratch. ``weights`` must be ``none``.
    """
    _require_channels(config.arch, in_channels)
    if config.weights != "none":
        raise MaskauditError(
            f"small_cnn has no pretrained weights (model.weights={config.weights!r}); "
            "set `model.weights: none`"
        )
    layers: list[nn.Module] = []
    width_in = in_channels
    for width in SMALL_CNN_WIDTHS:
        layers += [
            nn.Conv2d(width_in, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
        ]
        width_in = width
    return Classifier(
        config.arch,
        nn.Sequential(*layers),
        feature_dim=width_in,
        n_classes=n_classes,
        in_channels=in_channels,
        backbone_channels=in_channels,
        normalize=config.normalize,
        final_relu=False,
        study_trainable=None,
    )


# ------------------------------------------------------------------------------------------ factory


def build_model(config: ModelConfig, n_classes: int, in_channels: int) -> Classifier:
    """Build ``config.arch`` with ``n_classes`` logits for ``in_channels``-channel images.

    Loads the backbone weights ``config.weights`` names (``imagenet``, ``none`` or a local file) and
    applies the freeze policy ``config.freeze``.

    Parameters
    ----------
    config : ModelConfig
        Architecture, weights, freeze policy and input normalisation.
    n_classes : int
        Number of classes (logits), at least 1.
    in_channels : int
        1 (gray X-rays) or 3 (RGB fundus photographs).

    Returns
    -------
    Classifier
        In train mode, on the CPU.

    Raises
    ------
    MaskauditError
        For an unknown architecture (the message lists the known ones), or weights that cannot be
        loaded.
    ValueError
        For sizes no data source gives (channels other than 1 or 3, no class): a caller's mistake.

    Examples
    --------
    >>> model = build_model(ModelConfig(arch="small_cnn", weights="none"), n_classes=2, in_channels=1)
    >>> model(torch.rand(4, 1, 64, 64)).shape
    torch.Size([4, 2])
    """
    if config.arch not in MODELS:
        raise MaskauditError(f"unknown model.arch {config.arch!r}; known: {', '.join(sorted(MODELS))}")
    if n_classes < 1:
        raise ValueError(f"a classifier needs at least one class, got n_classes={n_classes}")
    model = MODELS[config.arch](config, n_classes, in_channels)
    model.apply_freeze(config.freeze)
    return model
