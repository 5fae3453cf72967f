"""The prepared store, built in tmp_path from real X-rays and fundus photographs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from maskaudit.config import FolderData
from maskaudit.data.imaging import read_image, read_mask, resize_pad
from maskaudit.data.sources.base import Loaded, Record, Rejected
from maskaudit.data.sources.folder import FolderSource
from maskaudit.data.store import Store, _Digesting, _listing_entry, _plan_hash, _sharing, prepare_store, to_pixels
from maskaudit.errors import MaskauditError
from maskaudit.rundir import ROWS_AT_ONCE, read_table, write_table

SIZE = 48
HEADER = ["image", "mask", "box", "image_id", "patient_id", "covid", "sex"]


def build_folder(cxr_dir: Path, root: Path, sixteen_bit: bool = False) -> Path:
    """Six good real X-rays (one as 16-bit PNG when asked) and five rows that fail, in order."""
    labels = pd.read_csv(cxr_dir / "labels.csv").head(8)
    for sub in ("images", "masks", "boxes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows: list[list[object]] = []
    for k, item in enumerate(labels.itertuples()):
        name = f"{item.image_id}.png"
        image = np.asarray(Image.open(cxr_dir / "images" / name))
        if sixteen_bit and k == 1:
            Image.fromarray(image.astype(np.uint16) * 250 + 7).save(root / "images" / name)
        else:
            shutil.copy(cxr_dir / "images" / name, root / "images" / name)
        shutil.copy(cxr_dir / "masks" / name, root / "masks" / name)
        box = np.zeros(image.shape, np.uint8)
        box[: image.shape[0] // 3, image.shape[1] // 4 : image.shape[1] // 2] = 255
        Image.fromarray(box).save(root / "boxes" / name)
        sex = item.sex if isinstance(item.sex, str) else ""
        rows.append(
            [
                f"images/{name}",
                f"masks/{name}",
                f"boxes/{name}",
                item.image_id,
                item.patient_id,
                item.covid,
                sex,
            ]
        )
    # rows that fail only when loaded, and one the source rejects
    broken, zero, other = labels.image_id[6], labels.image_id[7], labels.image_id[0]
    data = (root / "images" / f"{broken}.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 3])
    shape = np.asarray(Image.open(root / "images" / f"{zero}.png")).shape
    Image.fromarray(np.zeros(shape, np.uint8)).save(root / "images" / "zero.png")
    Image.fromarray(np.zeros(shape, np.uint8)).save(root / "masks" / "empty.png")
    rows[6] = ["images/truncated.png", *rows[6][1:]]  # row 8: unreadable
    rows[7] = ["images/zero.png", *rows[7][1:]]  # row 9: all zero
    rows.append(
        [f"images/{zero}.png", f"masks/{other}.png", f"boxes/{zero}.png", "mismatch", "q", 1, ""]
    )  # 10
    rows.append([f"images/{zero}.png", f"masks/{zero}.png", "masks/empty.png", "empty", "q", 0, ""])  # 11
    rows.append(["images/absent.png", f"masks/{zero}.png", f"boxes/{zero}.png", "absent", "q", 0, "F"])  # 12
    path = root / "labels.csv"
    pd.DataFrame(rows, columns=HEADER).to_csv(path, index=False)
    return path


def config_for(csv_path: Path) -> FolderData:
    return FolderData(
        source="folder",
        labels_csv=csv_path,
        id_column="image_id",
        patient_column="patient_id",
        mask_columns={"box": "box"},
        classes=["covid"],
        metadata_columns=["sex"],
    )


class CountingFolder(FolderSource):
    """A folder source that counts its loads (in this process) and can stop after some."""

    loads = 0
    stop_after: int | None = None

    def load(self, record: Record) -> Loaded:
        if self.stop_after is not None and CountingFolder.loads >= self.stop_after:
            raise KeyboardInterrupt
        CountingFolder.loads += 1
        return super().load(record)


@pytest.fixture(scope="module")
def folder(cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(cxr_dir, tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The store prepared in one go, in this process."""
    out = tmp_path_factory.mktemp("reference") / "prepared"
    return prepare_store(FolderSource(config_for(folder)), out, SIZE, ("roi+box",), workers=1, progress=False)


def store_files(root: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(root.iterdir()) if path.is_file()}


