"""The parsers of `duoserve bench ...` and `duoserve simulate` (what they run lives in bench/ and
orchestrator/sim_sweep.py, imported only when the command runs)."""
from __future__ import annotations

import argparse
from pathlib import Path

from duoserve.cli_args import (add_checkpoint_args, add_client_auth_args, add_model_args, add_stack_name_args, default_state_dir,
                               default_vllm_venv)


def bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    engine = bench_sub.add_parser("engine", help="prefill and decode throughput vs transformers")
    engine.add_argument("--prompt-lens", default="128,512,2048")
    engine.add_argument("--batch-sizes", default="1,8,32")
    engine.add_argument("--decode-steps", type=int, default=32)
    engine.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    add_model_args(engine)
    _bench_serve_parser(bench_sub)
    _bench_compare_parser(bench_sub)
    _bench_peer_parser(bench_sub)
    _bench_validate_parser(bench_sub)


def _rate(text: str) -> float:
    value = float(text)          # "inf" parses: every request at once
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a request rate must be positive (or inf)")
    return value


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    """What `bench serve` and `bench compare` send: dataset, lengths, arrivals, SLOs."""
    p.add_argument("--dataset", choices=["azure-conv", "random", "prompt-file", "multi-turn"], default="azure-conv",
                   help="multi-turn: synthetic conversations, each turn resending its history (--conversations, "
                        "--turns, --system-len, --user-len, --answer-len, --think-time); rates are conversations/s")
    p.add_argument("--dataset-path", type=Path, default=None,
                   help="azure-conv: the CSV (default bench/data/azure_conv_2023.csv, shipped); prompt-file: the file")
    p.add_argument("--num-requests", type=int, default=100,
                   help="requests (azure-conv: the first N from --start-offset; prompt-file: the first N lines)")
    p.add_argument("--start-offset", type=float, default=0.0, help="azure-conv: seconds into the trace to start")
    p.add_argument("--length-scale", type=float, default=0.1,
                   help="azure-conv: multiply prompt and output lengths (default 0.1, bench.datasets."
                        "DEFAULT_LENGTH_SCALE: the model is tiny, the CPU slow)")
    p.add_argument("--rate-scale", type=float, default=1.0,
                   help="azure-conv: divide the recorded gaps (2: twice the rate); --request-rate overrides")
    p.add_argument("--max-total-len", type=int, default=None,
                   help="azure-conv: cut prompts so prompt + output fit this many tokens")
    p.add_argument("--input-len", type=int, default=128, help="random: prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="random and prompt-file: output tokens")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="random, multi-turn (user messages, answers): lengths uniform in len*(1 -/+ r)")
    p.add_argument("--conversations", type=int, default=50, help="multi-turn: conversations per run")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: user messages (requests) per conversation")
    p.add_argument("--system-len", type=int, default=256,
                   help="multi-turn: tokens of the system prompt every conversation of a run shares (0: none)")
    p.add_argument("--user-len", type=int, default=64, help="multi-turn: tokens per user message")
    p.add_argument("--answer-len", type=int, default=32, help="multi-turn: tokens per answer (forced)")
    p.add_argument("--think-time", type=float, default=1.0,
                   help="multi-turn: seconds between an answer's last token and the next turn's send")
    p.add_argument("--arrival", choices=["trace", "poisson", "gamma"], default=None,
                   help="default: trace for azure-conv, else poisson")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (< 1 burstier than Poisson)")
    p.add_argument("--seed", type=int, default=0, help="arrival gaps and random lengths")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (multi-turn: conversations in progress at most)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT target for goodput and attainment")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT target for goodput and attainment")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent one at a time first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal)")


def _bench_serve_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="load generator against a running stack: vLLM's metrics, goodput")
    p.add_argument("--target", default=None,
                   help="HOST[:PORT] of a stack's gateway (`duoserve up` prints it; port 50051 unless given), or "
                        "http://HOST:PORT of an OpenAI-compatible server (POST /v1/completions, streamed); "
                        "default: the stack --name")
    add_stack_name_args(p)
    add_client_auth_args(p)
    p.add_argument("--request-rate", type=_rate, default=None,
                   help="requests/s (poisson/gamma; default inf); trace: rescale the trace to this mean rate")
    p.add_argument("--output", type=Path, default=None, help="write the result (with every request) as JSON")
    _add_workload_args(p)


