"""`duoctl`: the operator's command line, a client of the orchestrator's Admin API.

    duoctl status [--json]                      workers, shares, queue, KV, prefix cache, latency vs SLOs, model fit
    duoctl watch [--interval S]                 the same as a live table
    duoctl slo set --ttft-ms X --tpot-ms Y [--percentile P] [--prefer ttft|tpot]
    duoctl share set --prefill P --decode D [--token-budget N]
    duoctl policy set auto|static|manual
    duoctl history [--limit N] [--json]
    duoctl model [--json]

Without --target it finds the stack that `duoserve up` started on this machine (its state file) and
reaches it as its owner: with the stack's secret (<stack dir>/secret) unless --token is given, over TLS
against the stack's own certificate when it has one. --target/--token/--tls-ca default to DUOCTL_TARGET /
DUOSERVE_ADMIN_TOKEN / DUOCTL_TLS_CA. No torch import.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import grpc
from google.protobuf import json_format

from duoserve.channel import Tls, certificate_name, open_channel
from duoserve.credentials import CredentialError, secret_from_env, secret_of
from duoserve.errors import DuoserveError, from_rpc_error
from duoserve.pairs import name_in_pair
from duoserve.targets import StackNotFound, add_stack_args, read_stack_state, stack_target
from duoserve.v1 import admin_pb2 as pb
from duoserve.v1 import admin_pb2_grpc


def _find_target(state_dir: Path, name: str, pair: int = 0) -> str:
    """The orchestrator of pair `pair` of the stack `duoserve up --name NAME`, from its state file."""
    try:
        pairs = int(read_stack_state(state_dir, name).get("pairs", 1))
        if not 0 <= pair < pairs:
            raise DuoserveError(f"--pair {pair}: stack {name!r} has pairs 0..{pairs - 1}", code="INVALID_ARGUMENT")
        return stack_target(state_dir, name, name_in_pair("orchestrator", pair, pairs))
    except StackNotFound as e:
        raise DuoserveError(str(e), code="UNAVAILABLE") from None


def _local_access(state_dir: Path, name: str) -> tuple[str | None, str | None]:
    """The secret and the TLS certificate of a stack on this machine (None, None: it has neither)."""
    state = read_stack_state(state_dir, name)
    try:
        return secret_of(state.get("secret_file")), state.get("tls_cert")
    except CredentialError as e:
        raise DuoserveError(str(e), code="UNAUTHENTICATED") from None


class AdminClient:
    """The Admin API's client. `tls` and `server_name` as the SDK's (duoserve.channel)."""

    def __init__(self, target: str, token: str | None, timeout: float = 10.0, *, tls: Tls = None,
                 server_name: str | None = None) -> None:
        self.channel = open_channel(target, tls=tls, server_name=server_name, token=token)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)
        self.timeout = timeout

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


def _env_secret(env: Mapping[str, str]) -> str | None:
    """The stack's secret as its own processes get it (DUOSERVE_SECRET[_FILE]), if this shell has it."""
    try:
        return secret_from_env(env) or None
    except CredentialError:
        return None


def _as_dict(message: Any) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def format_units(w: pb.WorkerStatus) -> str:
    """The SMs (cuda: measured by the SM probe) or cores (cpu) a worker's share gives it: "used/total"."""
    if not w.measured_units:
        return "?"                       # not measured (e.g. no CUDA driver for the probe)
    return f"{w.measured_units}/{w.units_total}" if w.units_total else str(w.measured_units)


UNIT_NAMES = {"sm": ("SM", "SMs"), "core": ("core", "cores")}


def _unit_name(count: int, unit: str) -> str:
    one, many = UNIT_NAMES.get(unit, (unit, unit + "s"))
    return f"{count} {one if count == 1 else many}"


def _units(count: int, unit: str) -> str:
    """" (66 SMs)" / " (1 core)": what a share buys, when the orchestrator said."""
    return f" ({_unit_name(count, unit)})" if count and unit else ""


def format_status(s: pb.StackStatus) -> str:
    shares, unit = s.policy.shares, s.model_fit.unit
    lines = [f"policy {s.policy.mode}: prefill {shares.prefill:.2f}{_units(shares.prefill_units, unit)}, "
             f"decode {shares.decode:.2f}{_units(shares.decode_units, unit)}, token budget {shares.token_budget}",
             f"SLO: TTFT {s.slo.ttft_ms:.0f} ms, TPOT {s.slo.tpot_ms:.0f} ms at p{s.slo.percentile:.0f}, "
             f"prefer {s.slo.prefer}" + (f"   AT RISK: {s.at_risk}" if s.at_risk else ""),
             f"queue {s.queue_waiting} waiting{_queue_tokens(s)}; "
             f"KV {s.kv_blocks_total - s.kv_blocks_free}/{s.kv_blocks_total} blocks used",
             format_prefix_cache(s),
             "", f"{'worker':10} {'share':>6} {'SMs/cores':>10} {'budget':>7} {'running':>8} {'waiting':>8} "
             f"{'iters':>8} {'host ms':>8} {'cache hit':>9} {'age s':>6}"]
    for w in s.workers:
        lines.append(f"{w.phase:10} {w.share:6.2f} {format_units(w):>10} {w.token_budget:7d} {w.num_running:8d} "
                     f"{w.num_waiting:8d} {w.iterations:8d} {w.host_ms:8.2f} {_hit_rate(w):>9} {w.age_s:6.1f}")
    lines.append("")
    for name, lat in (("TTFT", s.ttft), ("TPOT", s.tpot)):
        lines.append(f"{name}: p50 {lat.p50_ms:.1f} ms, p90 {lat.p90_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms "
                     f"(target {lat.target_ms:.0f} ms, attainment {lat.attainment:.0%} of {lat.num_samples})")
    lines.append(format_fit(s.model_fit))
    if s.last_reason:
        lines.append(f"last decision: {s.last_reason}")
    return "\n".join(lines)


