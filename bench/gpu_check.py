"""`make gpu-check`: the CUDA backend end to end on one NVIDIA GPU, printed as one table.

  refuse   no NVIDIA driver, GPU or MPS control program: one clear line, exit 2, nothing started
  mps      the operator's running MPS daemon is used, else one is started on private directories
           (and quit at the end); never the GPU's compute mode, clocks or MIG layout
  shares   for each share (default 30,50,70,100 %) a process started with that
           CUDA_MPS_ACTIVE_THREAD_PERCENTAGE runs the SM probe (services.common.sm_probe, built by
           `make native`; n/a without it) and times the engine on cuda: prefill tokens/s (a batch of
           prompts, one token each) and decode tokens/s (a batch of requests for N steps, less their
           prefill)
  co-run   a prefill-like (GEMM) and a decode-like (bandwidth-bound) MPS client at overlapping caps
           (default 100/30 and 70/50 %), each alone and both together (bench/corun.py); the fitted
           co-residency parameter goes to the calibration file (--coresidency-out) that the orchestrator
           and `duoserve simulate` read with --coresidency-calibration
  driver   cuda-python (services/common/cuda_driver.py), before MPS starts: the SM count from
           cuDeviceGetAttribute, and green contexts split at 30/50/100 % (asked -> given SMs); each
           share's row also shows the driver's SM count inside that MPS client (is it capped?); the
           green retune (services/worker/green.py): each partition's switch time and a matmul on it
  stack    `duoserve up --device cuda` on that daemon: both workers are MPS clients; greedy output
           of a few prompts through the gateway equals the CPU engine's; hand-off latency (decode's
           duoserve:handoff_latency_seconds over those requests, as bench/stack_latency.py); switch
           latency (SetComputeShare to decode, then its report's share_switch_ms once the retune by
           handover is done; n/a when the worker does not report one); `duoserve down`

    python -m bench.gpu_check [--shares 30,50,70,100] [--corun-caps 100/30,70/50] [--model DIR] [--keep-logs DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from services.common import cuda_driver, mps
from services.common.shares import UnitSpace
from services.worker.green import GreenRetune

PROMPTS = [list(range(1000, 1000 + n)) for n in (7, 33, 130, 300)]   # token ids: no tokenizer differences
EXIT_NO_GPU = 2


def missing_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None. The cheap checks come before importing torch."""
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()):
        return "no NVIDIA driver on this machine (/proc/driver/nvidia/version and /dev/nvidiactl are missing)"
    if shutil.which(mps.CONTROL_BINARY) is None:
        return f"{mps.CONTROL_BINARY} is not on PATH (NVIDIA MPS ships with the driver's utilities)"
    import torch
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or CUDA_VISIBLE_DEVICES hides it)"
    return None


# ---------------------------------------------------------------------------------------------- greedy

