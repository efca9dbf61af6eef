"""`duoserve generate --target HOST:PORT`: ask a running stack's gateway through the SDK.

Prompts go as a user chat message (the server applies the model's chat template) unless --raw, all
at once so the stack batches them; completions print in the order of the prompts. Imports the SDK
only (grpc, protobuf): no torch.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

from duoserve.cli_args import client_tls
from duoserve.client import Client
from duoserve.messages import Completion
from duoserve.errors import DuoserveError

MAX_CONCURRENT = 32     # requests in flight from one command


def request_kwargs(args: argparse.Namespace, prompt: str) -> dict:
    """generate()'s keyword arguments for one prompt of the command line."""
    given = {"prompt": prompt} if args.raw else {"messages": [{"role": "user", "content": prompt}]}
    return {**given, "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": list(args.stop) or None,
            "ignore_eos": args.ignore_eos, "presence_penalty": args.presence_penalty,
            "frequency_penalty": args.frequency_penalty, "repetition_penalty": args.repetition_penalty,
            "min_tokens": args.min_tokens}


def run_remote_generate(args: argparse.Namespace) -> int:
    try:
        with Client(args.target, tls=client_tls(args.tls_ca), api_key=args.api_key, server_name=args.server_name) \
                as client, \
                ThreadPoolExecutor(max_workers=min(MAX_CONCURRENT, len(args.prompts))) as pool:
            futures = [pool.submit(client.generate, **request_kwargs(args, p)) for p in args.prompts]
            outputs: list[Completion] = [f.result() for f in futures]
    except DuoserveError as e:
        print(f"duoserve: error: {args.target}: {e}", file=sys.stderr)
        return 1
    for prompt, out in zip(args.prompts, outputs):
        if len(outputs) > 1:
            print(f"### {prompt}")
        print(out.text)
    return 0
