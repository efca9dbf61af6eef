"""Host time per decode iteration at a fixed batch, as the decode worker reports it.

Issue 11's budget: < 2 ms outside the forward pass at decode batch 32. On a running stack, holds
`batch` greedy streams in decode (ignore_eos, long outputs, a 64-token prompt), waits until decode
runs all of them, then reads decode's WorkerReport from Redis once a second: `host_ms` (the median
of its last 64 iterations: Redis, scheduling, input tensors, publishing, metrics; the forward pass
and the sampler excluded) and the iterations done, for the wall time per iteration. Prints the
median of the readings per batch; run it on a quiet machine (the workers' own figure includes any
time the OS gives their core to something else).

    python -m bench.host_time [--name STACK] [--batches 1,32] [--seconds 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import redis

import duoserve
from duoserve import stack, targets
from services.common import stream_entries
from services.common.contracts import KeySpace, WorkerReport

PROMPT_TOKENS = 64
MAX_TOKENS = 3000


def _decode_report(client: redis.Redis, keys: KeySpace) -> WorkerReport:
    return stream_entries.read_report(client.hget(keys.worker_stats("decode"), stream_entries.FIELD))


def measure(target: str, client: redis.Redis, keys: KeySpace, batch: int, seconds: float) -> dict:
    """Hold `batch` streams in decode, read its reports for `seconds`; -> medians."""
    stop = threading.Event()

    def stream(i: int) -> None:
        with duoserve.Client(target, timeout=600) as sdk:
            chunks = sdk.stream(token_ids=[100 + (i + k) % 1000 for k in range(PROMPT_TOKENS)],
                                max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
            for _ in chunks:
                if stop.is_set():
                    break
            chunks.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(batch)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while _decode_report(client, keys).num_running < batch:
        if time.monotonic() > deadline:
            raise RuntimeError(f"decode never ran {batch} requests at once")
        time.sleep(0.2)
    time.sleep(3)                                   # the report's window: iterations at this batch only
    host, per_iteration = [], []
    last = _decode_report(client, keys)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        report = _decode_report(client, keys)
        host.append(report.host_ms)
        if report.iterations > last.iterations:
            per_iteration.append((report.updated_at - last.updated_at) * 1000 / (report.iterations - last.iterations))
        last = report
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return {"batch": batch, "host_ms": statistics.median(host),
            "iteration_ms": statistics.median(per_iteration) if per_iteration else float("nan")}


def main() -> None:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    targets.add_stack_args(p, env)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    state = stack.read_state(Path(args.state_dir).expanduser() / args.name / stack.STATE_FILE)
    if state is None:
        raise SystemExit(f"no stack {args.name!r}; start one with `duoserve up --name {args.name} --detach`")
    client = redis.Redis.from_url(state.redis_url)
    keys = KeySpace(state.key_prefix)
    print(f"{'batch':>6} {'host ms':>8} {'iteration ms':>13}")
    for batch in (int(b) for b in args.batches.split(",")):
        row = measure(state.gateway_target, client, keys, batch, args.seconds)
        print(f"{row['batch']:>6} {row['host_ms']:>8.2f} {row['iteration_ms']:>13.1f}", flush=True)
        time.sleep(2)


if __name__ == "__main__":
    main()
