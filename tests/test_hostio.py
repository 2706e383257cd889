"""jlora.hostio: aligned range reads and the bit-pattern NaN/Inf count, against plain numpy."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from jlora.hostio import _CHECK_CHUNK, ALIGNMENT, count_nonfinite, read_ranges_checked


def test_read_ranges_places_every_range_aligned_and_merges_overlaps(tmp_path, rng):
    data = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    # Unsorted, overlapping, touching, empty and disjoint ranges.
    ranges = [(9000, 9100), (100, 300), (250, 400), (400, 410), (0, 7), (7000, 7000)]
    ranges.append((19990, 20000))
    buf, placed, bad = read_ranges_checked(str(path), ranges, [np.uint8] * len(ranges))
    assert bad == [0] * len(ranges)
    assert buf.ctypes.data % ALIGNMENT == 0
    for (begin, end), offset in zip(ranges, placed, strict=True):
        assert bytes(buf[offset : offset + end - begin]) == data[begin:end]
    # Three runs apart from the merged [100, 410): only their bytes (plus alignment) are held.
    assert buf.size < 7 + 310 + 100 + 10 + 4 * ALIGNMENT
    for i in (0, 1, 4, 6):  # the first range of each run starts aligned
        assert (buf.ctypes.data + placed[i]) % ALIGNMENT == 0


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


@pytest.mark.parametrize("readers", [1, 2, 3])
@pytest.mark.parametrize("piece", [7, 100, 1 << 20])
def test_read_ranges_checked_counts_each_range_as_numpy_does(
    tmp_path, rng, monkeypatch, piece, readers
):
    from jlora import hostio

    monkeypatch.setattr(hostio, "_READ_PIECE", piece)
    dtypes = [np.float16, np.float32, ml_dtypes.bfloat16, np.float32, np.float16, np.float64]
    arrays = [(rng.standard_normal(int(rng.integers(3, 90))) * 10).astype(d) for d in dtypes]
    arrays += [np.zeros(0, np.float32), (rng.standard_normal(40) * 10).astype(np.float16)]
    for x, bad in zip(arrays, [3, 0, 1, 0, 2, 1, 0, 0], strict=True):
        x[rng.choice(x.size, bad, replace=False)] = np.nan if bad % 2 else np.inf
    arrays[-1][-1] = -np.inf
    # Junk between the tensors: NaN bit patterns in bytes no range covers must not count.
    junk = np.full(8, np.nan, np.float32).tobytes()
    data, ranges = b"", []
    for x in arrays:
        data += junk
        ranges.append((len(data), len(data) + x.nbytes))
        data += x.tobytes()
    # Then neighbours with no junk between them (one run, counted as one array when they share
    # a dtype): after the last float16 one (which holds an Inf), a clean float16 one, a float32
    # one with a NaN and a clean float32 one.
    tail = [
        (rng.standard_normal(n) * 10).astype(d) for n, d in [(30, np.float16), (20, np.float32)]
    ]
    tail.append(tail[1].copy())
    tail[1][5] = np.nan
    for x in tail:
        ranges.append((len(data), len(data) + x.nbytes))
        data += x.tobytes()
    arrays += tail
    path = tmp_path / "t.bin"
    path.write_bytes(data)
    order = list(rng.permutation(len(ranges)))
    got_buf, placed, bad = read_ranges_checked(
        str(path), [ranges[i] for i in order], [arrays[i].dtype for i in order], readers
    )
    for k, i in enumerate(order):
        x = arrays[i]
        want = int(x.size - np.isfinite(x.astype(np.float64)).sum())
        assert bad[k] == want, (i, piece)
        view = np.frombuffer(got_buf, x.dtype, count=x.size, offset=placed[k])
        np.testing.assert_array_equal(view.view(np.uint8), x.view(np.uint8))


def test_read_ranges_checked_past_the_end_raises(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(EOFError, match="ends before byte 200"):
        read_ranges_checked(str(path), [(50, 200)], [np.float32])


@pytest.mark.parametrize("readers", [1, 2])
def test_read_ranges_checked_overlapping_ranges(tmp_path, readers):
    x = np.asarray([1, 2, 3, np.nan, 4], np.float32)
    path = tmp_path / "o.bin"
    path.write_bytes(x.tobytes())
    # The whole array, then a range inside it that ends before the NaN: each is counted alone.
    # Two readers cut the buffer at byte 4, inside the first range: it is counted after both.
    _, placed, bad = read_ranges_checked(str(path), [(0, 20), (4, 12)], [np.float32] * 2, readers)
    assert bad == [1, 0]
    assert placed == [0, 4]


@pytest.mark.parametrize("readers", [1, 2, 3, 4])
def test_one_large_range_is_shared_by_the_readers(tmp_path, rng, monkeypatch, readers):
    from jlora import hostio

    monkeypatch.setattr(hostio, "_READ_PIECE", 4096)  # segments of 1024 float32 values
    x = (rng.standard_normal(10_000) * 10).astype(np.float32)
    # Bad values on both sides of segment (so part) edges, at the ends and in the middle.
    bad_at = [0, 1023, 1024, 2047, 5000, 9999]
    x[bad_at] = [np.nan, np.inf, -np.inf, np.nan, np.nan, np.inf]
    path = tmp_path / "big.bin"
    path.write_bytes(b"\0" * 8 + x.tobytes())
    cuts = hostio._cuts(hostio._segments([0], [(8, 8 + x.nbytes)], [x.dtype]), x.nbytes, readers)
    assert len(cuts) == readers + 1  # every reader gets a part, of about equal size
    assert max(np.diff(cuts)) - min(np.diff(cuts)) <= 2 * 4096  # cuts within half a segment
    buf, placed, bad = read_ranges_checked(str(path), [(8, 8 + x.nbytes)], [x.dtype], readers)
    assert bad == [len(bad_at)]
    np.testing.assert_array_equal(buf.view(np.uint32), x.view(np.uint32))


def test_a_file_cut_short_in_a_later_part_raises_after_every_reader_stops(tmp_path, monkeypatch):
    from jlora import hostio

    monkeypatch.setattr(hostio, "_READ_PIECE", 1024)
    path = tmp_path / "cut.bin"
    path.write_bytes(np.ones(3000, np.float32).tobytes())  # 12,000 of the 16,000 bytes
    ranges = [(0, 8000), (8000, 16000)]
    with pytest.raises(EOFError, match="ends before byte 16000"):
        read_ranges_checked(str(path), ranges, [np.float32] * 2, readers=2)
    # The pool is left usable.
    _, _, bad = read_ranges_checked(str(path), [(0, 6000), (6000, 12000)], [np.float32] * 2, 2)
    assert bad == [0, 0]


def test_default_readers_follow_the_cpus_and_the_size(monkeypatch):
    from jlora import hostio

    monkeypatch.setattr(hostio.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert hostio._default_readers(1 << 30) == hostio._MAX_READERS
    assert hostio._default_readers(hostio._MIN_PART - 1) == 1  # small files: one thread
    assert hostio._default_readers(2 * hostio._MIN_PART) == 2
    monkeypatch.setattr(hostio.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert hostio._default_readers(1 << 30) == 1


def test_a_forked_child_reads_with_its_own_pool(tmp_path):
    # In a subprocess (no JAX threads, no pytest warnings filter): the parent's pool has idle
    # threads when it forks; the child's read must not wait for them.
    script = f"""
