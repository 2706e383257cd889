"""Host-side reads of adapter weights: one aligned buffer per file, filled by large reads, and a
NaN/Inf check by bit pattern, run on each piece as it lands. Shared by jlora.loader (PEFT
safetensors) and jlora.checkpoint (jlora's own checkpoints). Imports numpy and ml_dtypes only.

Why aligned: ``jax.device_put`` of a numpy array on a CPU device aliases the host memory when it
is 64-byte aligned and copies it otherwise (80 MB: 0.1 ms against 59 ms, BENCHMARKS.md), so
tensors viewed out of an aligned buffer reach a device slot without an extra copy. Why one
buffer: large ``readinto`` pieces of each contiguous range of the file instead of one
allocation and copy per tensor (into fresh memory: 29.7 ms against 60.6 ms for a 7B rank-16
adapter; when the heap still holds chunks freed by an earlier load of the same file,
per-tensor arrays reuse them and the one buffer is ~15% slower: BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np

ALIGNMENT = 64  # bytes; what XLA's CPU client needs to alias a host buffer
_CHECK_CHUNK = 1 << 19  # elements per step of the finite check: the scratch stays in L2
_READ_PIECE = 1 << 20  # bytes per readinto when the pieces are checked as they land

# dtype -> (unsigned view, mask without the sign bit, the all-ones exponent of Inf/NaN)
_FLOAT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF, 0x7F80),
    np.dtype(np.float32): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    np.dtype(np.float64): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 buffer of ``nbytes`` whose first byte is 64-byte aligned."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes]


def read_ranges_checked(
    path: str, ranges: Sequence[tuple[int, int]], dtypes: Sequence[np.dtype]
) -> tuple[np.ndarray, list[int], list[int]]:
    """Reads the byte ranges ``[begin, end)`` of ``path`` into one aligned buffer, counting
    the NaN/Inf values of range ``i`` read as ``dtypes[i]`` (0 for integer dtypes).

    Overlapping or touching ranges are merged into runs, each starting 64-byte aligned in the
    buffer.
    The runs are read in pieces of ``_READ_PIECE`` bytes and every range is counted as soon as
    its last byte lands, while the piece is still in cache; neighbouring ranges of one dtype are
    counted as one array (one call for a whole piece), and one by one only when that count is
    not zero. 80 MB of float16: read then count 9.7-11.0 ms, in 1 MiB pieces 8.2-8.6 ms (256 KiB
    and 4 MiB pieces were slower); with the 448 per-tensor calls gone too, the loader's
    conversion of that adapter went from 18.4 to 14.7 ms (BENCHMARKS.md). Returns the buffer,
    the offsets and the counts.

    Raises:
      EOFError: the file ends before a range does (it was truncated after it was checked).
    """
    runs, placed, size = _plan(ranges)
    buf = aligned_empty(size)
    order = sorted(range(len(ranges)), key=lambda i: placed[i])
    ends = [placed[i] + ranges[i][1] - ranges[i][0] for i in range(len(ranges))]
    bad = [0] * len(ranges)
    done = 0  # ranges of `order` counted so far

    def count(filled: int) -> None:  # every byte of the buffer below `filled` is in place
        nonlocal done
        while done < len(order) and ends[order[done]] <= filled:
            group = [order[done]]
            while done + len(group) < len(order):
                nxt = order[done + len(group)]
                last = group[-1]
                if ends[nxt] > filled or placed[nxt] != ends[last] or dtypes[nxt] != dtypes[last]:
                    break
                group.append(nxt)
            first, dtype = group[0], np.dtype(dtypes[group[0]])
            n = (ends[group[-1]] - placed[first]) // dtype.itemsize
            if count_nonfinite(np.frombuffer(buf, dtype, count=n, offset=placed[first])):
                for i in group:
                    n = (ends[i] - placed[i]) // dtype.itemsize
                    bad[i] = count_nonfinite(np.frombuffer(buf, dtype, count=n, offset=placed[i]))
            done += len(group)

    _fill(path, buf, runs, piece=_READ_PIECE, on_piece=count)
    return buf, placed, bad


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


def _fill(path, buf, runs, piece: int | None = None, on_piece=None) -> None:
    """Reads every run into its place in ``buf``, ``piece`` bytes per ``readinto`` at most,
    calling ``on_piece(filled)`` after each with the buffer offset below which all is read."""
    with open(path, "rb", buffering=0) as f:
        for begin, end, offset in runs:
            f.seek(begin)
            view = memoryview(buf[offset : offset + end - begin])
            filled = offset
            while view.nbytes:
                n = f.readinto(view[:piece] if piece else view)
                if not n:
                    raise EOFError(f"{path}: ends before byte {end}")
                view, filled = view[n:], filled + n
                if on_piece:
                    on_piece(filled)
        if on_piece:
            on_piece(buf.size)  # empty ranges past the last byte


def count_nonfinite(x: np.ndarray) -> int:
    """How many NaN/Inf values ``x`` holds (0 for integer arrays).

    By the bit pattern, in L2-sized chunks through one scratch buffer: no boolean temporary of
    the array's size (several times faster than ``np.isfinite(x).all()``, which once dominated
    loading). Counts only when a chunk holds a bad value, so clean arrays cost one pass."""
    bits = _FLOAT_BITS.get(x.dtype)
    if bits is None or x.size == 0:
        return 0
    view, mask, exponent = bits
    flat = x.reshape(-1).view(view)  # a copy only for non-contiguous x
    scratch = np.empty(min(flat.size, _CHECK_CHUNK), view)
    bad = 0
    for start in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[start : start + _CHECK_CHUNK]
        out = scratch[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if out.max() >= exponent:
            bad += int(np.count_nonzero(out >= exponent))
    return bad
