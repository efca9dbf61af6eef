"""A flood of large prompts beside one client's stream: the gateway must keep that stream going.

One client streams a normal request (a 64-token prompt, greedy, --max-tokens tokens) while other
clients flood the same gateway:
  rejected  1 MB prompts (--big-chars), far too long for the context, every other one over the HTTP
            API when the stack has it, at --rejected-rate a second: each must be refused at once
  valid     large prompts that fit (--valid-chars of English-like words, max_tokens 1), sent back to
            back by --valid-clients clients: each is tokenized by the gateway, then prefilled
The streaming client's inter-token latency (each chunk's gap spread over its tokens; p50 and p99)
and time per output token (TPOT) are measured unloaded, under each flood alone and under both; the
worse of the p50's and the TPOT's loaded/unloaded ratios is the figure (issue 13's target: within
1.5x). Before prompts were tokenized off the gateway's event loop, 91
rejected 1 MB prompts stretched such a stream from 6.9 s to 45.6 s.

    python -m bench.flood [--name STACK]      a running stack (`duoserve up --detach`)
    python -m bench.flood --start             its own split stack, stopped at the end
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import duoserve
from duoserve import errors, stack
from duoserve.cli_args import default_cache_dir

WORDS = ("the of and to in is was for that on as with by he at from his an were are which this be or "
         "has had first one their its new after but who not they have her she two been other when there "
         "all during into school time may years more most only over city some world would where later up "
         "such used many can state about national out known university united then made season team film "
         "game series north history music between government around early being part people south place "
         "system century number like under well since american played three both war family club called "
         "area city river village several work members while group also following each including station").split()


def english(num_chars: int, seed: int) -> str:
    """Text of common English words, ~4 to 5 characters per token."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < num_chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:num_chars]


