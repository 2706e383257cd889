"""The ``jlora`` console script: ``demo``, ``inspect``. Imports the public jlora API only."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jlora
from jlora.peft import PEFTConfig

REPO_FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "adapters"


def adapter_summary(path: str | os.PathLike) -> dict:
    """Validates and loads the adapter at ``path``; returns what ``inspect`` prints."""
    model = jlora.load_adapter(path)
    peft = PEFTConfig.from_dir(path)
    scalings = sorted({round(w.scaling, 4) for w in model.loras.values()})
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in model.loras})
    return {
        "name": model.name,
        "rank": model.rank,
        "alpha": peft.lora_alpha,
        "scaling": "/".join(f"{s:g}" for s in scalings),
        "targets": ",".join(suffixes),
        "modules": len(model.loras),
        "params": model.num_parameters,
        "bytes": model.num_bytes,
        "dtype": str(next(iter(model.loras.values())).lora_a.dtype),
        "rslora": peft.use_rslora,
    }


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
    except jlora.LoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args) -> int:
    root = pathlib.Path(args.adapters)
    dirs = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not dirs:
        print(f"error: no PEFT adapters under {root}", file=sys.stderr)
        return 2
    print(f"PEFT adapters under {root} (written by HF PEFT, loaded and converted by jlora):\n")
    print_table([adapter_summary(d) for d in dirs])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jlora", description=jlora.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the bundled example adapters")
    demo.add_argument("--adapters", default=str(REPO_FIXTURES), help="directory of adapters")
    demo.set_defaults(func=cmd_demo)
    inspect = sub.add_parser("inspect", help="validate a PEFT adapter and print its summary")
    inspect.add_argument("path")
    inspect.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
