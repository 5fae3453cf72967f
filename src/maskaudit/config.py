"""The whole configuration of an audit, as typed pydantic models.

Every key has the study's value as its default where the study has one (SPEC §1–§5).
Unknown keys, wrong types and missing files are errors that name the key or the file.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlparse

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from maskaudit.errors import MaskauditError
from maskaudit.strategies import STRATEGIES, SWEEP_SPREADS, Fill, check_strategy, one_of, study_strategies

#: The study's five masking strategies (SPEC §2), the default of ``strategies``.
STUDY_STRATEGIES = tuple(study_strategies())
#: A masking strategy's name: one registered in :data:`maskaudit.strategies.STRATEGIES`.
Strategy = Annotated[str, AfterValidator(check_strategy)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaybePath:
    """Marks a ``str`` field that is a file path unless it is one of ``words`` (``model.weights``: imagenet | none |
    a path): :func:`_resolve_paths` resolves it like a ``Path`` field."""

    def __init__(self, *words: str) -> None:
        self.words = words


# --------------------------------------------------------------------------------------------- data


def _no_clash(classes: list[str], metadata: list[str]) -> None:
    """Classes and metadata share the manifest's columns: one name cannot be both."""
    both = sorted(set(classes) & set(metadata))
    if both:
        raise ValueError(f"{', '.join(both)} is both a class and a metadata column; rename one")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat a name: {classes}")


SignalPlace = Literal["roi", "outside", "global", "shape", "none"]
#: Where an ``outside`` marker may go (:mod:`maskaudit.data.sources.synthetic`): a corner, or (``cxr`` only) the top or
#: bottom centre of the image.
MarkerAnchor = Literal["top_left", "top_right", "bottom_left", "bottom_right", "top", "bottom"]


class SyntheticClass(Strict):
    """Where the evidence for one synthetic class lives, and how strong it is."""

    signal: SignalPlace = "roi"
    strength: float = Field(1.0, ge=0.0, le=1.0, description="contrast of the planted signal, 0 = invisible")
    prevalence: float = Field(0.4, gt=0.0, lt=1.0)
    anchors: list[MarkerAnchor] | None = Field(
        None, min_length=1, description="outside only: the places its marker may go, one drawn per image; default "
                                        "every corner (cxr: also the top and bottom centre)")

    @model_validator(mode="after")
    def _anchors_for_markers(self) -> SyntheticClass:
        if self.anchors is not None:
            if self.signal != "outside":
                raise ValueError(f"anchors place an outside marker; this class's signal is {self.signal!r}")
            if len(set(self.anchors)) != len(self.anchors):
                raise ValueError(f"anchors repeat a place: {self.anchors}")
        return self


class SyntheticMetadata(Strict):
    """A metadata column of the synthetic data, optionally tied to a class label."""

    correlates_with: str | None = None
    strength: float = Field(0.0, ge=0.0, le=1.0, description="probability that the value follows the label")


class SyntheticData(Strict):
    source: Literal["synthetic"]
    kind: Literal["cxr", "fundus"] = "cxr"
    n_patients: int = Field(120, ge=4)
    images_per_patient: tuple[int, int] = (1, 3)
    size: int | None = Field(None, ge=32, description="native size before resize-with-pad; default image_size")
    classes: dict[str, SyntheticClass] = Field(
        default_factory=lambda: {
            "opacity": SyntheticClass(signal="roi"),
            "device": SyntheticClass(signal="outside"),
        }
    )
    metadata: dict[Literal["sex", "age", "projection", "camera"], SyntheticMetadata] = Field(
        default_factory=dict
    )
    saturate: bool = Field(True, description="every image holds a saturated, label-independent structure (cxr: the "
                                             "spine; fundus: the disc's red), so per-image max scaling cannot spread "
                                             "a local signal; false: a bright marker sets its image's maximum")

    @model_validator(mode="after")
    def _metadata_targets_exist(self) -> SyntheticData:
        for name, cls in self.classes.items():
            centred = [a for a in cls.anchors or [] if a in ("top", "bottom")]
            if self.kind == "fundus" and centred:
                raise ValueError(f"classes.{name}.anchors: {', '.join(centred)} is not a place for a fundus marker "
                                 "(they go in the black corners only: top_left, top_right, bottom_left, bottom_right)")
        for name, meta in self.metadata.items():
            if meta.correlates_with is not None and meta.correlates_with not in self.classes:
                raise ValueError(
                    f"metadata.{name}.correlates_with={meta.correlates_with!r} is not a class "
                    f"(classes: {', '.join(self.classes)})"
                )
        _no_clash(list(self.classes), list(self.metadata))
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)


class DicomOptions(Strict):
    """How DICOM images are turned into pixels (see :mod:`maskaudit.data.dicom` for all the rules)."""

    window: Literal["auto", "none"] = Field(
        "auto",
        description="auto: apply the file's VOI LUT or window (Window Center/Width) when it has one; none: never",
    )


class FolderData(Strict):
    """Any folder of images with masks and a labels CSV (one row per image)."""

    source: Literal["folder"]
    labels_csv: Path
    image_column: str = "image"
    mask_column: str | None = "mask"
    mask_columns: dict[str, str] = Field(default_factory=dict, description="further named ROIs: name → column")
    patient_column: str | None = None
    id_column: str | None = None
    classes: list[str] = Field(min_length=1)
    metadata_columns: list[str] = Field(default_factory=list)
    split_column: str | None = Field(
        None, description="a column whose value 'test' puts the row in the hold-out test set (official split)"
    )
    color: Literal["gray", "rgb"] = "gray"
    dicom: DicomOptions = DicomOptions()

    @model_validator(mode="after")
    def _names_distinct(self) -> FolderData:
        _no_clash(self.classes, self.metadata_columns)
        return self

    @field_validator("labels_csv")
    @classmethod
    def _csv_exists(cls, path: Path, info: ValidationInfo) -> Path:
        if _checking_files(info) and not path.is_file():
            raise ValueError(f"labels CSV not found: {path}")
        return path

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def root(self) -> Path:
        """Paths in the CSV are relative to the CSV's folder, and must stay inside it."""
        return self.labels_csv.resolve().parent


