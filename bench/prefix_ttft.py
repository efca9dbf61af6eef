"""Time to first token of one long prompt sent twice to the split stack, with prefix caching and
without: issue 15's figure (a 1,483-token prompt, before prefix caching: the second TTFT 4.6 s
against 6.4 s for the first).

For each setting a split stack of its own is started with `duoserve up`'s defaults (prefill and
decode one core each on two, the orchestrator on), its own Redis: nothing is cached from the other
setting. Each round then sends one prompt, greedy, and once it has finished sends it again.
A round's prompt is `--prompt-tokens` token ids of this repository's docs, tokenized by the stack,
cut at an offset of its own, so that no round starts on blocks an earlier one left cached. TTFT is
the client's: stream opened to first token (the gateway's own `usage.ttft_ms` is printed beside it);
`cached` is the second send's `usage.cached_tokens`. A short request first warms each stack up (its
first forward passes are slower), unless `--no-warm-up`.

    python -m bench.prefix_ttft [--prompt-tokens 1483] [--rounds 3] [--max-tokens 8]
                                [--settings cached,uncached] [--no-warm-up] [--no-orchestrator]

Run it on a quiet machine (under `flock /tmp/duoserve-stack.lock` where other stacks run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import duoserve
from duoserve import stack
from duoserve.cli_args import default_cache_dir
from duoserve.stack import Mode, StackConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
SETTINGS = {"cached": True, "uncached": False}     # name -> prefix_caching


@dataclass(frozen=True, slots=True)
class Send:
    ttft_s: float              # the client's: stream opened to the first token
    gateway_ttft_ms: float     # usage.ttft_ms: arrival at the gateway to the first token sent
    cached_tokens: int         # usage.cached_tokens


def send(client: duoserve.Client, prompt: list[int], max_tokens: int) -> Send:
    started, first, usage = time.perf_counter(), None, None
    for chunk in client.stream(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        usage = chunk.usage or usage
    assert first is not None and usage is not None
    return Send(first - started, usage.ttft_ms, usage.cached_tokens)


def prompts(client: duoserve.Client, num_tokens: int, rounds: int) -> list[list[int]]:
    """`rounds` prompts of `num_tokens` token ids each, disjoint slices of the docs' text."""
    ids: list[int] = []
    for path in sorted(DOCS.glob("*.md")):
        ids += client.tokenize(path.read_text())
        if len(ids) >= num_tokens * rounds:
            return [ids[r * num_tokens:(r + 1) * num_tokens] for r in range(rounds)]
    raise SystemExit(f"the docs hold {len(ids)} tokens, fewer than {rounds} x {num_tokens}")


def run_setting(name: str, args: argparse.Namespace) -> list[tuple[Send, Send]]:
    with tempfile.TemporaryDirectory(prefix="prefix-ttft-") as state_dir:
        config = StackConfig(state_dir=Path(state_dir), cache_dir=args.cache_dir, name=f"prefix-ttft-{name}",
                             mode=Mode.SPLIT, prefix_caching=SETTINGS[name], startup_timeout_s=600,
                             with_orchestrator=args.orchestrator)
        stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr), out=sys.stderr)
        try:
            target = stack.read_state(config.state_path).gateway_target
            with duoserve.Client(target, timeout=600) as client:
                if args.warm_up:       # the stack's first forward passes (oneDNN's first calls) before any timing
                    send(client, prompts(client, 64, 1)[0][::-1], 2)
                return [(send(client, p, args.max_tokens), send(client, p, args.max_tokens))
                        for p in prompts(client, args.prompt_tokens, args.rounds)]
        finally:
            stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)


def report(results: dict[str, list[tuple[Send, Send]]], prompt_tokens: int) -> None:
    print(f"{prompt_tokens}-token prompt, sent twice (TTFT: client's, gateway's in brackets)")
    print(f"{'setting':9} {'round':>5} {'1st TTFT':>16} {'2nd TTFT':>16} {'2nd cached':>10} {'2nd/1st':>8}")
    for name, pairs in results.items():
        for r, (first, second) in enumerate(pairs):
            print(f"{name:9} {r + 1:>5} {first.ttft_s:>7.2f} s ({first.gateway_ttft_ms / 1000:4.2f}) "
                  f"{second.ttft_s:>7.2f} s ({second.gateway_ttft_ms / 1000:4.2f}) {second.cached_tokens:>10} "
                  f"{second.ttft_s / first.ttft_s:>7.2f}x")
        first_med = statistics.median(f.ttft_s for f, _ in pairs)
        second_med = statistics.median(s.ttft_s for _, s in pairs)
        print(f"{name:9} {'med':>5} {first_med:>7.2f} s {'':6} {second_med:>7.2f} s {'':17} "
              f"{second_med / first_med:>7.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=1483)
    p.add_argument("--rounds", type=int, default=3, help="prompts, each sent twice")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--settings", default="cached,uncached", help="comma-separated: cached, uncached")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="time the first round's first send on a fresh stack (its first forward passes)")
    p.add_argument("--no-orchestrator", dest="orchestrator", action="store_false",
                   help="no orchestrator: prefill and decode keep one core each (it may lend prefill decode's)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="converted checkpoints")
    args = p.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    if not names or any(n not in SETTINGS for n in names):
        p.error(f"--settings: names among {', '.join(SETTINGS)}")
    report({name: run_setting(name, args) for name in names}, args.prompt_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
