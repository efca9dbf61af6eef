"""What the stack's plumbing costs: the gateway's added latency and the prefill -> decode hand-off.

Gateway: the same requests (token ids, greedy, fixed length, one at a time) sent (a) through the
gateway with the SDK and (b) straight into the prefill queue, reading the deliveries from Redis as
the gateway would; the difference of the end-to-end medians is what the gateway adds (gRPC,
validation, detokenization, stop strings, dispatch). Hand-off: decode's
`duoserve:handoff_latency_seconds` histogram (prefill publishes the hand-off -> decode's first
iteration of that request), read from its metrics endpoint before and after.

Per-token latency (issue 11's target: within 1.15x of the engine): a lone request's TPOT through the
gateway ((E2E - TTFT) / (tokens - 1), streamed), against the in-process engine's decode step at
batch 1 on as many torch threads as decode has cores, over the same prompt (`--engine-baseline`;
run it on a quiet stack: the engine shares the machine with the idle workers).

    python -m bench.stack_latency [--name STACK] [--requests 20] [--max-tokens 16] [--engine-baseline]
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
import urllib.request
import uuid
from pathlib import Path

import redis

import duoserve
from duoserve import stack
from services.common import stream_entries
from services.common.contracts import KeySpace, QueuedRequest
from services.engine.sampling_params import SamplingParams


def _histogram(metrics_port: int, name: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    total = float(re.search(rf"^{re.escape(name)}_sum\S* (\S+)$", text, re.M).group(1))
    count = float(re.search(rf"^{re.escape(name)}_count\S* (\S+)$", text, re.M).group(1))
    return total, count


def through_gateway(target: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """-> (end to end, time per output token after the first) in seconds, streamed."""
    with duoserve.Client(target, timeout=300) as client:
        t0 = time.perf_counter()
        first, received = None, 0
        for chunk in client.stream(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
            received += len(chunk.token_ids)
        elapsed = time.perf_counter() - t0
    assert received == max_tokens and first is not None
    return elapsed, (t0 + elapsed - first) / max(1, received - 1)


def engine_decode_step(prompt: list[int], threads: int, model: str | None, dtype: str, steps: int) -> float:
    """Median seconds of one in-process decode step at batch 1 on `threads` torch threads."""
    import torch
    from bench.engine import duoserve_decode, interleaved_medians
    from services.engine.llm_engine import EngineConfig, LLMEngine
    torch.set_num_threads(threads)
    engine = LLMEngine.from_config(EngineConfig(model=model, dtype=dtype, num_threads=threads))
    (seconds,) = interleaved_medians([duoserve_decode(engine, [prompt], steps)], repeats=5)
    return seconds / steps


def straight_to_redis(client: redis.Redis, keys: KeySpace, prompt: list[int], max_tokens: int) -> float:
    reply = keys.reply(f"bench-{uuid.uuid4().hex[:8]}")
    request_id = f"bench-{uuid.uuid4().hex}"
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    stream_entries.add(client, stream_entries.queued(keys, QueuedRequest(request_id, tuple(prompt), params, reply,
                                                                          time.time())))
    cursor, received = "0-0", 0
    while True:
        for _stream, entries in client.xread({reply: cursor}, block=30_000) or ():
            for entry_id, fields in entries:
                cursor = entry_id
                (delivery,) = stream_entries.read_deliveries(fields)    # one request: one delivery an entry
                received += len(delivery.token_ids)
                if delivery.finish_reason:
                    client.delete(reply)
                    assert received == max_tokens
                    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="default")
    p.add_argument("--state-dir", type=Path, default=Path.home() / ".cache" / "duoserve" / "stack")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--engine-baseline", action="store_true",
                   help="also time the in-process engine's decode step at batch 1 on decode's cores")
    p.add_argument("--model", default=None, help="the stack's model, for --engine-baseline (default model)")
    p.add_argument("--dtype", default="float32", help="the stack's dtype, for --engine-baseline")
    args = p.parse_args()
    state = stack.read_state(args.state_dir / args.name / "state.json")
    if state is None:
        raise SystemExit(f"no stack {args.name!r}: start one with `duoserve up --detach`")
    client, keys = redis.Redis.from_url(state.redis_url), KeySpace(state.key_prefix)
    decode = next(proc for proc in state.processes if proc.name == "decode")
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    through_gateway(state.gateway_target, prompt, args.max_tokens)          # warm both paths
    straight_to_redis(client, keys, prompt, args.max_tokens)
    before = _histogram(decode.metrics_port, "duoserve:handoff_latency_seconds")
    gateway, direct, per_token = [], [], []
    for _ in range(args.requests):                    # interleaved, so drift hits both alike
        e2e, tpot = through_gateway(state.gateway_target, prompt, args.max_tokens)
        gateway.append(e2e)
        per_token.append(tpot)
        direct.append(straight_to_redis(client, keys, prompt, args.max_tokens))
    after = _histogram(decode.metrics_port, "duoserve:handoff_latency_seconds")
    handoff_ms = (after[0] - before[0]) / max(1.0, after[1] - before[1]) * 1000
    g, d = statistics.median(gateway) * 1000, statistics.median(direct) * 1000
    print(f"{args.requests} requests of {args.prompt_tokens} prompt + {args.max_tokens} output tokens, one at a time")
    print(f"end to end through the gateway: median {g:.1f} ms; straight into Redis: median {d:.1f} ms")
    print(f"gateway added latency per request: {g - d:.1f} ms (median difference)")
    print(f"hand-off latency (prefill published -> first decode iteration): mean {handoff_ms:.1f} ms "
          f"over {after[1] - before[1]:.0f} requests")
    tpot_ms = statistics.median(per_token) * 1000
    print(f"per output token through the stack (lone request, streamed): median {tpot_ms:.1f} ms")
    if args.engine_baseline:
        threads = len(_decode_cores(decode.argv))
        step_ms = engine_decode_step(prompt, threads, args.model, args.dtype, args.max_tokens) * 1000
        print(f"engine decode step at batch 1 on {threads} thread(s): median {step_ms:.1f} ms; "
              f"stack / engine = {tpot_ms / step_ms:.2f}x (target <= 1.15x)")


def _decode_cores(argv: tuple[str, ...]) -> list[str]:
    """decode's --cpus from its command line (its initial share)."""
    args = list(argv)
    return args[args.index("--cpus") + 1].split(",") if "--cpus" in args else ["0"]


if __name__ == "__main__":
    main()