def _checking_files(info: ValidationInfo | None) -> bool:
    """Whether the config's files must exist: yes, unless validated with ``check_files=False`` (see
    :func:`config_from_dict`: a report or status of a run whose data has moved reads the run directory alone)."""
    return not (info is not None and info.context and info.context.get("check_files") is False)


def _existing(path: Path | None, what: str, kind: Literal["file", "dir"] = "file",
              info: ValidationInfo | None = None) -> Path | None:
    """``path`` when it exists as a file (or folder); else a clear error naming the key."""
    if path is None or not _checking_files(info):
        return path
    if kind == "dir" and not path.is_dir():
        raise ValueError(f"{what} folder not found: {path}")
    if kind == "file" and not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    return path


#: PadChest's classes in the study (SPEC §1); ``effusion`` also matches PadChest's ``pleural effusion``.
STUDY_CXR_CLASSES = ["cardiomegaly", "pneumonia", "atelectasis", "pneumothorax", "effusion"]


class PadChestData(Strict):
    """PadChest images and labels with CheXmask lung and heart masks (SPEC §1)."""

    source: Literal["padchest"]
    root: Path = Field(description="the folder that holds PadChest's numbered image folders (<ImageDir>/<ImageID>)")
    labels_csv: Path = Field(description="PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
    chexmask_csv: Path = Field(description="CheXmask's Padchest.csv")
    invalid_csv: Path | None = Field(None, description="the study's Invalid_images.csv (optional)")
    classes: list[str] = Field(default_factory=lambda: list(STUDY_CXR_CLASSES), min_length=1)
    projections: list[str] = Field(default_factory=lambda: ["PA", "AP", "AP_horizontal"], min_length=1)
    exclude_words: list[str] = Field(
        default_factory=lambda: ["suboptimal study", "exclude", "Unchanged"],
        description="a row whose raw Labels text contains one of these (case-sensitive) is dropped",
    )
    drop_unchanged_lowercase: bool = Field(
        False, description="also drop rows with 'unchanged' in lower case (the study kept them)"
    )
    min_dice_rca: float = Field(0.7, ge=0.0, le=1.0, description="keep masks with Dice RCA (Mean) above this")

    @field_validator("root")
    @classmethod
    def _root_exists(cls, path: Path, info: ValidationInfo) -> Path:
        return _existing(path, "data.root (PadChest images)", "dir", info)

    @field_validator("labels_csv", "chexmask_csv", "invalid_csv")
    @classmethod
    def _files_exist(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return _existing(path, f"data.{info.field_name}", info=info)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)


class ChestXray14Data(Strict):
    """NIH ChestX-ray14 images and labels with CheXmask lung and heart masks (SPEC §1)."""

    source: Literal["chestxray14"]
    root: Path = Field(description="the folder that holds the images (searched recursively by file name)")
    labels_csv: Path = Field(description="Data_Entry_2017.csv")
    chexmask_csv: Path = Field(description="CheXmask's ChestX-Ray8.csv")
    classes: list[str] = Field(default_factory=lambda: list(STUDY_CXR_CLASSES), min_length=1)
    min_dice_rca: float = Field(0.7, ge=0.0, le=1.0, description="keep masks with Dice RCA (Mean) above this")

    @field_validator("root")
    @classmethod
    def _root_exists(cls, path: Path, info: ValidationInfo) -> Path:
        return _existing(path, "data.root (ChestX-ray14 images)", "dir", info)

    @field_validator("labels_csv", "chexmask_csv")
    @classmethod
    def _files_exist(cls, path: Path, info: ValidationInfo) -> Path:
        return _existing(path, f"data.{info.field_name}", info=info)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)


class ChaksuData(Strict):
    """The Chákṣu fundus images (3 cameras, official Train/Test folders) with STAPLE disc/cup masks."""

    source: Literal["chaksu"]
    root: Path = Field(description="the folder that holds Chákṣu's Train/ and Test/ folders")
    cameras: list[Literal["Bosch", "Forus", "Remidio"]] = Field(
        default_factory=lambda: ["Bosch", "Forus", "Remidio"], min_length=1
    )

    @field_validator("root")
    @classmethod
    def _root_exists(cls, path: Path, info: ValidationInfo) -> Path:
        return _existing(path, "data.root (Chákṣu)", "dir", info)

    @property
    def class_names(self) -> list[str]:
        return ["glaucoma"]


DataConfig = Annotated[
    SyntheticData | FolderData | PadChestData | ChestXray14Data | ChaksuData, Field(discriminator="source")
]


# --------------------------------------------------------------------------------------- model/train


class ModelConfig(Strict):
    arch: str = "densenet121"
    weights: Annotated[str, MaybePath("imagenet", "none")] = Field(
        "imagenet", description="imagenet | none | path to a local state dict")
    freeze: Literal["study", "none"] = "study"
    normalize: Literal["none", "imagenet"] = Field(
        "none", description="the study feeds [0, 1] images without ImageNet mean/std"
    )


class AugmentConfig(Strict):
    rotation: float = Field(45.0, ge=0.0, le=180.0, description="degrees, uniform in ±rotation")
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    brightness: tuple[float, float] = (0.7, 1.1)

    @model_validator(mode="after")
    def _ordered(self) -> AugmentConfig:
        low, high = self.brightness
        if not 0 < low <= high:
            raise ValueError(f"brightness must be 0 < low <= high, got {self.brightness}")
        return self


NO_AUGMENT = AugmentConfig(rotation=0.0, hflip=0.0, brightness=(1.0, 1.0))