def _queue_tokens(s: pb.StackStatus) -> str:
    """" (3,120 prompt tokens, 410 uncached)": the prefill work waiting, and of it what will run."""
    if not s.queue_prompt_tokens:
        return ""
    return f" ({s.queue_prompt_tokens:,} prompt tokens, {s.queue_uncached_tokens:,} uncached)"


def _hit_rate(w: pb.WorkerStatus) -> str:
    """A worker's prefix-cache hit rate since it started ("-": it admits nothing, or caches nothing)."""
    if not w.prefix_caching or not w.prefix_query_tokens:
        return "-"
    return f"{w.prefix_hit_tokens / w.prefix_query_tokens:.1%}"


def format_prefix_cache(s: pb.StackStatus) -> str:
    """The pool's cached blocks and the hit rate of the workers that admit requests, since they started."""
    if not any(w.prefix_caching for w in s.workers):
        return "prefix cache: off" if s.workers else "prefix cache: no worker reports"
    queries = sum(w.prefix_query_tokens for w in s.workers)
    hits = sum(w.prefix_hit_tokens for w in s.workers)
    rate = f"hit rate {hits / queries:.1%} of {queries:,} prompt tokens looked up" if queries else "no lookups yet"
    held = s.kv_blocks_cached - s.kv_blocks_evictable
    return (f"prefix cache: {s.kv_blocks_cached} blocks cached ({held} held by requests, {s.kv_blocks_evictable} "
            f"evictable); {rate} since the workers started")


def format_fit(fit: pb.ModelFit) -> str:
    device = f"{fit.backend}, {_unit_name(fit.num_units, fit.unit)}" if fit.num_units else fit.backend
    parts = [f"model ({device}):"]
    for phase in fit.phases:
        coeffs = ", ".join(f"{c.name}={c.value:.4g}" for c in phase.coefficients)
        parts.append(f"  {phase.phase}: median error {phase.median_rel_error:.1%}, p90 {phase.p90_rel_error:.1%} "
                     f"over {phase.num_samples} samples; {coeffs}")
    return "\n".join(parts)


def format_history(h: pb.History) -> str:
    lines = []
    for d in h.decisions:
        when = time.strftime("%H:%M:%S", time.localtime(d.time_unix))
        mark = "*" if d.changed else " "
        lines.append(f"{when} {mark} prefill {d.shares.prefill:.2f} decode {d.shares.decode:.2f} "
                     f"budget {d.shares.token_budget:5d}  {d.reason}" + (f" [at risk: {d.at_risk}]" if d.at_risk else ""))
    return "\n".join(lines) or "no decisions yet"


