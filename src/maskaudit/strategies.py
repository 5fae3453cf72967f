"""The masking vocabulary: every masking strategy with the evidence it gives, the fills, the masking spec.

This module owns the names. The config's ``strategies``/``test_strategies`` accept exactly the
names registered in :data:`STRATEGIES`; :func:`maskaudit.masking.apply_strategy` builds each
strategy's image from its entry; the verdict's evidence cells (:func:`evidence_cells`) are
derived from what each entry says it shows. Adding a strategy is one :func:`register` call
(README, "Extending maskaudit").

It imports nothing heavy: the config (read by ``maskaudit --help``) validates names against it.
A strategy's ``keep`` function receives torch tensors and uses only their methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

#: Which piece of the verdict's evidence (:mod:`maskaudit.analyses.verdict`) a strategy's cells are read as.
Role = Literal["full", "inside", "outside", "shape"]


@dataclass(frozen=True)
class MaskStrategy:
    """One masking strategy (SPEC §2, §8).

    Attributes
    ----------
    name : str
        Its name in configs and in every table.
    summary : str
        What a model sees under it, in a few words (documentation, errors).
    keep : callable or None
        ``keep(roi, bounding_box) -> bool tensor``: the pixels kept, from the ROI (bool (B, 1, S, S))
        and :func:`maskaudit.masking.bounding_box`; the others are filled (``fill``). None: see ``image``.
    image : callable or None
        ``image(images, roi) -> tensor``: the whole image instead (``full``: the image itself, ``roi_shape``:
        the silhouette); ``fill`` does not apply.
    evidence : Role or None
        The evidence its cells give to the verdict; None: none (the strategy is only shown in the matrices).
    rank : int
        Preference among the strategies giving the same evidence (lower first).
    full_model : bool
        Whether the full-image model *tested* on this masking is also a (weaker) cell of that evidence, read after
        every model trained on a masking of that evidence.
    probe : bool
        Whether a probed model (trained elsewhere, on full images) scored on this masking is evidence.
    needs_roi : bool
        Whether it needs ROI masks (every strategy but ``full``).
    study : bool
        One of the study's five strategies (the default ``strategies``).
    """

    name: str
    summary: str
    keep: Callable[[Any, Callable[[Any], Any]], Any] | None = None
    image: Callable[[Any, Any], Any] | None = None
    evidence: Role | None = None
    rank: int = 0
    full_model: bool = False
    probe: bool = True
    needs_roi: bool = True
    study: bool = False

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.image is None):
            raise ValueError(f"strategy {self.name!r}: give exactly one of keep and image")


#: Every known strategy by name, in the order of the matrices' rows and columns.
STRATEGIES: dict[str, MaskStrategy] = {}


def register(strategy: MaskStrategy) -> MaskStrategy:
    """Add ``strategy`` (its name must be new); every table, matrix and the verdict then know it."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is registered already")
    STRATEGIES[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    """Remove a strategy registered by :func:`register` (tests that add a toy one)."""
    STRATEGIES.pop(name)


for _strategy in (
    MaskStrategy("full", "the whole image", image=lambda images, roi: images, evidence="full", needs_roi=False,
                 study=True),
    MaskStrategy("no_roi", "the image without the ROI", keep=lambda roi, box: ~roi, evidence="outside", rank=1,
                 full_model=True, study=True),
    MaskStrategy("no_roi_bbox", "the image without the ROI's bounding box (its silhouette hidden too)",
                 keep=lambda roi, box: ~box(roi), evidence="outside", rank=0, full_model=True, study=True),
    MaskStrategy("only_roi", "the ROI alone", keep=lambda roi, box: roi, evidence="inside", rank=0,
                 full_model=True, study=True),
    MaskStrategy("only_roi_bbox", "the ROI's bounding box alone", keep=lambda roi, box: box(roi),
                 evidence="inside", rank=1, study=True),
    MaskStrategy("roi_shape", "the ROI's binary mask alone (shape-leakage control, SPEC §8)",
                 image=lambda images, roi: roi.to(images.dtype).expand_as(images).contiguous(), evidence="shape",
                 probe=False),
):
    register(_strategy)


def study_strategies() -> list[str]:
    """The study's five strategies (SPEC §2): the default of ``strategies``."""
    return [s.name for s in STRATEGIES.values() if s.study]


def check_strategy(name: str) -> str:
    """``name`` when it is a registered strategy; else a ValueError listing them, worded as pydantic words a
    ``Literal`` of them (a config error)."""
    if name not in STRATEGIES:
        raise ValueError(one_of(STRATEGIES))
    return name


def one_of(names: Iterable[str]) -> str:
    """``Input should be 'a', 'b' or 'c'``: the words of pydantic's error for a ``Literal``, for names that a
    registry holds (a config's error reads the same whichever way its names are checked)."""
    *first, last = map(repr, names)
    return f"Input should be {', '.join(first)} or {last}" if first else f"Input should be {last}"


def evidence_cells() -> dict[str, list[tuple[str, str]]]:
    """Where each piece of the verdict's evidence is read: (training strategy, test strategy), preferred first.

    For each role, the models trained and tested on a masking of that role (by rank), then the full model tested
    on those whose ``full_model`` is set (by rank): with the study's strategies ``inside`` is
    ``only_roi→only_roi, only_roi_bbox→only_roi_bbox, full→only_roi``.
    """
    cells: dict[str, list[tuple[str, str]]] = {"full": [], "inside": [], "outside": [], "shape": []}
    ranked = sorted(STRATEGIES.values(), key=lambda s: s.rank)
    for role in cells:
        chosen = [s for s in ranked if s.evidence == role]
        cells[role] = [(s.name, s.name) for s in chosen]
        cells[role] += [("full", s.name) for s in chosen if s.full_model and s.name != "full"]
    return cells


def adapted_name(model: str, strategy: str) -> str:
    """The ``train_strategy`` of a probed model adapted to ``strategy`` (``maskaudit.adapt``): ``model+strategy``; a
    control that is not a probed model's copy (``probe`` unset: ``roi_shape``) is the strategy's own name."""
    return f"{model}+{strategy}" if STRATEGIES[strategy].probe else strategy


def adapted_split(strategies: Iterable[str]) -> tuple[list[str], list[str]]:
    """``adapt.strategies`` in two: the maskings a probed model's copy is fine-tuned on (``probe`` set), and the
    controls trained from scratch (``roi_shape``), each in the given order."""
    chosen = list(strategies)
    return [s for s in chosen if STRATEGIES[s].probe], [s for s in chosen if not STRATEGIES[s].probe]


def probe_cells(model: str, adapted: Iterable[str] = ()) -> dict[str, list[tuple[str, str]]]:
    """:func:`evidence_cells` for a probed model: that one model on each masking whose ``probe`` is set.

    With ``adapted`` (the probe's ``adapt.strategies``), each role reads first, as a full audit does, the models
    trained on its maskings (:func:`adapted_name` → the strategy, by rank), then the probed model itself: inside is
    ``m+only_roi→only_roi, m→only_roi, m→only_roi_bbox``, shape ``roi_shape→roi_shape``.
    """
    ranked = sorted(STRATEGIES.values(), key=lambda s: s.rank)
    chosen = set(adapted)
    return {role: [(adapted_name(model, s.name), s.name) for s in ranked if s.evidence == role and s.name in chosen]
            + [(model, s.name) for s in ranked if s.evidence == role and s.probe]
            for role in ("full", "inside", "outside", "shape")}


# ------------------------------------------------------------------------------------------ fills & spreads

#: How the removed pixels are filled: zero (the study), the dataset's mean intensity, or seeded noise (SPEC §8).
Fill = Literal["zero", "mean", "noise"]
FILLS: tuple[str, ...] = get_args(Fill)

#: The image size at which the study gives its spreads (SPEC §6.4).
REFERENCE_SIZE = 512

#: The dilation sweep's spreads at S = 512 (SPEC §6.4); scaled to the run's size by
#: :func:`maskaudit.masking.scale_spread`.
SWEEP_SPREADS = (0, 5, 10, 25, 50, 100, 150, 200, 300, 400, 500)


@dataclass(frozen=True)
class MaskSpec:
    """How one dataset's images are masked, resolved once (:func:`maskaudit.loader.mask_spec`).

    Attributes
    ----------
    roi : str or None
        The ROI key: a named ROI or a union ``a+b`` of the store; None for data without masks (only ``full``).
    spread : int
        Dilate (> 0) or erode (< 0) the ROI by this many 3x3-cross iterations, in pixels at the run's image size.
    fill : {"zero", "mean", "noise"}
        How removed pixels are filled.
    fill_value : float or tuple of float
        The ``mean`` fill's value and the ``noise`` fill's mean: the dataset's mean intensity.
    noise_seed : int
        The ``noise`` fill's stream (:func:`maskaudit.seeds.derive_seed`); image ``i`` of the store draws its noise
        from ``noise_seed + i``, so an image gets the same noise in any batch.
    scale : {"before_masking", "after_masking"}
        ``before_masking`` (the study): the stored image, divided by its own maximum at preparation, is masked as it
        is; ``after_masking``: the kept pixels are divided again by their own maximum
        (:func:`maskaudit.masking.apply_strategy`, ``rescale``).
    """

    roi: str | None
    spread: int = 0
    fill: Fill = "zero"
    fill_value: float | tuple[float, ...] = 0.0
    noise_seed: int = 0
    scale: str = "before_masking"

    def at_spread(self, spread: int) -> MaskSpec:
        """The same masking with the ROI at another spread (the dilation sweep)."""
        return replace(self, spread=int(spread))

    def fingerprint(self) -> dict[str, Any]:
        """What of it decides the images a model sees (part of every fingerprint that reads the masking)."""
        value = self.fill_value if isinstance(self.fill_value, float | int) else list(self.fill_value)
        return {"roi": self.roi, "spread": self.spread, "fill": self.fill,
                "fill_value": value if self.fill != "zero" else None,
                "noise_seed": self.noise_seed if self.fill == "noise" else None}
