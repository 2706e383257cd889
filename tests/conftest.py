"""Shared test setup: fixture paths and a strict, fresh random generator per test."""

import os
import pathlib
import zlib

import jax
import numpy as np
import pytest

# Tests compare against float32 references; keep XLA's CPU matmuls at full float32 precision.
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ADAPTERS_DIR = FIXTURES / "adapters"
ADAPTER_NAMES = sorted(p.name for p in ADAPTERS_DIR.iterdir() if p.is_dir())


@pytest.fixture
def rng(request) -> np.random.Generator:
    # Fresh inputs per test, reproducible per test name (a failure can be re-run as it was).
    # (crc32, not hash(): str hashes change with every interpreter; JLORA_RANDOM_SEED overrides.)
    seed = os.environ.get("JLORA_RANDOM_SEED")
    seed = zlib.crc32(request.node.nodeid.encode()) if seed is None else int(seed)
    return np.random.default_rng(seed)
