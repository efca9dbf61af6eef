"""Engine micro-benchmark: prefill and decode throughput of duoserve's engine against `transformers`.

Same model, same dtype, same thread count, one run. Prefill: one prompt of N tokens, time to its
first token's logits. Decode: B prompts of `--decode-prompt-len` tokens prefilled, then the time of
`--decode-steps` iterations producing one token per request each (greedy, EOS ignored).
transformers runs its own model class with its own KV cache (DynamicCache), prefill by a forward
over the prompt and decode by the forward-per-token loop that `generate` runs, minus its logits
processors: the leanest use of transformers, so the ratio is not flattered.

    python -m bench.engine            or            duoserve bench engine
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from services.engine.llm_engine import DTYPES, EngineConfig, LLMEngine
from services.engine.loader import resolve_model_dir
from services.engine.sampling_params import SamplingParams

DECODE_PROMPT_LEN = 128


@dataclass(frozen=True, slots=True)
class Row:
    phase: str              # prefill | decode
    size: int               # prompt tokens (prefill) or batch size (decode)
    duoserve_tok_s: float
    transformers_tok_s: float

    @property
    def ratio(self) -> float:
        return self.duoserve_tok_s / self.transformers_tok_s


def _best_of(fn: Callable[[], float], repeats: int) -> float:
    """Median of `repeats` timings after one warm-up (both engines get the same treatment)."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def duoserve_prefill(engine: LLMEngine, n: int) -> float:
    def once() -> float:
        engine.add_request(_prompt(n, engine.model_config.vocab_size, n), SamplingParams(max_tokens=1, temperature=0))
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0
    return n / _best_of(once, 3)


def duoserve_decode(engine: LLMEngine, batch: int, steps: int) -> float:
    def once() -> float:
        params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(_prompt(DECODE_PROMPT_LEN, engine.model_config.vocab_size, i), params)
        engine.step()                                   # prefill every prompt (and sample token 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - t0
        assert not engine.has_unfinished()
        return elapsed
    return batch * steps / _best_of(once, 2)


def transformers_prefill(model, n: int, vocab: int) -> float:
    ids = torch.tensor([_prompt(n, vocab, n)])

    def once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0
    return n / _best_of(once, 3)


def transformers_decode(model, batch: int, steps: int, vocab: int) -> float:
    from transformers import DynamicCache
    ids = torch.tensor([_prompt(DECODE_PROMPT_LEN, vocab, i) for i in range(batch)])

    def once() -> float:
        with torch.inference_mode():
            cache = DynamicCache()
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(next_ids, past_key_values=out.past_key_values, use_cache=True)
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0
    return batch * steps / _best_of(once, 2)


def run(config: EngineConfig, prompt_lens: list[int], batch_sizes: list[int], steps: int) -> list[Row]:
    from transformers import AutoModelForCausalLM
    engine = LLMEngine.from_config(config)
    model_dir = resolve_model_dir(config.model, config.cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[config.dtype]).eval()
    vocab = engine.model_config.vocab_size
    rows = []
    for n in prompt_lens:
        rows.append(Row("prefill", n, duoserve_prefill(engine, n), transformers_prefill(hf, n, vocab)))
        print(_format(rows[-1]), file=sys.stderr, flush=True)
    for b in batch_sizes:
        rows.append(Row("decode", b, duoserve_decode(engine, b, steps), transformers_decode(hf, b, steps, vocab)))
        print(_format(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _format(row: Row) -> str:
    label = f"{row.size} tokens" if row.phase == "prefill" else f"batch {row.size}"
    return (f"| {row.phase:7} | {label:>11} | {row.duoserve_tok_s:10.1f} | {row.transformers_tok_s:12.1f} "
            f"| {row.ratio:5.2f}x |")


def table(rows: list[Row], threads: int) -> str:
    head = (f"engine benchmark: tokens/s, {threads} torch threads, decode over {DECODE_PROMPT_LEN}-token prompts\n"
            "| phase   |        size |   duoserve | transformers | ratio  |\n"
            "|---------|-------------|------------|--------------|--------|")
    return "\n".join([head, *(_format(r) for r in rows)])


def run_from_args(args: argparse.Namespace) -> int:
    config = EngineConfig(model=args.model, cache_dir=args.cache_dir, dtype=args.dtype, num_threads=args.threads,
                          kv_cache_memory_bytes=1 << 30, max_num_batched_tokens=4096, chunk_size=4096)
    prompt_lens = [int(x) for x in args.prompt_lens.split(",") if x]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    rows = run(config, prompt_lens, batch_sizes, args.decode_steps)
    print(table(rows, torch.get_num_threads()))
    if args.output:
        args.output.write_text(json.dumps(
            [asdict(r) | {"ratio": r.ratio} for r in rows] , indent=2))
    return 0


if __name__ == "__main__":
    from duoserve.cli import main
    sys.exit(main(["bench", "engine", *sys.argv[1:]]))