class TrainConfig(Strict):
    epochs: int = Field(250, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    patience: int = Field(25, ge=1)
    min_delta: float = Field(0.001, ge=0)
    min_epochs: int = Field(0, ge=0, description="early stopping never stops before this many epochs (the study: 0)")
    monitor: Literal["val_loss", "val_auc"] = Field(
        "val_loss", description="what early stopping and the kept weights follow: the summed validation loss (the "
                                "study's) or the mean validation AUC over the classes (higher is better)")
    augment: AugmentConfig = AugmentConfig()
    num_workers: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(False, description="mixed precision on CUDA (bfloat16 where the GPU has it, else float16)")
    compile: bool = Field(False, description="torch.compile the training forward (minutes of compilation per job; "
                                             "then faster steps on a GPU)")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_flag(cls, value: Any) -> Any:
        if value is True:
            return AugmentConfig()
        if value is False:
            return NO_AUGMENT
        return value


class PredictConfig(Strict):
    batch_size: int = Field(32, ge=1)
    validation: bool = Field(True, description="also predict each fold's validation split (SPEC §5)")
    images: Literal["test", "all"] = Field(
        "test", description="the images scored: the hold-out, or (probe only: nothing was trained) every image")
    models: int = Field(0, ge=0, description="models scored on one read of the images; 0: as many as fit in half "
                                             "the free memory (on Ray: one per task)")


# ---------------------------------------------------------------------------------------------- probe


class ProbeInput(Strict):
    """What a probed model expects: its input is made from the masked image, in [0, 1] at ``image_size``."""

    size: int | None = Field(None, ge=8, description="resized (bilinear, antialiased) to this; default image_size")
    channels: Literal[1, 3] | None = Field(None, description="gray → 3 copies, RGB → luminance; default the data's")
    range: tuple[float, float] = Field((0.0, 1.0), description="[0, 1] mapped linearly onto this range, "
                                                               "e.g. torchxrayvision's [-1024, 1024]")
    mean: list[float] | None = Field(None, description="then (x - mean) / std per channel, e.g. ImageNet's")
    std: list[float] | None = None

    @model_validator(mode="after")
    def _normalisation(self) -> ProbeInput:
        if (self.mean is None) != (self.std is None):
            raise ValueError("input.mean and input.std go together")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"input.std must be positive, got {self.std}")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError("input.mean and input.std need the same length")
        return self


class ProbeOutput(Strict):
    """Which of a probed model's outputs is which of the dataset's classes, and what the outputs are."""

    activation: Literal["auto", "sigmoid", "softmax", "none"] = Field(
        "auto", description="sigmoid/softmax: the outputs are logits; none: already probabilities (or any score); "
                            "auto: none for torchxrayvision models with their calibration, else sigmoid")
    names: list[str] | None = Field(None, description="the model's outputs in order; torchxrayvision: its "
                                                       "pathologies; otherwise required")
    aliases: dict[str, list[str]] = Field(default_factory=dict,
                                          description="dataset class → other names it goes by among the outputs")


class ProbedModelConfig(Strict):
    """A classifier trained elsewhere, audited as it is (``maskaudit probe``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the model's name in every table (train_strategy)")
    source: Literal["python", "torchscript", "onnx", "torchxrayvision"]
    entry_point: str | None = Field(None, description="python: 'package.module:function' returning an nn.Module")
    arguments: dict[str, Any] = Field(default_factory=dict, description="python: keyword arguments of it")
    file: Path | None = Field(None, description="python: a state dict (loaded with weights_only=True); "
                                                "torchscript, onnx: the model file")
    weights: str | None = Field(None, description="torchxrayvision: the weights' name, e.g. densenet121-res224-all")
    pretrained: bool = Field(True, description="torchxrayvision: false builds the same model untrained "
                                               "(no download; for tests)")
    input: ProbeInput = ProbeInput()
    output: ProbeOutput = ProbeOutput()
    layer: str | None = Field(None, description="embeddings: the module whose output is the image's embedding "
                                                "(python, torchxrayvision); default the one before the classifier")

    @model_validator(mode="before")
    @classmethod
    def _xrv_input(cls, raw: Any) -> Any:
        """torchxrayvision models take 1-channel images in [-1024, 1024] at the size their name gives
        (``…-res224-…``): the input keys left out are filled in with these, so the written config says them."""
        if not isinstance(raw, dict) or raw.get("source") != "torchxrayvision":
            return raw
        found = re.search(r"-res(\d+)", str(raw.get("weights") or ""))
        given = raw.get("input") if isinstance(raw.get("input"), dict) else {}
        defaults = {"size": int(found.group(1)) if found else 224, "channels": 1, "range": [-1024.0, 1024.0]}
        return {**raw, "input": {**defaults, **given}}

    @model_validator(mode="after")
    def _source_fields(self, info: ValidationInfo) -> ProbedModelConfig:
        if self.name in STRATEGIES:
            raise ValueError(f"model name {self.name!r} is a strategy's name; choose another")
        needed = {"python": ["entry_point"], "torchscript": ["file"], "onnx": ["file"], "torchxrayvision": ["weights"]}
        for key in needed[self.source]:
            if getattr(self, key) is None:
                raise ValueError(f"model {self.name!r}: source {self.source} needs `{key}`")
        if self.file is not None and _checking_files(info) and not self.file.is_file():
            raise ValueError(f"model {self.name!r}: file not found: {self.file}")
        if self.source in ("torchscript", "onnx", "python") and self.output.names is None:
            raise ValueError(f"model {self.name!r}: output.names (the model's outputs in order) is required "
                             f"for source {self.source}")
        return self


# -------------------------------------------------------------------------------- probe: adapt (issue 17)


class ShapeControl(Strict):
    """The probe's ``roi_shape`` control: a small CNN trained from scratch on the ROI masks alone."""

    size: int = Field(64, ge=32, description="the masks are resized (area) to this many pixels first: cheap")
    epochs: int = Field(12, ge=1)
    lr: float = Field(0.002, gt=0)
    patience: int = Field(4, ge=1)
    batch_size: int = Field(16, ge=1)


