"""CheXmask tables in the publisher's own forms: multi-line ``Landmarks`` records, indexed by a quote-aware scan."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from published import chexmask_row, write_chexmask

from maskaudit.data.imaging import read_mask
from maskaudit.data.sources.chexmask import ChexmaskTable, record_spans, size_mismatch
from maskaudit.errors import MaskauditError


def halves(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    left, right = mask.copy(), mask.copy()
    left[:, : mask.shape[1] // 2] = False
    right[:, mask.shape[1] // 2 :] = False
    heart = np.zeros_like(mask)
    heart[mask.shape[0] // 2 : mask.shape[0] * 4 // 5, mask.shape[1] * 2 // 5 : mask.shape[1] * 3 // 5] = True
    return left, right, heart


@pytest.fixture(scope="module")
def lung_masks(cxr_dir: Path) -> dict[str, np.ndarray]:
    table = pd.read_csv(cxr_dir / "labels.csv").head(6)
    return {f"{row.image_id}.png": read_mask(cxr_dir / row.mask) for row in table.itertuples()}


@pytest.mark.parametrize("form", ["original", "preprocessed"])
def test_published_forms_index_and_decode(lung_masks: dict, tmp_path: Path, form: str):
    rows = [chexmask_row("ImageID", name, *halves(mask), form=form) for name, mask in lung_masks.items()]
    path = write_chexmask(rows, tmp_path / "Padchest.csv")
    text = path.read_text()
    if form == "original":  # the published OriginalResolution form: one record spans many lines
        assert text.count("\n") > 10 * len(rows) and '"[[' in text
    else:
        assert text.count("\n") == len(rows) + 1
    table = ChexmaskTable(path, "ImageID")
    assert list(table.rows) == list(lung_masks) and table.n_records == len(rows)
    # each record's first line, as a reader of the file counts lines (header = 1)
    starts = [i + 1 for i, line in enumerate(text.split("\n")) if line.split(",", 1)[0] in lung_masks]
    assert [row.line for row in table.rows.values()] == starts
    for name, mask in lung_masks.items():
        row = table.rows[name]
        assert (row.height, row.width) == mask.shape and row.dice == 0.9
        decoded = table.masks(row)
        left, right, heart = halves(mask)
        assert np.array_equal(decoded["lungs"], left | right) and np.array_equal(decoded["heart"], heart)


TRICKY = (
    'id,a,b\r\n'
    '1,"x\r\ny",plain\r\n'
    '\r\n'
    '2,"say ""hi"", then, go",""\r\n'
    '3,"[[ 1  2]\n [ 3  4]]",end'  # no newline at the end of the file
)


@pytest.mark.parametrize("block", [1, 5, 17, 64, 1 << 22])
def test_record_spans_agree_with_the_csv_module(tmp_path: Path, block: int):
    path = tmp_path / "tricky.csv"
    path.write_bytes(TRICKY.encode())
    expected = [r for r in csv.reader(io.StringIO(TRICKY, newline="")) if r]
    got = []
    for line, start, end, spans, record in record_spans(path, block=block):
        assert path.read_bytes()[start:end] == record
        got.append(([next(csv.reader([record[a:b].decode()]))[0] if record[a:b] else "" for a, b in spans], line))
    assert [fields for fields, _ in got] == expected
    assert [line for _, line in got] == [1, 2, 5, 6]


def test_broken_record_names_its_line(tmp_path: Path):
    path = tmp_path / "ChestX-Ray8.csv"
    rows = ["Image Index,Dice RCA (Mean),Dice RCA (Max),Landmarks,Left Lung,Right Lung,Heart,Height,Width",
            'a.png,0.9,0.9,"[[1 2]\n [3 4]]",1 2,3 4,5 6,4,4', 'b.png,0.9,0.9,"[[1 2]\n [3 4]]",1 2,3 4,4,4']
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(MaskauditError, match=r"ChestX-Ray8.csv line 4: 8 fields, the header has 9"):
        ChexmaskTable(path, "Image Index")


def test_missing_column_and_gzip_are_one_line_errors(tmp_path: Path, lung_masks: dict):
    name, mask = next(iter(lung_masks.items()))
    path = write_chexmask([chexmask_row("ImageID", name, *halves(mask))], tmp_path / "Padchest.csv")
    with pytest.raises(MaskauditError, match=r"missing CheXmask column\(s\) 'Image Index'"):
        ChexmaskTable(path, "Image Index")
    packed = tmp_path / "Padchest.csv.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(MaskauditError, match=r"gzip-compressed.*gunzip -k"):
        ChexmaskTable(packed, "ImageID")


def test_size_mismatch_says_when_transposed(tmp_path: Path, lung_masks: dict):
    name, mask = next((n, m) for n, m in lung_masks.items() if m.shape[0] != m.shape[1])
    h, w = mask.shape
    path = write_chexmask([chexmask_row("ImageID", name, *halves(mask), height=w, width=h)], tmp_path / "P.csv")
    row = ChexmaskTable(path, "ImageID").rows[name]
    why = size_mismatch(h, w, row, name, path)
    assert why.startswith(f"mask size mismatch: {name} is {w}x{h}")
    assert why.endswith("(the transpose of the image's size)")
    assert size_mismatch(w, h, row, name, path) == ""
