"""Property-based tests (hypothesis): the RLE decoder, the CheXmask reader and the config loader give a result or a
one-line user error for any input, never another exception; the quote-aware scan agrees with the csv module."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from maskaudit.config import AuditConfig, config_from_dict
from maskaudit.data.rle import decode_rle, encode_rle
from maskaudit.data.sources.chexmask import ChexmaskTable, record_spans
from maskaudit.errors import MaskauditError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_rle_round_trip(mask: np.ndarray):
    assert np.array_equal(decode_rle(encode_rle(mask), *mask.shape), mask)


@FAST
@given(st.text(alphabet="0123456789 -x.\n\t", max_size=40), st.integers(1, 8), st.integers(1, 8))
def test_rle_decoder_gives_a_mask_or_a_value_error(text: str, height: int, width: int):
    try:
        mask = decode_rle(text, height, width)
    except ValueError:
        return
    assert mask.shape == (height, width) and mask.dtype == bool


def _unquote(text: str) -> str:
    """A CSV field's text: RFC 4180 quotes removed, ``""`` unescaped."""
    return text[1:-1].replace('""', '"') if len(text) >= 2 and text[0] == text[-1] == '"' else text


@st.composite
def csv_documents(draw: st.DrawFn) -> str:
    """A CSV document as Python's csv writer (and so pandas) writes it: minimal quoting, \n or \r\n line ends.

    A bare \r inside a field is only drawn with \r\n line ends: with \n ends the writer leaves it unquoted, and
    no reader (csv, pandas) can tell it from a line end.
    """
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    field = st.text(alphabet=st.sampled_from(list('ab ,"\n1[]é') + (["\r"] if ending == "\r\n" else [])),
                    max_size=12)
    rows = draw(st.lists(st.lists(field, min_size=3, max_size=3), min_size=1, max_size=6))
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator=ending).writerows([["a", "b", "c"], *rows])
    return buffer.getvalue()


@FAST
@given(csv_documents(), st.integers(1, 40))
def test_record_spans_agree_with_the_csv_module(text: str, block: int):
    expected = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.csv"
        path.write_bytes(text.encode())
        got = [[_unquote(rec[a:b].decode()) for a, b in spans] for _, _, _, spans, rec in record_spans(path, block)]
    # the csv module drops records that are one empty field; the scan keeps them: compare the others
    assert [r for r in got if r != [""]] == [r for r in expected if r != [""]]


HEADER = b"ImageID,Dice RCA (Mean),Dice RCA (Max),Landmarks,Left Lung,Right Lung,Heart,Height,Width\n"


@FAST
@given(st.binary(max_size=300))
def test_chexmask_reader_gives_an_index_or_a_one_line_error(body: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "Padchest.csv"
        path.write_bytes(HEADER + body)
        try:
            table = ChexmaskTable(path, "ImageID")
        except MaskauditError as exc:
            assert "\n" not in str(exc)
            return
        for row in table.rows.values():
            try:
                masks = table.masks(row)
            except MaskauditError as exc:
                assert "\n" not in str(exc)
                continue
            assert masks["lungs"].shape == (row.height, row.width)


KEYS = sorted({*AuditConfig.model_fields, "source", "labels_csv", "classes", "epochs", "arch", "kind", "root",
               "n_patients", "signal", "run"})
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.floats(allow_nan=True),
                   st.text(max_size=8), st.sampled_from(["synthetic", "folder", "full", "no_roi", "small_cnn"]))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_config_loader_gives_a_config_or_a_one_line_error(raw: dict):
    try:
        config = config_from_dict(raw, origin="fuzz.yaml")
    except MaskauditError as exc:
        assert str(exc).startswith("fuzz.yaml") and "\n" not in str(exc)
        return
    assert isinstance(config, AuditConfig)