import os, sys, numpy as np
from jlora.hostio import read_ranges_checked
path = {str(tmp_path / "f.bin")!r}
x = np.arange(4096, dtype=np.float32)
x[7] = np.nan
x.tofile(path)
ranges, dtypes = [(0, 8192), (8192, 16384)], [np.float32] * 2
assert read_ranges_checked(path, ranges, dtypes, 2)[2] == [1, 0]
pid = os.fork()
if pid == 0:
    ok = read_ranges_checked(path, ranges, dtypes, 2)[2] == [1, 0]
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_reads_at_interpreter_shutdown_run_in_the_calling_thread(tmp_path):
    # A non-daemon thread reading after the main thread returned, and an atexit handler: no
    # new pool thread can start then, so the parts are read serially.
    script = f"""
import atexit, threading, time, numpy as np
from jlora.hostio import read_ranges_checked
path = {str(tmp_path / "f.bin")!r}
x = np.ones(1 << 16, np.float32)
x[-1] = np.inf
x.tofile(path)
ranges, dtypes = [(0, 1 << 17), (1 << 17, 1 << 18)], [np.float32] * 2
def read(tag):
    print(tag, read_ranges_checked(path, ranges, dtypes, 2)[2], flush=True)
def late():
    time.sleep(0.5)
    read("late")
threading.Thread(target=late).start()
atexit.register(read, "atexit")
"""
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(result.stdout.decode().split("\n")) == ["", "atexit [0, 1]", "late [0, 1]"]


def test_a_read_on_a_pool_thread_runs_serially(tmp_path):
    from jlora import hostio

    x = np.arange(1 << 14, dtype=np.float32)
    x[3] = np.nan
    path = tmp_path / "f.bin"
    x.tofile(path)
    ranges, dtypes = [(0, 1 << 15), (1 << 15, 1 << 16)], [np.float32] * 2
    read_ranges_checked(str(path), ranges, dtypes, 2)  # the pool exists
    # More nested reads than pool threads: each would wait for a thread that never frees.
    jobs = [
        hostio._POOL.submit(read_ranges_checked, str(path), ranges, dtypes, 4)
        for _ in range(2 * hostio._MAX_READERS)
    ]
    assert all(job.result(timeout=30)[2] == [1, 0] for job in jobs)


def test_touching_ranges_of_a_partial_value_are_counted_apart(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 6 + np.asarray([np.nan, 1.0], np.float32).tobytes())
    # One run; counted as one float32 array the NaN would sit across two values.
    _, _, bad = read_ranges_checked(str(path), [(0, 6), (6, 14)], [np.float32] * 2, 1)
    assert bad == [0, 1]
