"""The ``jlora`` console script: ``demo``, ``bench``, ``inspect``, ``convert``.

``demo`` is the main job on an embedded default: a small random-weight Llama, several synthetic
PEFT adapters written to a temp dir in PEFT's file layout, a mixed batch served by the engine.
Imports jlora modules only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

import jlora
from jlora.checkpoint import META_ITEM, is_adapter_checkpoint, restore_adapter
from jlora.peft import PEFTConfig
from jlora.weights import PackedLoRALayerWeights

# inspect and convert read the files, not what a server allows: any rank, and a LoRA bias
# (PEFT lora_bias=True: for jlora.merge_adapter; slot banks do not serve it) is kept.
FILE_LIMITS = jlora.LoRAConfig(max_lora_rank=sys.maxsize, bias_enabled=True)


def adapter_summary(path: str | os.PathLike) -> dict:
    """Validates and loads the adapter at ``path`` (a PEFT directory or a jlora checkpoint);
    returns what ``inspect`` prints. A checkpoint stores scalings, not PEFT's alpha."""
    if _is_checkpoint_dir(path):
        model, alpha, rslora = restore_adapter(path), "-", "-"
    else:
        model = jlora.load_adapter(path, config=FILE_LIMITS)
        peft = PEFTConfig.from_dir(path)
        alpha, rslora = peft.lora_alpha, peft.use_rslora
    layers = _named_layers(model)
    # 4 significant digits: a small scaling (alpha 0.001, r 128) is not 0.
    scalings = sorted({float(f"{w.scaling:.4g}") for _, w in layers})
    suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    return {
        "name": model.name,
        "rank": model.rank,
        "alpha": alpha,
        "scaling": "/".join(f"{s:g}" for s in scalings),
        "targets": ",".join(suffixes),
        "modules": len(model.loras),
        "params": model.num_parameters,
        "bytes": model.num_bytes,
        "dtype": "/".join(sorted({str(w.lora_a.dtype) for _, w in layers})) or "-",
        "rslora": rslora,
        "lora_bias": any(w.bias is not None for _, w in layers),
    }


def _is_checkpoint_dir(path) -> bool:
    # A jlora_adapter/ item without its metadata is a broken checkpoint: restore_adapter says so.
    return is_adapter_checkpoint(path) or os.path.isdir(os.path.join(path, META_ITEM))


def _named_layers(model) -> list[tuple[str, jlora.LoRALayerWeights]]:
    # A packed module (a fused qkv_proj) counts as the PEFT modules of its slices.
    return [
        (name, w)
        for key, weights in model.loras.items()
        for name, w in (
            [(s.module_name or key, s) for s in weights.slices if s is not None]
            if isinstance(weights, PackedLoRALayerWeights)
            else [(key, weights)]
        )
    ]


def print_table(rows: list[dict], out=None) -> None:
    if not rows:
        return
    out = out or sys.stdout
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols), file=out)
    print("  ".join("-" * width[c] for c in cols), file=out)
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols), file=out)


def cmd_inspect(args) -> int:
    try:
        print_table([adapter_summary(args.path)])
    except (jlora.LoRAError, OSError) as e:  # OSError: a file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class Progress:
    """A one-line progress bar on stderr: ``label [#####.....] 12/40``."""

    def __init__(self, total: int, label: str, width: int = 30, out=None):
        self.total, self.label, self.width, self.done = max(total, 1), label, width, 0
        self.out = out or sys.stderr

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        # Redraw in place on a terminal; elsewhere (logs, CI) print the finished bar only.
        if self.done < self.total and not self.out.isatty():
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if self.done == self.total else ""
        print(
            f"\r{self.label} [{bar}] {self.done}/{self.total}", end=end, file=self.out, flush=True
        )