def _add_connection_args(p: argparse.ArgumentParser, env: Mapping[str, str], nested: bool) -> None:
    """--target/--token and the stack's name, at the top level or (overriding it) after a subcommand."""
    default = (lambda value: argparse.SUPPRESS) if nested else (lambda value: value)
    p.add_argument("--target", default=default(env.get("DUOCTL_TARGET")), help="orchestrator HOST:PORT (env DUOCTL_TARGET)")
    p.add_argument("--token", default=default(env.get("DUOSERVE_ADMIN_TOKEN") or _env_secret(env)),
                   help="admin bearer token (env DUOSERVE_ADMIN_TOKEN, else the stack's secret from DUOSERVE_SECRET "
                        "or DUOSERVE_SECRET_FILE as in the compose containers; default with --name: the stack's "
                        "secret file)")
    p.add_argument("--tls-ca", default=default(env.get("DUOCTL_TLS_CA")),
                   help="the Admin API is served over TLS: check it against this CA, or 'system' for the "
                        "system's roots (env DUOCTL_TLS_CA; default with --name: the stack's own certificate)")
    p.add_argument("--pair", type=int, default=default(None),
                   help="a stack of several pairs (`duoserve up --pairs N`): the pair whose orchestrator to ask "
                        "(default: every pair in turn; `share set` and `watch` need one)")
    add_stack_args(p, env, nested=nested)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="duoctl", description="operate a duoserve stack")
    _add_connection_args(p, env, nested=False)
    sub = p.add_subparsers(dest="command", required=True)
    commands = []
    for name in ("status", "history", "model"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--json", action="store_true")
        if name == "history":
            cmd.add_argument("--limit", type=int, default=20)
        commands.append(cmd)
    watch = sub.add_parser("watch")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.add_argument("--count", type=int, default=0, help="refreshes before exiting (0: until Ctrl-C)")
    slo = sub.add_parser("slo").add_subparsers(dest="action", required=True).add_parser("set")
    slo.add_argument("--ttft-ms", type=float, required=True)
    slo.add_argument("--tpot-ms", type=float, required=True)
    slo.add_argument("--percentile", type=float, default=90.0)
    slo.add_argument("--prefer", choices=["ttft", "tpot"], default="tpot")
    share = sub.add_parser("share").add_subparsers(dest="action", required=True).add_parser("set")
    share.add_argument("--prefill", type=float, required=True)
    share.add_argument("--decode", type=float, required=True)
    share.add_argument("--token-budget", type=int, default=0)
    policy = sub.add_parser("policy").add_subparsers(dest="action", required=True).add_parser("set")
    policy.add_argument("mode", choices=["auto", "static", "manual"])
    for cmd in (*commands, watch, slo, share, policy):     # `duoctl status --name X` as well as `duoctl --name X status`
        _add_connection_args(cmd, env, nested=True)
    return p


def pairs_to_ask(args: argparse.Namespace) -> list[int | None]:
    """Which pairs' orchestrators a command goes to: [None] for one (a --target, or a one-pair stack)."""
    if args.target or args.pair is not None:
        return [args.pair]
    try:
        pairs = int(read_stack_state(args.state_dir, args.name).get("pairs", 1))
    except StackNotFound as e:
        raise DuoserveError(str(e), code="UNAVAILABLE") from None
    if pairs == 1:
        return [None]
    if args.command in ("share", "watch"):
        raise DuoserveError(f"stack {args.name!r} has {pairs} pairs: `{args.command}` needs --pair 0..{pairs - 1}",
                            code="INVALID_ARGUMENT")
    return list(range(pairs))


def connect(args: argparse.Namespace, pair: int | None = None) -> AdminClient:
    """--target as given (with --token, --tls-ca), else the local stack --name with its own credentials."""
    tls = True if args.tls_ca == "system" else args.tls_ca
    if args.target:
        return AdminClient(args.target, args.token, tls=tls)
    target = _find_target(args.state_dir, args.name, pair or 0)
    secret, cert = _local_access(args.state_dir, args.name)
    if cert and not tls:
        tls = cert
    return AdminClient(target, args.token or secret, tls=tls, server_name=certificate_name(cert) if cert else None)


def run_all(args: argparse.Namespace) -> int:
    """The command against each pair it is for (a header per pair when there are several)."""
    pairs = pairs_to_ask(args)
    for pair in pairs:
        if len(pairs) > 1:
            print(f"{'' if pair == pairs[0] else chr(10)}pair {pair}:", flush=True)
        run(args, pair)
    return 0


def run(args: argparse.Namespace, pair: int | None = None) -> int:
    client = connect(args, pair if pair is not None else args.pair)
    cmd = args.command
    if cmd in ("status", "watch"):
        for i in range(args.count or sys.maxsize) if cmd == "watch" else range(1):
            status = client.call("GetStatus", pb.GetStatusRequest())
            if cmd == "status" and args.json:
                print(json.dumps(_as_dict(status), indent=2))
            else:
                print(("\033[2J\033[H" if cmd == "watch" and sys.stdout.isatty() else "") + format_status(status),
                      flush=True)
            if cmd == "watch":
                time.sleep(args.interval)
        return 0
    if cmd == "history":
        history = client.call("GetHistory", pb.GetHistoryRequest(limit=args.limit))
        print(json.dumps(_as_dict(history), indent=2) if args.json else format_history(history))
    elif cmd == "model":
        fit = client.call("GetModelFit", pb.GetModelFitRequest())
        print(json.dumps(_as_dict(fit), indent=2) if args.json else format_fit(fit))
    elif cmd == "slo":
        slo = client.call("SetSLO", pb.SLO(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms, percentile=args.percentile,
                                           prefer=args.prefer))
        print(f"SLO set: TTFT {slo.ttft_ms:.0f} ms, TPOT {slo.tpot_ms:.0f} ms at p{slo.percentile:.0f}, prefer {slo.prefer}")
    elif cmd == "share":
        state = client.call("PinShares", pb.Shares(prefill=args.prefill, decode=args.decode,
                                                   token_budget=args.token_budget))
        print(f"shares pinned: prefill {state.shares.prefill:.2f}, decode {state.shares.decode:.2f}, "
              f"token budget {state.shares.token_budget} (policy {state.mode}; the workers take them at the "
              "orchestrator's next tick)")
    elif cmd == "policy":
        state = client.call("SetPolicy", pb.SetPolicyRequest(mode=args.mode))
        print(f"policy {state.mode}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_all(args)
    except DuoserveError as e:
        print(f"duoctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
