"""CheXmask RLE: exact on hand-made masks (1-based starts, row-major), round trips, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from maskaudit.data.rle import decode_rle, encode_rle


def test_hand_made():
    # 2 x 3, row-major: pixels 1..6; "1 2" = (0,0),(0,1); "6 1" = (1,2)
    assert decode_rle("1 2 6 1", 2, 3).tolist() == [[True, True, False], [False, False, True]]
    assert decode_rle("3 2", 2, 3).tolist() == [[False, False, True], [True, False, False]]  # wraps rows
    assert decode_rle("1 6", 2, 3).all()
    assert not decode_rle("", 2, 3).any() and not decode_rle(float("nan"), 2, 3).any()
    assert decode_rle("5 1 1 2", 2, 3).tolist() == [[True, True, False], [False, True, False]]  # unsorted
    assert decode_rle("1 3 2 3", 2, 3).tolist() == [[True, True, True], [True, False, False]]  # overlap
    assert encode_rle(np.array([[1, 1, 0], [0, 0, 1]])) == "1 2 6 1"
    assert encode_rle(np.zeros((2, 2))) == ""


@pytest.mark.parametrize("bad", ["1 2 3", "0 2", "5 3", "1 -1", "a 2"])
def test_malformed(bad: str):
    with pytest.raises(ValueError):
        decode_rle(bad, 2, 3)


def test_round_trips():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 33), (200, 300)]:
        for density in (0.0, 0.1, 0.5, 1.0):
            mask = rng.random(shape) < density
            assert np.array_equal(decode_rle(encode_rle(mask), *shape), mask)
    text = "10 5 40 3 99 2"
    assert encode_rle(decode_rle(text, 10, 10)) == text


def test_large_mask_is_fast():
    height, width = 3520, 4280
    yy, xx = np.mgrid[:height, :width]
    mask = ((yy - 1700) ** 2 / 1500**2 + (xx - 1200) ** 2 / 700**2 < 1) | (
        (yy - 1700) ** 2 / 1500**2 + (xx - 3000) ** 2 / 700**2 < 1
    )
    text = encode_rle(mask)
    best = min(_timed(lambda: decode_rle(text, height, width)) for _ in range(3))
    assert np.array_equal(decode_rle(text, height, width), mask)
    assert best < 0.2, f"decoding a {height}x{width} mask took {best:.3f} s"


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
