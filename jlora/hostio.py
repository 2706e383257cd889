"""Host-side reads of adapter weights: one aligned buffer per file, filled by whole-range reads,
and a NaN/Inf check by bit pattern. Shared by jlora.loader (PEFT safetensors) and
jlora.checkpoint (jlora's own checkpoints). Imports numpy and ml_dtypes only.

Why aligned: ``jax.device_put`` of a numpy array on a CPU device aliases the host memory when it
is 64-byte aligned and copies it otherwise (80 MB: 0.1 ms against 59 ms, BENCHMARKS.md), so
tensors viewed out of an aligned buffer reach a device slot without an extra copy. Why one
buffer: one ``readinto`` per contiguous range of the file instead of one allocation and copy per
tensor (into fresh memory: 29.7 ms against 60.6 ms for a 7B rank-16 adapter; when the heap
still holds chunks freed by an earlier load of the same file, per-tensor arrays reuse them and
the one buffer is ~15% slower: BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np

ALIGNMENT = 64  # bytes; what XLA's CPU client needs to alias a host buffer
_CHECK_CHUNK = 1 << 19  # elements per step of the finite check: the scratch stays in L2

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


def read_ranges(path: str, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, list[int]]:
    """Reads the byte ranges ``[begin, end)`` of ``path`` into one aligned buffer.

    Overlapping or touching ranges are merged and each merged run is read with one
    ``readinto``; every run starts 64-byte aligned in the buffer. Returns the buffer and, per
    input range, the offset of its first byte in the buffer.

    Raises:
      EOFError: the file ends before a range does (it was truncated after it was checked).
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    runs: list[list[int]] = []  # [file begin, file end, buffer offset]
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
    buf = aligned_empty(size)
    with open(path, "rb", buffering=0) as f:
        for begin, end, offset in runs:
            f.seek(begin)
            view = memoryview(buf[offset : offset + end - begin])
            while view.nbytes:
                n = f.readinto(view)
                if not n:
                    raise EOFError(f"{path}: ends before byte {end}")
                view = view[n:]
    placed = [runs[r][2] + ranges[i][0] - runs[r][0] for i, r in enumerate(run_of)]
    return buf, placed


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
