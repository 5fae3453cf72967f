"""A synthetic data source with known truth: chest-X-ray-like and fundus-like images (SPEC §8).

Every image, mask, label and metadata value is generated from the run's seed; no file is read.
The generator plants, for each class, the evidence of a positive image in a chosen place, so an
audit run on it can be checked against what was planted.

Generation
----------
*Patients and labels.* Patient ``p`` has ``k`` images, ``k`` drawn uniformly from the inclusive
range ``images_per_patient``. For every class the patient has a latent state drawn with the
class prevalence; each image copies that state with probability ``LABEL_PERSISTENCE`` and is
otherwise redrawn with the prevalence, so the marginal prevalence is exactly the configured one
while a patient's images are correlated, as follow-up studies are. Classes are independent.

*Anatomy.* Each patient gets one set of anatomy parameters (lung, heart and torso geometry, rib
spacing and tissue intensities for ``cxr``; eye side, optic disc and cup geometry, retinal
colour and the vessel tree for ``fundus``), drawn from the seed and the patient index only, never
from the labels. Each image adds small jitter of its own: translation, rotation and scale of the
anatomy frame, gain, gamma, smooth low-frequency texture and fine noise.

*Signals.* For every class, the parameters of its signal (where the opacities go, which marker,
where) are drawn for every image from a stream of their own, whether or not the image is
positive; a negative image simply does not render them. Flipping one label therefore changes only
the pixels of that class's signal, and the ROI masks only when the signal is ``shape``:

``roi``
    ``cxr``: one to three soft bright opacities, multiplied by the lung mask so that they lie
    strictly inside it. ``fundus``: an enlarged cup (cup-to-disc ratio raised towards 0.82),
    which stays inside the disc; the cup *mask* follows the cup, as a real annotation would, while
    the disc mask (the default ROI) does not change.
``outside``
    A bright burned-in marker (an ``L`` glyph, a ring or a cross; side 11 % of the image) in a
    corner (``cxr`` also at the top or bottom centre), placed so that it lies outside the bounding
    box of every ROI with a margin: it survives ``no_roi`` and ``no_roi_bbox`` and is removed by
    ``only_roi`` and ``only_roi_bbox``. Each image draws one of the anchors; a class's ``anchors``
    (``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``, ``cxr`` also ``top`` and
    ``bottom``) limits the draw to those places, so that where the marker lies is known (the truth
    :mod:`maskaudit.analyses.localize` is checked against). The draw consumes the same random
    numbers either way, and without ``anchors`` the pixels are those of every earlier version.
``global``
    A scanner-like change of the whole image: a gamma below one (mid-tones brightened) and a fine
    noise texture, present in the unmasked pixels of every strategy.
``shape``
    ``cxr``: an enlarged heart (cardiomegaly-like), which also changes the lung mask, because the
    heart is cut out of it. ``fundus``: an enlarged optic disc (the cup scales with it).
``none``
    Nothing: the label is noise with respect to the pixels.

``strength`` scales the contrast (or the geometric change) linearly; zero makes a signal
invisible. Opacities, markers and global changes of several positive classes add up; geometric
changes (``shape``, fundus ``roi``) combine as ``1 - prod(1 - strength)``.

*Saturation.* Every image holds a saturated, label-independent structure (the spine of ``cxr``,
the red channel of the optic disc of ``fundus``), so its maximum is 255 whatever its labels, and
scaling each image by its own maximum (SPEC §1) cannot spread a local signal over the image.
``saturate: false`` leaves that structure out: the ``cxr`` spine adds 30 % of its contrast, the
``fundus`` disc's red tint is 1.0 instead of 1.3, and the anatomy of both is rendered at 80 % of its
brightness before the markers are stamped. An image's maximum is then the anatomy's (about 150–220
of 255) unless a bright ``outside`` marker (about 235–255) sets it. Scaling each image by its own maximum then
darkens every pixel of a marked image against an unmarked one: the marker's class leaks into the
ROI, as a burned-in label does in real X-rays (issue 16, part 4). With ``saturate: true`` (the
default) the pixels are those of every earlier version.

*Metadata.* ``sex`` and ``age`` are per patient, ``projection`` and ``camera`` per image. A
column that ``correlates_with`` a class follows that class's label (the patient's latent state
for per-patient columns) with probability ``strength`` and is random otherwise: positive means
``"M"``, 60–90 years, ``"AP"``, ``"remidio"``; negative means ``"F"``, 20–55 years, ``"PA"``,
``"bosch"`` or ``"forus"``. Metadata never changes pixels.

*Determinism.* Every random stream is a :class:`numpy.random.SeedSequence` of the seed, a stream
tag, the patient and image indices and, for class streams, a CRC-32 of the class name (adding a
class leaves the other classes' draws unchanged). :meth:`SyntheticSource.load` depends only on the
seed, the configuration and ``record.key``, never on the order of calls, so parallel preparation
gives identical pixels.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskaudit.config import AuditConfig, SyntheticData
from maskaudit.data.sources.base import Loaded, Record, Source
from maskaudit.errors import MaskauditError

__all__ = ["LABEL_PERSISTENCE", "MARKER_ANCHORS", "SyntheticSource"]

#: Probability that an image's label equals its patient's latent state for that class.
LABEL_PERSISTENCE = 0.8

#: The places of an ``outside`` marker, in the order the generator lists them (``top``, ``bottom``: ``cxr`` only);
#: a class's ``anchors`` names some of them.
MARKER_ANCHORS = ("top_left", "top_right", "bottom_left", "bottom_right", "top", "bottom")

#: ``saturate: false``: the share of the spine's contrast kept (cxr), and the anatomy's brightness (both kinds).
_UNSATURATED_SPINE, _UNSATURATED_BRIGHTNESS = 0.3, 0.8

# Stream tags of the seed sequences (never reorder: they are part of the generated data).
_COUNT, _LABELS, _ANATOMY, _JITTER, _SIGNAL, _META = 1, 2, 3, 4, 5, 6

_MASK64 = (1 << 64) - 1

# Positive-image effect sizes at strength 1.
_OPACITY_GAIN = 0.5  # added intensity at the centre of a CXR opacity
_CDR_POSITIVE = 0.82  # cup-to-disc ratio of a fundus `roi` positive
_HEART_GROWTH = (0.45, 0.22)  # relative growth of the heart's half-axes (x, y) for `shape`
_DISC_GROWTH = 0.45  # relative growth of the optic disc for `shape`
_GLOBAL_GAMMA = 0.55  # gamma of a `global` positive (image in [0, 1])
_GLOBAL_NOISE = 0.035  # std of its fine noise texture
_MARKER_SIZE = 0.11  # marker side as a fraction of the image side


def _rng(*entropy: int) -> np.random.Generator:
    """A generator seeded by a sequence of non-negative integers (negatives are wrapped to 64 bits)."""
    return np.random.default_rng(np.random.SeedSequence([int(e) & _MASK64 for e in entropy]))


def _name_id(name: str) -> int:
    """A stable integer for a name (CRC-32), so streams do not depend on class order."""
    return zlib.crc32(name.encode("utf-8"))


def _combined(strengths: Sequence[float]) -> float:
    """Combine several signal strengths of the same kind: ``1 - prod(1 - s)``."""
    out = 1.0
    for s in strengths:
        out *= 1.0 - s
    return 1.0 - out


def _soft(r: np.ndarray, edge: float) -> np.ndarray:
    """Soft fill of an implicit shape ``r < 1``: 1 inside, a smoothstep over ``[1-edge, 1)``, 0 outside."""
    t = np.clip((1.0 - r) * (1.0 / edge), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
             angle_deg: float = 0.0) -> np.ndarray:
    """Squared normalised radius of a rotated ellipse; the ellipse is ``r < 1``."""
    dx, dy = x - cx, y - cy
    if angle_deg:
        c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx * (1.0 / ax)) ** 2 + (dy * (1.0 / ay)) ** 2


def _segment(x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float],
             width: float) -> np.ndarray:
    """A soft bar of half-width ``width`` along the segment ``a``–``b`` (1 on the axis, 0 beyond)."""
    vx, vy = b[0] - a[0], b[1] - a[1]
    t = np.clip(((x - a[0]) * vx + (y - a[1]) * vy) * (1.0 / (vx * vx + vy * vy)), 0.0, 1.0)
    d2 = (x - a[0] - t * vx) ** 2 + (y - a[1] - t * vy) ** 2
    return np.clip(1.0 - d2 * (1.0 / (width * width)), 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, grid: int = 10) -> np.ndarray:
    """Low-frequency noise of unit scale: a ``grid x grid`` Gaussian field spread by Gaussian bases."""
    centres = np.linspace(-0.1, 1.1, grid, dtype=np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size
    basis = np.exp(-0.5 * ((pos[:, None] - centres[None, :]) * ((grid - 1) / 1.2)) ** 2)
    basis /= basis.sum(axis=1, keepdims=True)
    field = basis @ rng.standard_normal((grid, grid)).astype(np.float32) @ basis.T
    return field * (1.0 / max(float(field.std()), 1e-6))


def _fine_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pixel-wise noise of unit standard deviation (uniform, which is much faster to draw than Gaussian)."""
    noise = rng.random((size, size), dtype=np.float32)
    noise -= 0.5
    noise *= math.sqrt(12.0)
    return noise