def cmd_demo(args) -> int:
    from jlora.engine import Engine
    from jlora.models.llama import LlamaConfig
    from jlora.sampling import SamplingParams
    from jlora.synthetic import llama_module_shapes, random_llama, write_peft_adapter

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    # Room for the largest prompt bucket (64) plus the new tokens, within the model's positions.
    most = config.max_position_embeddings - 64
    if args.max_tokens > most:
        print(
            f"error: --max-tokens {args.max_tokens}: at most {most} (the demo model's "
            f"{config.max_position_embeddings} positions less a 64-token prompt bucket)",
            file=sys.stderr,
        )
        return 2
    model = random_llama(config, seed=0)
    rng = np.random.default_rng(0)
    specs = [  # name, rank, alpha, projections
        ("sql", 8, 16, ("q_proj", "v_proj")),
        ("chat", 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("code", 16, 16, ("gate_proj", "up_proj", "down_proj")),
        ("math", 4, 8, jlora.synthetic.LLAMA_PROJECTIONS),
        ("poems", 8, 8, jlora.synthetic.LLAMA_PROJECTIONS),
        ("legal", 16, 32, ("q_proj", "o_proj", "down_proj")),
    ]
    with tempfile.TemporaryDirectory(prefix="jlora-demo-") as root:
        requests = []
        for i, (name, r, alpha, projections) in enumerate(specs):
            path = write_peft_adapter(
                os.path.join(root, name),
                llama_module_shapes(config, projections),
                r=r,
                alpha=alpha,
                seed=i,
            )
            requests.append(jlora.LoRARequest(lora_name=name, lora_int_id=i + 1, lora_path=path))
        print(f"Wrote {len(specs)} synthetic PEFT adapters under {root} (deleted at exit):\n")
        print_table([adapter_summary(r.path) for r in requests])

        # 4 device slots for 6 adapters: the engine swaps adapters as requests come and go.
        # Room for the largest prompt bucket (64: prompts are 8-39 tokens) plus the new tokens.
        engine = Engine(
            model,
            jlora.LoRAConfig(max_loras=4, max_lora_rank=16),
            max_batch=8,
            max_seq_len=64 + args.max_tokens,
        )
        picks = [*requests, None, *requests[:3], None, requests[4]]
        prompts = [
            rng.integers(0, config.vocab_size, int(rng.integers(8, 40))).tolist() for _ in picks
        ]
        params = SamplingParams(max_tokens=args.max_tokens)
        bar = Progress(len(picks) * args.max_tokens, "generating")
        outs = engine.generate(prompts, picks, params, on_token=lambda i, t: bar.advance())
        first_s = engine.stats.wall_s  # compiles the programs this run needs, as it goes
        engine.generate(prompts, picks, params)  # the same run again, compiled: what is timed
        s = engine.stats
        base = engine.generate(prompts, [None] * len(picks), params)
    print(
        f"\n{len(picks)} requests, {engine.config.max_loras} slots, max_batch "
        f"{engine.max_batch}; first tokens of each generation:\n"
    )
    rows = [
        {
            "#": o.index,
            "adapter": o.adapter or "(base)",
            "prompt": len(o.prompt),
            "tokens": " ".join(map(str, o.tokens[:10])),
            "vs base": "same" if o.tokens == b.tokens else "differs",
        }
        for o, b in zip(outs, base, strict=True)
    ]
    print_table(rows)
    print(
        f"\nthroughput: {s.tokens_per_s:,.0f} tokens/s ({s.prompt_tokens} prompt + "
        f"{s.generated_tokens} generated tokens in {s.wall_s:.2f} s; {s.prefill_calls} prefill "
        f"calls, {s.decode_steps} decode steps); the first run, compiling: {first_s:.1f} s"
    )
    return 0


def cmd_bench(args) -> int:
    from jlora import bench

    # Checked before the run, which takes minutes: fail now rather than after it.
    needed = [m for m in ("torch", "transformers", "peft") if args.compare_peft]
    needed += ["matplotlib"] if args.plot is not None else []
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"error: {', '.join(missing)} not installed (pip install {' '.join(missing)})",
            file=sys.stderr,
        )
        return 2
    if args.plot is not None and args.no_skewed:
        print("error: --plot draws the skewed workload; drop --no-skewed", file=sys.stderr)
        return 2
    if args.plot is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        print(f"error: --plot {args.plot}: no such directory", file=sys.stderr)
        return 2
    if args.plot is not None and (why := _unplottable(args.plot)):  # before the run, not after it
        print(f"error: --plot {args.plot}: {why}", file=sys.stderr)
        return 2
    cfg = bench.BenchConfig.quick() if args.quick else bench.BenchConfig()
    steps = (
        2
        + args.compare_peft
        + (0 if args.no_skewed else 1 + len(cfg.skew_alphas) * len(cfg.skew_adapters))
    )
    bar = Progress(steps, "bench")
    label = {"": None}

    def progress(msg):
        if label[""] is not None:
            bar.advance()
        label[""] = msg
        bar.label = f"bench: {msg:<40.40}"
        bar.advance(0)

    results = bench.run(
        cfg, compare_peft=args.compare_peft, skewed=not args.no_skewed, progress=progress
    )
    bar.advance()
    if args.json:
        print(json.dumps(results))
    else:
        print_bench(results)
    if args.plot is not None:
        try:
            plot_bench(results, args.plot)
        except (OSError, RuntimeError, ValueError) as e:  # what _unplottable cannot foresee
            print(f"error: --plot {args.plot}: {e}", file=sys.stderr)
            return 2
    return 0


