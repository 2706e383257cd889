"""Punica-style LoRA kernels for JAX: Pallas with the Triton backend, plus their references.

Two shapes of work, each split into shrink (`x @ A[slot]` -> float32 `[T, R]`) and expand
(`y += scale[slot] * h @ B[slot]`, per output slice):

- segmented (prefill): tokens sorted by slot, each block of tokens owned by one slot, so an
  adapter's tile is read once per block (`segmented_shrink`, `segmented_expand`);
- gathered (decode): one program per token, each with its own slot (`gathered_shrink`,
  `gathered_expand`).

Kernels take arrays and static configs only. This package must not import jlora.
"""

from pallas_kernels.config import GatheredConfig, SegmentedConfig
from pallas_kernels.gathered_expand import gathered_expand, gathered_expand_reference
from pallas_kernels.gathered_shrink import gathered_shrink, gathered_shrink_reference
from pallas_kernels.segmented_expand import segmented_expand, segmented_expand_reference
from pallas_kernels.segmented_shrink import segmented_shrink, segmented_shrink_reference
from pallas_kernels.segments import (
    SegmentBlocks,
    num_blocks_bound,
    segment_blocks,
    slots_of_sorted_positions,
)

__all__ = [
    "GatheredConfig",
    "SegmentBlocks",
    "SegmentedConfig",
    "gathered_expand",
    "gathered_expand_reference",
    "gathered_shrink",
    "gathered_shrink_reference",
    "num_blocks_bound",
    "segment_blocks",
    "segmented_expand",
    "segmented_expand_reference",
    "segmented_shrink",
    "segmented_shrink_reference",
    "slots_of_sorted_positions",
]
