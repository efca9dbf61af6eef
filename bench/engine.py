"""Engine micro-benchmark: prefill and decode throughput of duoserve's engine against `transformers`.

Same model, same dtype, same thread count, same prompts, one process. Prefill: one prompt of N
tokens, time to its first token's logits. Decode: B prompts prefilled, then the time of
`--decode-steps` iterations producing one token per request each (greedy, EOS ignored).

transformers is measured two ways, both with its own model class and KV cache (DynamicCache):
  forward    a forward over the prompt, then the forward-per-token loop `generate` runs, minus its
             logits processors and bookkeeping: the leanest use of transformers, so the ratio is
             not flattered
  generate   `model.generate` (greedy, `min_new_tokens` so no row stops early): what users run.
             Prefill: the whole call with one new token. Decode: from the first token to the last
             (a stopping criterion that never stops takes the timestamps), so its prefill is excluded
The ragged row gives each of the B requests its own prompt length: transformers left-pads the
batch and masks the padding (both columns); duoserve's batch is ragged by construction.
Every repeat runs duoserve, forward and generate back to back, so load from other processes
lands on all three alike; each column is the median of its repeats.

    python -m bench.engine            or            duoserve bench engine
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from services.engine import cpu_ops
from services.engine.llm_engine import DTYPES, EngineConfig, LLMEngine
from services.engine.loader import resolve_model_dir
from services.engine.sampling_params import SamplingParams

DECODE_PROMPT_LEN = 128
RAGGED_PROMPT_LENS = (64, 192)       # the ragged row's prompt lengths: uniform in this range, mean ~128
REPEATS = 5                          # timed rounds per row; 3 let one burst of load from other processes decide a median


@dataclass(frozen=True, slots=True)
class Row:
    phase: str              # prefill | decode | decode ragged
    size: int               # prompt tokens (prefill) or batch size (decode)
    duoserve_tok_s: float
    transformers_tok_s: float       # lean forward loop
    generate_tok_s: float           # transformers `generate`

    @property
    def ratio(self) -> float:
        return self.duoserve_tok_s / self.transformers_tok_s

    @property
    def generate_ratio(self) -> float:
        return self.duoserve_tok_s / self.generate_tok_s


def interleaved_medians(fns: list[Callable[[], float]], repeats: int) -> list[float]:
    """Median seconds of each timing function: one warm-up each, then `repeats` rounds of all in turn."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            times.append(fn())
    return [statistics.median(times) for times in samples]


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def decode_prompts(batch: int, vocab: int, ragged: bool) -> list[list[int]]:
    if not ragged:
        return [_prompt(DECODE_PROMPT_LEN, vocab, i) for i in range(batch)]
    lens = torch.randint(RAGGED_PROMPT_LENS[0], RAGGED_PROMPT_LENS[1] + 1, (batch,),
                         generator=torch.Generator().manual_seed(batch))
    return [_prompt(int(n), vocab, i) for i, n in enumerate(lens)]


# ---------------------------------------------------------------- duoserve
def duoserve_prefill(engine: LLMEngine, prompt: list[int]) -> Callable[[], float]:
    def once() -> float:
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0
    return once


def duoserve_decode(engine: LLMEngine, prompts: list[list[int]], steps: int) -> Callable[[], float]:
    def once() -> float:
        params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
        for p in prompts:
            engine.add_request(p, params)
        started = 0
        while started < len(prompts):                   # prefill every prompt (and sample token 1)
            started += sum(1 for out in engine.step() if len(out.token_ids) == 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - t0
        assert not engine.has_unfinished()
        return elapsed
    return once


# ---------------------------------------------------------------- transformers
def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids, attention mask [B, longest]: what a transformers user feeds a ragged batch."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def transformers_prefill(model, prompt: list[int]) -> Callable[[], float]:
    ids = torch.tensor([prompt])

    def once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0
    return once


def transformers_decode(model, prompts: list[list[int]], steps: int) -> Callable[[], float]:
    """The forward loop. Equal lengths: no mask at all (leanest). Ragged: left padding, a growing
    mask and positions counted over real tokens, as `generate` does."""
    from transformers import DynamicCache
    ids, mask = _left_padded(prompts, model.config.pad_token_id or 0)
    ragged = not bool(mask.all())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def once() -> float:
        with torch.inference_mode():
            kwargs = {"attention_mask": mask, "position_ids": positions} if ragged else {}
            out = model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1, **kwargs)
            next_ids, pos = out.logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:]
            t0 = time.perf_counter()
            for _ in range(steps):
                if ragged:
                    pos = pos + 1
                    kwargs = {"attention_mask": torch.cat([kwargs["attention_mask"], torch.ones_like(pos)], dim=1),
                              "position_ids": pos}
                out = model(next_ids, past_key_values=out.past_key_values, use_cache=True, **kwargs)
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0
    return once


