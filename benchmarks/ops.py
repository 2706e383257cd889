"""One LoRA'd linear layer on a mixed batch, each approach timed against the base matmul alone.

    python -m benchmarks.ops            # table
    python -m benchmarks.ops --json     # {"64": {"jlora": 1.07, "gather": 1.6, ...}, "2048": {...}}
    python -m benchmarks.ops --breakdown  # also: where jlora's time goes, XLA-path variants

The layer: float32, in = out = 2048, rank 16, 32 adapters plus slot 0 (33 slots), every token
on a slot drawn uniformly at random from all 33, at T = 64 (a decode step) and T = 2048 (a
prefill step). Every approach computes the whole layer, `x @ W` plus the LoRA, jitted:

- jlora:      `jlora.ops.add_lora(x @ W, x, bank, mapping)` with impl="auto" (XLA path on CPU);
- gather:     per-token gather of A and B + einsum (vLLM's torch reference approach);
- onehot:     one-hot einsum over all slots (vLLM's JAX/TPU backend, sglang-jax);
- ragged_dot: `jax.lax.ragged_dot` on the slot-sorted tokens, then un-permuted.

The `LoRAMapping` (token -> slot, slot-sorted order, counts) is built on the host before timing:
it is computed once per step and shared by every layer, so it is not part of a layer's cost.
Approaches are timed interleaved (each takes a turn every round, `block_until_ready`), after a
warm-up, and each ratio is the approach's median time over the base matmul's median time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import ops
from jlora.mapping import LoRAMapping
from jlora.reference import add_lora as reference_add_lora
from jlora.weights import LoRABank

# The benchmark layer; tests/kernel_cases.py holds the same shapes as BENCH_CASES.
IN_FEATURES = OUT_FEATURES = 2048
RANK = 16
NUM_SLOTS = 33  # 32 adapters + slot 0
TOKEN_COUNTS = (64, 2048)
APPROACHES = ("jlora", "gather", "onehot", "ragged_dot")
# Rounds per token count: ~2 s per round at T=2048 on a 2-core CPU, far less at T=64.
DEFAULT_ROUNDS = {64: 150, 2048: 21}


def make_layer(num_tokens: int, seed: int = 0):
    """x, W, the LoRA bank and the host-built mapping for one benchmark step."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((num_tokens, IN_FEATURES), np.float32))
    w = jnp.asarray(rng.standard_normal((IN_FEATURES, OUT_FEATURES), np.float32) / 45.0)
    a = rng.standard_normal((NUM_SLOTS, IN_FEATURES, RANK), np.float32) / 45.0
    b = rng.standard_normal((NUM_SLOTS, RANK, OUT_FEATURES), np.float32) / 4.0
    a[0], b[0] = 0.0, 0.0
    scale = rng.uniform(0.5, 2.0, NUM_SLOTS).astype(np.float32)
    scale[0] = 0.0
    bank = LoRABank(a=jnp.asarray(a), b=jnp.asarray(b), scale=jnp.asarray(scale))
    slots = rng.integers(0, NUM_SLOTS, num_tokens)
    mapping = LoRAMapping.build(
        slots,
        np.ones(num_tokens, np.int64),
        num_slots=NUM_SLOTS,
        is_prefill=num_tokens > 64,
        num_tokens=num_tokens,
    )
    return x, w, bank, mapping


def base_layer(x, w, bank, mapping):
    del bank, mapping
    return x @ w


def jlora_layer(x, w, bank, mapping, config=None):
    return ops.add_lora(x @ w, x, bank, mapping, config=config)


def gather_layer(x, w, bank, mapping):
    slots = mapping.token_slots
    h = jnp.einsum("ti,tir->tr", x, bank.a[slots])
    delta = jnp.einsum("tr,tro->to", h * bank.scale[slots][:, None], bank.b[slots])
    return x @ w + delta


def onehot_layer(x, w, bank, mapping):
    onehot = jax.nn.one_hot(mapping.token_slots, NUM_SLOTS, dtype=x.dtype)
    h = jnp.einsum("ti,ts,sir->tr", x, onehot, bank.a)
    delta = jnp.einsum("tr,ts,sro->to", h, onehot * bank.scale, bank.b)
    return x @ w + delta


def ragged_dot_layer(x, w, bank, mapping):
    order = mapping.sorted_token_ids
    counts = mapping.slot_counts
    x_sorted = x[order]
    slots_sorted = mapping.token_slots[order]
    h = lax.ragged_dot(x_sorted, bank.a, counts) * bank.scale[slots_sorted][:, None]
    delta_sorted = lax.ragged_dot(h, bank.b, counts)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return x @ w + delta_sorted[inverse]


LAYERS = {
    "base": base_layer,
    "jlora": jlora_layer,
    "gather": gather_layer,
    "onehot": onehot_layer,
    "ragged_dot": ragged_dot_layer,
}


