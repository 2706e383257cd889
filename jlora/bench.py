"""End-to-end serving benchmark behind ``jlora bench``: tokens/s of the engine for the base model,
one adapter for every row and many distinct adapters, optionally HF transformers + PEFT on the same
shapes in the same run, and S-LoRA's skewed workload with adapter swapping.

Throughput counts prompt and generated tokens over wall time; compilation is excluded (a warm-up
run with the same shapes goes first) and reported apart. Imports jlora modules only; torch,
transformers and peft only inside ``peft_tokens_per_s`` and only when asked for.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
from flax import nnx

import jlora
from jlora.engine import Engine
from jlora.models.llama import LlamaConfig
from jlora.sampling import SamplingParams
from jlora.synthetic import llama_module_shapes, random_llama, write_peft_adapter


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 8
    num_heads: int = 16
    num_kv_heads: int = 8
    vocab_size: int = 8192
    num_seqs: int = 32
    prompt_len: int = 64
    new_tokens: int = 32
    num_adapters: int = 32
    rank: int = 16
    alpha: float = 32
    skew_adapters: tuple[int, ...] = (8, 64, 512)
    skew_alphas: tuple[float, ...] = (1.0, 0.3, 0.1)
    skew_max_loras: int = 16
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchConfig:
        """Tiny shapes: a smoke test of the whole benchmark in seconds."""
        return cls(
            hidden_size=128,
            intermediate_size=344,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            vocab_size=512,
            num_seqs=4,
            prompt_len=16,
            new_tokens=8,
            num_adapters=4,
            skew_adapters=(2, 8),
            skew_alphas=(1.0, 0.1),
            skew_max_loras=2,
        )

    def llama(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.prompt_len + self.new_tokens,
        )


class AdapterPool:
    """Synthetic PEFT adapters written to a temp dir on first use (adapter ``i`` -> id ``i+1``)."""

    def __init__(self, cfg: BenchConfig, root: str):
        self.cfg, self.root = cfg, root
        self.shapes = llama_module_shapes(cfg.llama())
        self._requests: dict[int, jlora.LoRARequest] = {}

    def request(self, i: int) -> jlora.LoRARequest:
        if i not in self._requests:
            path = write_peft_adapter(
                os.path.join(self.root, f"adapter_{i}"),
                self.shapes,
                r=self.cfg.rank,
                alpha=self.cfg.alpha,
                seed=self.cfg.seed + 1000 + i,
            )
            self._requests[i] = jlora.LoRARequest(
                lora_name=f"adapter_{i}", lora_int_id=i + 1, lora_path=path
            )
        return self._requests[i]


def _prompts(cfg: BenchConfig, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (n, cfg.prompt_len)).tolist()


def _compile_s(engine: Engine, cfg: BenchConfig) -> float:
    """Compiles every prefill and decode program of the workload (``Engine.warmup``)."""
    return engine.warmup([cfg.prompt_len])


def _interleaved_tok_s(engine: Engine, workloads: dict, prompts, params, rounds: int) -> dict:
    """Median tokens/s per workload, the workloads run in turn ``rounds`` times so that machine
    noise falls on all of them alike."""
    seen: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(rounds):
        for name, requests in workloads.items():
            engine.generate(prompts, requests, params)
            seen[name].append(engine.stats.tokens_per_s)
    return {name: float(np.median(v)) for name, v in seen.items()}


def run(
    cfg: BenchConfig,
    *,
    compare_peft: bool = False,
    skewed: bool = True,
    rounds: int = 3,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict:
    model = random_llama(cfg.llama(), seed=cfg.seed)
    params = SamplingParams(max_tokens=cfg.new_tokens)
    n = cfg.num_seqs
    prompts = _prompts(cfg, n, cfg.seed)
    results: dict = {"rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="jlora-bench-") as root:
        pool = AdapterPool(cfg, root)
        lora_config = jlora.LoRAConfig(
            max_loras=cfg.num_adapters, max_lora_rank=cfg.rank, max_cpu_loras=cfg.num_adapters
        )
        engine = Engine(
            model, lora_config, max_batch=n, max_seq_len=cfg.prompt_len + cfg.new_tokens
        )
        workloads = {
            "base": [None] * n,
            "one_adapter": [pool.request(0)] * n,
            "distinct": [pool.request(i % cfg.num_adapters) for i in range(n)],
        }
        progress("compile")
        results["compile_s"] = _compile_s(engine, cfg)
        progress(f"base, one adapter, {cfg.num_adapters} distinct adapters")
        tok_s = _interleaved_tok_s(engine, workloads, prompts, params, rounds)
        results.update({f"{name}_tok_s": v for name, v in tok_s.items()})
        results["distinct_over_base"] = results["distinct_tok_s"] / results["base_tok_s"]
        results["peft_distinct_tok_s"] = None
        if compare_peft:
            progress("HF transformers + PEFT")
            paths = [r.path for r in workloads["distinct"]]
            peft = peft_tokens_per_s(cfg, model, paths, prompts, rounds)
            results.update({f"peft_{k}": v for k, v in peft.items()})
            results["distinct_over_peft"] = results["distinct_tok_s"] / peft["distinct_tok_s"]
        if skewed:
            results["skewed"] = skewed_workload(cfg, model, pool, progress)
    return results


def skewed_workload(cfg: BenchConfig, model, pool: AdapterPool, progress) -> dict:
    """S-LoRA's generator: adapter of request ``k`` is ``floor(n * power(alpha))``; more
    adapters than ``skew_max_loras`` slots, so the engine swaps adapters during the run."""
    n = cfg.num_seqs
    params = SamplingParams(max_tokens=cfg.new_tokens)
    lora_config = jlora.LoRAConfig(
        max_loras=cfg.skew_max_loras, max_lora_rank=cfg.rank, max_cpu_loras=2 * cfg.skew_max_loras
    )
    engine = Engine(model, lora_config, max_batch=n, max_seq_len=cfg.prompt_len + cfg.new_tokens)
    num_requests = 2 * n
    prompts = _prompts(cfg, num_requests, cfg.seed + 1)
    progress("skewed: compile")
    _compile_s(engine, cfg)
    out: dict = {}
    for alpha in cfg.skew_alphas:
        row = {}
        for num_adapters in cfg.skew_adapters:
            progress(f"skewed alpha={alpha} adapters={num_adapters}")
            rng = np.random.default_rng(cfg.seed + num_adapters)
            picks = np.floor(num_adapters * rng.power(alpha, num_requests)).astype(int)
            requests = [pool.request(int(i)) for i in picks]
            # The first pass loads the adapters from disk; the timed second pass swaps them
            # between host cache, disk and device slots as a steady-state server would.
            engine.generate(prompts, requests, params)
            engine.generate(prompts, requests, params)
            row[str(num_adapters)] = {
                "tok_s": engine.stats.tokens_per_s,
                "distinct": int(len(set(picks))),
            }
        first, last = (row[str(k)]["tok_s"] for k in (cfg.skew_adapters[0], cfg.skew_adapters[-1]))
        row["drop"] = 1.0 - last / first
        out[str(alpha)] = row
    return out


def peft_tokens_per_s(cfg: BenchConfig, model, adapter_paths, prompts, rounds: int) -> dict:
    """HF transformers + PEFT on the same weights, shapes and adapters (mixed-batch inference
    with ``adapter_names``), greedy, timed after a warm-up. Needs torch, transformers, peft."""
    import torch
    import transformers
    from peft import PeftModel

    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.prompt_len + cfg.new_tokens,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    weights = {k: torch.from_numpy(np.array(v)) for k, v in hf_state_dict(model).items()}
    hf.load_state_dict(weights, strict=True)
    # Same weights, same function: the two models must agree before their speed is compared.
    with torch.no_grad():
        ours = np.asarray(model(np.asarray(prompts[:2], np.int32)))
        theirs = hf(torch.tensor(prompts[:2])).logits.numpy()
    if not np.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(ours).max()):
        raise AssertionError("HF model built from the jlora weights disagrees with it")
    unique = list(dict.fromkeys(adapter_paths))
    by_path = {p: f"a{k}" for k, p in enumerate(unique)}
    peft_model = PeftModel.from_pretrained(hf, unique[0], adapter_name=by_path[unique[0]])
    for path in unique[1:]:
        peft_model.load_adapter(path, adapter_name=by_path[path])
    names = [by_path[p] for p in adapter_paths]
    ids = torch.tensor(prompts)
    total = ids.numel() + ids.shape[0] * cfg.new_tokens

    def gen(adapter_names=None):
        kwargs = dict(
            max_new_tokens=cfg.new_tokens,
            min_new_tokens=cfg.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        start = time.perf_counter()
        with torch.no_grad():
            if adapter_names is None:
                with peft_model.disable_adapter():
                    peft_model.generate(input_ids=ids, **kwargs)
            else:
                peft_model.generate(input_ids=ids, adapter_names=adapter_names, **kwargs)
        return total / (time.perf_counter() - start)

    gen(names)  # warm-up
    workloads = {"base": None, "one_adapter": [names[0]] * len(names), "distinct": names}
    seen: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(rounds):
        for name, w in workloads.items():
            seen[name].append(gen(w))
    return {f"{name}_tok_s": float(np.median(v)) for name, v in seen.items()} | {
        "torch": torch.__version__
    }


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The NNX Llama's parameters under HF's names and layouts (Linear weights ``[out, in]``)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, value = ".".join(str(p) for p in path), np.asarray(var.get_value())
        if name.endswith(".kernel"):
            out[name.removesuffix(".kernel") + ".weight"] = value.T
        elif name.endswith(".embedding"):
            out[name.removesuffix(".embedding") + ".weight"] = value
        else:
            out[name] = value
    return out