def _frame(size: int, tx: float, ty: float, angle_deg: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy coordinates of every pixel centre: the image frame shifted, turned about its centre, scaled."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x, y = pos[None, :] - tx, pos[:, None] - ty
    c, s = math.cos(math.radians(angle_deg)) / scale, math.sin(math.radians(angle_deg)) / scale
    return (0.5 + c * x + s * y).astype(np.float32), (0.5 - s * x + c * y).astype(np.float32)


def _glyph(kind: int, side: int) -> np.ndarray:
    """A ``side x side`` marker stamp in [0, 1]: 0 an ``L`` glyph, 1 a ring, 2 a cross."""
    stroke = max(1, round(side * 0.25))
    out = np.zeros((side, side), np.float32)
    if kind == 0:
        out[:, :stroke] = 1.0
        out[side - stroke:, :] = 1.0
    elif kind == 1:
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - (side - 1) / 2.0
        radius = np.hypot(xx, yy)
        mid = (side - 1) / 2.0 - stroke / 2.0 + 0.25
        out[np.abs(radius - mid) <= stroke / 2.0 + 0.25] = 1.0
    else:
        lo = (side - stroke) // 2
        out[lo:lo + stroke, :] = 1.0
        out[:, lo:lo + stroke] = 1.0
    return out


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (row0, row1, col0, col1) of a mask's pixels, or ``None`` when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


@dataclass(frozen=True)
class _Jitter:
    """Per-image acquisition jitter, drawn from the image's own stream (independent of labels)."""

    tx: float
    ty: float
    angle: float
    scale: float
    gain: float
    gamma: float
    noise: float

    def window(self, size: int, xa: np.ndarray, ya: np.ndarray, pad: float) -> tuple[slice, slice] | None:
        """The pixel window (rows, cols) covering anatomy-frame points ``(xa, ya)`` plus ``pad``
        (anatomy units), clipped to the image; ``None`` when it misses the image. Inverts :func:`_frame`."""
        c = math.cos(math.radians(self.angle)) / self.scale
        s = math.sin(math.radians(self.angle)) / self.scale
        k = c * c + s * s
        dx, dy = np.asarray(xa, np.float64) - 0.5, np.asarray(ya, np.float64) - 0.5
        col = ((c * dx - s * dy) / k + 0.5 + self.tx) * size - 0.5
        row = ((s * dx + c * dy) / k + 0.5 + self.ty) * size - 0.5
        grow = pad * size * self.scale + 2.0
        r0, r1 = max(int(math.floor(row.min() - grow)), 0), min(int(math.ceil(row.max() + grow)) + 1, size)
        c0, c1 = max(int(math.floor(col.min() - grow)), 0), min(int(math.ceil(col.max() + grow)) + 1, size)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def box(self, size: int, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """The pixel window covering an axis-aligned box of the anatomy frame (the whole image when it
        misses the image, so that callers need no special case)."""
        win = self.window(size, np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]), 0.01)
        return win if win is not None else (slice(0, size), slice(0, size))