# ------------------------------------------------------------------------------------- contents


def test_manifest_holds_every_row_with_its_reason(reference: Store) -> None:
    manifest = reference.manifest
    assert list(manifest["row"]) == list(range(2, 13))  # every CSV data row, in order
    assert reference.n == 6 and list(reference.kept["index"]) == list(range(6))
    reasons = dict(zip(manifest["row"], manifest["reason"], strict=True))
    assert reasons[8].startswith("unreadable image or mask: ") and "truncated.png" in reasons[8]
    assert reasons[9].startswith("image all zero: images/zero.png")
    assert reasons[10].startswith("mask size mismatch: ")
    assert reasons[11] == "empty ROI mask: 'box' (images/" + manifest["source_path"][9].split("/")[1] + ")"
    assert reasons[12].startswith("image file not found: images/absent.png")
    assert list(manifest.loc[manifest.status == "rejected", "index"]) == [-1] * 5
    assert manifest["covid"].dtype == "Int8" and manifest["roi_fraction_roi"].notna().sum() == 6
    counts = reference.counts()
    assert counts.iloc[0].tolist() == ["kept", "", 6]
    assert set(counts["reason"][1:]) == {
        "unreadable image or mask", "image all zero", "mask size mismatch", "empty ROI mask",
        "image file not found",
    }  # fmt: skip
    assert sorted(path.name for path in reference.root.iterdir()) == [
        "images.npy", "manifest.parquet", "mask_box.npy", "mask_roi+box.npy", "mask_roi.npy", "store.json",
    ]  # fmt: skip


