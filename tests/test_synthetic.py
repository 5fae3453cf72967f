"""The synthetic source: deterministic, grouped by patient, and every planted signal where it was planted."""

from __future__ import annotations

import pickle
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from maskaudit.config import SyntheticClass, SyntheticData, SyntheticMetadata
from maskaudit.data.sources.base import Record
from maskaudit.data.sources.synthetic import SyntheticSource
from maskaudit.errors import MaskauditError

SIZE = 64


def make(kind: str = "cxr", n_patients: int = 12, seed: int = 5, size: int | None = SIZE,
         **classes: SyntheticClass | Any) -> SyntheticSource:
    """A small source; ``classes`` default to one class of every signal kind."""
    if not classes:
        classes = {
            "inside": SyntheticClass(signal="roi"),
            "marker": SyntheticClass(signal="outside"),
            "scanner": SyntheticClass(signal="global"),
            "big": SyntheticClass(signal="shape"),
            "noise": SyntheticClass(signal="none"),
        }
    config = SyntheticData(source="synthetic", kind=kind, n_patients=n_patients, size=size, classes=classes)
    return SyntheticSource(config, seed=seed, image_size=SIZE)


def bbox_mask(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.zeros_like(mask)
    out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    return out


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels (H, W) where two renderings differ in any channel."""
    diff = a.astype(np.int16) != b.astype(np.int16)
    return diff.any(axis=-1) if diff.ndim == 3 else diff


def flip(source: SyntheticSource, record: Record, name: str) -> tuple[Any, Any]:
    """The record rendered with ``name`` positive and negative, every other label as drawn."""
    return source.render(record.key, {name: 1}), source.render(record.key, {name: 0})


KINDS = ["cxr", "fundus"]


# ------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_records_and_pixels(kind: str) -> None:
    a, b = make(kind), make(kind)
    records_a, records_b = list(a.records()), list(b.records())
    assert records_a == records_b
    for record in records_a[:6]:
        one, two = a.load(record), b.load(record)
        assert np.array_equal(one.image, two.image)
        assert all(np.array_equal(one.rois[name], two.rois[name]) for name in a.rois)
    other = make(kind, seed=6)
    assert [r.labels for r in other.records()] != [r.labels for r in records_a]
    assert not np.array_equal(other.load(records_a[0]).image, a.load(records_a[0]).image)


def test_load_order_and_pickling_do_not_matter() -> None:
    source = make()
    records = list(source.records())[:8]
    forward = [source.load(r).image for r in records]
    backward = [source.load(r).image for r in reversed(records)][::-1]
    clone = pickle.loads(pickle.dumps(source))
    pickled = [clone.load(pickle.loads(pickle.dumps(r))).image for r in records]
    for f, b, p in zip(forward, backward, pickled, strict=True):
        assert np.array_equal(f, b) and np.array_equal(f, p)
    assert len({img.tobytes() for img in forward}) == len(forward)  # images really differ


def test_negative_seed_is_accepted() -> None:
    source = make(seed=-3)
    assert source.load(next(iter(source.records()))).image.shape == (SIZE, SIZE)


def test_adding_a_class_keeps_the_other_labels() -> None:
    one = make(a=SyntheticClass(signal="roi"))
    two = make(a=SyntheticClass(signal="roi"), b=SyntheticClass(signal="outside"))
    assert [r.labels["a"] for r in one.records()] == [r.labels["a"] for r in two.records()]


# ------------------------------------------------------------------------------------- shape, groups


@pytest.mark.parametrize("kind", KINDS)
def test_interface_shapes_and_dtypes(kind: str) -> None:
    source = make(kind, size=None)
    assert source.name == "synthetic"
    assert source.rois == (("lungs", "heart") if kind == "cxr" else ("disc", "cup"))
    assert source.channels == (1 if kind == "cxr" else 3)
    assert source.classes == ["inside", "marker", "scanner", "big", "noise"]
    assert source.metadata_columns == []
    record = next(iter(source.records()))
    loaded = source.load(record)
    expected = (SIZE, SIZE) if kind == "cxr" else (SIZE, SIZE, 3)
    assert loaded.image.shape == expected and loaded.image.dtype == np.uint8
    assert set(loaded.rois) == set(source.rois)
    for mask in loaded.rois.values():
        assert mask.shape == (SIZE, SIZE) and mask.dtype == bool
    assert make(kind, size=40).load(record).image.shape[:2] == (40, 40)  # config.size beats image_size


@pytest.mark.parametrize("kind", KINDS)
def test_masks_are_non_empty_and_nested(kind: str) -> None:
    source = make(kind, n_patients=20)
    for record in list(source.records())[::2]:
        rois = source.load(record).rois
        first, second = (rois[name] for name in source.rois)
        assert first.sum() > 0.02 * SIZE * SIZE and second.sum() > 4
        if kind == "fundus":
            assert not (rois["cup"] & ~rois["disc"]).any()  # cup inside disc
            assert rois["cup"].sum() < rois["disc"].sum()
        else:
            assert not (rois["lungs"] & rois["heart"]).any()  # the heart is cut out of the lungs


@pytest.mark.parametrize("size", [32, SIZE])
@pytest.mark.parametrize("kind", KINDS)
def test_every_image_saturates_so_max_scaling_carries_no_signal(kind: str, size: int) -> None:
    source = make(kind, n_patients=20, size=size)
    for record in list(source.records())[:20]:
        for name in ("marker", "inside", "scanner", "big"):
            for value in (0, 1):
                assert source.render(record.key, {name: value}).image.max() == 255


def test_records_are_grouped_by_patient() -> None:
    config = SyntheticData(source="synthetic", n_patients=30, images_per_patient=(2, 4))
    source = SyntheticSource(config, seed=1, image_size=SIZE)
    records = list(source.records())
    per_patient: dict[str, list[Record]] = {}
    for r in records:
        per_patient.setdefault(r.patient_id, []).append(r)
    assert len(per_patient) == 30
    counts = [len(v) for v in per_patient.values()]
    assert min(counts) >= 2 and max(counts) <= 4 and len(set(counts)) > 1
    assert len({r.image_id for r in records}) == len(records)
    first = records[0]
    assert first.patient_id == "p0000" and first.image_id == "syn_p0000_i0"
    assert first.source_path == "synthetic:cxr:syn_p0000_i0" and first.split is None
    assert set(first.labels) == {"opacity", "device"} and set(first.labels.values()) <= {0, 1}
    # one anatomy per patient: the same key anatomy, slightly different images
    a, b = per_patient["p0000"][:2]
    assert a.key["anatomy"] == b.key["anatomy"]
    pa, pb = source.load(a), source.load(b)
    overlap = (pa.rois["lungs"] & pb.rois["lungs"]).sum() / (pa.rois["lungs"] | pb.rois["lungs"]).sum()
    assert overlap > 0.75


def test_images_per_patient_must_be_ordered() -> None:
    config = SyntheticData(source="synthetic", images_per_patient=(3, 1))
    with pytest.raises(MaskauditError, match="images_per_patient"):
        SyntheticSource(config, seed=0, image_size=SIZE)


def test_prevalence_is_roughly_right() -> None:
    source = make(n_patients=400, rare=SyntheticClass(signal="none", prevalence=0.1),
                  common=SyntheticClass(signal="none", prevalence=0.6))
    records = list(source.records())
    for name, prevalence in (("rare", 0.1), ("common", 0.6)):
        share = np.mean([r.labels[name] for r in records])
        assert abs(share - prevalence) < 0.06, (name, share)


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("size", [32, SIZE])
@pytest.mark.parametrize("kind", KINDS)
def test_outside_signal_lies_outside_every_roi_bbox(kind: str, size: int) -> None:
    source = make(kind, n_patients=20, size=size)
    for record in list(source.records())[:24]:
        pos, neg = flip(source, record, "marker")
        diff = changed(pos.image, neg.image)
        assert diff.sum() >= 5  # never dropped for lack of room, even on tiny images
        union = np.zeros_like(diff)
        for name in source.rois:
            assert np.array_equal(pos.rois[name], neg.rois[name])
            union |= pos.rois[name]
        assert not (diff & bbox_mask(union)).any()


@pytest.mark.parametrize("kind", KINDS)
def test_roi_signal_changes_only_roi_pixels(kind: str) -> None:
    source = make(kind)
    roi = source.rois[0]
    for record in list(source.records())[:10]:
        pos, neg = flip(source, record, "inside")
        diff = changed(pos.image, neg.image)
        assert diff.sum() >= 3
        assert not (diff & ~pos.rois[roi]).any()
        assert np.array_equal(pos.rois[roi], neg.rois[roi])
        if kind == "fundus":  # a larger cup-to-disc ratio: the cup mask follows the cup
            assert pos.rois["cup"].sum() > neg.rois["cup"].sum()


@pytest.mark.parametrize("kind", KINDS)
def test_global_signal_changes_the_whole_image(kind: str) -> None:
    source = make(kind)
    record = next(iter(source.records()))
    pos, neg = flip(source, record, "scanner")
    diff = changed(pos.image, neg.image)
    assert diff.mean() > 0.5
    for name in source.rois:
        roi = pos.rois[name]
        assert diff[roi].mean() > 0.5 and diff[~bbox_mask(roi)].mean() > 0.5
    assert pos.image.astype(float).mean() > neg.image.astype(float).mean()  # gamma < 1 brightens


@pytest.mark.parametrize("kind", KINDS)
def test_no_signal_but_shape_moves_a_mask(kind: str) -> None:
    source = make(kind)
    for record in list(source.records())[:6]:
        for name in ("inside", "marker", "scanner", "noise"):
            pos, neg = flip(source, record, name)
            unchanged = source.rois if (kind == "cxr" or name != "inside") else source.rois[:1]
            for roi in unchanged:
                assert np.array_equal(pos.rois[roi], neg.rois[roi]), (name, roi)
        pos, neg = flip(source, record, "noise")
        assert np.array_equal(pos.image, neg.image)


def test_shape_signal_enlarges_the_heart_and_changes_the_lungs() -> None:
    source = make("cxr")
    for record in list(source.records())[:6]:
        pos, neg = flip(source, record, "big")
        assert pos.rois["heart"].sum() > 1.3 * neg.rois["heart"].sum()
        assert pos.rois["lungs"].sum() < neg.rois["lungs"].sum()
        assert changed(pos.image, neg.image).any()


def test_shape_signal_enlarges_the_disc() -> None:
    source = make("fundus")
    for record in list(source.records())[:6]:
        pos, neg = flip(source, record, "big")
        assert pos.rois["disc"].sum() > 1.5 * neg.rois["disc"].sum()
        assert not (pos.rois["cup"] & ~pos.rois["disc"]).any()


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_is_invisible(kind: str) -> None:
    kinds = ("roi", "outside", "global", "shape")
    source = make(kind, **{s: SyntheticClass(signal=s, strength=0.0) for s in kinds})
    record = next(iter(source.records()))
    for name in source.classes:
        pos, neg = flip(source, record, name)
        assert np.array_equal(pos.image, neg.image), name
        assert all(np.array_equal(pos.rois[r], neg.rois[r]) for r in source.rois)


def test_weak_signal_is_fainter_than_strong() -> None:
    source = make(weak=SyntheticClass(signal="outside", strength=0.3),
                  strong=SyntheticClass(signal="outside"))
    record = next(iter(source.records()))
    weak = np.abs(np.subtract(*(x.image.astype(int) for x in flip(source, record, "weak")))).max()
    strong = np.abs(np.subtract(*(x.image.astype(int) for x in flip(source, record, "strong")))).max()
    assert 0 < weak < strong


def test_render_rejects_unknown_classes() -> None:
    source = make()
    with pytest.raises(KeyError):
        source.render(next(iter(source.records())).key, {"nope": 1})


def test_load_follows_the_key_labels() -> None:
    source = make()
    record = next(r for r in source.records() if r.labels["marker"] == 1)
    assert np.array_equal(source.load(record).image, source.render(record.key, {"marker": 1}).image)
    labels = tuple(0 if name == "marker" else record.labels[name] for name in source.classes)
    negative_key = {**record.key, "labels": labels}
    negative = replace(record, key=negative_key)
    assert np.array_equal(source.load(negative).image, source.render(record.key, {"marker": 0}).image)


# ----------------------------------------------------------------------------------------- metadata


def metadata_source(strength: float, kind: str = "cxr") -> SyntheticSource:
    columns = ("projection", "sex", "age") if kind == "cxr" else ("camera",)
    config = SyntheticData(
        source="synthetic", kind=kind, n_patients=300, images_per_patient=(1, 2), size=SIZE,
        classes={"target": SyntheticClass(signal="none", prevalence=0.5)},
        metadata={c: SyntheticMetadata(correlates_with="target", strength=strength) for c in columns},
    )
    return SyntheticSource(config, seed=11, image_size=SIZE)


def agreement(records: list[Record], column: str, positive: Any) -> float:
    return float(np.mean([(r.metadata[column] == positive) == bool(r.labels["target"]) for r in records]))


def test_metadata_follows_the_label_with_its_strength() -> None:
    strong = list(metadata_source(1.0).records())
    weak = list(metadata_source(0.0).records())
    assert agreement(strong, "projection", "AP") == 1.0  # per image: exact
    assert agreement(strong, "sex", "M") > 0.8  # per patient: follows the patient's latent state
    assert abs(agreement(weak, "projection", "AP") - 0.5) < 0.08
    assert abs(agreement(weak, "sex", "M") - 0.5) < 0.1
    old = [r.metadata["age"] for r in strong if r.labels["target"]]
    young = [r.metadata["age"] for r in strong if not r.labels["target"]]
    assert np.mean(old) > np.mean(young) + 20
    assert all(isinstance(r.metadata["age"], int) and 20 <= r.metadata["age"] <= 90 for r in weak)
    cameras = list(metadata_source(1.0, "fundus").records())
    assert agreement(cameras, "camera", "remidio") == 1.0
    cameras = list(metadata_source(0.0, "fundus").records())
    assert {r.metadata["camera"] for r in cameras} == {"bosch", "forus", "remidio"}
    assert list(strong[0].metadata) == ["projection", "sex", "age"]


def test_metadata_changes_no_pixel_and_no_label() -> None:
    with_meta = metadata_source(1.0)
    bare = SyntheticSource(with_meta.config.model_copy(update={"metadata": {}}), seed=11, image_size=SIZE)
    a, b = list(with_meta.records()), list(bare.records())
    assert [r.labels for r in a] == [r.labels for r in b] and all(r.metadata == {} for r in b)
    for ra, rb in zip(a[:4], b[:4], strict=True):
        assert ra.key == rb.key
        assert np.array_equal(with_meta.load(ra).image, bare.load(rb).image)


# ------------------------------------------------------------------------------------------- speed


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_fast(kind: str) -> None:
    source = make(kind)
    records = list(source.records())[:10]
    source.load(records[0])
    times = []
    for record in records:
        start = time.perf_counter()
        source.load(record)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.015  # well under 5 ms on an idle core; loose against a busy machine