def print_bench(r: dict) -> None:
    rows = [
        {
            "workload": k,
            "tokens/s": f"{r[k + '_tok_s']:,.1f}",
            "vs jlora base": f"{r[k + '_tok_s'] / r['base_tok_s']:.2f}x",
        }
        for k in ("base", "one_adapter", "distinct")
    ]
    if r.get("peft_distinct_tok_s"):
        rows += [
            {
                "workload": f"HF+PEFT {k}",
                "tokens/s": f"{r['peft_' + k + '_tok_s']:,.1f}",
                "vs jlora base": f"{r['peft_' + k + '_tok_s'] / r['base_tok_s']:.2f}x",
            }
            for k in ("base", "one_adapter", "distinct")
        ]
    print_table(rows)
    print(f"compile (excluded above): {r['compile_s']:.1f} s")
    if r.get("peft_distinct_tok_s"):
        print(f"jlora distinct / HF+PEFT distinct: {r['distinct_over_peft']:.2f}x")
    for alpha, row in r.get("skewed", {}).items():
        cells = ", ".join(
            f"{n} adapters: {v['tok_s']:,.1f} tok/s" for n, v in row.items() if n != "drop"
        )
        print(f"skewed alpha={alpha}: {cells}; drop {100 * row['drop']:.1f}%")


def _unplottable(path: str) -> str:
    """Why matplotlib would not write ``path`` as asked ("" when it would)."""
    from matplotlib.backend_bases import FigureCanvasBase

    if not path:
        return "is empty; name the image file"
    if os.path.isdir(path):
        return "is a directory; name the image file"
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    # pgf needs a TeX install, which matplotlib only finds missing after the run.
    formats = sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})
    if ext not in formats:
        return f"the name must end in an image format matplotlib writes ({', '.join(formats)})"
    return ""


def plot_bench(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for alpha, row in r.get("skewed", {}).items():
        ns = [int(n) for n in row if n != "drop"]
        ax.plot(ns, [row[str(n)]["tok_s"] for n in ns], marker="o", label=f"skewed, alpha={alpha}")
    ax.axhline(r["base_tok_s"], color="k", linestyle="--", label="base model")
    ax.axhline(r["distinct_tok_s"], color="C3", linestyle=":", label="distinct adapters, all slots")
    ax.set_xscale("log")
    ax.set_xlabel("number of adapters")
    ax.set_ylabel("tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_convert(args) -> int:
    from jlora.checkpoint import save_adapter

    if _is_checkpoint_dir(args.path):
        print(
            f"error: {args.path} is already a jlora checkpoint; convert takes a PEFT adapter "
            "directory (jlora inspect checks a checkpoint)",
            file=sys.stderr,
        )
        return 2
    if os.path.lexists(args.out) and not args.overwrite:
        hint = (
            "pass --overwrite to replace it"
            if is_adapter_checkpoint(args.out)
            else "it is not a jlora checkpoint (only those are replaced): choose a new path"
        )
        print(f"error: {args.out}: already exists; {hint}", file=sys.stderr)
        return 2
    try:
        model = jlora.load_adapter(args.path, config=FILE_LIMITS)
        out = save_adapter(model, args.out, overwrite=args.overwrite)
    except (jlora.LoRAError, OSError) as e:  # OSError: an output path that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.path} -> {out} ({model.num_parameters:,} parameters)")
    if any(w.bias is not None for _, w in _named_layers(model)):
        print("note: it carries a LoRA bias: jlora.merge_adapter takes it; slots do not serve it")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jlora", description=jlora.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="serve a mixed batch with a small model and adapters")
    demo.add_argument(
        "--max-tokens", type=_positive_int, default=24, help="new tokens per request (default 24)"
    )
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="end-to-end serving benchmark")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--plot", metavar="FILE.png", help="throughput vs number of adapters")
    bench.add_argument(
        "--compare-peft",
        action="store_true",
        help="also time HF transformers + PEFT (needs torch, transformers, peft)",
    )
    bench.add_argument("--no-skewed", action="store_true", help="skip the skewed workload")
    bench.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    bench.set_defaults(func=cmd_bench)
    convert = sub.add_parser("convert", help="PEFT adapter -> Orbax checkpoint")
    convert.add_argument("path")
    convert.add_argument("out")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace an existing jlora checkpoint at OUT"
    )
    convert.set_defaults(func=cmd_convert)
    inspect = sub.add_parser(
        "inspect", help="validate a PEFT adapter (or jlora checkpoint) and print its summary"
    )
    inspect.add_argument("path")
    inspect.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
