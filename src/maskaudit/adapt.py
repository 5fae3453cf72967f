"""Light cross-masking (issue 17): a probed model fine-tuned on masked images, and the probe's shape control.

A probe (:mod:`maskaudit.probe_audit`) scores a model trained elsewhere as it is; its cells on masked
images cannot tell "the ROI alone lacks the evidence" from "masked images are unlike anything the model
saw". ``adapt: {strategies: [...]}`` fills in the cells a full audit gets from models trained on masked
images, at a fraction of the cost: for each listed masking and each of the run's patient-grouped folds,
one job (:func:`adapt_job`) fine-tunes a copy of each probed model on that fold's training images under
that masking, with :func:`maskaudit.train.train_job` (Adam, BCE, early stopping on the validation loss,
per-epoch checkpoints, resumable, one fingerprint per job), starting from the model's own weights and
through its own preprocessing (:class:`~maskaudit.probe.ProbedModel`). The copy is named
``<model>+<masking>`` in every table (:func:`maskaudit.strategies.adapted_name`) and is scored on every
test masking, as a full audit's model is.

``roi_shape`` (the ROI's binary mask alone) is not an image a probed model can be adapted to: it is the
shape-leakage control, a small CNN (``small_cnn``) trained from scratch on the masks alone, resized to
``adapt.shape.size`` pixels first (:class:`ShapeModel`, :func:`shape_job`; job ``roi_shape``), shared by
every probed model's verdict.

What ``adapt.layers`` trains, for every source that is a torch module (python entry point, TorchScript,
torchxrayvision; ONNX runs outside torch and cannot be adapted), on the underlying network (``ProbedModel.net``):

``head``
    the parameters of the **last module that owns parameters**, in registration order: the final
    ``Linear`` (a maskaudit model's ``classifier.1``, torchxrayvision DenseNet's ``classifier``, its
    ResNet's ``model.fc``).
``last_block``
    every parameter from the **last block** on, in registration order (the head included). The block is found
    by descending from the network: through a module that is the only one with parameters besides the head's
    (DenseNet's ``features``, xrv ResNet's ``model``), then, among the children with parameters there, the last
    that has children with parameters of its own (DenseNet's ``features.denseblock4``, then ``norm5`` and the
    head; ResNet's ``layer4``, then ``fc``); in a flat stack of layers (maskaudit's ``small_cnn``) the last
    convolution (a parameter of 3 or more dimensions) and what follows it (``features.12`` … ``classifier.1``).
``all``
    every parameter.

BatchNorm layers update their running statistics on the masked training images whatever ``layers`` says (as
``model.freeze: study`` does): part of what adapting to a masking is. A TorchScript model saved frozen
(``torch.jit.freeze``) keeps its weights as constants: it has no parameters to train, which is an error.

Training takes logits: a model with ``output.activation: sigmoid`` gives them; for ``softmax`` or ``none`` (already
probabilities, e.g. a calibrated torchxrayvision model) the logit of its class probabilities is trained
(:class:`AdaptedModel`). A dataset class the model has no output for stays unpredicted (NaN), and takes no part
in the loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskaudit.config import ModelConfig, ProbedModelConfig, TrainConfig
from maskaudit.data.splits import Splits
from maskaudit.data.store import Store
from maskaudit.errors import MaskauditError
from maskaudit.models import build_model, load_checkpoint
from maskaudit.probe import ProbedModel, load_probed_model
from maskaudit.rundir import write_json
from maskaudit.seeds import derive_seed
from maskaudit.strategies import MaskSpec
from maskaudit.train import train_job

#: What ``adapt.layers`` may say (the module's docstring).
LAYERS = ("head", "last_block", "all")

#: Probabilities are clamped to [EPS, 1 - EPS] before their logit is taken.
EPS = 1e-6

#: The shape control's architecture: small, trained from scratch, fast on the CPU.
SHAPE_ARCH = ModelConfig(arch="small_cnn", weights="none", freeze="none")


# ------------------------------------------------------------------------------------------ what is trained


def _has_parameters(module: nn.Module) -> bool:
    return next(iter(module.parameters()), None) is not None


def _owns_parameters(module: nn.Module) -> bool:
    return next(iter(module.parameters(recurse=False)), None) is not None


def _is_block(module: nn.Module) -> bool:
    """A module with children that have parameters (DenseNet's dense block, ResNet's layer): not a single layer."""
    return any(_has_parameters(child) for child in module.children())


def _holds(name: str, inner: str) -> bool:
    return inner == name or inner.startswith(f"{name}.")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def head_module(net: nn.Module) -> str:
    """The name of the head: the last module (in registration order) that owns parameters itself; ``""`` is ``net``.

    Raises
    ------
    MaskauditError
        When ``net`` has no parameters (e.g. a frozen TorchScript module).
    """
    owners = [name for name, module in net.named_modules() if _owns_parameters(module)]
    if not owners:
        raise MaskauditError("it has no parameters to train (a TorchScript module saved after torch.jit.freeze "
                             "keeps its weights as constants); save it unfrozen, or give it as python")
    return owners[-1]


def last_block_module(net: nn.Module) -> str:
    """The name of the last block before the head (the module's docstring, ``last_block``)."""
    head = head_module(net)
    here, prefix = net, ""
    while True:
        kids = [(_join(prefix, name), child) for name, child in here.named_children() if _has_parameters(child)]
        holder = next(((name, child) for name, child in kids if _holds(name, head)), None)
        body = [(name, child) for name, child in kids if not _holds(name, head)]
        if not body:  # only the head's branch has parameters here: look inside it, unless it is the head
            if holder is None or holder[0] == head:
                return head
            here, prefix = holder[1], holder[0]
            continue
        if len(body) == 1 and _is_block(body[0][1]):  # one backbone beside the head: its blocks are inside
            here, prefix = body[0][1], body[0][0]
            continue
        blocks = [name for name, child in body if _is_block(child)]
        if blocks:
            return blocks[-1]
        convolutions = [name for name, child in body if any(p.dim() >= 3 for p in child.parameters())]
        return (convolutions or [name for name, _ in body])[-1]


def trainable_names(net: nn.Module, layers: str) -> list[str]:
    """The parameter names ``layers`` trains (``head``, ``last_block`` or ``all``), in registration order.

    Examples
    --------
    >>> from maskaudit.models import ModelConfig, build_model
    >>> net = build_model(ModelConfig(arch="small_cnn", weights="none"), n_classes=2, in_channels=1)
    >>> trainable_names(net, "head")
    ['classifier.1.weight', 'classifier.1.bias']
    >>> trainable_names(net, "last_block")[:3]
    ['features.12.weight', 'features.13.weight', 'features.13.bias']
    """
    if layers not in LAYERS:
        raise ValueError(f"layers={layers!r}; expected one of {', '.join(LAYERS)}")
    names = [name for name, _ in net.named_parameters()]
    if not names:
        head_module(net)  # raises, saying why
    if layers == "all":
        return names
    head = head_module(net)
    if layers == "head":
        return [name for name in names if name.rpartition(".")[0] == head]
    block = last_block_module(net)
    start = next(i for i, name in enumerate(names) if _holds(block, name.rpartition(".")[0]))
    return names[start:] + [name for name in names[:start] if name.rpartition(".")[0] == head]


def select_trainable(net: nn.Module, layers: str) -> list[str]:
    """Set ``requires_grad`` on exactly the parameters of :func:`trainable_names`; returns their names."""
    chosen = set(trainable_names(net, layers))
    for name, param in net.named_parameters():
        param.requires_grad_(name in chosen)
    return [name for name, _ in net.named_parameters() if name in chosen]


# ------------------------------------------------------------------------------------------ the models


class AdaptedModel(nn.Module):
    """A :class:`ProbedModel` as :func:`~maskaudit.train.train_job` trains it: per dataset class a logit.

    The logit itself for ``sigmoid`` outputs, else the logit of the class probability; 0 (a constant, no
    gradient) for a class the model does not predict. Its state dict is the probed model's, under ``probed.``.
    """

    def __init__(self, probed: ProbedModel) -> None:
        super().__init__()
        self.probed = probed
        self.n_classes = probed.n_classes

    def forward(self, x: Tensor) -> Tensor:
        if self.probed.activation == "sigmoid":
            logits = self.probed(x)
        else:
            logits = torch.logit(self.probed.probabilities(x).clamp(EPS, 1 - EPS))
        return torch.nan_to_num(logits, nan=0.0)


class ShapeModel(nn.Module):
    """The shape control: the ROI mask image resized (area) to ``size`` pixels, then a small CNN (logits).

    Images smaller than ``size`` are kept as they are (at least 32 px, the small CNN's least).
    """

    def __init__(self, n_classes: int, in_channels: int, size: int) -> None:
        super().__init__()
        self.size, self.n_classes = size, n_classes
        self.net = build_model(SHAPE_ARCH, n_classes=n_classes, in_channels=in_channels)

    def forward(self, x: Tensor) -> Tensor:
        side = max(32, min(self.size, x.shape[-1]))
        if x.shape[-1] != side:
            x = F.interpolate(x.float(), size=(side, side), mode="area" if x.shape[-1] > side else "bilinear")
        return self.net(x)


def load_probed(config: ProbedModelConfig, store: Store, device: torch.device, seed: int) -> ProbedModel:
    """The probed model, loaded as the probe loads it; an untrained one (``pretrained: false``) gets the same
    random weights in every process (a stream of the run's seed), without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "probe", config.name))
        return load_probed_model(config, store.classes, store.channels, device, store.image_size)


# ------------------------------------------------------------------------------------------ the jobs


def _settings(config: Any, epochs: int, lr: float, patience: int, batch_size: int, **more: Any) -> TrainConfig:
    """The training settings of an adapt job: the recipe's, and how to run (device, workers) from ``train``."""
    return TrainConfig(epochs=epochs, lr=lr, patience=patience, batch_size=batch_size,
                       device=config.train.device, num_workers=config.train.num_workers, **more)


def adapt_job(config: Any, store: Store, splits: Splits, spec: MaskSpec, probed: ProbedModelConfig, masking: str,
              name: str, fold: int, job_dir: Path, fingerprint: str) -> dict:
    """Fine-tune a copy of ``probed`` on fold ``fold``'s training images under ``masking`` into ``job_dir``.

    ``config`` is the model part's view of the config (its ``adapt`` recipe, ``seed``, how to run). Returns
    :func:`~maskaudit.train.train_job`'s summary.

    ``job_dir/adapt.json`` says which model, which masking and which modules were trained.

    Raises
    ------
    MaskauditError
        One line naming the model: it is not a torch module (ONNX), or has nothing to train.
    """
    a = config.adapt
    device = torch.device("cpu")  # loaded on the CPU; train_job moves it
    model = load_probed(probed, store, device, config.seed)
    if model.net is None or probed.source == "onnx":
        raise MaskauditError(f"model {probed.name!r} (onnx): cannot be adapted: onnxruntime runs it outside torch, "
                             "so it has no gradients; remove `adapt`, or give it as python or torchscript")
    try:
        trained = select_trainable(model.net, a.layers)
    except MaskauditError as exc:
        raise MaskauditError(f"model {probed.name!r} ({probed.source}): cannot be adapted: {exc}") from exc
    settings = _settings(config, a.epochs, a.lr, a.patience, a.batch_size, min_delta=a.min_delta,
                         augment=a.augment, amp=a.amp)
    write_json(job_dir / "adapt.json", {"model": probed.name, "masking": masking, "layers": a.layers,
                                        "trained": _spans(trained)})  # what the report says of it
    return train_job(config, store, splits, spec, name, fold, job_dir, fingerprint, start=AdaptedModel(model),
                     settings=settings, masking=masking)


def shape_job(config: Any, store: Store, splits: Splits, spec: MaskSpec, strategy: str, fold: int, job_dir: Path,
              fingerprint: str) -> dict:
    """Train the shape control (:class:`ShapeModel`) from scratch on fold ``fold``'s masks (``strategy``)."""
    s = config.adapt.shape
    torch.manual_seed(derive_seed(config.seed, "train", strategy, fold))
    model = ShapeModel(len(store.classes), store.channels, s.size)
    settings = _settings(config, s.epochs, s.lr, s.patience, s.batch_size, augment=False)
    return train_job(config, store, splits, spec, strategy, fold, job_dir, fingerprint, start=model,
                     settings=settings)


def load_adapted(probed: ProbedModelConfig, store: Store, job_dir: Path, device: torch.device,
                 seed: int) -> ProbedModel:
    """The probed model with the weights its adapt job kept (``job_dir/model.pt``), in eval mode on ``device``."""
    wrapper = AdaptedModel(load_probed(probed, store, torch.device("cpu"), seed))
    load_checkpoint(wrapper, job_dir / "model.pt")
    return wrapper.probed.to(device).eval()


def load_shape(store: Store, size: int, job_dir: Path, device: torch.device) -> ShapeModel:
    """The shape control its job trained, in eval mode on ``device``."""
    model = ShapeModel(len(store.classes), store.channels, size)
    load_checkpoint(model, job_dir / "model.pt")
    return model.to(device).eval()


def _spans(names: list[str]) -> list[str]:
    """Parameter names grouped by module, in order (``features.12``, ``classifier.1``): what job.json says."""
    return list(dict.fromkeys(name.rpartition(".")[0] or name for name in names))

