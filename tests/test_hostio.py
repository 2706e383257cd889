"""jlora.hostio: aligned range reads and the bit-pattern NaN/Inf count, against plain numpy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jlora.hostio import _CHECK_CHUNK, ALIGNMENT, count_nonfinite, read_ranges


def test_read_ranges_places_every_range_aligned_and_merges_overlaps(tmp_path, rng):
    data = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    # Unsorted, overlapping, touching, empty and disjoint ranges.
    ranges = [(9000, 9100), (100, 300), (250, 400), (400, 410), (0, 7), (7000, 7000)]
    ranges.append((19990, 20000))
    buf, placed = read_ranges(str(path), ranges)
    assert buf.ctypes.data % ALIGNMENT == 0
    for (begin, end), offset in zip(ranges, placed, strict=True):
        assert bytes(buf[offset : offset + end - begin]) == data[begin:end]
    # Three runs apart from the merged [100, 410): only their bytes (plus alignment) are held.
    assert buf.size < 7 + 310 + 100 + 10 + 4 * ALIGNMENT
    for i in (0, 1, 4, 6):  # the first range of each run starts aligned
        assert (buf.ctypes.data + placed[i]) % ALIGNMENT == 0


def test_read_ranges_past_the_end_raises(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(EOFError, match="ends before byte 200"):
        read_ranges(str(path), [(50, 200)])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 1000, _CHECK_CHUNK + 17, 3 * _CHECK_CHUNK])
def test_count_nonfinite_matches_numpy(rng, dtype, size):
    x = (rng.standard_normal(size) * 100).astype(dtype)
    assert count_nonfinite(x) == 0
    bad = rng.choice(size, size=min(size, 5), replace=False)
    # Chunk edges too: the last element of a chunk and the first of the next.
    bad = np.unique(np.concatenate([bad, [size - 1], [min(_CHECK_CHUNK, size - 1)]]))
    x[bad] = np.asarray([np.nan, np.inf, -np.inf] * len(bad), dtype)[: len(bad)]
    want = int(np.size(x) - np.isfinite(x.astype(np.float64)).sum())
    assert want == len(bad)
    assert count_nonfinite(x) == want
    assert count_nonfinite(x.reshape(-1, 1)[::-1]) == want  # non-contiguous views too


def test_count_nonfinite_of_large_finite_values_and_integers():
    x = np.asarray([65504, -65504, 6e-8, -0.0], np.float16)  # max, min, subnormal: all finite
    assert count_nonfinite(x) == 0
    assert count_nonfinite(np.arange(10)) == 0