def time_interleaved(fns: dict, args: tuple, rounds: int, warmup: int = 2) -> dict:
    """Median seconds per call of each jitted fn, the fns taking turns within each round.

    In its turn a fn is called twice and only the second call is timed: a call right after a
    different program that allocated and freed hundreds of MB (the per-token gather, ragged_dot)
    runs 25-40 ms slower at T=2048 on this machine, whatever it computes. So every timed call
    follows a call of the same program, as in a serving loop, while the approaches still
    alternate (and the order rotates every round) so that drifts in machine load hit all alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            jax.block_until_ready(fns[name](*args))
            start = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def check_outputs(fns: dict, args: tuple) -> None:
    """Every approach computes the same layer (float32 reference at highest precision)."""
    x, w, bank, mapping = args
    y = jnp.matmul(x, w, precision=lax.Precision.HIGHEST)
    expected = np.asarray(reference_add_lora(y, x, (bank,), mapping.token_slots))
    for name, fn in fns.items():
        if name != "base":
            np.testing.assert_allclose(
                np.asarray(fn(*args)), expected, rtol=2e-3, atol=2e-3, err_msg=name
            )


def run(rounds: dict[int, int]) -> dict[str, dict[str, float]]:
    results = {}
    for num_tokens in TOKEN_COUNTS:
        args = make_layer(num_tokens)
        fns = {name: jax.jit(fn) for name, fn in LAYERS.items()}
        check_outputs(fns, args)
        medians = time_interleaved(fns, args, rounds[num_tokens])
        base = medians.pop("base")
        results[str(num_tokens)] = {name: round(t / base, 3) for name, t in medians.items()}
        results[str(num_tokens)]["base_ms"] = round(base * 1e3, 3)
    return results


def _breakdown_fns(num_tokens: int) -> dict:
    fns = {"base": jax.jit(base_layer), "jlora": jax.jit(jlora_layer)}
    for strategy, blocks in (("sorted", (2, 4, 8, 16, 32)), ("scatter", (8, 16, 32, 64))):
        for block_t in blocks:
            config = ops.OpsConfig(xla_strategy=strategy, xla_block_t=block_t)
            fns[f"{strategy}/{block_t}"] = jax.jit(
                lambda x, w, bank, mapping, c=config: jlora_layer(x, w, bank, mapping, c)
            )
    # Per-step metadata derived on device from the mapping (blocks of the auto plan).
    _, block_t = ops._xla_plan(num_tokens, ops.OpsConfig())
    fns["metadata"] = jax.jit(
        lambda x, w, bank, m: ops.pk.segment_blocks(
            m.slot_counts, m.slot_starts, num_tokens=num_tokens, block_t=block_t
        )
    )
    # A floor for small T: reading every adapter's A and B once (33 slots, 8.6 MB), nothing else.
    fns["read_adapters"] = jax.jit(lambda x, w, bank, m: jnp.sum(bank.a) + jnp.sum(bank.b))
    return fns


def breakdown(rounds: dict[int, int]) -> dict[str, dict[str, float]]:
    """Where jlora's time goes on the XLA path: milliseconds of the base matmul, the whole
    layer, the per-step block metadata and one read of all adapter weights, and each
    (strategy, block_t) of the XLA path as a ratio to the base matmul."""
    out = {}
    for num_tokens in TOKEN_COUNTS:
        args = make_layer(num_tokens)
        fns = _breakdown_fns(num_tokens)
        medians = time_interleaved(fns, args, max(5, rounds[num_tokens] // 2))
        base = medians["base"]
        row = {"auto": "/".join(map(str, ops._xla_plan(num_tokens, ops.OpsConfig())))}
        for name in ("base", "jlora", "metadata", "read_adapters"):
            row[f"{name}_ms"] = round(medians.pop(name) * 1e3, 3)
        row["lora_ms"] = round(row["jlora_ms"] - row["base_ms"], 3)
        row.update({name: round(t / base, 3) for name, t in medians.items()})
        out[str(num_tokens)] = row
    return out


def print_table(results: dict) -> None:
    print(f"{'T':>6} {'base ms':>9} " + " ".join(f"{a:>11}" for a in APPROACHES))
    for num_tokens, row in results.items():
        cells = " ".join(f"{row[a]:>10.3f}x" for a in APPROACHES)
        print(f"{num_tokens:>6} {row['base_ms']:>9.2f} {cells}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per T")
    parser.add_argument("--breakdown", action="store_true", help="also time jlora's pieces")
    args = parser.parse_args(argv)
    rounds = (
        dict(DEFAULT_ROUNDS) if args.rounds is None else dict.fromkeys(TOKEN_COUNTS, args.rounds)
    )
    results = run(rounds)
    if args.json:
        print(json.dumps({t: {a: row[a] for a in APPROACHES} for t, row in results.items()}))
    else:
        print(
            f"jlora LoRA'd linear layer, fp32, in=out={IN_FEATURES}, rank {RANK}, "
            f"{NUM_SLOTS - 1} adapters + slot 0; time / base matmul time (median, interleaved)"
        )
        print(
            f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
            f"jax {jax.__version__}"
        )
        print_table(results)
    if args.breakdown:
        print(json.dumps(breakdown(rounds), indent=1))


if __name__ == "__main__":
    main()
