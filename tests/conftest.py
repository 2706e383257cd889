"""Shared test setup: fixture paths and a strict, fresh random generator per test."""

import os
import pathlib

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
    seed = (
        abs(hash(request.node.nodeid)) % (2**32)
        if os.environ.get("JLORA_RANDOM_SEED") is None
        else int(os.environ["JLORA_RANDOM_SEED"])
    )
    return np.random.default_rng(seed)