def test_arrays_match_a_direct_resize_of_the_files(reference: Store, folder: Path) -> None:
    assert reference.images.dtype == np.uint8 and reference.image_max == 255
    assert reference.images.shape == (6, 1, SIZE, SIZE) and isinstance(reference.images, np.memmap)
    for i, row in reference.kept.iterrows():
        name = Path(row["source_path"]).name
        expected = to_pixels(resize_pad(read_image(folder.parent / row["source_path"]), SIZE), 255)
        np.testing.assert_array_equal(reference.images[i, 0], expected)
        roi = resize_pad(read_mask(folder.parent / "masks" / name), SIZE, "mask")
        box = resize_pad(read_mask(folder.parent / "boxes" / name), SIZE, "mask")
        np.testing.assert_array_equal(reference.masks("roi", [i])[0], roi)
        np.testing.assert_array_equal(reference.masks("box", [i])[0], box)
        np.testing.assert_array_equal(reference.masks("roi+box", [i])[0], roi | box)
    assert reference.packed_masks("roi").dtype == np.uint8
    assert reference.packed_masks("roi").shape == (reference.n, SIZE, (SIZE + 7) // 8)
    np.testing.assert_array_equal(reference.labels[:, 0], reference.kept["covid"].to_numpy(dtype=np.float32))
    mean = np.mean([reference.images[i] / 255.0 for i in range(6)])
    assert reference.mean_intensity == pytest.approx(mean, rel=1e-9)


def test_unknown_roi_keys_name_the_available_ones(reference: Store, folder: Path, tmp_path: Path) -> None:
    with pytest.raises(MaskauditError, match=r"'box\+roi'.*available: roi, box, roi\+box"):
        reference.masks("box+roi")
    with pytest.raises(MaskauditError, match="'lungs'"):
        prepare_store(FolderSource(config_for(folder)), tmp_path / "s", SIZE, ("roi+lungs",), workers=1)


def test_workers_give_identical_stores(reference: Store, folder: Path, tmp_path: Path) -> None:
    parallel = prepare_store(
        FolderSource(config_for(folder)), tmp_path / "prepared", SIZE, ("roi+box",), workers=2, progress=False
    )
    assert parallel.fingerprint == reference.fingerprint
    assert store_files(parallel.root) == store_files(reference.root)


def test_sixteen_bit_sources_are_stored_with_8_bits_unless_bits_16(cxr_dir: Path, tmp_path: Path) -> None:
    """8 bits after the per-image maximum scaling, as the study fed its network; ``bits=16`` keeps 16."""
    csv_path = build_folder(cxr_dir, tmp_path / "data", sixteen_bit=True)
    study = prepare_store(FolderSource(config_for(csv_path)), tmp_path / "study", SIZE, workers=1, progress=False)
    store = prepare_store(
        FolderSource(config_for(csv_path)), tmp_path / "prepared", SIZE, workers=1, progress=False, bits=16
    )
    assert study.images.dtype == np.uint8 and study.image_max == 255
    assert store.images.dtype == np.uint16 and store.image_max == 65535
    for i, row in store.kept.iterrows():
        image = read_image(csv_path.parent / row["source_path"])
        np.testing.assert_array_equal(study.images[i, 0], to_pixels(resize_pad(image, SIZE), 255))
        if i == 1:
            assert image.dtype == np.uint16
            expected = to_pixels(resize_pad(image, SIZE), 65535)
        else:  # 8-bit images keep their 8-bit quantisation, widened exactly
            expected = to_pixels(resize_pad(image, SIZE), 255).astype(np.uint16) * 257
        np.testing.assert_array_equal(store.images[i, 0], expected)


# --------------------------------------------------------------------------------------- resuming


def test_a_killed_preparation_resumes_to_the_same_bytes(
    reference: Store, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prepared"
    script = textwrap.dedent(
        f"""
        import json, os
        from pathlib import Path
        import maskaudit.data.store as store
        from maskaudit.config import FolderData
        from maskaudit.data.sources.folder import FolderSource

        store.CHECKPOINT_EVERY = 2

        class Dying(FolderSource):
            loads = 0
            def load(self, record):
                Dying.loads += 1
                if Dying.loads > 5:
                    os._exit(7)  # no cleanup, no final checkpoint
                return super().load(record)

        config = FolderData.model_validate(json.loads({json.dumps(config_for(folder).model_dump_json())}))
        out = Path({str(out)!r})
        store.prepare_store(Dying(config), out, {SIZE}, ("roi+box",), workers=1, progress=False)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 7, done.stderr
    assert not (out / "store.json").exists()
    state = np.load(out / ".partial" / "state.npy")
    assert (state > 0).sum() == 4  # checkpoints after results 2 and 4; result 5 was not recorded
    with pytest.raises(MaskauditError, match="unfinished preparation; run `maskaudit prepare` first"):
        Store.open(out)
    CountingFolder.loads, CountingFolder.stop_after = 0, None
    resumed = prepare_store(
        CountingFolder(config_for(folder)), out, SIZE, ("roi+box",), workers=1, progress=False
    )
    assert CountingFolder.loads == 10 - 4  # ten candidates, four already done
    assert store_files(resumed.root) == store_files(reference.root)
    assert not (out / ".partial").exists()


class DyingInAWorker(FolderSource):
    """A folder source whose worker processes die (no clean-up) at their fourth image."""

    loads = 0

    def load(self, record: Record) -> Loaded:
        DyingInAWorker.loads += 1  # in the worker process that loads it
        if DyingInAWorker.loads > 3:
            os._exit(7)
        return super().load(record)


def test_a_worker_that_dies_in_a_preparation_is_one_line_and_the_next_run_resumes(
    reference: Store, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prepared"
    with pytest.raises(MaskauditError) as caught:
        prepare_store(DyingInAWorker(config_for(folder)), out, SIZE, ("roi+box",), workers=2, progress=False)
    text = str(caught.value)
    assert text.startswith("preparation: a worker process died (killed, or out of memory") and "\n" not in text
    assert not (out / "store.json").exists()
    resumed = prepare_store(FolderSource(config_for(folder)), out, SIZE, ("roi+box",), workers=1, progress=False)
    assert store_files(resumed.root) == store_files(reference.root)


def test_an_interrupted_preparation_resumes(reference: Store, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    CountingFolder.loads, CountingFolder.stop_after = 0, 3
    with pytest.raises(KeyboardInterrupt):
        prepare_store(CountingFolder(config_for(folder)), out, SIZE, ("roi+box",), workers=1, progress=False)
    assert (np.load(out / ".partial" / "state.npy") > 0).sum() == 3  # saved on the way out
    CountingFolder.loads, CountingFolder.stop_after = 0, None
    resumed = prepare_store(
        CountingFolder(config_for(folder)), out, SIZE, ("roi+box",), workers=2, progress=False
    )
    assert resumed.fingerprint == reference.fingerprint
    assert store_files(resumed.root) == store_files(reference.root)


def test_a_complete_store_is_not_prepared_again(reference: Store, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    shutil.copytree(reference.root, out)
    CountingFolder.loads, CountingFolder.stop_after = 0, None
    again = prepare_store(
        CountingFolder(config_for(folder)), out, SIZE, ("roi+box",), workers=1, progress=False
    )
    assert CountingFolder.loads == 0 and again.fingerprint == reference.fingerprint
    bigger = prepare_store(CountingFolder(config_for(folder)), out, SIZE + 16, workers=1, progress=False)
    assert CountingFolder.loads == 10 and bigger.image_size == SIZE + 16 and bigger.roi_keys == ["roi", "box"]
    assert bigger.fingerprint != reference.fingerprint
    assert not (out / "mask_roi+box.npy").exists()  # the older store's files are gone
    assert json.loads((out / "store.json").read_text())["image_size"] == SIZE + 16


def test_open_refuses_a_missing_or_incomplete_store(reference: Store, tmp_path: Path) -> None:
    with pytest.raises(MaskauditError, match="no prepared store; run `maskaudit prepare` first"):
        Store.open(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(reference.root, broken)
    (broken / "mask_box.npy").unlink()
    with pytest.raises(MaskauditError, match="missing mask_box.npy"):
        Store.open(broken)


# -------------------------------------------------------------------------------------- real sets


def test_the_whole_real_xray_set(cxr_dir: Path, tmp_path: Path) -> None:
    config = FolderData(
        source="folder",
        labels_csv=cxr_dir / "labels.csv",
        id_column="image_id",
        patient_column="patient_id",
        classes=["covid"],
        metadata_columns=["sex", "age", "projection"],
    )
    store = prepare_store(FolderSource(config), tmp_path / "prepared", 64, workers=2, progress=False)
    assert store.n == 182 and (store.manifest["status"] == "kept").all()
    assert store.images.shape == (182, 1, 64, 64) and store.images.dtype == np.uint8
    assert int(store.labels.sum()) == 141 and store.kept["patient_id"].nunique() == 108
    assert store.kept["age"].notna().sum() == 156
    assert (store.images.reshape(182, -1).max(axis=1) == 255).all()  # each image scaled by its own maximum
    assert 0.2 < store.mean_intensity < 0.8


def test_the_real_fundus_set_in_colour_with_a_union(fundus_dir: Path, tmp_path: Path) -> None:
    config = FolderData(
        source="folder",
        labels_csv=fundus_dir / "labels.csv",
        id_column="image_id",
        classes=["glaucoma"],
        mask_columns={"cup": "mask_cup"},
        split_column="split",
        color="rgb",
    )
    store = prepare_store(
        FolderSource(config), tmp_path / "prepared", 32, ("roi+cup",), workers=1, progress=False
    )
    assert store.n == 101 and store.channels == 3 and store.images.shape == (101, 3, 32, 32)
    assert (store.kept["split"] == "test").sum() == 51
    disc, cup = store.masks("roi"), store.masks("cup")
    np.testing.assert_array_equal(store.masks("roi+cup"), disc | cup)
    assert (store.kept["roi_fraction_cup"] < store.kept["roi_fraction_roi"]).all()


def test_a_source_without_masks_and_one_without_usable_images(folder: Path, tmp_path: Path) -> None:
    no_masks = FolderData(
        source="folder", labels_csv=folder, id_column="image_id", mask_column=None, classes=["covid"]
    )
    store = prepare_store(FolderSource(no_masks), tmp_path / "plain", SIZE, workers=1, progress=False)
    # without masks, the two mask failures would be kept, but they share one image file: the second is rejected
    assert store.rois == [] and store.n == 7
    assert store.manifest.set_index("image_id").loc["empty", "reason"] == \
        "duplicate image file: same image file as 'mismatch' (row 10, patient 'mismatch')"
    with pytest.raises(MaskauditError, match=r"available: \(none\)"):
        store.masks("roi")
    frame = pd.read_csv(folder)
    frame.loc[:, "covid"] = 3
    frame.to_csv(tmp_path / "labels.csv", index=False)
    bad = FolderData(source="folder", labels_csv=tmp_path / "labels.csv", classes=["covid"])
    with pytest.raises(MaskauditError, match="no usable image among 11 inputs"):
        prepare_store(FolderSource(bad), tmp_path / "none", SIZE, workers=1, progress=False)
    assert len(pd.read_parquet(tmp_path / "none" / "manifest.parquet")) == 11


def test_a_store_pickles_by_path_not_by_content(fundus_dir: Path, tmp_path: Path) -> None:
    import pickle

    config = FolderData(source="folder", labels_csv=fundus_dir / "labels.csv", id_column="image_id",
                        classes=["glaucoma"], color="rgb")
    store = prepare_store(FolderSource(config), tmp_path / "s", image_size=32, workers=1, progress=False)
    payload = pickle.dumps(store)
    assert len(payload) < 1000 < store.images.nbytes
    back = pickle.loads(payload)
    assert np.array_equal(back.images, store.images) and back.root == store.root


def test_the_plan_is_the_hash_of_the_whole_listing_as_stores_were_made_before() -> None:
    """The plan is hashed one input at a time, to the same bytes as the whole document (json.dumps of the plan with
    its listing), so that a store prepared before is still found complete; equal label mappings are shared, never
    merged across value types (1, True and 1.0 dump differently)."""
    items = [Record("a", "p", {"x": 1, "y": 0}, {"age": 40}, "a.png", None, {"row": 2}, 2),
             Rejected("b", "unreadable image or mask: b.png: truncated", "b.png", 3, "p", {"x": 0}),
             Record("c", "q", {"x": 1, "y": 0}, key=7, no_masks="no CheXmask row"),
             Record("d", "q", {"x": True, "y": 0}, key=8), Record("e", "r", {"x": 1.0, "y": 0}, key=9)]
    shared: dict = {}
    listed = [_sharing(item, shared) for item in items]
    assert listed[2].labels is listed[0].labels and listed[2].metadata == {}
    assert [type(r.labels["x"]) for r in (listed[3], listed[4])] == [bool, float]
    assert listed == items  # equal records: only the mappings' identity changed
    doc = {"version": 2, "image_size": 32, "rois": ["lungs"], "source": {"name": "folder", "csv": "/d/l.csv"},
           "bits": 8}
    for listing in ([], listed):
        whole = json.dumps({**doc, "items": [_listing_entry(item) for item in listing]}, sort_keys=True, default=str)
        assert _plan_hash(doc, listing) == hashlib.sha256(whole.encode()).hexdigest()


def test_the_fingerprint_hashes_the_manifest_csv_in_chunks_to_the_same_bytes() -> None:
    """The store's fingerprint digests the manifest's CSV as pandas writes it, chunk by chunk, to the same bytes as
    the whole text (so the fingerprints of stores made before are unchanged): quoted text, missing values, more rows
    than one of pandas' chunks."""
    n = 12_000
    frame = pd.DataFrame({
        "image_id": [f"img_{i}_é" for i in range(n)],
        "reason": ["" if i % 5 else 'bad, "quoted"\nrow' for i in range(n)],
        "covid": pd.array([None if i % 11 == 0 else i % 2 for i in range(n)], dtype="Int8"),
        "lung_fraction": [math.nan if i % 3 == 0 else i / 7 for i in range(n)],
    })  # fmt: skip
    digest = hashlib.sha256()
    frame.to_csv(_Digesting(digest), index=False)
    assert digest.hexdigest() == hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()


def test_a_table_of_many_row_groups_reads_back_batch_by_batch_as_written(tmp_path: Path) -> None:
    """write_table splits a large table into row groups and read_table decodes it a batch at a time: the same frame,
    dtypes and missing values included, as written and as pandas reads it whole."""
    n = 2 * ROWS_AT_ONCE + 5
    frame = pd.DataFrame({
        "image_id": pd.array([f"i{k}" for k in range(n)], dtype="str"), "split": [None] * n,
        "covid": pd.array([None if k % 7 == 0 else k % 2 for k in range(n)], dtype="Int8"),
        "row": pd.array([None if k % 5 == 0 else k for k in range(n)], dtype="Int64"),
        "lung_fraction": [math.nan if k % 3 == 0 else k / 3 for k in range(n)],
    })  # fmt: skip
    write_table(tmp_path / "t.parquet", frame)
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 3
    back = read_table(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back, frame)
    pd.testing.assert_frame_equal(back, pd.read_parquet(tmp_path / "t.parquet"))
