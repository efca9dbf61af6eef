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
from duoserve.cli_args import (add_checkpoint_args, add_client_auth_args, add_model_args, add_stack_name_args,
                               cpu_list, port_number, default_state_dir)
from duoserve.cli_bench import bench_parser, simulate_parser


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
    add_client_auth_args(p)
    add_model_args(p)


def _up_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the service stack and wait until every process is SERVING")
    add_stack_name_args(p)
    p.add_argument("--mode", choices=["split", "colocated"], default="split",
                   help="split: arena + prefill + decode (default); colocated: one chunked-prefill engine")
    p.add_argument("--detach", action="store_true", help="return once SERVING, leaving the stack running")
    p.add_argument("--host", default=os.environ.get("DUOSERVE_HOST", "127.0.0.1"),
                   help="the gateway's bind address: 127.0.0.1 (default) or 0.0.0.0 (env DUOSERVE_HOST)")
    p.add_argument("--port", type=port_number, default=os.environ.get("DUOSERVE_PORT", str(targets.DEFAULT_GRPC_PORT)),
                   help="the gateway's gRPC port (default 50051, env DUOSERVE_PORT; 0: any free port)")
    p.add_argument("--http-port", type=port_number,
                   default=os.environ.get("DUOSERVE_HTTP_PORT", str(targets.DEFAULT_HTTP_PORT)),
                   help="its OpenAI-compatible HTTP port (default 8000, env DUOSERVE_HTTP_PORT; 0: any free port)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="use this Redis (env REDIS_URL; never started or stopped); default: start one")
    add_checkpoint_args(p)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks of 16 tokens")
    p.add_argument("--pairs", type=int, default=1,
                   help="split: run N pairs (arena + prefill + decode + orchestrator) behind the gateway, which "
                        "routes each request by prefix-cache affinity and load; on the CPU they divide the cores")
    p.add_argument("--cpus", type=cpu_list, default=(),
                   help="the stack's cores, e.g. 0-3 (default: all); split mode gives prefill the first "
                        "half and decode the rest (2 cores: prefill 0, decode 1)")
    p.add_argument("--prefill-cpus", type=cpu_list, default=(), help="prefill's initial cores (split)")
    p.add_argument("--decode-cpus", type=cpu_list, default=(), help="decode's initial cores (split)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running requests per worker at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per worker iteration")
    p.add_argument("--chunk-size", type=int, default=None, help="colocated: prompt tokens per iteration")
    p.add_argument("--max-queue-len", type=int, default=None, help="gateway: waiting requests at most")
    p.add_argument("--no-orchestrator", action="store_true", help="split: keep the initial shares, no Admin API")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt whole (default: reuse the KV blocks of cached prompt prefixes, "
                        "as vLLM's automatic prefix caching)")
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
    p.add_argument("--retune-mode", choices=["succession", "green"], default="succession",
                   help="cuda split: how a new share is applied: succession (default: a standby process at the "
                        "new MPS percentage takes over) or green (green-context SM partitions inside each "
                        "worker, switched in milliseconds; the workers run at MPS percentage 100)")
    p.add_argument("--mps-pipe-dir", type=Path, default=os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or None,
                   help="cuda: pipe directory of a running MPS daemon to use (env CUDA_MPS_PIPE_DIRECTORY; "
                        "default /tmp/nvidia-mps)")
    p.add_argument("--admin-token", default=os.environ.get("DUOSERVE_ADMIN_TOKEN", ""),
                   help="a bearer token the Admin API (duoctl --token) accepts besides the stack's secret (env "
                        "DUOSERVE_ADMIN_TOKEN; the flag shows in `ps`, the environment does not)")
    p.add_argument("--no-auth", action="store_true", default=os.environ.get("DUOSERVE_NO_AUTH") == "1",
                   help="no stack secret: the workers' control service, the Admin API (unless --admin-token) and "
                        "the stack's Redis open to every local user (env DUOSERVE_NO_AUTH=1); default: a secret "
                        "in <state dir>/<name>/secret (mode 0600) guards them")
    p.add_argument("--api-key", default=os.environ.get("DUOSERVE_API_KEY", ""),
                   help="the gateway's gRPC and HTTP APIs want `Authorization: Bearer KEY`, as vLLM's --api-key "
                        "(env DUOSERVE_API_KEY, which keeps it out of `ps`); /health and /metrics stay open")
    p.add_argument("--tls-cert", type=Path, default=os.environ.get("DUOSERVE_TLS_CERT") or None,
                   help="PEM certificate chain: the gateway's gRPC and HTTP APIs and the Admin API over TLS "
                        "(env DUOSERVE_TLS_CERT; with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=os.environ.get("DUOSERVE_TLS_KEY") or None,
                   help="its PEM private key (env DUOSERVE_TLS_KEY)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds until every process is SERVING")
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")
    p.add_argument("--restart", choices=["always", "never"], default=os.environ.get("DUOSERVE_RESTART", "always"),
                   help="always (default): a supervisor restarts a process that dies, with backoff, in "
                        "dependency order (detached too); never: the first death stops the stack (env "
                        "DUOSERVE_RESTART)")


def _down_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop the stack and remove its processes, shared memory and state")
    add_stack_name_args(p)
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")


def _status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="each process of the stack: pid, alive, port, health")
    add_stack_name_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def stack_config_from_args(args: argparse.Namespace):
    from duoserve.stack import Mode, StackConfig
    return StackConfig(
        state_dir=args.state_dir.expanduser(), cache_dir=args.cache_dir.expanduser(), name=args.name,
        mode=Mode(args.mode), redis_url=args.redis_url or None, model=args.model, dtype=args.dtype,
        weights=args.weights, num_kv_blocks=args.num_kv_blocks, prefix_caching=not args.no_prefix_caching, pairs=args.pairs, cpus=args.cpus, prefill_cpus=args.prefill_cpus,
        decode_cpus=args.decode_cpus, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, chunk_size=args.chunk_size,
        max_queue_len=args.max_queue_len, startup_timeout_s=args.startup_timeout, stop_timeout_s=args.stop_timeout,
        with_orchestrator=not args.no_orchestrator, admin_token=args.admin_token, auth=not args.no_auth,
        api_key=args.api_key, tls_cert=args.tls_cert, tls_key=args.tls_key, device=args.device,
        prefill_percentage=args.prefill_percentage, decode_percentage=args.decode_percentage,
        mps_pipe_dir=args.mps_pipe_dir, cuda_retune_mode=args.retune_mode, host=args.host, port=args.port, http_port=args.http_port,
        restart=args.restart)


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
        cert = targets.read_stack_state(args.state_dir, args.name).get("tls_cert")
        if cert and args.tls_ca is None:       # the stack's own certificate, whatever host it names
            from duoserve.channel import certificate_name
            args.tls_ca, args.server_name = cert, certificate_name(cert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description="duoserve: split prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _up_parser(sub)
    _down_parser(sub)
    _status_parser(sub)
    bench_parser(sub)
    simulate_parser(sub)
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