def transformers_generate(model, prompts: list[list[int]], new_tokens: int) -> Callable[[], float]:
    """`generate`, greedy. One new token: the whole call. More: first token to last, so the
    decode steps alone (the criterion runs after each token)."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    ids, mask = _left_padded(prompts, model.config.pad_token_id or 0)
    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def once() -> float:
        stamps.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 stopping_criteria=StoppingCriteriaList([Stamp()]))
        assert out.shape[1] == ids.shape[1] + new_tokens and len(stamps) == new_tokens
        return stamps[-1] - (t0 if new_tokens == 1 else stamps[0])
    return once


# ---------------------------------------------------------------- rows and report
def run(config: EngineConfig, prompt_lens: list[int], batch_sizes: list[int], steps: int,
        ragged_batch: int | None) -> list[Row]:
    from transformers import AutoModelForCausalLM
    engine = LLMEngine.from_config(config)
    model_dir = resolve_model_dir(config.model, config.cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[config.dtype]).eval()
    vocab = engine.model_config.vocab_size
    rows = []
    for n in prompt_lens:
        prompt = _prompt(n, vocab, n)
        times = interleaved_medians([duoserve_prefill(engine, prompt), transformers_prefill(hf, prompt),
                              transformers_generate(hf, [prompt], 1)], repeats=REPEATS)
        rows.append(Row("prefill", n, *(n / t for t in times)))
        print(_format(rows[-1]), file=sys.stderr, flush=True)
    decode_rows = [(b, False) for b in batch_sizes] + ([(ragged_batch, True)] if ragged_batch else [])
    for b, ragged in decode_rows:
        prompts = decode_prompts(b, vocab, ragged)
        times = interleaved_medians([duoserve_decode(engine, prompts, steps), transformers_decode(hf, prompts, steps),
                              transformers_generate(hf, prompts, steps + 1)], repeats=REPEATS)
        rows.append(Row("decode ragged" if ragged else "decode", b, *(b * steps / t for t in times)))
        print(_format(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _format(row: Row) -> str:
    label = f"{row.size} tokens" if row.phase == "prefill" else f"batch {row.size}"
    return (f"| {row.phase:13} | {label:>11} | {row.duoserve_tok_s:8.1f} | {row.transformers_tok_s:8.1f} "
            f"| {row.ratio:5.2f}x | {row.generate_tok_s:8.1f} | {row.generate_ratio:5.2f}x |")


def table(rows: list[Row], threads: int, dtype: str, kernels: str) -> str:
    lo, hi = RAGGED_PROMPT_LENS
    head = (f"engine benchmark: tokens/s, {dtype}, {threads} torch threads, duoserve on {kernels}, decode over "
            f"{DECODE_PROMPT_LEN}-token prompts (ragged: {lo}-{hi}, transformers left-pads)\n"
            "| phase         |        size | duoserve |  forward | ratio  | generate | ratio  |\n"
            "|---------------|-------------|----------|----------|--------|----------|--------|")
    return "\n".join([head, *(_format(r) for r in rows)])


def run_from_args(args: argparse.Namespace) -> int:
    config = EngineConfig(model=args.model, cache_dir=args.cache_dir, dtype=args.dtype, num_threads=args.threads,
                          kv_cache_memory_bytes=1 << 30, max_num_batched_tokens=4096, chunk_size=4096)
    prompt_lens = [int(x) for x in args.prompt_lens.split(",") if x]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    ragged_batch = getattr(args, "ragged_batch", None)
    if ragged_batch is None:            # by default the largest batch also runs ragged
        ragged_batch = max(batch_sizes, default=0)
    rows = run(config, prompt_lens, batch_sizes, args.decode_steps, ragged_batch)
    kernels = cpu_ops.describe(torch.device(config.device), DTYPES[args.dtype])
    print(table(rows, torch.get_num_threads(), args.dtype, kernels))
    if args.output:
        args.output.write_text(json.dumps(
            [asdict(r) | {"ratio": r.ratio, "generate_ratio": r.generate_ratio} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    from duoserve.cli import main
    sys.exit(main(["bench", "engine", *sys.argv[1:]]))
