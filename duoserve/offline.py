"""`duoserve generate` without --target: the engine in this process, prompts batched together."""
from __future__ import annotations

import argparse


def engine_config_from_args(args: argparse.Namespace):
    from services.engine.llm_engine import EngineConfig
    return EngineConfig(model=args.model, cache_dir=args.cache_dir, dtype=args.dtype, num_threads=args.threads)


def sampling_params_from_args(args: argparse.Namespace):
    from services.engine.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens)


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)     # validate before loading anything
    from services.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_config(engine_config_from_args(args))
    tok = engine.tokenizer
    prompts = [tok.encode(p) if args.raw else tok.apply_chat_template([{"role": "user", "content": p}])
               for p in args.prompts]
    outputs = engine.generate(prompts, params)
    for prompt, out in zip(args.prompts, outputs):
        if len(outputs) > 1:
            print(f"### {prompt}")
        print(out.text)
    return 0