class AdaptConfig(Strict):
    """Light cross-masking (``maskaudit probe``): each probed model fine-tuned on masked images, one job per
    (strategy, fold) of the run's patient-grouped folds, then scored on every masking (README, "Audit your own
    model"). ``roi_shape`` is the shape control instead: a small CNN trained from scratch on the masks alone."""

    strategies: list[Strategy] = Field(default_factory=list, description="the maskings a copy of each probed "
                                       "model is fine-tuned on (roi_shape: the shape control); each must be a test "
                                       "masking; none (the default): no adaptation")
    layers: Literal["head", "last_block", "all"] = Field(
        "last_block", description="what is trained: the final layer, the last block and what follows it, or all "
                                  "(maskaudit.adapt)")
    epochs: int = Field(4, ge=1, description="at most this many epochs per job (early stopping on the val loss)")
    lr: float = Field(1e-4, gt=0)
    patience: int = Field(2, ge=1)
    min_delta: float = Field(0.001, ge=0)
    batch_size: int = Field(16, ge=1)
    augment: AugmentConfig = NO_AUGMENT
    amp: bool = Field(False, description="mixed precision on CUDA")
    folds: int | None = Field(None, ge=1, description="adapt on the first this many folds (default every fold); "
                                                     "fewer is cheaper")
    shape: ShapeControl = ShapeControl()

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_flag(cls, value: Any) -> Any:
        return {True: AugmentConfig(), False: NO_AUGMENT}.get(value, value) if isinstance(value, bool) else value

    @field_validator("strategies")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"strategies repeat a name: {value}")
        return value

    @field_validator("strategies")
    @classmethod
    def _not_full(cls, value: list[str]) -> list[str]:
        if "full" in value:
            raise ValueError("full is the probed model itself (trained on full images): list maskings only")
        return value

# -------------------------------------------------------------------------------- end of probe: adapt


class ReportConfig(Strict):
    title: str = "maskaudit report"
    formats: list[Literal["png", "svg", "pdf"]] = Field(
        default_factory=lambda: ["png"], min_length=1,
        description="file formats of every figure (svg, pdf for papers); PNG is always written, "
                    "as the report inlines it",
    )


# ------------------------------------------------------------------------------------------ analyses

#: A (training strategy, test strategy) pair: one model scored on one masking. In a probe, the first is a
#: probed model's name.
Pair = tuple[str, Strategy]


class BaselineConfig(Strict):
    """SPEC §6.1: logistic regression on metadata alone, compared with image models (DeLong)."""

    compare: list[Pair] | None = Field(
        None, description="image models (train, test) the baseline is tested against; default "
                          "no_roi_bbox→no_roi_bbox (the study's) and full→full; a probe: each model on "
                          "no_roi_bbox and full")
    columns: list[str] | None = Field(None, description="metadata columns to use; default every one the data has")


class ExplainConfig(Strict):
    """SPEC §6.2: attribution maps for positive hold-out images, and the share inside the ROI (§8)."""

    method: Literal["partition", "deep", "gradient"] = Field(
        "partition", description="partition = the study's shap.Explainer with an image masker"
    )
    masker: str = Field("auto", description="auto (zero for X-rays, blur(S,S) for colour) | zero | blur | "
                                            "inpaint_telea | any shap image-masker string")
    max_evals: int = Field(1000, ge=10, description="partition explainer: model evaluations per image")
    batch_size: int = Field(50, ge=1)
    pairs: list[Pair] | None = Field(None, description="models (train, test) to explain; default each strategy "
                                                       "on its own masking")
    folds: list[int] = Field(default_factory=lambda: [0], description="whose fold's models")
    images_per_class: int = Field(8, ge=1, description="positive hold-out images explained per class and pair")
    background: int = Field(16, ge=1, description="deep/gradient: training images as the background")


class EmbedConfig(Strict):
    """SPEC §6.3: the full model's penultimate features under every strategy; t-SNE and cosine similarity."""

    train_strategy: str | None = Field(None, description="whose model: default full (a probe: its first model)")
    fold: int = Field(0, ge=0)
    split: Literal["val", "test"] = Field("val", description="the study used fold 0's validation images")
    perplexity: float = Field(10.0, gt=0)
    max_images: int | None = Field(None, ge=2, description="a seeded sample of at most this many images")


class SweepConfig(Strict):
    """SPEC §6.4: AUC against the ROI's spread, for hold-out images under only_roi and no_roi."""

    train_strategies: list[str] | None = Field(None, min_length=1,
                                               description="whose models: default full (a probe: every model)")
    test_strategies: list[Literal["no_roi", "only_roi"]] = Field(
        default_factory=lambda: ["only_roi", "no_roi"], min_length=1
    )
    spreads: list[int] = Field(
        default_factory=lambda: list(SWEEP_SPREADS),
        description="spreads at S = 512, scaled to image_size",
    )


class ReaderConfig(Strict):
    """SPEC §6.5: images for a reader study at chosen percentiles of each model's positives."""

    fold: int | None = Field(None, ge=0, description="whose fold's models; default fold 1 as the study "
                                                     "(fold 0 when there is one fold)")
    percentiles: list[float] = Field(default_factory=lambda: [25.0, 50.0, 75.0], min_length=1)


class EvidenceConfig(Strict):
    """When the report and the verdict's reading say the evidence is weak (:mod:`maskaudit.analyses.verdict`)."""

    min_class_count: int = Field(10, ge=1, description="a class with fewer positives or negatives than this in "
                                                       "the hold-out set (or a fold's validation set) is flagged")
    chance_margin: float = Field(0.05, ge=0.0, lt=0.5, description="a fold's validation AUC is at chance when its "
                                                                   "CI reaches 0.5 or it is below 0.5 + this")


