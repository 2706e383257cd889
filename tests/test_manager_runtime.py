"""The manager in a serving loop: adapter churn never recompiles the forward or the slot
writers, and cycling many adapters through few slots keeps device memory flat."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
from compile_counter import CompileCounter
from test_manager import MemoryDisk, check_invariants, make_adapter, toy_state

from jlora import manager as M
from jlora import ops, reference
from jlora.errors import CapacityError


@jax.jit
def forward(banks, x, token_ids, mapping):
    """Every toy target's LoRA delta for one step, through the serving ops."""
    t = x.shape[0]
    qk = ops.add_lora(jnp.zeros((t, 7)), x[:, :8], banks["attn.qk"], mapping)
    down = ops.add_lora(jnp.zeros((t, 7)), x[:, :5], banks["mlp.down"], mapping)
    emb = ops.add_lora_embedding(jnp.zeros((t, 6)), token_ids, banks["embed"][0], mapping)
    return qk, down, emb


def test_fifty_steps_of_churn_compile_once_per_bucket():
    rng = np.random.default_rng(0)
    disk = MemoryDisk(
        {
            i: make_adapter(
                i,
                rank=1 + i % 4,
                modules=("attn.q", "attn.k", "mlp.down", "embed")[: 1 + i % 4],
                path=f"/mem/{i}",
            )
            for i in range(1, 9)
        }
    )
    state = toy_state(max_loras=3, max_cpu_loras=4, load_fn=disk)
    # Compile the slot writers (both source orders: rank-1 adapters take PyTorch's) and the
    # slot clearer for this layout before counting.
    M.warmup(toy_state(max_loras=3, max_cpu_loras=4))
    writers = (M._WRITE[True]._cache_size(), M._CLEAR[True]._cache_size())

    seen, steps = set(), 0
    with CompileCounter() as compiles:
        while steps < 50:
            # Churn: register, pin, unpin, deactivate or remove a random adapter.
            op = rng.choice(["add", "pin", "unpin", "deactivate", "remove"])
            i = int(rng.integers(1, 9))
            try:
                if op == "add":
                    state = M.add_adapter(state, disk.request(i))
                elif op == "pin" and len(state.pinned) < 2:
                    state = M.pin_adapter(state, disk.request(i))
                elif state.is_known(i) and op != "pin":
                    fn = {
                        "unpin": M.unpin_adapter,
                        "deactivate": M.deactivate_adapter,
                        "remove": M.remove_adapter,
                    }[op]
                    state = fn(state, i)
            except CapacityError:
                pass
            # A random mixed batch, split to fit the free slots, each part served by one step.
            n = int(rng.integers(1, 5))
            batch = [None if r == 0 else disk.request(int(r)) for r in rng.integers(0, 9, n)]
            lengths = rng.integers(1, 16, n)
            for group in M.split_batch(state, batch):
                state, mapping = M.prepare_batch(
                    state,
                    [batch[k] for k in group],
                    lengths[group],
                    is_prefill=bool(rng.integers(2)),
                )
                t = mapping.num_tokens
                x = jax.device_put(rng.standard_normal((t, 8), np.float32))
                ids = jax.device_put(rng.integers(0, 11, t).astype(np.int32))
                out = jax.block_until_ready(forward(state.banks, x, ids, mapping))
                seen.add((t, mapping.seq_slots.shape[0], mapping.is_prefill))
                steps += 1
    # The last step's outputs match the reference math on the final banks.
    slots = mapping.token_slots
    want = reference.add_lora(jnp.zeros((t, 7)), x[:, :5], state.banks["mlp.down"], slots)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert 2 < len(seen) < steps  # several buckets, each reused
    assert forward._cache_size() == len(seen)
    assert compiles.counts.pop("jit(forward)") == len(seen)
    # Nothing else compiled: not the slot writer, not the clearer. (jax 0.10's jnp.asarray,
    # used by LoRAMapping.build, compiles a trivial "stage" program per new array shape: bounded
    # by the buckets too, and gone once the mapping moves arrays with jax.device_put.)
    assert set(compiles.counts) <= {"jit(stage)"}, compiles.counts
    assert compiles.counts.get("jit(stage)", 0) <= 3 * len(seen)
    assert (M._WRITE[True]._cache_size(), M._CLEAR[True]._cache_size()) == writers
    check_invariants(state, disk.models)


def _device_footprint() -> tuple[int, int]:
    gc.collect()
    arrays = [x for x in jax.live_arrays() if not x.is_deleted()]
    return len(arrays), sum(x.nbytes for x in arrays)


def test_cycling_a_thousand_adapters_through_four_slots_keeps_memory_flat():
    state = toy_state(max_loras=4, max_cpu_loras=4)
    pointer = state.banks["attn.qk"][0].a.unsafe_buffer_pointer()
    footprint = None
    for i in range(1, 1001):
        state = M.add_adapter(state, make_adapter(i, rank=1 + i % 4))
        state, mapping = M.prepare_batch(state, [i, None], [3, 1])
        if i == 20:
            footprint = _device_footprint()
    assert _device_footprint() == footprint
    assert len(state.cache) == 4 and set(state.slots[1:]) == {997, 998, 999, 1000}
    # Donated writes reuse the banks' buffers: no bank was ever reallocated.
    assert state.banks["attn.qk"][0].a.unsafe_buffer_pointer() == pointer
    check_invariants(state, {i: make_adapter(i, rank=1 + i % 4) for i in range(997, 1001)})