@dataclass
class Outcomes:
    """What the flood's requests got, by status."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


def _grpc_outcome(call) -> str:        # noqa: ANN001 - a thunk running one SDK call
    try:
        call()
        return "OK"
    except errors.DuoserveError as e:
        return e.code


def _http_outcome(url: str, body: bytes) -> str:
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return f"http {response.status}"
    except urllib.error.HTTPError as e:
        return f"http {e.code}"


class Flood:
    """The flooding clients, as threads, until `stop()`."""

    def __init__(self, target: str, http_url: str | None, rejected_rate: float, valid_clients: int,
                 big_chars: int, valid_chars: int) -> None:
        self.stopping = threading.Event()
        self.rejected, self.valid = Outcomes(), Outcomes()
        big = english(big_chars, seed=1)
        self.threads = []
        if rejected_rate > 0:
            self.threads.append(threading.Thread(target=self._reject_loop, args=(target, http_url, big, rejected_rate)))
        for i in range(valid_clients):
            self.threads.append(threading.Thread(target=self._valid_loop, args=(target, valid_chars, i)))

    def start(self) -> "Flood":
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def _reject_loop(self, target: str, http_url: str | None, big: str, rate: float) -> None:
        """Open loop at `rate` a second; a slow refusal delays the next (the rate is a ceiling)."""
        body = json.dumps({"prompt": big, "max_tokens": 1}).encode()
        with duoserve.Client(target, timeout=60) as client:
            sent, started = 0, time.monotonic()
            while not self.stopping.is_set():
                if http_url and sent % 2:
                    self.rejected.add(_http_outcome(f"{http_url}/v1/completions", body))
                else:
                    self.rejected.add(_grpc_outcome(lambda: client.generate(prompt=big, max_tokens=1)))
                sent += 1
                self.stopping.wait(max(0.0, started + sent / rate - time.monotonic()))

    def _valid_loop(self, target: str, valid_chars: int, index: int) -> None:
        with duoserve.Client(target, timeout=300) as client:
            n = 0
            while not self.stopping.is_set():
                prompt = english(valid_chars, seed=1000 * index + n)
                self.valid.add(_grpc_outcome(lambda: client.generate(prompt=prompt, max_tokens=1)))
                n += 1


@dataclass
class StreamTimes:
    """What the streaming client saw over one phase's requests."""

    gaps: list[float] = field(default_factory=list)        # per token: its chunk's gap over the chunk's tokens
    tpots: list[float] = field(default_factory=list)       # per request: (last token - first token) / (tokens - 1)
    seconds: list[float] = field(default_factory=list)     # per request: end to end

    def add(self, target: str, max_tokens: int) -> None:
        prompt = [1000 + 7 * i for i in range(64)]
        with duoserve.Client(target, timeout=600) as client:
            started = time.perf_counter()
            first = last = None
            for chunk in client.stream(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
                if not chunk.token_ids:
                    continue
                now = time.perf_counter()
                if last is not None:
                    self.gaps += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                first, last = first or now, now
            self.seconds.append(time.perf_counter() - started)
            self.tpots.append((last - first) / (max_tokens - 1))

    def summary(self) -> dict[str, float]:
        """ms: inter-token p50 and p99, the median TPOT; s: the median stream."""
        q = statistics.quantiles(self.gaps, n=100)
        return {"p50": statistics.median(self.gaps) * 1000, "p99": q[98] * 1000,
                "tpot": statistics.median(self.tpots) * 1000, "stream": statistics.median(self.seconds)}


def run(target: str, http_url: str | None, args: argparse.Namespace) -> float:
    """Every phase; returns the worst loaded/unloaded ratio of the inter-token p50 and the TPOT.

    Both, because a stalled gateway delivers the tokens that piled up as a burst of chunks microseconds
    apart: the p50 of the gaps can then even drop while the stream takes minutes; the TPOT cannot."""
    StreamTimes().add(target, 8)                             # warm the path
    phases = {"unloaded": (0.0, 0), "rejected": (args.rejected_rate, 0), "valid": (0.0, args.valid_clients),
              "both": (args.rejected_rate, args.valid_clients)}
    base: dict[str, float] = {}
    worst = 0.0
    print(f"stream: 64-token prompt, {args.max_tokens} tokens, greedy, {args.streams} streams per phase; "
          f"flood: {args.big_chars}-character prompts at {args.rejected_rate:g}/s "
          f"({'gRPC and HTTP' if http_url else 'gRPC'}), {args.valid_clients} client(s) of "
          f"{args.valid_chars}-character prompts back to back")
    for name, (rate, clients) in phases.items():
        flood = Flood(target, http_url, rate, clients, args.big_chars, args.valid_chars).start()
        times = StreamTimes()
        try:
            time.sleep(args.warmup_s if rate or clients else 0)
            for _ in range(args.streams):
                times.add(target, args.max_tokens)
        finally:
            flood.stop()
        got = times.summary()
        base = base or got
        ratio = max(got["p50"] / base["p50"], got["tpot"] / base["tpot"])
        worst = max(worst, ratio)
        print(f"{name:9s} inter-token p50 {got['p50']:6.1f} ms  p99 {got['p99']:7.1f} ms  TPOT {got['tpot']:6.1f} ms"
              f"  stream {got['stream']:5.1f} s  x{ratio:4.2f}  rejected {dict(flood.rejected.counts)}  "
              f"valid {dict(flood.valid.counts)}")
    print(f"worst loaded / unloaded (inter-token p50 or TPOT): {worst:.2f}x (target <= 1.5x)")
    return worst


def _start_stack(state_dir: Path, cache_dir: Path) -> stack.StackConfig:
    from duoserve.stack import Mode, StackConfig
    config = StackConfig(state_dir=state_dir, cache_dir=cache_dir, name="flood", mode=Mode.SPLIT, startup_timeout_s=600)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    return config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="default", help="a running stack's name (without --start)")
    p.add_argument("--state-dir", type=Path, default=Path.home() / ".cache" / "duoserve" / "stack")
    p.add_argument("--start", action="store_true", help="start a split stack of its own, stop it at the end")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="converted models (with --start)")
    p.add_argument("--streams", type=int, default=3, help="streamed requests per phase")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rejected-rate", type=float, default=4.0, help="rejected prompts per second")
    p.add_argument("--big-chars", type=int, default=1_000_000)
    p.add_argument("--valid-clients", type=int, default=2)
    p.add_argument("--valid-chars", type=int, default=12_000)
    p.add_argument("--warmup-s", type=float, default=2.0, help="flood time before the stream starts")
    args = p.parse_args()
    if args.start:
        with tempfile.TemporaryDirectory(prefix="duoserve-flood-") as tmp:
            config = _start_stack(Path(tmp), args.cache_dir)
            try:
                state = stack.read_state(config.state_path)
                run(state.gateway_target, state.http_url, args)
            finally:
                stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
        return
    state = stack.read_state(args.state_dir / args.name / "state.json")
    if state is None:
        raise SystemExit(f"no stack {args.name!r}: start one with `duoserve up --detach`, or pass --start")
    run(state.gateway_target, state.http_url, args)


if __name__ == "__main__":
    main()