class VerdictConfig(Strict):
    """The rules of the per-class verdict (README, "Reading the verdict")."""

    min_auc: float = Field(0.6, gt=0.5, lt=1.0, description="an AUC is evidence of signal when its CI's lower "
                                                                "bound is above 0.5 and the AUC at least this")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="significance level of DeLong's paired tests")
    evidence: EvidenceConfig = EvidenceConfig()


class LocalizeConfig(Strict):
    """Where in the image a class's evidence lies (:mod:`maskaudit.analyses.localize`): an occlusion grid on the
    hold-out images of the model that shows the evidence, each cell's AUC drop tested (DeLong) and corrected."""

    where: list[Literal["outside", "inside"]] = Field(
        default_factory=lambda: ["outside"], description="whose evidence is localised, for each class that shows "
                                                         "signal there: outside the ROI, inside it (an empty list: "
                                                         "none)")
    grid: int = Field(8, ge=2, le=64, description="the image is cut into grid x grid cells, each hidden in turn")
    folds: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="whose fold's models; default every fold (their mean)")
    correction: Literal["holm", "bh"] = Field(
        "holm", description="multiple-testing correction over a class's cells: holm (family-wise error) or bh "
                            "(Benjamini-Hochberg, false discovery rate)")
    top: int = Field(5, ge=1, description="cells per class in the report's table")

    @field_validator("where", "folds")
    @classmethod
    def _distinct(cls, value: list | None) -> list | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"repeats a value: {value}")
        return value


def _known_analysis(name: str) -> str:
    """``name`` when it is an analysis (a section of :class:`AnalysesConfig`), worded as pydantic words a Literal."""
    if name not in ANALYSES:
        raise ValueError(one_of(ANALYSES))
    return name


class AnalysesConfig(Strict):
    """Every analysis is a section named after it (its settings); ``run`` says which ones ``maskaudit run`` does."""

    run: list[Annotated[str, AfterValidator(_known_analysis)]] = Field(
        default_factory=lambda: list(ANALYSES), description="which analyses `maskaudit run` does"
    )
    level: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of every AUC interval")
    baseline: BaselineConfig = BaselineConfig()
    explain: ExplainConfig = ExplainConfig()
    embed: EmbedConfig = EmbedConfig()
    sweep: SweepConfig = SweepConfig()
    reader: ReaderConfig = ReaderConfig()
    localize: LocalizeConfig = LocalizeConfig()
    verdict: VerdictConfig = VerdictConfig()