class SyntheticSource(Source):
    """Chest-X-ray-like (``kind="cxr"``, ROIs lungs and heart) or fundus-like (``kind="fundus"``,
    ROIs disc and cup) images with planted, known signals; see the module docstring for the method."""

    name = "synthetic"
    config_type = SyntheticData

    def __init__(self, config: SyntheticData, seed: int, image_size: int) -> None:
        low, high = config.images_per_patient
        if not 1 <= low <= high:
            raise MaskauditError(
                f"data.images_per_patient must be 1 <= low <= high, got {list(config.images_per_patient)}"
            )
        self.config = config
        self.seed = int(seed)
        self.size = int(config.size or image_size)
        self.kind = config.kind
        self.rois = ("lungs", "heart") if config.kind == "cxr" else ("disc", "cup")
        self.channels = 1 if config.kind == "cxr" else 3

    @classmethod
    def from_config(cls, config: AuditConfig) -> SyntheticSource:
        """The source of ``config.data``, drawn with the run's ``seed`` at its ``image_size`` (unless ``data.size``)."""
        return cls(config.data, seed=config.seed, image_size=config.image_size)

    # ------------------------------------------------------------------------------------ interface

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def metadata_columns(self) -> list[str]:
        return list(self.config.metadata)

    def records(self) -> Iterator[Record]:
        """One record per image, patients in order, each patient's images in order.

        Labels and metadata are decided here from the seed; ``key`` carries everything
        :meth:`load` needs: patient and image index, the label vector (in class order) and the
        patient's anatomy parameters, all plain Python numbers.
        """
        low, high = self.config.images_per_patient
        width = max(4, len(str(self.config.n_patients - 1)))
        classes = self.classes
        for p in range(self.config.n_patients):
            n_images = int(_rng(self.seed, _COUNT, p).integers(low, high + 1))
            states, labels = self._patient_labels(p, n_images)
            anatomy = self._anatomy(p)
            patient_meta = self._patient_metadata(p, states)
            patient_id = f"p{p:0{width}d}"
            for i in range(n_images):
                image_id = f"syn_{patient_id}_i{i}"
                label_vec = tuple(labels[name][i] for name in classes)
                image_labels = dict(zip(classes, label_vec, strict=True))
                metadata = {**patient_meta, **self._image_metadata(p, i, image_labels)}
                metadata = {column: metadata[column] for column in self.metadata_columns}
                yield Record(
                    image_id=image_id,
                    patient_id=patient_id,
                    labels=image_labels,
                    metadata=metadata,
                    source_path=f"synthetic:{self.kind}:{image_id}",
                    split=None,
                    key={"patient": p, "image": i, "labels": label_vec, "anatomy": dict(anatomy)},
                )

    def load(self, record: Record) -> Loaded:
        """Render one record's image and ROI masks from ``record.key``."""
        return self.render(record.key)

    def render(self, key: Mapping[str, Any], labels: Mapping[str, int] | None = None) -> Loaded:
        """Render the image of ``key``; ``labels`` overrides some of its labels (for controls and tests).

        With the same key, two renderings that differ in one class's label differ only in that
        class's signal: the anatomy, the jitter and every other class's signal are identical.
        """
        label_vec = dict(zip(self.classes, key["labels"], strict=True))
        if labels:
            unknown = set(labels) - set(label_vec)
            if unknown:
                raise KeyError(f"unknown classes: {sorted(unknown)}")
            label_vec.update({name: int(value) for name, value in labels.items()})
        p, i = int(key["patient"]), int(key["image"])
        if self.kind == "cxr":
            return self._render_cxr(p, i, key["anatomy"], label_vec)
        return self._render_fundus(p, i, key["anatomy"], label_vec)

    # ------------------------------------------------------------------------------ labels/metadata

    def _patient_labels(self, p: int, n_images: int) -> tuple[dict[str, int], dict[str, list[int]]]:
        """Each class's latent patient state and the image labels derived from it."""
        states: dict[str, int] = {}
        labels: dict[str, list[int]] = {}
        for name, cls in self.config.classes.items():
            rng = _rng(self.seed, _LABELS, _name_id(name), p)
            state = int(rng.random() < cls.prevalence)
            keep = rng.random(n_images) < LABEL_PERSISTENCE
            fresh = rng.random(n_images) < cls.prevalence
            states[name] = state
            labels[name] = [state if k else int(f) for k, f in zip(keep, fresh, strict=True)]
        return states, labels

    def _metadata_value(self, column: str, label: int | None, rng: np.random.Generator) -> Any:
        """One metadata value: follows ``label`` with the column's strength, else random."""
        meta = self.config.metadata[column]
        follow = rng.random() < meta.strength and label is not None
        u = float(rng.random())
        if column == "sex":
            return ("M" if label else "F") if follow else ("M" if u < 0.5 else "F")
        if column == "age":
            if follow:
                return 60 + int(u * 31) if label else 20 + int(u * 36)
            return 20 + int(u * 71)
        if column == "projection":
            return ("AP" if label else "PA") if follow else ("AP" if u < 0.5 else "PA")
        if column == "camera":
            if follow:
                return "remidio" if label else ("bosch" if u < 0.5 else "forus")
            return ("bosch", "forus", "remidio")[min(int(u * 3), 2)]
        raise ValueError(f"unknown synthetic metadata column {column!r}")  # the config allows only these four

    def _patient_metadata(self, p: int, states: Mapping[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for column in ("sex", "age"):
            if column in self.config.metadata:
                target = self.config.metadata[column].correlates_with
                rng = _rng(self.seed, _META, _name_id(column), p)
                out[column] = self._metadata_value(column, states[target] if target else None, rng)
        return out

    def _image_metadata(self, p: int, i: int, labels: Mapping[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for column in ("projection", "camera"):
            if column in self.config.metadata:
                target = self.config.metadata[column].correlates_with
                rng = _rng(self.seed, _META, _name_id(column), p, i)
                out[column] = self._metadata_value(column, labels[target] if target else None, rng)
        return out

    # ------------------------------------------------------------------------------------- anatomy

    def _anatomy(self, p: int) -> dict[str, Any]:
        """Patient-level anatomy, drawn from the seed and the patient index only (never the labels)."""
        rng = _rng(self.seed, _ANATOMY, p)

        def u(lo: float, hi: float) -> float:
            return float(rng.uniform(lo, hi))

        if self.kind == "cxr":
            return {
                "torso_w": u(0.40, 0.46), "torso_cy": u(0.57, 0.63),
                "lung_dx": u(0.17, 0.20), "lung_cy": u(0.46, 0.50),
                "lung_ax_l": u(0.13, 0.155), "lung_ay_l": u(0.24, 0.27),
                "lung_ax_r": u(0.125, 0.145), "lung_ay_r": u(0.23, 0.26),
                "heart_dx": u(0.045, 0.07), "heart_cy": u(0.60, 0.64),
                "heart_ax": u(0.11, 0.13), "heart_ay": u(0.085, 0.105), "heart_angle": u(-30.0, -15.0),
                "clav_y": u(0.17, 0.20), "clav_rise": u(0.04, 0.08),
                "rib_freq": u(9.0, 12.0), "rib_phase": u(0.0, 1.0),
                "tissue": u(0.42, 0.52), "lung": u(0.13, 0.2), "heart": u(0.6, 0.7), "bone": u(0.15, 0.22),
                "spine": u(0.75, 0.9),
            }
        side = 1.0 if rng.random() < 0.5 else -1.0
        angle = rng.uniform(0.0, 2.0 * math.pi)
        radius = math.sqrt(rng.random())
        vessels = []
        # (theta0, curvature, r_max, half-width, darkness) of the four arcades, artery and vein each;
        # theta in the eye frame where the macula (temporal side) lies at angle pi, superior at -pi/2.
        for theta0, bend in ((-1.75, -2.6), (1.75, 2.6), (-1.0, 1.2), (1.0, -1.2)):
            for darkness, width in ((0.55, 0.0085), (0.75, 0.011)):
                vessels.append((theta0 + u(-0.15, 0.15), bend * u(0.8, 1.2), u(0.45, 0.6),
                                width * u(0.85, 1.15), darkness))
        branches = []
        for parent in rng.choice(len(vessels), size=6, replace=False):
            branches.append((int(parent), u(0.1, 0.25), u(3.0, 6.0) * (1.0 if rng.random() < 0.5 else -1.0),
                             u(0.25, 0.4)))
        return {
            "side": side, "disc_dx": u(0.12, 0.19), "disc_dy": u(-0.04, 0.04),
            "disc_r": u(0.08, 0.1), "disc_aspect": u(1.0, 1.12), "cdr": u(0.25, 0.45),
            "cup_ox": radius * math.cos(angle), "cup_oy": radius * math.sin(angle),
            "retina_r": u(0.44, 0.47), "red": u(0.7, 0.85), "green": u(0.28, 0.4), "blue": u(0.08, 0.16),
            "macula": u(0.2, 0.35), "vessels": tuple(vessels), "branches": tuple(branches),
        }

    def _jitter(self, p: int, i: int) -> _Jitter:
        rng = _rng(self.seed, _JITTER, p, i)
        shift, turn = (0.02, 3.0) if self.kind == "cxr" else (0.015, 8.0)
        return _Jitter(
            tx=float(rng.uniform(-shift, shift)), ty=float(rng.uniform(-shift, shift)),
            angle=float(rng.uniform(-turn, turn)), scale=float(rng.uniform(0.97, 1.03)),
            gain=float(rng.uniform(0.92, 1.05)), gamma=float(np.exp(rng.normal(0.0, 0.05))),
            noise=float(rng.uniform(0.008, 0.016)),
        )

    def _strengths(self, signal: str, labels: Mapping[str, int]) -> list[float]:
        """Strengths of the positive classes whose signal is ``signal``."""
        return [cls.strength for name, cls in self.config.classes.items()
                if cls.signal == signal and labels[name]]

    # ------------------------------------------------------------------------------- common signals

    def _markers(self, image: np.ndarray, roi_union: np.ndarray, p: int, i: int,
                 labels: Mapping[str, int]) -> None:
        """Stamp the ``outside`` classes' markers, each outside the bounding box of every ROI (in place).

        A marker of side ``_MARKER_SIZE`` goes to one of a few anchors (:data:`MARKER_ANCHORS`: the
        corners; for ``cxr`` also the top and bottom centre; a class's ``anchors``: those alone), moved
        by a few pixels, among those that keep a margin from the ROIs' box. Where none does (tiny
        images), it shrinks down to 3 pixels and hugs the border.
        """
        size = self.size
        box = _bbox(roi_union)
        side = max(5, round(_MARKER_SIZE * size))
        edge = max(1, round(0.03 * size))
        tries = [(side, max(2, round(0.02 * size)), edge)] + [(s, 1, 0) for s in range(side, 2, -1)]

        def anchors(side: int, edge: int) -> list[tuple[int, int]]:
            far = size - edge - side
            out = [(edge, edge), (edge, far), (far, edge), (far, far)]
            if self.kind == "cxr":  # also above the neck and below the diaphragm; fundus: black corners only
                out += [(edge, (size - side) // 2), (far, (size - side) // 2)]
            return out

        def clear(r0: int, c0: int, side: int, margin: int) -> bool:
            return box is None or (r0 + side - 1 < box[0] - margin or r0 > box[1] + margin
                                   or c0 + side - 1 < box[2] - margin or c0 > box[3] + margin)

        for name, cls in self.config.classes.items():
            if cls.signal != "outside":
                continue
            rng = _rng(self.seed, _SIGNAL, _name_id(name), p, i)
            pick, kind = float(rng.random()), int(rng.integers(0, 3))
            dr, dc = (int(v) for v in rng.integers(-edge + 1, edge, size=2)) if edge > 1 else (0, 0)
            if not labels[name]:
                continue
            for side_now, margin, edge_now in tries:
                shift = (dr, dc) if edge_now else (0, 0)
                last = size - side_now
                places = anchors(side_now, edge_now)
                if cls.anchors is not None:  # only the named places, in the order of MARKER_ANCHORS
                    places = [at for at, named in zip(places, MARKER_ANCHORS, strict=False) if named in cls.anchors]
                moved = [(min(max(r0 + shift[0], 0), last), min(max(c0 + shift[1], 0), last))
                         for r0, c0 in places]
                valid = [(r0, c0) for r0, c0 in moved if clear(r0, c0, side_now, margin)]
                if valid:
                    break
            else:  # the ROIs fill the image: there is no room outside their box
                continue
            r0, c0 = valid[min(int(pick * len(valid)), len(valid) - 1)]
            stamp = _glyph(kind, side_now) * cls.strength
            patch = image[r0:r0 + side_now, c0:c0 + side_now]
            if patch.ndim == 3:
                stamp = stamp[..., None]
            patch += stamp * (1.0 - patch)

    def _finish(self, image: np.ndarray, jitter: _Jitter, p: int, i: int,
                labels: Mapping[str, int]) -> np.ndarray:
        """Acquisition: gain, gamma (jitter and ``global`` signal), fine noise; quantise to uint8.

        The anatomy of every image holds a saturated structure (the spine for ``cxr``, the red
        channel of the optic disc for ``fundus``), so every image's maximum is 255 whatever its
        labels: normalising an image by its own maximum (SPEC §1) cannot carry a signal from one
        place of the image to every other. Unless ``saturate`` is false (module docstring).
        """
        size = self.size
        gamma = jitter.gamma
        texture = None
        for name, cls in self.config.classes.items():
            if cls.signal != "global":
                continue
            rng = _rng(self.seed, _SIGNAL, _name_id(name), p, i)
            if labels[name]:
                gamma *= 1.0 - (1.0 - _GLOBAL_GAMMA) * cls.strength
                grain = _fine_noise(rng, size) * (_GLOBAL_NOISE * cls.strength)
                texture = grain if texture is None else texture + grain
        # in place: `image` is the caller's scratch buffer
        image *= np.float32(jitter.gain)
        np.maximum(image, 0.0, out=image)  # values above 1 stay above 1 through the gamma, then saturate
        np.power(image, np.float32(gamma), out=image)
        noise = _fine_noise(_rng(self.seed, _JITTER, p, i, 1), size)
        noise *= np.float32(jitter.noise)
        if texture is not None:
            noise += texture
        image += noise[..., None] if image.ndim == 3 else noise
        np.clip(image, 0.0, 1.0, out=image)
        image *= np.float32(255.0)
        return np.rint(image, out=image).astype(np.uint8)

    # ------------------------------------------------------------------------------------------ CXR

    def _render_cxr(self, p: int, i: int, a: Mapping[str, float], labels: Mapping[str, int]) -> Loaded:
        size = self.size
        jit = self._jitter(p, i)
        x, y = _frame(size, jit.tx, jit.ty, jit.angle, jit.scale)

        # body: soft tissue in a super-ellipse, a little brighter towards its edge, with smooth texture
        bg = 0.04
        r_torso = (np.abs((x - 0.5) * (1.0 / a["torso_w"])) ** 2.4
                   + np.abs((y - a["torso_cy"]) * (1.0 / 0.56)) ** 2.4)
        torso = _soft(r_torso, 0.25)
        image = bg + torso * (a["tissue"] * (1.0 + 0.25 * np.minimum(r_torso, 1.0)) - bg)
        image *= 1.0 + 0.06 * _smooth_noise(_rng(self.seed, _JITTER, p, i, 2), size)

        # lungs: two tapered ellipses, darker, with curved rib shadows
        lcx, rcx = 0.5 - a["lung_dx"] - 0.01, 0.5 + a["lung_dx"]
        ay_max = max(a["lung_ay_l"], a["lung_ay_r"])
        lw = jit.box(size, lcx - a["lung_ax_l"], rcx + a["lung_ax_r"], a["lung_cy"] - ay_max,
                     a["lung_cy"] + ay_max)
        xl, yl = x[lw], y[lw]

        def lung(cx: float, ax: float, ay: float) -> np.ndarray:
            top = a["lung_cy"] - ay
            taper = 0.55 + 0.45 * np.sqrt(np.clip((yl - top) * (1.0 / (1.3 * ay)), 0.0, 1.0))
            return ((xl - cx) / (ax * taper)) ** 2 + ((yl - a["lung_cy"]) * (1.0 / ay)) ** 2

        r_left, r_right = lung(lcx, a["lung_ax_l"], a["lung_ay_l"]), lung(rcx, a["lung_ax_r"], a["lung_ay_r"])
        lung_soft = np.maximum(_soft(r_left, 0.3), _soft(r_right, 0.3))
        ribs = 0.5 + 0.5 * np.sin((2.0 * math.pi * a["rib_freq"])
                                  * (yl + 0.6 * (xl - 0.5) ** 2 - 0.25 * np.abs(xl - 0.5))
                                  + 2.0 * math.pi * a["rib_phase"])
        image[lw] += lung_soft * (a["lung"] + 0.09 * ribs ** 3 - image[lw])
        lung_fields = np.zeros((size, size), bool)
        lung_fields[lw] = (r_left < 1.0) | (r_right < 1.0)

        # heart: a tilted ellipse over the lower medial part of the image-right lung (`shape` enlarges it)
        grow = _combined(self._strengths("shape", labels))
        h_ax = a["heart_ax"] * (1.0 + _HEART_GROWTH[0] * grow)
        h_ay = a["heart_ay"] * (1.0 + _HEART_GROWTH[1] * grow)
        hcx = 0.5 + a["heart_dx"] + 0.3 * (h_ax - a["heart_ax"])
        hcy = a["heart_cy"] + 0.3 * (h_ay - a["heart_ay"])
        reach = max(h_ax, h_ay)
        hw = jit.box(size, hcx - reach, hcx + reach, hcy - reach, hcy + reach)
        r_heart = _ellipse(x[hw], y[hw], hcx, hcy, h_ax, h_ay, a["heart_angle"])
        image[hw] += _soft(r_heart, 0.35) * (a["heart"] - image[hw])
        heart = np.zeros((size, size), bool)
        heart[hw] = r_heart < 1.0
        lungs = lung_fields & ~heart

        # bones: spine with vertebrae, clavicles
        sw = jit.box(size, 0.41, 0.59, -0.05, 1.05)
        spine = np.exp(-(((x[sw] - 0.5) * (1.0 / 0.028)) ** 2))
        spine *= 0.8 + 0.2 * np.sin((2.0 * math.pi * 16.0) * y[sw])
        if self.config.saturate:
            image[sw] += a["spine"] * torso[sw] * spine  # saturates: see `_finish`
        else:
            image[sw] += (a["spine"] * _UNSATURATED_SPINE) * torso[sw] * spine
        for mid, tip in ((0.46, 0.2), (0.54, 0.8)):
            ends = ((mid, a["clav_y"]), (tip, a["clav_y"] - a["clav_rise"]))
            cw = jit.window(size, np.array([mid, tip]), np.array([ends[0][1], ends[1][1]]), 0.016)
            image[cw] += a["bone"] * torso[cw] * _segment(x[cw], y[cw], ends[0], ends[1], 0.016)

        # `roi`: soft opacities strictly inside the lung mask
        inside = np.zeros((size, size), np.float32)
        inside[lw] = lung_soft * lungs[lw]
        for name, cls in self.config.classes.items():
            if cls.signal != "roi":
                continue
            rng = _rng(self.seed, _SIGNAL, _name_id(name), p, i)
            n_blobs = int(rng.integers(1, 4))
            params = rng.random((n_blobs, 5))
            if not labels[name]:
                continue
            blobs = np.zeros((size, size), np.float32)
            for right, rho, phi, sigma, amp in params:
                left_side = right < 0.5
                ax, ay = (a["lung_ax_l"], a["lung_ay_l"]) if left_side else (a["lung_ax_r"], a["lung_ay_r"])
                bx = (lcx if left_side else rcx) + 0.6 * rho * ax * math.cos(2.0 * math.pi * phi)
                by = a["lung_cy"] + 0.1 * ay + 0.6 * rho * ay * math.sin(2.0 * math.pi * phi)
                s = 0.035 + 0.035 * sigma
                win = jit.window(size, np.array([bx]), np.array([by]), 3.5 * s)
                if win is not None:
                    d2 = (x[win] - bx) ** 2 + (y[win] - by) ** 2
                    blobs[win] += (0.7 + 0.3 * amp) * np.exp(d2 * (-0.5 / (s * s)))
            image += (_OPACITY_GAIN * cls.strength) * np.minimum(blobs, 1.0) * inside

        image = image.astype(np.float32, copy=False)
        if not self.config.saturate:
            image *= np.float32(_UNSATURATED_BRIGHTNESS)
        self._markers(image, lungs | heart, p, i, labels)
        return Loaded(image=self._finish(image, jit, p, i, labels), rois={"lungs": lungs, "heart": heart})

    # --------------------------------------------------------------------------------------- fundus

    def _render_fundus(self, p: int, i: int, a: Mapping[str, Any], labels: Mapping[str, int]) -> Loaded:
        size = self.size
        jit = self._jitter(p, i)
        x, y = _frame(size, jit.tx, jit.ty, jit.angle, jit.scale)
        side = a["side"]
        cx, cy = 0.5 + side * a["disc_dx"], 0.5 + a["disc_dy"]

        # retina: an orange-red disc with vignetting, smooth texture and a darker macula
        radius2 = a["retina_r"] ** 2
        rho2 = (x - 0.5) ** 2 + (y - 0.5) ** 2
        retina = _soft(rho2 * (1.0 / radius2), 0.08)
        shade = (1.0 - (0.45 / radius2) * rho2) * retina
        shade *= 1.0 + 0.07 * _smooth_noise(_rng(self.seed, _JITTER, p, i, 2), size)
        mx = cx - side * 4.6 * a["disc_r"]
        mw = jit.window(size, np.array([mx]), np.array([cy]), 0.25)
        if mw is not None:
            d2 = (x[mw] - mx) ** 2 + (y[mw] - cy) ** 2
            shade[mw] *= 1.0 - a["macula"] * np.exp(d2 * (-0.5 / 0.06**2))
        color = np.array([a["red"], a["green"], a["blue"]], np.float32)
        image = 0.015 + shade[..., None] * (color - 0.015)

        # disc (the `shape` signal enlarges it) and cup (the `roi` signal raises the cup-to-disc ratio)
        rd = a["disc_r"] * (1.0 + _DISC_GROWTH * _combined(self._strengths("shape", labels)))
        asp = a["disc_aspect"]
        cdr = a["cdr"] + (_CDR_POSITIVE - a["cdr"]) * _combined(self._strengths("roi", labels))
        off = 0.5 * (1.0 - cdr)  # keeps the cup inside the disc
        dw = jit.window(size, np.array([cx]), np.array([cy]), rd * asp)
        disc, cup = np.zeros((size, size), bool), np.zeros((size, size), bool)
        if dw is not None:
            u, v = (x[dw] - cx) * side, y[dw] - cy  # eye frame: macula towards -u, superior towards -v
            r_disc = _ellipse(u, v, 0.0, 0.0, rd, rd * asp)
            r_cup = _ellipse(u, v, off * a["cup_ox"] * rd, off * a["cup_oy"] * rd * asp, cdr * rd,
                             cdr * rd * asp)
            disc[dw], cup[dw] = r_disc < 1.0, r_cup < 1.0
            disc_tint = (1.3, 0.68, 0.33) if self.config.saturate else (1.0, 0.68, 0.33)
            for r_shape, tint in ((r_disc, disc_tint), (r_cup, (1.0, 0.96, 0.86))):
                fill = _soft(r_shape, 0.35)
                image[dw] += fill[..., None] * (np.array(tint, np.float32) - image[dw])

        # vessels: curves theta(r) = theta0 + bend * r in polar coordinates about the disc, with branches
        start, pixel = 0.25 * a["disc_r"], 1.0 / size
        curves = [(t0, bend, rmax, w, dark, 0.0) for t0, bend, rmax, w, dark in a["vessels"]]
        for parent, rb, bend, rmax in a["branches"]:
            t0, pbend, _, w, dark = a["vessels"][parent]
            curves.append((t0 + pbend * rb - bend * rb, bend, rb + rmax, 0.7 * w, dark, rb))
        windows = []
        for t0, bend, rmax, w, _dark, rb in curves:
            along = np.linspace(max(rb, start), rmax, 48)
            theta = t0 + bend * along
            windows.append(jit.window(size, cx + side * along * np.cos(theta), cy + along * np.sin(theta),
                                      w + pixel))
        found = [win for win in windows if win is not None]
        if found:
            vw = (slice(min(w[0].start for w in found), max(w[0].stop for w in found)),
                  slice(min(w[1].start for w in found), max(w[1].stop for w in found)))
            u, v = (x[vw] - cx) * side, y[vw] - cy
            r, phi = np.sqrt(u * u + v * v), np.arctan2(v, u)
            vessels = np.zeros_like(r)
            for (t0, bend, rmax, w, dark, rb), win in zip(curves, windows, strict=True):
                if win is None:
                    continue
                sub = (slice(win[0].start - vw[0].start, win[0].stop - vw[0].start),
                       slice(win[1].start - vw[1].start, win[1].stop - vw[1].start))
                rw = r[sub]
                delta = phi[sub] - (t0 + bend * rw)
                delta -= (2.0 * math.pi) * np.rint(delta * (0.5 / math.pi))
                width = np.maximum(w * (1.0 - 0.55 / rmax * rw), 0.7 * pixel)
                line = np.clip(1.0 - (delta * rw / width) ** 2, 0.0, 1.0)
                line *= np.clip((rmax - rw) * (1.0 / 0.05), 0.0, 1.0) * (rw > max(rb, start))
                np.maximum(vessels[sub], dark * line, out=vessels[sub])
            vessels *= retina[vw]
            image[vw] += vessels[..., None] * (np.array([0.45, 0.08, 0.05], np.float32) - image[vw])

        image = image.astype(np.float32, copy=False)
        if not self.config.saturate:
            image *= np.float32(_UNSATURATED_BRIGHTNESS)
        self._markers(image, disc | cup, p, i, labels)
        return Loaded(image=self._finish(image, jit, p, i, labels), rois={"disc": disc, "cup": cup})
