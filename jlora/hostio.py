"""Host-side reads of adapter weights: one aligned buffer per file, filled by large reads, and a
NaN/Inf check by bit pattern, run on each piece as it lands, by one thread per CPU (up to 4).
Shared by jlora.loader (PEFT safetensors) and jlora.checkpoint (jlora's own checkpoints).
Imports numpy and ml_dtypes only.

Why aligned: ``jax.device_put`` of a numpy array on a CPU device aliases the host memory when it
is 64-byte aligned and copies it otherwise (80 MB: 0.1 ms against 59 ms, BENCHMARKS.md), so
tensors viewed out of an aligned buffer reach a device slot without an extra copy. Why one
buffer: large ``readinto`` pieces of each contiguous range of the file instead of one
allocation and copy per tensor (into fresh memory: 29.7 ms against 60.6 ms for a 7B rank-16
adapter; when the heap still holds chunks freed by an earlier load of the same file,
per-tensor arrays reuse them and the one buffer is ~15% slower: BENCHMARKS.md).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import os
import threading
from collections.abc import Sequence

import ml_dtypes
import numpy as np

ALIGNMENT = 64  # bytes; what XLA's CPU client needs to alias a host buffer
_CHECK_CHUNK = 1 << 19  # elements per step of the finite check: the scratch stays in L2
_READ_PIECE = 1 << 20  # bytes per readinto when the pieces are checked as they land
_MAX_READERS = 4  # threads per read: more cores than this add little bandwidth
_MIN_PART = 4 << 20  # bytes: below this a thread's start costs more than it saves

# dtype -> (unsigned view, mask without the sign bit, the all-ones exponent of Inf/NaN)
_FLOAT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF, 0x7F80),
    np.dtype(np.float32): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    np.dtype(np.float64): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}
# The weight dtypes jlora holds on the host: those whose NaN/Inf ``count_nonfinite`` can count.
FLOAT_DTYPE_NAMES = frozenset(d.name for d in _FLOAT_BITS)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 buffer of ``nbytes`` whose first byte is 64-byte aligned."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes]


def freeze(buf: np.ndarray) -> None:
    """Makes ``buf`` and every array it is a view of read-only, so that ``is_frozen`` holds for
    views of it: no NumPy write reaches the memory a cached adapter shares (short of turning
    the flag back on, which NumPy allows on the owner)."""
    x = buf
    while isinstance(x, np.ndarray):
        x.setflags(write=False)
        x = x.base


def is_frozen(x: np.ndarray) -> bool:
    """Whether no NumPy write reaches ``x``'s memory: ``x`` and every array it is a view of are
    read-only, down to memory NumPy owns or immutable ``bytes`` (a read-only view of a writable
    array, or of a ``bytearray`` or ``mmap``, is not). A caller that sets the owner writable
    again is not guarded against."""
    while isinstance(x, np.ndarray):
        if x.flags.writeable:
            return False
        x = x.base
    return x is None or isinstance(x, bytes)


def read_ranges_checked(
    path: str,
    ranges: Sequence[tuple[int, int]],
    dtypes: Sequence[np.dtype],
    readers: int | None = None,
) -> tuple[np.ndarray, list[int], list[int]]:
    """Reads the byte ranges ``[begin, end)`` of ``path`` into one aligned buffer, counting
    the NaN/Inf values of range ``i`` read as ``dtypes[i]`` (0 for integer dtypes).

    Overlapping or touching ranges are merged into runs, each starting 64-byte aligned in the
    buffer. The buffer is cut into ``readers`` parts of about equal size (default: one per
    CPU this process may use, at most ``_MAX_READERS``, parts of ``_MIN_PART`` bytes or more),
    each read by its own thread: ``readinto`` and numpy's loops release the GIL, so the copies
    out of the page cache and the counts run on all cores (a single thread leaves half of a
    2-core machine's memory bandwidth unused: BENCHMARKS.md). Each part is read in pieces of
    ``_READ_PIECE`` bytes and every range (cut into ``_READ_PIECE`` segments) is counted as
    soon as its last byte lands, while the piece is still in cache; neighbouring segments of
    one dtype are counted as one array, and one by one only when that count is not zero.
    Returns the buffer, the offsets and the counts.

    Raises:
      EOFError: the file ends before a range does (it was truncated after it was checked).
    """
    runs, placed, size = _plan(ranges)
    buf = aligned_empty(size)
    dtypes = [np.dtype(d) for d in dtypes]
    segments = _segments(placed, ranges, dtypes)
    if readers is None:
        readers = _default_readers(size)
    cuts = _cuts(segments, size, max(1, readers))
    parts = [(lo, hi, []) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    for seg in segments:  # to the part its start falls in (the last one for empty tail ranges)
        parts[min(bisect.bisect_right(cuts, seg[0]), len(parts)) - 1][2].append(seg)

    def read_part(lo: int, hi: int, segs: list[tuple[int, int, int]]) -> tuple[dict, list]:
        counter = _Counter(buf, segs, dtypes)
        _fill(path, buf, runs, lo, hi, piece=_READ_PIECE, on_piece=counter.upto)
        return counter.bad, counter.left()

    results = _run_parallel(read_part, parts)
    bad = [0] * len(ranges)
    for counts, left in results:
        for i, n in counts.items():
            bad[i] += n
        for begin, end, i in left:  # a segment past its part's end (overlapping ranges)
            bad[i] += _count_at(buf, begin, end, dtypes[i])
    return buf, placed, bad


def _default_readers(size: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_READERS, size // _MIN_PART))


def _segments(placed, ranges, dtypes) -> list[tuple[int, int, int]]:
    """``(buffer begin, buffer end, range index)`` of every range cut into pieces of at most
    ``_READ_PIECE`` bytes (whole values), sorted by buffer offset."""
    out = []
    for i, (begin, end) in enumerate(ranges):
        step = max(dtypes[i].itemsize, _READ_PIECE - _READ_PIECE % dtypes[i].itemsize)
        lo, hi = placed[i], placed[i] + end - begin
        if hi - lo <= step:  # most tensors of an adapter: one segment
            out.append((lo, hi, i))
        else:
            out.extend((a, min(a + step, hi), i) for a in range(lo, hi, step))
    out.sort()
    return out


def _cuts(segments, size: int, parts: int) -> list[int]:
    """Buffer offsets ``0 = c_0 < ... < c_k = size`` (k <= parts), each inner one a segment
    start near ``j * size / parts``, so that every part holds about as many bytes."""
    cuts = [0]
    starts = sorted({s[0] for s in segments if 0 < s[0] < size})
    for j in range(1, parts):
        if not starts:
            break
        k = bisect.bisect_left(starts, j * size // parts)
        best = min(starts[max(0, k - 1) : k + 1], key=lambda c: abs(c - j * size // parts))
        if best > cuts[-1]:
            cuts.append(best)
    cuts.append(size)
    return cuts


class _Counter:
    """Counts NaN/Inf of a part's segments as their bytes land (``upto``), per range index."""

    def __init__(self, buf: np.ndarray, segs: list[tuple[int, int, int]], dtypes):
        self.buf, self.segs, self.dtypes = buf, segs, dtypes
        self.done = 0  # segments counted so far
        self.bad: dict[int, int] = {}

    def upto(self, filled: int) -> None:  # every byte of the part below `filled` is in place
        segs, dtypes = self.segs, self.dtypes
        while self.done < len(segs) and segs[self.done][1] <= filled:
            group = [segs[self.done]]
            while self.done + len(group) < len(segs):
                nxt = segs[self.done + len(group)]
                last = group[-1]
                dtype = dtypes[last[2]]
                if (
                    nxt[1] > filled
                    or nxt[0] != last[1]
                    or dtypes[nxt[2]] != dtype
                    or (last[1] - last[0]) % dtype.itemsize  # would count misaligned values
                ):
                    break
                group.append(nxt)
            if _count_at(self.buf, group[0][0], group[-1][1], dtypes[group[0][2]]):
                for begin, end, i in group:
                    n = _count_at(self.buf, begin, end, dtypes[i])
                    if n:
                        self.bad[i] = self.bad.get(i, 0) + n
            self.done += len(group)

    def left(self) -> list[tuple[int, int, int]]:
        return self.segs[self.done :]


def _count_at(buf: np.ndarray, begin: int, end: int, dtype: np.dtype) -> int:
    """NaN/Inf among the whole ``dtype`` values of ``buf[begin:end]``."""
    n = (end - begin) // dtype.itemsize
    return count_nonfinite(np.frombuffer(buf, dtype, count=n, offset=begin))


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool_in_child() -> None:
    # A forked child has none of the pool's threads, but the pool believes it has idle ones and
    # would queue work that never runs: the child starts its own.
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


_IN_POOL = threading.local()  # set on the pool's threads: a read there runs serially


def _run_parallel(fn, parts: list[tuple]) -> list:
    """``fn(*part)`` for every part, the first in this thread and the rest on a shared pool;
    waits for all of them (they write into one buffer) before raising the first error.

    Runs every part in this thread when called from a pool thread (waiting there for the pool
    could deadlock it) or when no thread can start (the interpreter is shutting down)."""
    global _POOL
    if len(parts) == 1 or getattr(_IN_POOL, "active", False):
        return [fn(*part) for part in parts]
    futures = []
    try:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = concurrent.futures.ThreadPoolExecutor(
                    _MAX_READERS - 1, thread_name_prefix="jlora-read", initializer=_mark_pool
                )
            pool = _POOL
        for part in parts[1:]:
            futures.append(pool.submit(fn, *part))
    except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
        pass
    try:
        here = [fn(*parts[0])] + [fn(*part) for part in parts[1 + len(futures) :]]
    finally:
        concurrent.futures.wait(futures)
    return here + [f.result() for f in futures]


def _mark_pool() -> None:
    _IN_POOL.active = True


def _plan(ranges: Sequence[tuple[int, int]]) -> tuple[list[list[int]], list[int], int]:
    """Merged runs ``[file begin, file end, buffer offset]`` in file order (so in buffer order
    too), each range's buffer offset, and the buffer size."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    runs: list[list[int]] = []
    run_of = [0] * len(ranges)
    size = 0
    for i in order:
        begin, end = ranges[i]
        if runs and begin <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            if runs:
                size += runs[-1][1] - runs[-1][0]
                size += -size % ALIGNMENT
            runs.append([begin, end, size])
        run_of[i] = len(runs) - 1
    if runs:
        size += runs[-1][1] - runs[-1][0]
    placed = [runs[r][2] + ranges[i][0] - runs[r][0] for i, r in enumerate(run_of)]
    return runs, placed, size


def _fill(path, buf, runs, lo: int, hi: int, piece: int, on_piece) -> None:
    """Reads the bytes of ``buf[lo:hi]`` from the runs that cover them, ``piece`` bytes per
    ``readinto`` at most, calling ``on_piece(filled)`` after each with the buffer offset below
    which all of the part is read."""
    with open(path, "rb", buffering=0) as f:
        for begin, end, offset in runs:
            a, b = max(lo, offset), min(hi, offset + end - begin)
            if a >= b:
                continue
            f.seek(begin + a - offset)
            view, filled = memoryview(buf[a:b]), a
            while view.nbytes:
                n = f.readinto(view[:piece])
                if not n:
                    raise EOFError(f"{path}: ends before byte {end}")
                view, filled = view[n:], filled + n
                on_piece(filled)
        on_piece(hi)  # empty ranges at the part's end


def count_nonfinite(x: np.ndarray) -> int:
    """How many NaN/Inf values ``x`` holds (0 for integer arrays).

    By the bit pattern, in L2-sized chunks through one scratch buffer: no boolean temporary of
    the array's size (several times faster than ``np.isfinite(x).all()``, which once dominated
    loading). Counts only when a chunk holds a bad value, so clean arrays cost one pass."""
    bits = _FLOAT_BITS.get(x.dtype)
    if bits is None or x.size == 0:
        return 0
    view, mask, exponent = bits
    # memory order: a view of a C- or Fortran-contiguous x (a transposed weight), else a copy
    flat = x.ravel(order="K").view(view)
    scratch = np.empty(min(flat.size, _CHECK_CHUNK), view)
    bad = 0
    for start in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[start : start + _CHECK_CHUNK]
        out = scratch[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if out.max() >= exponent:
            bad += int(np.count_nonzero(out >= exponent))
    return bad
