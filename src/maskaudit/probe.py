"""Probed models: classifiers trained elsewhere, loaded from their source and audited as they are.

:func:`load_probed_model` turns a :class:`~maskaudit.config.ProbedModelConfig` into a
:class:`ProbedModel`, a ``torch.nn.Module`` with the interface the pipeline expects of a model: it
takes masked images ``(N, C, S, S)`` in [0, 1] at the run's image size (``C`` = the data's channels)
and returns one column per *dataset* class, in the dataset's class order.

Between the two it does what the model was trained to expect (``config.input``):

1. resize (bilinear, antialiased) to ``input.size``;
2. convert channels: gray → 3 copies, RGB → luminance ``0.299 R + 0.587 G + 0.114 B``;
3. map [0, 1] linearly onto ``input.range`` (torchxrayvision: [-1024, 1024]);
4. ``(x - mean) / std`` per channel when ``input.mean``/``input.std`` are given;

then runs the model, and picks, for every dataset class, the model output of that name
(:func:`match_outputs`; ``output.aliases`` for other spellings). A class the model does not predict
gets a NaN column: it is never guessed.

Sources (``config.source``):

- ``python``: ``entry_point: package.module:function`` called with ``arguments`` must return an
  ``nn.Module``; ``file`` (optional) is a state dict read with ``weights_only=True`` and loaded
  strictly. :func:`maskaudit_model` is such an entry point for models trained by maskaudit.
- ``torchscript``: ``torch.jit.load(file)``.
- ``onnx``: an onnxruntime session (CUDA when the device is CUDA and onnxruntime has it, else CPU).
  Its forward pass goes through numpy, so it is **not differentiable**: gradient-based explainers
  (SHAP deep/gradient) need a python, TorchScript or torchxrayvision model; the partition explainer
  works, as it only calls the model; nor can it be adapted to a masking (``adapt``, :mod:`maskaudit.adapt`).
- ``torchxrayvision``: ``xrv.models.get_model(weights)`` (downloaded into xrv's cache), or with
  ``pretrained: false`` the same architecture untrained, without download (for tests).

Every failure to load is a :class:`~maskaudit.errors.MaskauditError` in one line that names the model.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskaudit.config import ModelConfig, ProbedModelConfig, ProbeInput
from maskaudit.errors import MaskauditError
from maskaudit.models import build_model, load_weights_file, state_mismatch

__all__ = ["LUMINANCE", "ProbedModel", "load_probed_model", "maskaudit_model", "match_outputs"]

#: ITU-R BT.601 luma weights: an RGB image → the gray image a 1-channel model expects.
LUMINANCE = (0.299, 0.587, 0.114)

#: Images per onnxruntime call (a model exported with a fixed batch size runs with that size).
ONNX_CHUNK = 64

#: Side of the load-time check images when neither ``input.size`` nor the run's image size is known.
CHECK_SIZE = 224


# ------------------------------------------------------------------------------------------ outputs


def _normalise(name: str) -> str:
    """Case-insensitive, with runs of spaces, underscores and hyphens treated alike."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def match_outputs(names: Sequence[str], classes: Sequence[str],
                  aliases: Mapping[str, Sequence[str]]) -> dict[str, int | None]:
    """Which model output is which dataset class.

    Parameters
    ----------
    names : list of str
        The model's outputs, in order. Empty names (torchxrayvision's unused outputs) never match.
    classes : list of str
        The dataset's classes.
    aliases : dict
        Dataset class → other names it may go by among the outputs (``{"effusion": ["Effusion"]}``).

    Returns
    -------
    dict
        Dataset class → index of its output, or None when the model does not predict it. Names match
        case-insensitively, with spaces, underscores and hyphens alike (``Pleural_Thickening`` ~
        ``pleural thickening``).

    Raises
    ------
    MaskauditError
        When an alias names a class the dataset does not have, or two outputs match one class.

    Examples
    --------
    >>> match_outputs(["Effusion", "", "Cardiomegaly"], ["effusion", "cardiomegaly", "covid"], {})
    {'effusion': 0, 'cardiomegaly': 2, 'covid': None}
    """
    known = {_normalise(c): c for c in classes}
    unknown = [key for key in aliases if _normalise(key) not in known]
    if unknown:
        raise MaskauditError(
            f"output.aliases names {', '.join(map(repr, unknown))}, not among the dataset's classes "
            f"({', '.join(classes)})"
        )
    wanted: dict[str, set[str]] = {c: {_normalise(c)} for c in classes}
    for key, others in aliases.items():
        wanted[known[_normalise(key)]].update(_normalise(o) for o in others)
    normalised = [_normalise(n) for n in names]
    result: dict[str, int | None] = {}
    for cls in classes:
        hits = [i for i, n in enumerate(normalised) if n and n in wanted[cls]]
        if len(hits) > 1:
            listed = ", ".join(f"#{i} {names[i]!r}" for i in hits)
            raise MaskauditError(
                f"class {cls!r} matches {len(hits)} model outputs ({listed}); make output.names or "
                "output.aliases name exactly one"
            )
        result[cls] = hits[0] if hits else None
    return result