def _bench_compare_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("compare", help="colocated chunked prefill vs split static vs split dynamic")
    p.add_argument("--rates", required=True, help="request rates to sweep, e.g. 0.5,1,2")
    p.add_argument("--chunk-sizes", default="512", help="colocated baselines' chunk sizes, e.g. 256,512")
    p.add_argument("--configs", default="colocated,split-static,split-dynamic",
                   help="which of colocated, split-static, split-dynamic to run; a name ending in -no-cache "
                        "runs it with prefix caching off (e.g. split-dynamic,split-dynamic-no-cache)")
    p.add_argument("--attainment", type=float, default=0.9,
                   help="share of requests that must meet both SLOs (default 0.9)")
    p.add_argument("--output", type=Path, default=Path("bench-compare"), help="directory for JSON and PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--request-rate", type=_rate, default=None, help=argparse.SUPPRESS)
    _add_workload_args(p)
    p.set_defaults(slo_ttft_ms=2000.0, slo_tpot_ms=200.0)
    _add_bench_stack_args(p)


def _bench_peer_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("peer", help="duoserve against vLLM's CPU build on this machine, one after another, "
                                          "the same requests: SLO attainment, goodput, max rate, plots")
    p.add_argument("--systems", default="vllm,vllm-omp2,split,split-static,colocated",
                   help="which of vllm (its default threads), vllm-omp2 (OMP_NUM_THREADS=2), split (orchestrator "
                        "in auto), split-static (its static policy), colocated; each may end in -no-cache: prefix "
                        "caching off (vLLM's too), e.g. vllm,split,split-no-cache")
    p.add_argument("--rates", default="1,1.5,2,3", help="request rates to sweep, e.g. 1,1.5,2,3 (2 cores, 200 "
                   "Azure requests at lengths x 0.1: every system here saturates near 2 req/s)")
    p.add_argument("--chunk-size", type=int, default=512, help="colocated: prompt tokens per iteration")
    p.add_argument("--rejudge", type=Path, default=None, metavar="PEER_JSON",
                   help="run nothing: print an earlier peer.json judged at --slo-ttft-ms/--slo-tpot-ms")
    p.add_argument("--attainment", type=float, default=0.9,
                   help="share of requests that must meet both SLOs (default 0.9)")
    p.add_argument("--output", type=Path, default=Path("bench-peer"),
                   help="directory for peer.json, per-run JSON, the vLLM logs and PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--vllm-venv", type=Path, default=default_vllm_venv(),
                   help="vLLM's own virtual environment, created on first use (~3.4 GB, ~10 minutes)")
    p.add_argument("--vllm-startup-timeout", type=float, default=900.0, help="seconds until vLLM's /health is 200")
    p.add_argument("--vllm-block-size", type=int, default=None,
                   help="vLLM's KV block size, which is also its prefix cache's granularity (default: vLLM's own, "
                        "128 tokens on the CPU; its CPU attention takes multiples of 32; duoserve's blocks are 16)")
    p.add_argument("--request-rate", type=_rate, default=None, help=argparse.SUPPRESS)
    _add_workload_args(p)
    p.set_defaults(slo_ttft_ms=3000.0, slo_tpot_ms=150.0, num_requests=200)
    _add_bench_stack_args(p)


def _bench_validate_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("validate-sim", help="the simulator against the real CPU stack on the same requests: "
                                                 "p50/p90 TTFT and TPOT within a tolerance")
    p.add_argument("--policy", choices=["static", "auto"], default="static",
                   help="the split stack's policy (and the simulated system): static halves or the dynamic policy")
    p.add_argument("--tolerance", type=float, default=0.2, help="relative error allowed per percentile")
    p.add_argument("--cpu-cores", type=int, default=2, help="cores the stack runs on (the simulated device)")
    p.add_argument("--output", type=Path, default=None, help="write the comparison as JSON")
    p.add_argument("--request-rate", type=_rate, default=None, help=argparse.SUPPRESS)
    _add_workload_args(p)
    p.set_defaults(slo_ttft_ms=5000.0, slo_tpot_ms=500.0, num_requests=16, rate_scale=0.1)   # as the e2e test
    _add_bench_stack_args(p)


def _add_bench_stack_args(p: argparse.ArgumentParser) -> None:
    """The stacks a benchmark starts for itself (`bench compare`, `bench peer`, `bench validate-sim`)."""
    p.add_argument("--num-kv-blocks", type=int, default=None, help="each stack's KV pool in blocks of 16 tokens")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                   help="where the stacks keep their state and logs (env DUOSERVE_STATE_DIR)")
    add_checkpoint_args(p)
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds until a stack is SERVING")


def simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="discrete-event simulation: the real scheduler, policy and performance "
                                        "model over a trace; highest rate at which the SLOs hold (docs/simulator.md)")
    p.add_argument("--trace", type=Path, default=None,
                   help="Azure-format CSV: TIMESTAMP,ContextTokens,GeneratedTokens (or --multi-turn)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="the engines reuse cached KV blocks of repeated prefixes (vLLM's automatic prefix caching)")
    p.add_argument("--policy-blind-to-cache", action="store_true",
                   help="with --prefix-caching: the policy counts every prompt token, as before it saw the cache")
    mt = p.add_argument_group("multi-turn workload (instead of --trace; docs/simulator.md)")
    mt.add_argument("--multi-turn", action="store_true",
                    help="conversations whose every turn resends the history plus a new user message")
    mt.add_argument("--conversations", type=int, default=500, help="conversations in all")
    mt.add_argument("--turns", type=int, default=5, help="requests per conversation")
    mt.add_argument("--user-tokens", type=int, default=200, help="tokens of each new user message")
    mt.add_argument("--answer-tokens", type=int, default=200, help="output tokens of each turn")
    mt.add_argument("--system-tokens", type=int, default=0, help="a system prompt every conversation starts with")
    mt.add_argument("--think-s", type=float, default=5.0,
                    help="mean seconds from an answer to the next turn (exponential, from --seed)")
    mt.add_argument("--conversation-rate", type=float, default=1.0,
                    help="conversations started per second at rate multiple 1 (Poisson, from --seed)")
    p.add_argument("--gpu", choices=["h100", "cpu"], default="h100",
                   help="h100: the H100 prior; cpu: the CPU stack's model and settings (see --calibration)")
    p.add_argument("--model", default="llama-3.1-8b",
                   help="llama-3.1-8b, llama-2-7b, smollm2-135m, or a checkpoint directory (its config.json)")
    p.add_argument("--slo-ttft-ms", type=float, required=True)
    p.add_argument("--slo-tpot-ms", type=float, required=True)
    p.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet both SLOs")
    p.add_argument("--prefer", choices=["ttft", "tpot"], default=None, help="SLO the policy protects (default: "
                                                                            "ttft on h100, tpot on cpu, as the stack)")
    p.add_argument("--rates", default="1.5,2,2.5,3",
                   help="rate multiples of the trace to sweep (the default brackets the Azure trace on an H100)")
    p.add_argument("--rate-scale", type=float, default=None,
                   help="one rate multiple only: no sweep, no bisection, no early stop (every request simulated)")
    p.add_argument("--bisect-steps", type=int, default=3, help="halvings of each system's pass/fail bracket")
    p.add_argument("--systems", default=None, help="comma-separated subset, e.g. colocated-1024,dynamic")
    p.add_argument("--chunks", default=None, help="colocated chunk sizes (default 512,1024,2048)")
    p.add_argument("--static-splits", default=None, help="prefill/decode shares, e.g. 60/40,70/30")
    p.add_argument("--max-requests", type=int, default=None, help="the first N requests of the trace")
    p.add_argument("--start-s", type=float, default=0.0, help="skip the trace's first seconds")
    p.add_argument("--duration-s", type=float, default=None, help="this many seconds of the trace")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply prompt and output lengths, as bench serve's --length-scale (cpu: 0.1 there)")
    p.add_argument("--max-total-len", type=int, default=None, help="cut prompts so prompt + output fit, as bench serve")
    p.add_argument("--arrivals", choices=["trace", "poisson"], default="trace",
                   help="trace: recorded arrival times; poisson: the same lengths at the same mean rate, from --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tick-ms", type=float, default=None, help="policy tick in simulated ms (default 250)")
    p.add_argument("--switch-cost-ms", type=float, default=None, help="stall of an engine whose share moves "
                                                                       "(default 10 on h100, 1 on cpu)")
    p.add_argument("--overlap", type=float, default=None, help="PolicyConfig.overlap (default 1 on h100, 0.5 on cpu)")
    p.add_argument("--min-dwell-ms", type=float, default=None,
                   help="split-dynamic: least time between two moves (default 0 on h100: 4 switch costs; 2000 on cpu)")
    p.add_argument("--persist-ticks", type=int, default=None,
                   help="split-dynamic: ticks a need within the model's error must persist (default 3)")
    p.add_argument("--no-bw-contention", action="store_true", help="split: do not share HBM bandwidth")
    p.add_argument("--no-coresidency", action="store_true",
                   help="split: overlapping caps are time-shared half and half (the model before co-residency)")
    p.add_argument("--coresidency-calibration", type=Path, default=None,
                   help="co-residency calibration JSON written by `make gpu-check` (default: the published prior)")
    p.add_argument("--no-early-stop", action="store_true", help="simulate every request even once the target is lost")
    p.add_argument("--cpu-cores", type=int, default=2, help="cpu: cores of the simulated stack")
    p.add_argument("--calibration", type=Path, default=None,
                   help="cpu: coefficients JSON (`duoctl model --json` of the live stack, or {phase: {...}})")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool in blocks (default: from memory)")
    p.add_argument("--vidur", type=Path, default=None,
                   help="h100: vidur operator CSV to check the calibration against (default: beside the trace)")
    p.add_argument("--jobs", type=int, default=None, help="processes (default: the cores this process may use)")
    p.add_argument("--output", type=Path, default=None, help="write the report as JSON")
