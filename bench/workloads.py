"""`--dataset` and the arrival flags of `duoserve bench serve` / `compare` / `peer` / `validate-sim`
(parsed in duoserve/cli_bench.py) turned into a workload and its Arrival.

A workload is a list of RequestSpecs (azure-conv, random, prompt-file: open loop, each request at its
own send time) or of Conversations (multi-turn: each conversation starts at its send time, then sends
its turns one after another: bench.multiturn).
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from bench.conversations import Conversation, MultiTurnParams, describe_lengths, synthetic_conversations
from bench.datasets import (DEFAULT_AZURE_CONV, Arrival, RequestSpec, load_azure_conv, load_prompt_file,
                            random_requests)

Workload = Sequence[RequestSpec] | Sequence[Conversation]    # what one benchmark run sends


def multi_turn_params(args: argparse.Namespace) -> MultiTurnParams:
    return MultiTurnParams(num_conversations=args.conversations, turns=args.turns, user_len=args.user_len,
                           answer_len=args.answer_len, system_len=args.system_len, think_s=args.think_time,
                           range_ratio=args.range_ratio, seed=args.seed)


def workload_from_args(args: argparse.Namespace) -> tuple[list[RequestSpec] | list[Conversation], str]:
    """The requests (or conversations) of --dataset, and the workload in words."""
    if args.dataset == "multi-turn":
        params = multi_turn_params(args)
        convs = synthetic_conversations(params)
        return convs, f"{params.describe()} ({describe_lengths(convs)})"
    if args.dataset == "azure-conv":
        path = args.dataset_path or DEFAULT_AZURE_CONV
        specs = load_azure_conv(path, max_requests=args.num_requests, start_offset_s=args.start_offset,
                                length_scale=args.length_scale, rate_scale=args.rate_scale,
                                max_total_len=args.max_total_len)
        words = (f"azure-conv {path.name}: {len(specs)} requests from {args.start_offset:g} s, lengths x "
                 f"{args.length_scale:g}")
    elif args.dataset == "random":
        specs = random_requests(args.num_requests, args.input_len, args.output_len, args.range_ratio,
                                seed=args.seed)
        words = (f"random: {len(specs)} requests, input {args.input_len}, output {args.output_len}, "
                 f"range ratio {args.range_ratio:g}")
    else:
        if args.dataset_path is None:
            raise ValueError("--dataset prompt-file needs --dataset-path FILE (one prompt per line)")
        specs = load_prompt_file(args.dataset_path, args.output_len, max_requests=args.num_requests)
        return specs, f"prompt file {args.dataset_path}: {len(specs)} prompts, output {args.output_len} tokens"
    mean_in = sum(s.prompt_len for s in specs) / len(specs)
    mean_out = sum(s.output_len for s in specs) / len(specs)
    return specs, f"{words} (mean {mean_in:.0f} in / {mean_out:.0f} out tokens)"


def arrival_from_args(args: argparse.Namespace, rate: float | None = None) -> Arrival:
    """The Arrival at `rate` (default --request-rate): requests/s, or for multi-turn conversations/s."""
    multi_turn = args.dataset == "multi-turn"
    kind = args.arrival or ("trace" if args.dataset == "azure-conv" else "poisson")
    if multi_turn and kind == "trace":
        raise ValueError("--dataset multi-turn has no recorded arrivals: use --arrival poisson or gamma")
    rate = rate if rate is not None else args.request_rate
    if kind != "trace" and rate is None:
        rate = math.inf
    return Arrival(kind, rate, args.burstiness, args.seed, per="conversation" if multi_turn else "request")