#: The analyses, in the order they run (SPEC §6, §8): the sections of :class:`AnalysesConfig`, each an analysis of
#: :data:`maskaudit.analyses.run.ANALYSES` (``verdict``, last, reads the others).
ANALYSES = tuple(name for name, field in AnalysesConfig.model_fields.items()
                 if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
#: Every stage of an audit, in order (:mod:`maskaudit.pipeline` runs them; ``maskaudit status`` reads them).
STAGES = ("prepare", "split", "train", "predict", "metrics", *ANALYSES, "report")


# ------------------------------------------------------------------------------------------ tracking


class MlflowTracking(Strict):
    """Where an audit is logged in MLflow (:mod:`maskaudit.tracking`): a tracking URI and an experiment.

    ``tracking: {mlflow: URI}`` is the short spelling of ``tracking: {mlflow: {uri: URI}}``.
    """

    uri: str | None = Field(None, min_length=1, description="an MLflow tracking URI: a server (http://host:5000), a "
                                                            "database (sqlite:////abs/mlflow.db, postgresql://...); "
                                                            "default sqlite:///RUN/mlflow/mlflow.db, in the run "
                                                            "directory, with the artifacts beside it")
    experiment: str = Field("maskaudit", min_length=1, description="the MLflow experiment the runs are logged in")

    @model_validator(mode="before")
    @classmethod
    def _uri_alone(cls, raw: Any) -> Any:
        return {"uri": raw} if isinstance(raw, str) else raw

    @field_validator("uri")
    @classmethod
    def _no_password(cls, uri: str | None) -> str | None:
        """config.yaml, the report and the log show the URI: a password in it would be shown too."""
        if uri is not None and urlparse(uri).password:
            raise ValueError("the URI holds a password, which config.yaml and report.html would show: give it "
                             "through MLflow's environment (MLFLOW_TRACKING_PASSWORD) or the database's own "
                             "(PGPASSWORD, ~/.pgpass) instead")
        return uri


class TrackingConfig(Strict):
    """Experiment tracking, off unless a backend is given. It says how a run is watched, never what it makes: no
    stage reads it into a fingerprint (:data:`maskaudit.stages.EXECUTION_KEYS`), so a run with and without it reuses
    the same outputs."""

    mlflow: MlflowTracking | None = Field(None, description="log each training job (parameters, per-epoch curves, "
                                                            "best metrics) and the run's AUC matrices, verdicts and "
                                                            "report to MLflow; `{}` for the default store")


# --------------------------------------------------------------------------------------------- local


class LocalConfig(Strict):
    """How ``executor: local`` runs the jobs on this machine (:class:`maskaudit.executors.LocalExecutor`).

    How a run is executed, never what it makes: no fingerprint holds it (:data:`maskaudit.stages.EXECUTION_KEYS`).
    """

    jobs: int = Field(
        1, ge=1, description="jobs at once: 1 runs them one after the other in this process; more runs each in a "
                             "process of its own, sharing the CPU cores (each gets cores/jobs threads) and the GPUs "
                             "(on several GPUs the processes take turns: a job uses one); a batch-2 training leaves "
                             "a GPU, or a CPU's second core, nearly idle")


# ----------------------------------------------------------------------------------------------- ray

#: ``ray.address`` as written: ``auto`` or ``local`` (Ray's words), ``ray://host[:port]`` (Ray Client) or
#: ``host[:port]`` (the head's GCS); a host is a name or an IPv4 address, or an IPv6 one in brackets.
_RAY_ADDRESS = re.compile(r"(?:ray://)?(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


class RayConfig(Strict):
    """Where ``executor: ray`` runs the jobs, and what each reserves there (:class:`maskaudit.executors.RayExecutor`).

    How a run is executed, never what it makes: no fingerprint holds it (:data:`maskaudit.stages.EXECUTION_KEYS`), so
    a grid trained on a laptop and finished on a cluster reuses every finished job. ``num_cpus`` and ``num_gpus`` are
    Ray's task resources (https://docs.ray.io/en/latest/ray-core/scheduling/resources.html): logical, used to place
    the jobs; a fraction below 1 packs several jobs on one device, a value above 1 is a whole number (Ray's rule).
    """

    address: str | None = Field(
        None, description="the cluster: host:port of its head (Ray's GCS; a host alone means port 6379), "
                          "ray://host:port (Ray Client; port 10001 by default), auto (the cluster `ray start` runs on "
                          "this machine) or local (a new Ray in this process); default: RAY_ADDRESS, else the cluster "
                          "`ray start` last began on this machine, else a new Ray in this process")
    num_cpus: float = Field(1.0, gt=0, allow_inf_nan=False,
                            description="CPUs each job reserves (Ray sets the job's OMP_NUM_THREADS to it, at least 1, "
                                        "where the node's environment does not)")
    num_gpus: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="GPUs each job reserves: a fraction shares one GPU (0.25: four jobs on it at once, e.g. batch-2 "
                    "trainings, which leave a GPU nearly idle); default 1 on a cluster with GPUs, else 0")
    max_retries: int = Field(2, ge=0, description="how many more times a job runs after its worker process or node "
                                                  "died (it resumes after its last saved epoch); an error raised by "
                                                  "the job itself is not retried")

    @field_validator("address")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        if address is None or address in ("auto", "local") or _RAY_ADDRESS.fullmatch(address):
            return address
        if "://" in address and not address.startswith("ray://"):
            raise ValueError(f"{address!r} is not a Ray cluster's address ({address.split('://')[0]}:// is, for "
                             "example, the dashboard's, which maskaudit does not use); expected host:port of the "
                             "head (port 6379 by default), ray://host:10001, auto or local")
        raise ValueError(f"{address!r} is not a Ray cluster's address; expected host:port of the head (port 6379 by "
                         "default), ray://host:10001, auto or local")

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _whole_above_one(cls, value: float | None) -> float | None:
        if value is not None and value > 1 and not float(value).is_integer():
            raise ValueError(f"{value:g}: above 1, Ray reserves whole devices only (a fraction must be at most 1)")
        return value


# --------------------------------------------------------------------------------------------- root


class ExternalDataset(Strict):
    """Another dataset every trained model is scored on (SPEC §5, external test)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names its rows in the prediction table")
    data: DataConfig
    roi: str | None = Field(None, description="the ROI to mask; default the run's roi, else its first ROI")


class DataChecks(Strict):
    """What ``prepare`` does with inputs that are odd but usable (docs/reliability.md, "What a bad or odd input
    becomes"): the same image file on two rows, a ROI that covers (almost) all of its image or almost none."""

    duplicate_images: Literal["reject", "warn"] = Field(
        "reject", description="rows whose image file is byte-identical to an earlier row's: rejected (the later "
                              "ones, by input order), or kept with a warning")
    min_roi_fraction: float = Field(0.001, ge=0.0, le=1.0, description="warn about kept images whose ROI covers "
                                                                        "less than this share of the image")
    max_roi_fraction: float = Field(0.95, ge=0.0, le=1.0, description="warn about kept images whose ROI covers "
                                                                       "more than this share (no_roi blanks them)")

    @model_validator(mode="after")
    def _ordered(self) -> DataChecks:
        if self.min_roi_fraction >= self.max_roi_fraction:
            raise ValueError(f"min_roi_fraction ({self.min_roi_fraction:g}) must be below max_roi_fraction "
                             f"({self.max_roi_fraction:g})")
        return self


class StoreConfig(Strict):
    """How the prepared store keeps the images (:mod:`maskaudit.data.store`)."""

    bits: Literal[8, 16] = Field(8, description="bits per stored pixel: 8 (the study fed 8-bit max-scaled images; "
                                                "0.26 MB per 512-px image) or 16, kept for 16-bit sources")


class AuditConfig(Strict):
    data: DataConfig
    image_size: int = Field(512, ge=16)
    roi: str | None = Field(None, description="named ROI or union 'a+b'; default the source's first ROI")
    strategies: list[Strategy] = Field(default_factory=lambda: list(STUDY_STRATEGIES), min_length=1)
    test_strategies: list[Strategy] | None = Field(None, description="default: the same as strategies")
    spread: int = Field(0, description="dilate (>0) or erode (<0) the ROI by this many 3x3-cross iterations")
    fill: Fill = "zero"
    scale: Literal["before_masking", "after_masking"] = Field(
        "before_masking", description="before_masking (the study): each image is divided by its own maximum before "
        "it is masked, so a bright object outside the ROI lowers every pixel inside it; after_masking: each masked "
        "image is divided by the maximum of the pixels it keeps, so nothing outside them can reach them")
    folds: int = Field(5, ge=2)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 1907
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    analyses: AnalysesConfig = AnalysesConfig()
    report: ReportConfig = ReportConfig()
    workers: int = Field(0, ge=0, description="processes for preparation; 0 = one per CPU core")
    data_checks: DataChecks = DataChecks()
    store: StoreConfig = StoreConfig()
    executor: Literal["local", "ray"] = "local"
    local: LocalConfig = Field(LocalConfig(), description="executor: local only: how many jobs run at once")
    ray: RayConfig = Field(RayConfig(), description="executor: ray only: the cluster and what each job reserves")
    tracking: TrackingConfig = TrackingConfig()
    external: list[ExternalDataset] = Field(default_factory=list)
    models: list[ProbedModelConfig] = Field(
        default_factory=list, description="probe: classifiers trained elsewhere, scored as they are instead of "
                                          "training; `model: {source: ...}` is the one-model spelling")
    adapt: AdaptConfig = Field(AdaptConfig(), description="probe: fine-tune each probed model on each of "
                                                          "adapt.strategies (light cross-masking, maskaudit.adapt)")

    @model_validator(mode="before")
    @classmethod
    def _one_probed_model(cls, raw: Any) -> Any:
        """``model: {source: ...}`` names a model to probe, not one to train: it is ``models: [...]``."""
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "source" in raw["model"]:
            if raw.get("models"):
                raise ValueError("give the probed models either as `model` (one) or as `models` (a list), not both")
            one = raw["model"]
            default = one.get("weights") or Path(str(one.get("file") or "")).stem or \
                str(one.get("entry_point") or "model").rpartition(":")[2]
            raw = {**raw, "models": [{"name": default, **one}]}
            del raw["model"]
        return raw

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[ProbedModelConfig]) -> list[ProbedModelConfig]:
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"probed model names must be distinct: {names}")
        return value

    @field_validator("strategies", "test_strategies")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"strategies repeat a name: {value}")
        return value

    @field_validator("external")
    @classmethod
    def _external_names(cls, value: list[ExternalDataset]) -> list[ExternalDataset]:
        names = [e.name for e in value]
        if len(set(names)) != len(names) or "main" in names:
            raise ValueError(f"external dataset names must be distinct and not 'main': {names}")
        return value

    @model_validator(mode="after")
    def _analysis_folds(self) -> AuditConfig:
        a = self.analyses
        named = {"analyses.explain.folds": a.explain.folds, "analyses.embed.fold": [a.embed.fold],
                 "analyses.reader.fold": [] if a.reader.fold is None else [a.reader.fold]}
        for key, folds in named.items():
            if any(k >= self.folds for k in folds):
                raise ValueError(f"{key}={folds}: folds are numbered 0..{self.folds - 1}")
        if self.predict.images == "all" and self.kind != "probe":
            raise ValueError("predict.images=all scores training images: only a probe (nothing trained) may")
        self._check_adapt()
        return self

    def _check_adapt(self) -> None:
        """``adapt`` (issue 17): a probe's, on test maskings, on the hold-out, of models torch can train."""
        adapt = self.adapt
        if not adapt.strategies:
            return
        if self.kind != "probe":
            raise ValueError("adapt fine-tunes probed models (`model: {source: ...}` / `models`); a full audit "
                             "trains its own models on every masking: remove `adapt`")
        missing = [s for s in adapt.strategies if s not in self.eval_strategies]
        if missing:
            raise ValueError(f"adapt.strategies {missing} are not test maskings ({', '.join(self.eval_strategies)}): "
                             "an adapted model is scored on its own masking; add them to `strategies`")
        if self.predict.images == "all":
            raise ValueError("adapt trains on the run's training folds, so predict.images=all would score images "
                             "the adapted models were trained on: use predict.images: test")
        if adapt.folds is not None and adapt.folds > self.folds:
            raise ValueError(f"adapt.folds={adapt.folds}, but the run has folds={self.folds}")
        for m in self.models:
            if m.source == "onnx":
                raise ValueError(f"model {m.name!r}: source onnx cannot be adapted (onnxruntime runs it outside "
                                 "torch, so it has no gradients); remove `adapt`, or give the model as python "
                                 "or torchscript")

    @property
    def kind(self) -> Literal["audit", "probe"]:
        """The kind of audit (:mod:`maskaudit.kinds`): ``probe`` for models trained elsewhere (``models``), else
        ``audit``, which trains its own."""
        return "probe" if self.models else "audit"

    def dataset(self, name: str) -> tuple[Any, str | None]:
        """Dataset ``name``'s ``data`` section and ROI: the run's own (``main``), or an external dataset's, whose
        ROI defaults to the run's."""
        if name == "main":
            return self.data, self.roi
        ext = next(e for e in self.external if e.name == name)
        return ext.data, ext.roi or self.roi

    def for_dataset(self, name: str) -> AuditConfig:
        """The config dataset ``name`` is prepared and checked under: the run's settings with that dataset's
        :meth:`dataset` as its data and ROI, and no external dataset of its own."""
        if name == "main":
            return self
        data, roi = self.dataset(name)
        return self.model_copy(update={"data": data, "roi": roi, "external": []})

    @property
    def eval_strategies(self) -> list[str]:
        return list(self.test_strategies or self.strategies)

    @property
    def classes(self) -> list[str]:
        return self.data.class_names