# ------------------------------------------------------------------------------------------ the model


class ProbedModel(nn.Module):
    """A loaded probed model: masked images in, one score per dataset class out.

    Build it with :func:`load_probed_model`.

    Attributes
    ----------
    name : str
        The model's name in every table.
    source : str
        python, torchscript, onnx or torchxrayvision.
    classes : list of str
        The dataset's classes: the columns of :meth:`forward` and :meth:`probabilities`.
    n_classes : int
        ``len(classes)``.
    output_names : list of str
        The model's outputs, in order.
    output_index : dict
        Dataset class → index of the model output that is that class, or None.
    activation : {"sigmoid", "softmax", "none"}
        The resolved activation (``auto`` resolved).
    in_channels : int
        Channels of the images it is fed (the data's).
    input_config : ProbeInput
        The resolved preprocessing (torchxrayvision's defaults filled in).
    net : nn.Module or None
        The underlying torch or TorchScript model; None for ONNX.
    """

    def __init__(
        self,
        name: str,
        source: str,
        net: nn.Module | None,
        session: Any,
        classes: Sequence[str],
        output_names: Sequence[str],
        output_index: Mapping[str, int | None],
        activation: str,
        in_channels: int,
        input_config: ProbeInput,
        layer: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("sigmoid", "softmax", "none"):
            raise ValueError(f"activation must be resolved, got {activation!r}")
        self.name = name
        self.source = source
        self.net = net
        self._session = session
        self.classes = list(classes)
        self.n_classes = len(self.classes)
        self.output_names = list(output_names)
        self.output_index = dict(output_index)
        self.activation = activation
        self.in_channels = in_channels
        self.input_config = input_config
        self.layer = layer
        self.channels = input_config.channels or in_channels
        if self.in_channels not in (1, 3) or self.channels not in (1, 3):
            raise MaskauditError(f"model {name!r}: images must have 1 or 3 channels (data: {in_channels}, "
                                 f"model input: {self.channels})")
        index = [self.output_index[c] for c in self.classes]
        self.register_buffer("_gather", torch.tensor([i if i is not None else 0 for i in index],
                                                     dtype=torch.long), persistent=False)
        self.register_buffer("_predicted", torch.tensor([i is not None for i in index]), persistent=False)
        self.register_buffer("_luminance", torch.tensor(LUMINANCE).view(1, 3, 1, 1), persistent=False)
        mean, std = input_config.mean, input_config.std
        if mean is not None and std is not None:
            if len(mean) not in (1, self.channels):
                raise MaskauditError(f"model {name!r}: input.mean/std have {len(mean)} values for a "
                                     f"{self.channels}-channel input; give 1 or {self.channels}")
            self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)
            self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)
        else:
            self._mean = self._std = None
        if session is not None:
            first = session.get_inputs()[0]
            self._onnx_input = first.name
            self._onnx_output = session.get_outputs()[0].name
            self._onnx_dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(first.type,
                                                                                               np.float32)
            batch = first.shape[0] if first.shape else None
            self._onnx_chunk = batch if isinstance(batch, int) and batch > 0 else ONNX_CHUNK

    # ---------------------------------------------------------------------------------- classes

    @property
    def predicted(self) -> list[str]:
        """The dataset classes the model has an output for."""
        return [c for c in self.classes if self.output_index[c] is not None]

    @property
    def not_predicted(self) -> list[str]:
        """The dataset classes the model has no output for (NaN columns)."""
        return [c for c in self.classes if self.output_index[c] is None]

    def describe(self) -> dict[str, Any]:
        """What the report shows of the model (written to ``probe.json``): its input, activation and mapping.

        ``input`` and ``outputs`` are one-line strings, e.g. ``"224 px, 1 channel, [0, 1] → [-1024, 1024]"``
        and ``"covid → Pneumonia (#8)"``.
        """
        cfg = self.input_config
        conversion = {(1, 3): " (gray repeated)", (3, 1): " (RGB → luminance)"}.get(
            (self.in_channels, self.channels), "")
        parts = [f"{cfg.size} px" if cfg.size is not None else "the run's image size",
                 f"{self.channels} channel{'s' if self.channels > 1 else ''}{conversion}",
                 f"[0, 1] → [{cfg.range[0]:g}, {cfg.range[1]:g}]"]
        if cfg.mean is not None:
            parts.append(f"then (x - {cfg.mean}) / {cfg.std}")
        outputs = "; ".join(f"{c} → {self.output_names[i]} (#{i})" for c in self.predicted
                            if (i := self.output_index[c]) is not None)
        return {"name": self.name, "source": self.source, "input": ", ".join(parts), "activation": self.activation,
                "outputs": outputs, "not_predicted": self.not_predicted, "output_names": self.output_names}

    # ---------------------------------------------------------------------------------- computing

    def preprocess(self, x: Tensor) -> Tensor:
        """Masked images ``(N, in_channels, S, S)`` in [0, 1] → the model's input (``input_config``)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise MaskauditError(f"model {self.name!r} was loaded for {self.in_channels}-channel images "
                                 f"(N, C, S, S); got a tensor of shape {tuple(x.shape)}")
        x = x.float()
        size = self.input_config.size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if self.in_channels == 1 and self.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        elif self.in_channels == 3 and self.channels == 1:
            x = (x * self._luminance).sum(1, keepdim=True)
        low, high = self.input_config.range
        if (low, high) != (0.0, 1.0):
            x = x * (high - low) + low
        if self._mean is not None:
            x = (x - self._mean) / self._std
        return x

    def outputs(self, x: Tensor) -> Tensor:
        """All the model's raw outputs ``(N, len(output_names))`` for masked images ``x``."""
        x = self.preprocess(x)
        out = self.net(x) if self._session is None else self._run_onnx(x)
        if not isinstance(out, Tensor):
            raise MaskauditError(f"model {self.name!r} returned {type(out).__name__}; expected a tensor "
                                 "(N, outputs)")
        if out.dim() != 2 or out.shape[1] != len(self.output_names):
            raise MaskauditError(
                f"model {self.name!r} returned outputs of shape {tuple(out.shape)}, but output.names lists "
                f"{len(self.output_names)} outputs"
            )
        return out.float()

    def _run_onnx(self, x: Tensor) -> Tensor:
        array = x.detach().cpu().numpy().astype(self._onnx_dtype, copy=False)
        step = self._onnx_chunk
        parts = []
        for start in range(0, len(array), step):
            chunk = np.ascontiguousarray(array[start:start + step])
            parts.append(self._session.run([self._onnx_output], {self._onnx_input: chunk})[0])
        out = np.concatenate(parts) if parts else np.zeros((0, len(self.output_names)), np.float32)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def _select(self, scores: Tensor) -> Tensor:
        picked = scores.index_select(1, self._gather)
        return torch.where(self._predicted, picked, picked.new_full((), math.nan))

    def forward(self, x: Tensor) -> Tensor:
        """Per dataset class the score before the final activation ``(N, n_classes)``.

        The logit (sigmoid), the log-softmax over all the model's outputs (softmax) or the raw output
        (none); NaN for a class the model does not predict. Differentiable for every source but ONNX.
        """
        out = self.outputs(x)
        if self.activation == "softmax":
            out = torch.log_softmax(out, dim=1)
        return self._select(out)

    def probabilities(self, x: Tensor) -> Tensor:
        """Per dataset class the probability ``(N, n_classes)``; NaN for a class the model does not predict.

        The softmax is taken over all the model's outputs before the classes are picked.
        """
        out = self.outputs(x)
        if self.activation == "sigmoid":
            out = torch.sigmoid(out)
        elif self.activation == "softmax":
            out = torch.softmax(out, dim=1)
        return self._select(out)

    # ---------------------------------------------------------------------------------- embeddings

    def embedding_layer(self) -> nn.Module:
        """The module whose output is an image's embedding.

        ``config.layer`` (a name from ``named_modules()`` of the underlying model), or by default the
        module registered last before the model's last ``nn.Linear`` (not counting that Linear's
        parents): for a maskaudit model the ``Flatten`` of its head; for torchxrayvision's DenseNet
        ``features.norm5`` (before xrv's functional ReLU and pooling), for its ResNet ``model.avgpool``.

        Raises
        ------
        MaskauditError
            For TorchScript and ONNX models, an unknown ``layer``, or a model without a Linear layer.
        """
        if self.source not in ("python", "torchxrayvision") or self.net is None:
            raise MaskauditError(
                f"model {self.name!r}: embeddings need a python or torchxrayvision model; this one is "
                f"{self.source} (leave it out of the embed analysis, or load it from its python code)"
            )
        modules = dict(self.net.named_modules())
        if self.layer is not None:
            if self.layer not in modules:
                tail = [n for n in modules if n][-8:]
                raise MaskauditError(f"model {self.name!r}: no module named layer={self.layer!r}; its last "
                                     f"modules are {', '.join(tail)}")
            return modules[self.layer]
        names = list(modules)
        linear = [n for n in names if isinstance(modules[n], nn.Linear)]
        if not linear:
            raise MaskauditError(f"model {self.name!r} has no nn.Linear head; set `layer` to the module "
                                 "whose output is the embedding")
        last = linear[-1]
        for name in reversed(names[:names.index(last)]):
            if name and not last.startswith(name + "."):
                return modules[name]
        raise MaskauditError(f"model {self.name!r}: nothing comes before its head {last!r}; set `layer`")

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, F)``: the output of :meth:`embedding_layer` during a forward pass, averaged
        over its spatial dimensions when it has them, then flattened (as :meth:`Classifier.embed`)."""
        layer = self.embedding_layer()
        seen: list[Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            seen.append(tensor.clone())  # a copy: xrv's DenseNet applies an in-place ReLU afterwards

        handle = layer.register_forward_hook(keep)
        try:
            self.outputs(x)
        finally:
            handle.remove()
        if not seen:
            raise MaskauditError(f"model {self.name!r}: its embedding layer did not run in a forward pass; "
                                 "set `layer`")
        feats = seen[-1]
        if feats.dim() > 2:
            feats = feats.flatten(2).mean(2)
        return torch.flatten(feats, 1)


# ------------------------------------------------------------------------------------------ loading


def maskaudit_model(arch: str, n_classes: int, in_channels: int, normalize: str = "none") -> nn.Module:
    """Entry point for probing a model trained by maskaudit: its architecture, untrained.

    With ``source: python``, ``entry_point: maskaudit.probe:maskaudit_model``, ``arguments: {arch:
    small_cnn, n_classes: 2, in_channels: 1}`` and ``file: RUN/jobs/full/fold_0/model.pt`` the
    checkpoint is loaded into it. It takes [0, 1] images and returns logits: leave ``input`` and
    ``output.activation`` at their defaults, and list the run's classes as ``output.names``.
    """
    return build_model(ModelConfig(arch=arch, weights="none", normalize=normalize), n_classes, in_channels)


def _fail(config: ProbedModelConfig, cause: str) -> MaskauditError:
    return MaskauditError(f"model {config.name!r} ({config.source}): {cause}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _load_python(config: ProbedModelConfig) -> nn.Module:
    entry = config.entry_point or ""
    module_name, _, attribute = entry.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise _fail(config, f"entry_point {entry!r} must be 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise _fail(config, f"cannot import {module_name!r} of entry_point {entry!r} ({_first_line(exc)}); "
                            "is its package installed in this environment?") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _fail(config, f"entry_point {entry!r}: {module_name} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise _fail(config, f"entry_point {entry!r} is a {type(target).__name__}, not a callable")
    try:
        net = target(**config.arguments)
    except MaskauditError as exc:
        raise _fail(config, f"{entry}(**arguments) failed: {exc}") from exc
    except Exception as exc:
        raise _fail(config, f"{entry}(**arguments) failed: {_first_line(exc)}") from exc
    if not isinstance(net, nn.Module):
        raise _fail(config, f"{entry} returned a {type(net).__name__}, not a torch.nn.Module")
    if config.file is not None:
        _load_state(config, net)
    return net


def _load_state(config: ProbedModelConfig, net: nn.Module) -> None:
    """Load ``config.file`` (a state dict, or ``{"state_dict": ...}``) into ``net`` strictly."""
    try:
        state: Mapping[str, Any] = load_weights_file(config.file)
    except MaskauditError as exc:
        raise _fail(config, str(exc)) from exc
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    expected = net.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    problems = state_mismatch(expected, state)
    if problems:
        raise _fail(config, f"{config.file} does not fit what {config.entry_point} builds: {problems}")
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise _fail(config, f"{config.file} does not load into {config.entry_point}: {_first_line(exc)}") from exc


def _load_torchscript(config: ProbedModelConfig, device: torch.device) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            return torch.jit.load(str(config.file), map_location=device)
    except Exception as exc:
        raise _fail(config, f"{config.file} is not a readable TorchScript file ({_first_line(exc)})") from exc


def _load_onnx(config: ProbedModelConfig, device: torch.device) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise _fail(config, "source onnx needs onnxruntime: pip install onnxruntime "
                            "(or onnxruntime-gpu for CUDA)") from exc
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(str(config.file), providers=providers)
    except Exception as exc:
        raise _fail(config, f"{config.file} is not a readable ONNX model ({_first_line(exc)})") from exc
    if len(session.get_inputs()) != 1:
        names = ", ".join(i.name for i in session.get_inputs())
        raise _fail(config, f"{config.file} has {len(session.get_inputs())} inputs ({names}); a probed model "
                            "takes one image batch")
    return session


def _xrv_untrained(xrv: Any, weights: str, labels: list[str], resolution: int | None) -> nn.Module:
    """The architecture of ``xrv.models.get_model(weights)``, untrained, without download or calibration."""
    if weights.startswith("densenet"):
        net = xrv.models.DenseNet(weights=None, num_classes=len(labels))
    else:
        import torchvision

        # xrv.models.ResNet always downloads its weights; build its layout by hand instead.
        net = xrv.models.ResNet.__new__(xrv.models.ResNet)
        nn.Module.__init__(net)
        net.weights, net.apply_sigmoid = weights, False
        net.weights_dict = xrv.models.model_urls[weights]
        arch = torchvision.models.resnet101 if weights.startswith("resnet101") else torchvision.models.resnet50
        net.model = arch(num_classes=len(labels), weights=None)
        net.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.targets = list(labels)
    net.pathologies = net.targets
    if resolution is not None:
        net.input_resolution = resolution  # as the pretrained model: xrv resizes other sizes itself
    return net


def _load_xrv(config: ProbedModelConfig) -> tuple[nn.Module, list[str], str]:
    """The xrv model, its output names and the resolved activation (its input convention is filled into
    ``config.input`` by the config itself: :meth:`ProbedModelConfig._xrv_input`)."""
    try:
        import torchxrayvision as xrv
    except ImportError as exc:
        raise _fail(config, "source torchxrayvision needs torchxrayvision: pip install torchxrayvision") from exc
    weights = config.weights or ""
    known = sorted(k for k in xrv.models.model_urls if k.startswith(("densenet", "resnet")))
    if weights not in known:
        raise _fail(config, f"unknown torchxrayvision weights {weights!r}; known: {', '.join(known)}")
    info = xrv.models.model_urls[weights]
    resolution = info.get("input_resolution")
    if config.pretrained:
        try:
            net = xrv.models.get_model(weights)
        except Exception as exc:
            url = info.get("weights_url", "")
            raise _fail(config, f"could not load torchxrayvision weights {weights} ({_first_line(exc)}); "
                                f"offline, download {url} into {xrv.utils.get_cache_dir()}") from exc
    else:
        net = _xrv_untrained(xrv, weights, list(info["labels"]), resolution)
    activation = config.output.activation
    thresholds = getattr(net, "op_threshs", None)
    if activation != "none" and activation != "auto" and thresholds is not None:
        net.op_threshs = None  # sigmoid/softmax: the outputs must be logits, so xrv's calibration is off
        thresholds = None
    if activation == "auto":
        activation = "none" if thresholds is not None else "sigmoid"
    names = [str(n) for n in net.pathologies]
    if thresholds is not None:
        # xrv's calibration outputs a constant 0.5 where the threshold is NaN: not a prediction
        nan = torch.isnan(thresholds.detach().cpu().flatten()).tolist()
        names = ["" if missing else n for n, missing in zip(names, nan, strict=False)]
    return net, names, activation


#: Each probed model source (``models[].source``) and its loader: ``(config, device) -> (torch module or None,
#: onnxruntime session or None, its output names or None, its activation or None)``; the last two are defaults
#: that ``output.names``/``output.activation`` override.
PROBE_SOURCES: dict[str, Callable[[ProbedModelConfig, torch.device], tuple[Any, Any, list[str] | None, str | None]]] = {
    "python": lambda config, device: (_load_python(config), None, None, None),
    "torchscript": lambda config, device: (_load_torchscript(config, device), None, None, None),
    "onnx": lambda config, device: (None, _load_onnx(config, device), None, None),
    "torchxrayvision": lambda config, device: _xrv_module(config),
}


def _xrv_module(config: ProbedModelConfig) -> tuple[nn.Module, None, list[str], str]:
    """:func:`_load_xrv` as a :data:`PROBE_SOURCES` loader: its names and its resolved activation (its own
    calibration, ``output.activation`` considered) replace the config's."""
    net, names, activation = _load_xrv(config)
    return net, None, names, activation