def cpu_greedy(model: str | None, cache_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The CPU engine's greedy completions (float32), the reference the GPU stack must match."""
    from services.engine.llm_engine import EngineConfig, LLMEngine
    from services.engine.sampling_params import SamplingParams
    engine = LLMEngine.from_config(EngineConfig(model=model, cache_dir=cache_dir, num_kv_blocks=256))
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [list(o.token_ids) for o in outs]


def stack_greedy(target: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    import duoserve
    with duoserve.Client(target, timeout=300) as client:
        return [list(client.generate(token_ids=p, max_tokens=max_tokens, temperature=0, ignore_eos=True).token_ids)
                for p in prompts]


# ---------------------------------------------------------------------------------------------- one share

def measure_here(args: argparse.Namespace) -> dict:
    """In a process started at one MPS percentage: SMs it gets, prefill and decode throughput."""
    import torch
    from services.engine.llm_engine import EngineConfig, LLMEngine
    from services.engine.sampling_params import SamplingParams
    out: dict = {"percentage": os.environ.get(mps.PERCENTAGE_ENV, "100")}
    try:
        from services.common.sm_probe import probe_sms
        probe = probe_sms(0)
        out.update(sms=probe.num_sms_used if probe.ok else None, sms_total=probe.num_sms_total or None,
                   probe_error=probe.error)
    except ImportError as e:
        out.update(sms=None, sms_total=None, probe_error=f"no SM probe: {e}")
    try:                        # the driver's count in this MPS client's context: capped by its percentage or not
        out["driver_sms"] = cuda_driver.sm_count(0)
    except cuda_driver.CudaDriverError as e:
        out.update(driver_sms=None, driver_error=str(e))
    batch_tokens = args.prefill_batch * args.prompt_tokens
    engine = LLMEngine.from_config(EngineConfig(
        model=args.model, cache_dir=args.cache_dir, dtype=args.dtype, device="cuda", num_kv_blocks=args.kv_blocks,
        max_num_seqs=max(args.prefill_batch, args.decode_batch), max_num_batched_tokens=batch_tokens,
        chunk_size=batch_tokens))
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.generate([list(range(100, 164))] * 2, one)                           # warm-up: kernels, allocator

    def timed(prompts: list[list[int]], params: SamplingParams) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts, params)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    long_prompts = [list(range(1000 + i, 1000 + i + args.prompt_tokens)) for i in range(args.prefill_batch)]
    out["prefill_tok_s"] = batch_tokens / timed(long_prompts, one)
    short = [list(range(2000 + i, 2016 + i)) for i in range(args.decode_batch)]
    steps = SamplingParams(max_tokens=1 + args.decode_steps, temperature=0, ignore_eos=True)
    decode_s = timed(short, steps) - timed(short, one)
    out["decode_tok_s"] = args.decode_batch * args.decode_steps / decode_s if decode_s > 0 else None
    return out


def measure_share(percentage: int, daemon: mps.MpsDaemon, args: argparse.Namespace) -> dict:
    argv = [sys.executable, "-m", "bench.gpu_check", "--measure-here", "--dtype", args.dtype,
            "--cache-dir", str(args.cache_dir), "--prefill-batch", str(args.prefill_batch),
            "--prompt-tokens", str(args.prompt_tokens), "--decode-batch", str(args.decode_batch),
            "--decode-steps", str(args.decode_steps), "--kv-blocks", str(args.kv_blocks)]
    argv += ["--model", args.model] if args.model else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **daemon.client_env(percentage)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"percentage": str(percentage), "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- the stack

@dataclass
class StackChecks:
    rows: list[tuple[str, str]] = field(default_factory=list)     # (check, result)
    ok: bool = True

    def add(self, check: str, result: str, ok: bool = True) -> None:
        self.rows.append((check, result))
        self.ok = self.ok and ok


def _handoff_histogram(metrics_port: int) -> tuple[float, float]:
    from bench.stack_latency import _histogram
    return _histogram(metrics_port, "duoserve:handoff_latency_seconds")


def _switch_latency_ms(state, timeout_s: float = 180.0) -> str:
    """SetComputeShare to decode; its report's share_switch_ms once the successor serves."""
    import grpc
    import redis

    from duoserve.credentials import bearer, secret_of
    from duoserve.v1 import worker_pb2, worker_pb2_grpc
    from services.common.contracts import KeySpace
    decode = next(r for r in state.processes if r.name == "decode")
    client, key = redis.Redis.from_url(state.redis_url), KeySpace(state.key_prefix).worker_stats("decode")
    with grpc.insecure_channel(decode.target) as channel:
        worker_pb2_grpc.WorkerStub(channel).SetComputeShare(worker_pb2.SetComputeShareRequest(share=0.3), timeout=10,
                                                            metadata=bearer(secret_of(state.secret_file)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = client.hget(key, "m")
        report = json.loads(raw) if raw else {}
        if report.get("share_switch_ms"):
            return (f"{report['share_switch_ms']:.0f} ms (decode 0.5 -> 0.3; pause "
                    f"{report.get('share_switch_stall_ms', 0):.0f} ms)")
        if "share_switch_ms" not in report and report:
            return "n/a (the decode worker reports no share_switch_ms)"
        time.sleep(0.5)
    return f"n/a (no retune reported within {timeout_s:.0f} s)"


def check_stack(daemon: mps.MpsDaemon, args: argparse.Namespace, state_dir: Path) -> StackChecks:
    from duoserve import stack
    checks = StackChecks()
    config = stack.StackConfig(state_dir=state_dir, cache_dir=args.cache_dir, name="gpu-check", model=args.model,
                               dtype=args.dtype, device="cuda", prefill_percentage=50, decode_percentage=50,
                               num_kv_blocks=args.kv_blocks, with_orchestrator=False, mps_pipe_dir=Path(daemon.pipe_dir),
                               startup_timeout_s=600)
    started = time.monotonic()
    stack.up(config, detach=True, say=lambda m: print(f"  {m}", file=sys.stderr))
    checks.add("stack up --device cuda", f"SERVING after {time.monotonic() - started:.1f} s")
    try:
        state = stack.read_state(config.state_path)
        pids = {r.name: r.pid for r in state.processes}
        clients = mps.all_clients(daemon.pipe_dir)
        attached = [n for n in ("prefill", "decode") if pids[n] in clients]
        checks.add("MPS clients", f"{', '.join(f'{n} {pids[n]}' for n in attached) or 'none'} of "
                                  f"{len(clients)} clients", ok=len(attached) == 2)
        decode = next(r for r in state.processes if r.name == "decode")
        before = _handoff_histogram(decode.metrics_port)
        got = stack_greedy(state.gateway_target, PROMPTS, args.max_tokens)
        after = _handoff_histogram(decode.metrics_port)
        want = cpu_greedy(args.model, args.cache_dir, PROMPTS, args.max_tokens)
        same = sum(g == w for g, w in zip(got, want))
        first_diff = next((f"; prompt {i} differs from token {next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)}"
                           for i, (g, w) in enumerate(zip(got, want)) if g != w), "")
        checks.add("greedy == cpu", f"{same}/{len(PROMPTS)} prompts, {args.max_tokens} tokens each{first_diff}",
                   ok=same == len(PROMPTS))
        count = after[1] - before[1]
        checks.add("hand-off latency", f"mean {(after[0] - before[0]) / max(count, 1) * 1000:.2f} ms over "
                                       f"{count:.0f} requests")
        checks.add("switch latency", _switch_latency_ms(state))
    finally:
        stack.down(config.state_dir, config.name, stop_timeout_s=15, say=lambda m: print(f"  {m}", file=sys.stderr))
    return checks


def measure_coruns(daemon: mps.MpsDaemon, args: argparse.Namespace, device: str, num_sms: int) -> list[tuple[str, str]]:
    """The co-residency co-runs (bench/corun.py) and the calibration file; rows for the table."""
    from bench import corun
    from orchestrator.coresidency import write_calibration
    if not args.corun_caps.strip():
        return []
    try:
        caps = corun.parse_caps(args.corun_caps)
        print(f"co-runs at {args.corun_caps}", file=sys.stderr)
        runs = corun.measure(caps, args.corun_seconds, num_sms, lambda pct: {**os.environ, **daemon.client_env(pct)})
        args.coresidency_out.parent.mkdir(parents=True, exist_ok=True)
        data = write_calibration(args.coresidency_out, device, runs, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as e:
        return [("co-run", f"failed: {e}")]
    return corun.rows(runs, data["residual"], str(args.coresidency_out))


# ---------------------------------------------------------------------------------------------- driver

def driver_rows(green_shares: Sequence[float] = (0.3, 0.5, 1.0)) -> list[tuple[str, str]]:
    """cuda-python's view (services/common/cuda_driver.py), outside MPS: the device's SM count from
    cuDeviceGetAttribute, and green contexts split at a few shares (asked -> given SMs)."""
    try:
        info = cuda_driver.device_info(0)
    except cuda_driver.CudaDriverError as e:
        return [("SMs (driver)", f"failed: {e}")]
    rows = [("SMs (driver)", f"{info.sm_count} (cuDeviceGetAttribute MULTIPROCESSOR_COUNT), sm_{info.compute_capability[0]}"
                              f"{info.compute_capability[1]}, {info.total_memory_bytes / 2**30:.0f} GiB")]
    space = UnitSpace.cuda(info.sm_count)
    try:
        resource = cuda_driver.sm_resource(0)
        green = cuda_driver.GreenShares.create(space, green_shares)
    except (cuda_driver.CudaDriverError, ValueError) as e:
        return rows + [("green contexts", f"failed: {e}")]
    try:
        asked = ", ".join(f"{s:.0%}->{green.for_units(space.units_for(s)).sm_count}" for s in green_shares)
        rows.append(("green contexts", f"split ok: {asked} SMs (min {resource.min_partition}, "
                                       f"alignment {resource.alignment})"))
    finally:
        green.close()
    return rows + [green_switch_row(green_shares)]


def green_switch_row(green_shares: Sequence[float]) -> tuple[str, str]:
    """The retune path of `--retune-mode green` (services/worker/green.py): a 4096^2 matmul timed on
    each partition's stream after the switch, and the switch itself (old stream drained)."""
    import torch
    try:
        retune = GreenRetune.create(green_shares)
    except (cuda_driver.CudaDriverError, ValueError) as e:
        return ("green retune", f"failed: {e}")
    a = torch.randn(4096, 4096, device="cuda:0", dtype=torch.float16)
    parts = []
    try:
        for share in green_shares:
            switch = retune.apply(share)
            a @ a
            torch.cuda.current_stream().synchronize()
            started = time.perf_counter()
            for _ in range(10):
                a @ a
            torch.cuda.current_stream().synchronize()
            parts.append(f"{switch.sm_count} SMs: switch {switch.switch_ms:.2f} ms, matmul "
                         f"{(time.perf_counter() - started) * 100:.2f} ms")
    finally:
        retune.close()
        torch.cuda.set_stream(torch.cuda.default_stream(0))
    return ("green retune", "; ".join(parts))


# ---------------------------------------------------------------------------------------------- table

def render(device: str, checks: StackChecks, shares: list[dict]) -> str:
    def num(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [f"duoserve gpu-check on {device}", f"{'check':<24} result", f"{'-' * 24} {'-' * 50}"]
    lines += [f"{check:<24} {result}" for check, result in checks.rows]
    lines += ["", f"{'share':>6} {'SMs':>9} {'driver SMs':>10} {'prefill tok/s':>14} {'decode tok/s':>13}  note",
              f"{'-' * 6} {'-' * 9} {'-' * 10} {'-' * 14} {'-' * 13}  {'-' * 20}"]
    for row in shares:
        sms = "n/a" if row.get("sms") is None else f"{row['sms']}/{row.get('sms_total') or '?'}"
        note = row.get("error") or (row.get("probe_error") or row.get("driver_error") or "")[:60]
        lines.append(f"{row['percentage'] + '%':>6} {sms:>9} {num(row.get('driver_sms'), 'd'):>10} "
                     f"{num(row.get('prefill_tok_s'), '.0f'):>14} {num(row.get('decode_tok_s'), '.0f'):>13}  {note}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--shares", default="30,50,70,100", help="MPS percentages to measure")
    p.add_argument("--model", default=os.environ.get("DUOSERVE_MODEL"), help="default: the default model")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("DUOSERVE_CACHE_DIR", Path.home() / ".cache" / "duoserve" / "models")))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt compared with the CPU")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--kv-blocks", type=int, default=1024)
    p.add_argument("--keep-logs", type=Path, default=None, help="copy the stack's logs here")
    p.add_argument("--corun-caps", default="100/30,70/50",
                   help="prefill/decode MPS percentages of the co-runs (overlapping: sum > 100); '' skips them")
    p.add_argument("--corun-seconds", type=float, default=5.0, help="each co-run child's timed loop")
    p.add_argument("--coresidency-out", type=Path,
                   default=Path(os.environ.get("DUOSERVE_CACHE_DIR", Path.home() / ".cache" / "duoserve"))
                   / "coresidency.json", help="the co-residency calibration file written from the co-runs")
    p.add_argument("--measure-here", action="store_true", help=argparse.SUPPRESS)   # the per-share child
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure_here:
        print(json.dumps(measure_here(args)), flush=True)
        return 0
    reason = missing_gpu_reason()
    if reason is not None:
        print(f"gpu-check needs an NVIDIA GPU with its driver and MPS: {reason}. Nothing was started.",
              file=sys.stderr)
        return EXIT_NO_GPU
    import torch
    device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
    driver = driver_rows()                # before MPS starts: this process is no MPS client
    with tempfile.TemporaryDirectory(prefix="duoserve-gpu-check-") as tmp:
        daemon = mps.ensure_daemon([p for p in (os.environ.get(mps.PIPE_ENV), mps.DEFAULT_PIPE_DIR) if p],
                                   Path(tmp) / "mps", Path(tmp) / "mps-log")
        print(f"MPS control daemon {daemon.pid} on {daemon.pipe_dir} "
              f"({'started' if daemon.started_by_us else 'already running'})", file=sys.stderr)
        try:
            shares = []
            for percentage in (int(s) for s in args.shares.split(",") if s.strip()):
                print(f"measuring at {percentage}%", file=sys.stderr)
                shares.append(measure_share(percentage, daemon, args))
            corun_rows = measure_coruns(daemon, args, device, torch.cuda.get_device_properties(0).multi_processor_count)
            checks = check_stack(daemon, args, Path(tmp) / "state")
            for check, result in (*driver, *corun_rows):
                checks.add(check, result, ok=not result.startswith("failed"))
        finally:
            if args.keep_logs and (Path(tmp) / "state").exists():
                shutil.copytree(Path(tmp) / "state", args.keep_logs, dirs_exist_ok=True)
            mps.quit_daemon(daemon)
    print(render(device, checks, shares))
    return 0 if checks.ok and all("error" not in s for s in shares) else 1


if __name__ == "__main__":
    sys.exit(main())