def _unwrap(annotation: Any, discriminator: str | None) -> tuple[Any, str | None]:
    """``X | None`` → ``X``, ``Annotated[X, Field(discriminator=...)]`` → ``X`` and its discriminator."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            discriminator = next((m.discriminator for m in extra if getattr(m, "discriminator", None)), discriminator)
        elif get_origin(annotation) in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation, discriminator
            annotation = members[0]
        else:
            return annotation, discriminator


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _user_key(loc: tuple[int | str, ...], raw: Any) -> tuple[str, list[str], str | None]:
    """A pydantic error's location as the key the user wrote, the keys allowed beside its last part, and the
    discriminator still to choose a union's member when the location ends at the union.

    Walks :class:`AuditConfig`'s fields along ``loc``: drops the tag pydantic adds under a union (the member's
    ``source``: ``data.folder.labels_csv`` → ``data.labels_csv``), writes list indices as ``external[0]``, and
    says ``model`` for the one probed model that ``model: {source: ...}`` became (``models[0]``)."""
    where: list[str] = []
    allowed: list[str] = []
    here: Any = AuditConfig
    pending: str | None = None
    for part in loc:
        here, pending = _unwrap(here, pending)
        if part == "[key]" or str(part).startswith("function-"):
            continue  # a dict's key (the error is about the key itself), or a validator's name
        if get_origin(here) in (Union, types.UnionType):  # pydantic's tag of the member the error is in
            members = [a for a in get_args(here) if _is_model(a)]
            here = next((m for m in members if pending and pending in m.model_fields
                         and part in get_args(m.model_fields[pending].annotation)), None)
            pending = None
            continue
        if _is_model(here):
            allowed = list(here.model_fields)
            field = here.model_fields.get(str(part))
            here, pending = (field.annotation, field.discriminator) if field else (None, None)
            where.append(f".{part}")
            continue
        if get_origin(here) in (list, tuple) and isinstance(part, int):
            args = [a for a in get_args(here) if a is not Ellipsis]  # list[X], tuple[X, ...], tuple[X, Y]
            here = args[min(part, len(args) - 1)] if args else None
        elif get_origin(here) is dict:
            here = get_args(here)[1] if get_args(here) else None
        else:
            here = None
        where.append(f"[{part}]" if isinstance(part, int) else f".{part}")
        allowed, pending = [], None
    one = raw.get("model") if isinstance(raw, dict) else None
    if where[:2] == [".models", "[0]"] and isinstance(one, dict) and "source" in one and not raw.get("models"):
        where[:2] = [".model"]
    here, pending = _unwrap(here, pending)
    return "".join(where).removeprefix("."), allowed, pending if get_origin(here) in (Union, types.UnionType) else None


def _error_line(exc: ValidationError, origin: str, raw: Any = None) -> str:
    """Every error of ``exc`` in one line, each naming the key as written in the config (README, "Audit your
    own images"): ``unknown key 'data.labels_cvs' (did you mean 'labels_csv'?)``."""
    parts = []
    for err in exc.errors():
        where, allowed, discriminator = _user_key(err["loc"], raw)
        if err["type"] == "extra_forbidden":
            name = str(err["loc"][-1])
            close = difflib.get_close_matches(name, allowed, n=1)
            parts.append(f"unknown key {where!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif err["type"] == "missing":
            parts.append(f"missing key {where or '(top level)'!r}")
        elif err["type"] == "union_tag_not_found" and discriminator:
            parts.append(f"missing key {where + '.' + discriminator!r}")
        else:
            if err["type"] == "union_tag_invalid" and discriminator:
                where += f".{discriminator}"
            parts.append(f"{where or '(top level)'}: {err['msg'].removeprefix('Value error, ')}")
    return f"{origin}: " + "; ".join(parts)


def _resolve_paths(raw: dict[str, Any], base: Path, schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """Every path of the config, by its field's type, taken from ``base`` when relative: a ``Path`` field (a
    source's files, a probed model's file) or a :class:`MaybePath` one, wherever it is (``data``, ``external[i]``,
    ``model``, ``models[i]``), so that a new source's path field resolves like the others."""
    schema = schema or AuditConfig
    for key, value in raw.items():
        field = schema.model_fields.get(key)
        if field is None:
            continue  # an unknown key: validation names it
        annotation = field.annotation
        if schema is AuditConfig and key == "model" and isinstance(value, dict) and "source" in value:
            annotation = ProbedModelConfig  # the one-model spelling of `models`
        raw[key] = _resolve_value(value, annotation, field.metadata, base, field.discriminator)
    return raw


def _resolve_value(value: Any, annotation: Any, metadata: list[Any], base: Path,
                   discriminator: str | None = None) -> Any:
    kind, tag = _unwrap(annotation, discriminator)
    words = next((m.words for m in metadata if isinstance(m, MaybePath)), None)
    if isinstance(value, str) and (kind is Path or (words is not None and value not in words)):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())
    if isinstance(value, dict):
        if get_origin(kind) in (Union, types.UnionType) and tag:  # a tagged union: the member the value names
            kind = next((m for m in get_args(kind) if _is_model(m) and tag in m.model_fields
                         and value.get(tag) in get_args(m.model_fields[tag].annotation)), None)
        if _is_model(kind):
            return _resolve_paths(value, base, kind)
    if isinstance(value, list) and get_origin(kind) is list and get_args(kind):
        return [_resolve_value(item, get_args(kind)[0], [], base) for item in value]
    return value


def config_from_dict(raw: dict[str, Any], origin: str = "config", base: Path | None = None,
                     check_files: bool = True) -> AuditConfig:
    """Validate a config mapping; relative data paths are taken from ``base``.

    ``check_files=False`` skips the checks that the data and model files exist (what reads only a run
    directory: the report, on a run whose data has moved).
    """
    if not isinstance(raw, dict):
        raise MaskauditError(f"{origin}: expected a mapping of keys at the top level")
    raw = _resolve_paths(json.loads(json.dumps(raw)), base or Path.cwd())
    try:
        return AuditConfig.model_validate(raw, context={"check_files": check_files})
    except ValidationError as exc:
        raise MaskauditError(_error_line(exc, origin, raw)) from None


def load_config(path: Path, check_files: bool = True) -> AuditConfig:
    """Read and validate a YAML config; relative paths in it are relative to the file (``check_files``: see
    :func:`config_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise MaskauditError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MaskauditError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return config_from_dict(raw or {}, origin=str(path), base=path.resolve().parent, check_files=check_files)


def dump_config(config: AuditConfig) -> str:
    """The resolved config as YAML, with every default written out."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