def load_probed_model(config: ProbedModelConfig, classes: Sequence[str], in_channels: int,
                      device: torch.device, image_size: int | None = None) -> ProbedModel:
    """Load ``config``'s model from its source and wrap it as a :class:`ProbedModel` for ``classes``.

    Parameters
    ----------
    config : ProbedModelConfig
        The probed model.
    classes : list of str
        The dataset's classes, in order: the columns of the model's scores.
    in_channels : int
        Channels of the data's images (1 gray, 3 RGB).
    device : torch.device
        Where the model runs (ONNX: CUDA when onnxruntime has the CUDA provider, else CPU).
    image_size : int, optional
        The run's image size ``S``: the size of the load-time check images when ``input.size`` is
        unset (default: the ONNX model's fixed input size, else 224).

    Returns
    -------
    ProbedModel
        In eval mode, on ``device``. One forward pass of check images has run: the model's output
        count matches ``output.names``.

    Notes
    -----
    torchxrayvision: ``output.names`` defaults to the model's pathologies (an output whose calibration
    threshold is NaN, a constant 0.5, is left unnamed); ``output.activation: auto`` is ``none`` when xrv
    calibrates the outputs (pretrained weights: ``op_threshs``), else ``sigmoid``; an explicit
    ``sigmoid`` or ``softmax`` turns the calibration off so the outputs are logits. Each ``input`` field
    the user leaves unset has xrv's convention, filled in by the config (``size`` = the weights' input
    resolution, ``channels`` 1, ``range`` [-1024, 1024]).

    Raises
    ------
    MaskauditError
        One line naming the model: missing module or package, unreadable file, an entry point that
        does not return a module, weights that do not fit, unknown torchxrayvision weights, output
        names that do not match the model's output count, no dataset class predicted.
    """
    names = list(config.output.names) if config.output.names is not None else None
    activation = config.output.activation
    if config.file is not None and not Path(config.file).is_file():  # gone since the config was read
        raise _fail(config, f"file not found: {config.file}")
    net, session, default_names, default_activation = PROBE_SOURCES[config.source](config, device)
    names = names if names is not None else default_names
    activation = default_activation or activation
    if names is None:
        raise _fail(config, "output.names (the model's outputs in order) is required")
    if activation == "auto":
        activation = "sigmoid"
    try:
        index = match_outputs(names, classes, config.output.aliases)
    except MaskauditError as exc:
        raise _fail(config, str(exc)) from exc
    if all(i is None for i in index.values()):
        raise _fail(config, f"it predicts none of the dataset's classes ({', '.join(classes)}); its outputs are "
                            f"{', '.join(repr(n) for n in names if n)}; map them with output.aliases")
    model = ProbedModel(config.name, config.source, net, session, classes, names, index, activation,
                        in_channels, config.input, config.layer)
    model.to(device).eval()
    _check(model, config, in_channels, device, image_size, session)
    return model


def _check(model: ProbedModel, config: ProbedModelConfig, in_channels: int, device: torch.device,
           image_size: int | None, session: Any) -> None:
    """One forward pass of two check images (a ramp over [0, 1]): the model runs and its output count fits."""
    size = image_size or CHECK_SIZE
    if session is not None and config.input.size is None:
        shape = session.get_inputs()[0].shape
        if len(shape) == 4 and isinstance(shape[-1], int):
            size = shape[-1]
    ramp = torch.linspace(0.0, 1.0, size, device=device)
    x = (ramp.view(1, 1, 1, size) * ramp.view(1, 1, size, 1)).expand(2, in_channels, size, size).contiguous()
    try:
        with torch.no_grad():
            out = model.outputs(x)
    except MaskauditError as exc:
        raise _fail(config, str(exc).removeprefix(f"model {config.name!r} ")) from exc
    except Exception as exc:
        raise _fail(config, f"a check forward pass on a {tuple(x.shape)} batch (after input preprocessing) "
                            f"failed: {_first_line(exc)}") from exc
    if not torch.isfinite(out).all():
        warnings.warn(f"model {config.name!r}: non-finite outputs on the load-time check images", stacklevel=3)
