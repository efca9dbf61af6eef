"""The worker's configuration: built once in `main` from the command line and the environment.

The only module of a worker process that reads either. One frozen dataclass, passed explicitly.
"""
from __future__ import annotations

import argparse
import enum
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from duoserve.credentials import redis_url_from_env, secret_from_env
from services.worker.green import DEFAULT_GREEN_SHARES, parse_green_shares


RETUNE_MODES = ("inplace", "succession", "green")
RETUNE_MODE_ALIASES = {"handover": "succession"}   # its name before: stacks and scripts still say it
DEVICES = ("cpu", "cuda")
WEIGHT_LAYOUTS = ("packed", "shared")


class Phase(enum.Enum):
    PREFILL = "prefill"        # prompts -> KV blocks + first token, handed to decode
    DECODE = "decode"          # one token per running request per iteration
    COLOCATED = "colocated"    # chunked-prefill hybrid batches in one process (the baseline)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """One worker process."""

    phase: Phase
    redis_url: str                      # where queues, blocks and stats live
    key_prefix: str                     # Redis key space of this stack
    port: int                           # gRPC: Worker service, health, reflection
    metrics_port: int                   # Prometheus /metrics; 0 disables
    arena_socket: Path | None           # split mode: attach weights and KV here
    model: str | None                   # colocated mode: load the model privately
    cache_dir: Path                     # converted checkpoints (colocated)
    dtype: str = "float32"
    cpu_ids: tuple[int, ...] = ()       # initial compute share; empty = every core allowed now
    stack_cpus: tuple[int, ...] = ()    # the cores its shares are cut from (its pair's); empty: every core allowed now
    num_kv_blocks: int | None = None    # colocated: pool size (None: from kv_cache_memory_bytes)
    kv_cache_memory_bytes: int = 512 << 20
    max_num_seqs: int = 128             # running requests at most
    max_num_batched_tokens: int = 2048  # tokens per iteration
    chunk_size: int = 512               # colocated: prompt tokens per iteration (chunked prefill)
    idle_block_ms: int = 50             # how long an idle worker blocks on its queue per poll
    worker_id: str = ""                 # unique per process instance
    retune_mode: str = "inplace"        # SetComputeShare: "inplace" (cpu: move threads) | "succession" (a
                                        # successor at the new share takes over; cuda's default: an MPS limit
                                        # is fixed per process) | "green" (cuda: another green-context stream
                                        # in this process, services/worker/green.py)
    green_shares: tuple[float, ...] = DEFAULT_GREEN_SHARES   # "green": the shares partitions are made at
    takeover_from: str = ""             # a standby: the worker id it takes over from (the supervisor started it)
    device: str = "cpu"                 # "cpu", or "cuda": the arena's CUDA memory, compute on cuda:0
    mps_percentage: int | None = None   # cuda: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE this process started with
    weights: str = "packed"             # cpu: "packed" = a private oneDNN-packed copy of the linear weights
                                        # (1.1-1.8x faster GEMMs, one more copy of them per worker);
                                        # "shared" = GEMMs over the arena's copy in place. cuda: always shared
    overlap_publish: bool = True        # host work off the loop's thread: the publish sent while the next
                                        # iteration runs, decode's growth asked for during the forward pass,
                                        # inputs read only when the doorbell rang
    prefix_caching: bool = True         # reuse the KV blocks of cached prompt prefixes (vLLM's automatic
                                        # prefix caching); --no-prefix-caching turns it off
    secret: str = field(default="", repr=False)   # the stack's secret: the Worker service (SetComputeShare,
                                        # Drain, GetStats) wants it as a bearer token; "": open (--no-auth)

    def __post_init__(self) -> None:
        if self.phase is not Phase.COLOCATED and self.arena_socket is None:
            raise ValueError("prefill and decode workers need --arena-socket")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.chunk_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and chunk_size must be at least 1")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.mps_percentage is not None and not 1 <= self.mps_percentage <= 100:
            raise ValueError(f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE must be in 1..100, got {self.mps_percentage}")
        if self.weights not in WEIGHT_LAYOUTS:
            raise ValueError(f"weights must be one of {WEIGHT_LAYOUTS}, got {self.weights!r}")
        if self.retune_mode not in RETUNE_MODES:
            raise ValueError(f"retune_mode must be one of {RETUNE_MODES}, got {self.retune_mode!r}")
        if self.retune_mode == "green" and (self.device != "cuda" or self.mps_percentage not in (None, 100)):
            raise ValueError("--retune-mode green needs --device cuda and CUDA_MPS_ACTIVE_THREAD_PERCENTAGE 100 "
                             f"or unset (an MPS cap would clip the green partitions), got device {self.device!r}, "
                             f"percentage {self.mps_percentage}")
        available = os.sched_getaffinity(0)
        if any(cpu not in available for cpu in self.cpu_ids):
            raise ValueError(f"cpu ids {list(self.cpu_ids)} not all available to this process ({sorted(available)})")

    @property
    def name(self) -> str:
        return f"{self.phase.value}"


def _percentage(text: str | None) -> int | None:
    """MPS's variable may be fractional ("33.3"); the share we report is whole percent."""
    return None if not text else max(1, min(100, round(float(text))))


def _cpu_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(phase: Phase, argv: Sequence[str] | None = None) -> WorkerConfig:
    env = os.environ
    p = argparse.ArgumentParser(prog=f"duoserve-{phase.value}", description=f"duoserve {phase.value} worker")
    p.add_argument("--redis-url", default=env.get("REDIS_URL"), required=env.get("REDIS_URL") is None,
                   help="env REDIS_URL (`duoserve up` hands it so: it carries the stack's Redis password)")
    p.add_argument("--key-prefix", default=env.get("DUOSERVE_KEY_PREFIX", "duo"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--arena-socket", type=Path, default=None)
    p.add_argument("--model", default=env.get("DUOSERVE_MODEL"))
    p.add_argument("--cache-dir", type=Path,
                   default=Path(env.get("DUOSERVE_CACHE_DIR", Path.home() / ".cache" / "duoserve" / "models")))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cpus", type=_cpu_list, default=(), help="comma-separated core ids (initial share)")
    p.add_argument("--stack-cpus", type=_cpu_list, default=(),
                   help="the cores shares are fractions of (a pair's, with `duoserve up --pairs`); default: all allowed")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu, or cuda (attach the arena's CUDA memory; the SM share comes from MPS, "
                        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE)")
    p.add_argument("--retune-mode", choices=(*RETUNE_MODES, *RETUNE_MODE_ALIASES),
                   default=env.get("DUOSERVE_RETUNE_MODE") or None,
                   help="how SetComputeShare changes the share: inplace, or succession (a successor process "
                        "at the new share takes over; 'handover' is its old name), or green (cuda: green-"
                        "context SM partitions in this process, MPS percentage 100). Default: inplace on cpu, "
                        "succession on cuda")
    p.add_argument("--green-shares", type=parse_green_shares, default=DEFAULT_GREEN_SHARES,
                   help="--retune-mode green: comma-separated shares of the GPU to pre-create partitions at "
                        "(default 0.1,0.2,...,1.0)")
    p.add_argument("--weights", choices=WEIGHT_LAYOUTS, default="packed",
                   help="cpu: packed = this worker's own oneDNN-packed copy of the linear weights (faster "
                        "GEMMs, more memory); shared = run on the arena's copy in place (zero copy)")
    p.add_argument("--overlap-publish", choices=("on", "off"), default=env.get("DUOSERVE_OVERLAP_PUBLISH", "on"),
                   help="on (default): publish each iteration's outputs on a thread during the next forward "
                        "pass, ask for decode's next blocks during this one, read inputs only when a doorbell "
                        "thread saw some; off: all of it on the loop's thread, every iteration "
                        "(env DUOSERVE_OVERLAP_PUBLISH)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt whole: no reuse of cached prefixes' KV blocks")
    p.add_argument("--takeover-from", default="", help=argparse.SUPPRESS)   # set by the supervisor for a standby
    a = p.parse_args(argv)
    retune_mode = a.retune_mode or ("succession" if a.device == "cuda" else "inplace")   # an MPS limit is fixed
    retune_mode = RETUNE_MODE_ALIASES.get(retune_mode, retune_mode)
    return WorkerConfig(
        phase=phase, redis_url=redis_url_from_env(env, a.redis_url), key_prefix=a.key_prefix, port=a.port, metrics_port=a.metrics_port,
        arena_socket=a.arena_socket, model=a.model, cache_dir=a.cache_dir, dtype=a.dtype, cpu_ids=a.cpus, stack_cpus=a.stack_cpus,
        num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
        chunk_size=a.chunk_size, worker_id=f"{phase.value}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        retune_mode=retune_mode, green_shares=a.green_shares, takeover_from=a.takeover_from, device=a.device,
        mps_percentage=_percentage(env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")), weights=a.weights,
        overlap_publish=a.overlap_publish == "on", prefix_caching=a.prefix_caching, secret=secret_from_env(env))
