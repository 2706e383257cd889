"""Tunables for the LoRA kernels: frozen, keyword-only, slotted dataclasses with defaults.

Every block size is a power of two and at least 16: Triton's tensors must have power-of-two
sizes and `tl.dot` needs M, N and K of at least 16. Ragged edges (odd hidden sizes, ranks below
16) are handled with masked loads and stores, not with smaller blocks. The defaults keep each
register tile at or below 32 KB; they are not yet tuned on a GPU.

Must not import jlora.
"""

from __future__ import annotations

import dataclasses

from jax.experimental.pallas import triton as plgpu

__all__ = ["GatheredConfig", "SegmentedConfig"]


def _check_block(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two >= {minimum}")


def _check_launch(num_warps: int, num_stages: int) -> None:
    _check_block("num_warps", num_warps, 1)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r} must be a positive int")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SegmentedConfig:
    """Tunables of the segmented (prefill) shrink and expand kernels.

    Attributes:
      block_t: tokens per block; every block is owned by one slot.
      block_k: shrink reduction chunk along the input features.
      block_r: rank columns per shrink program and rank chunk of the expand reduction.
      block_n: output columns per expand program.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_t: int = 32
    block_k: int = 128
    block_r: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_t", "block_k", "block_r", "block_n"):
            _check_block(name, getattr(self, name), 16)
        _check_launch(self.num_warps, self.num_stages)

    def compiler_params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GatheredConfig:
    """Tunables of the gathered (decode) shrink and expand kernels: one program per token.

    Attributes:
      block_k: shrink reduction chunk along the input features.
      block_r: rank columns per shrink program and rank chunk of the expand reduction.
      block_n: output columns per expand program.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_k: int = 128
    block_r: int = 32
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_k", "block_r", "block_n"):
            _check_block(name, getattr(self, name), 16)
        _check_launch(self.num_warps, self.num_stages)

    def compiler_params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)
