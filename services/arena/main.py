"""Arena: the resident holder of one stack's weights and paged KV pool (semi-PD's resident process).

The arena's life:
  start     config from argv/env; refuse to start beside a live arena of the same stack; gRPC
            health NOT_SERVING and metrics up
  re-open   cpu: a restarted arena takes over the segments its dead predecessor left, when they
            hold what it would make (services.arena.segments): the workers, which map them, go on
            as if nothing happened, and the KV blocks of the requests in flight stay as they are.
            Whatever dead arenas left that is not re-opened is unlinked
  load      otherwise: the model resolved and its weights loaded once (load_engine_weights: fused,
            in the serving dtype), into private memory
  export    one weights segment, packed with a manifest (one copy), then the private copy freed;
            one KV segment, zeroed, every page allocated; then the record a restarted arena
            re-opens them by; the model info published in Redis. New memory gets a new random
            `memory_id` (re-opened memory keeps its own): the workers put it on every hand-off, so
            decode knows when a request's KV was written to memory that is gone.
            --device cuda: the same two buffers as one CUDA allocation each on cuda:0 (packed with
            the same manifest), exported as CUDA IPC handles (services.arena.cuda_export); they die
            with the arena, so its workers restart with it and their requests are recomputed
  serve     each connection to the private Unix socket from a process of our uid (SO_PEERCRED)
            gets one JSON `ArenaExport` and is closed; health SERVING. Workers attach, compute,
            restart and re-attach; the arena itself does no compute. On cuda each connection gets
            freshly described handles (one torch IPC ref-counter slot per worker)
  shutdown  SIGTERM/SIGINT (also while loading): health NOT_SERVING, socket and segments
            unlinked, exit 0. Workers still mapping the segments keep their memory until they exit.

Segments are named `duoserve-<stack_id>-<pid>-weights`, `...-kv` and `...-record`: the owner pid in
the name tells a restarted arena (or `reclaim_segments`) that their owner is dead.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import grpc
import redis
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.arena import segments
from duoserve.credentials import redact_url
from services.arena.config import ArenaConfig, parse_args
from services.arena.cuda_export import CudaExport, describe
from services.arena.export import ArenaExport, KVLayout, model_config_to_dict, peer_credentials, private_dir
from services.common.contracts import KeySpace
from services.common.grpc_input import InputInterceptor
from services.common.metrics_http import serve_metrics
from services.common.model_info import ModelInfo
from services.common.shm import (create_segment, list_segments, owned_name, pid_alive, reclaim_segments,
                                 segment_owner, unlink_segment)
from services.common.weights_pack import layout, pack_into
from services.engine.kv_cache import KVCacheSpec
from services.engine.llm_engine import DTYPES
from services.engine.loader import load_engine_weights, resolve_model_dir
from services.engine.model_config import ModelConfig

log = logging.getLogger("duoserve.arena")

REDIS_WAIT_S = 30.0                 # how long to retry a Redis that is still starting


class ArenaMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.weights_bytes = Gauge("duoserve:arena_weights_bytes", "Bytes of the shared weights segment", registry=r)
        self.kv_bytes = Gauge("duoserve:arena_kv_bytes", "Bytes of the shared KV pool segment", registry=r)
        self.kv_blocks = Gauge("duoserve:arena_kv_blocks", "Blocks in the shared KV pool", registry=r)
        self.attachments = Counter("duoserve:arena_attachments", "Workers answered on the arena socket", registry=r)
        self.refused_peers = Counter("duoserve:arena_refused_peers",
                                     "Connections closed unanswered (another uid)", registry=r)

    def serve(self, port: int) -> None:
        serve_metrics(port, self.registry)


class Shutdown:
    """SIGTERM/SIGINT handler. While the arena starts, the signal abandons start-up at once
    (SystemExit, so the cleanup in `run` still runs); once serving, it only wakes the main thread."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.interrupt = True
        self.signalled = False        # a signal arrived (requested is also set by `run`'s own clean-up)

    def __call__(self, signum: int, frame: object) -> None:
        self.signalled = True
        first = not self.requested.is_set()
        self.requested.set()
        if first and self.interrupt:
            self.interrupt = False
            raise SystemExit(0)


@dataclass
class Exported:
    """The arena's memory, once exported."""

    weights_bytes: int
    kv_bytes: int
    document: ArenaExport
    buffers: tuple = ()                 # what must live as long as the arena: Segments (cpu), CUDA tensors (cuda)

    def answer(self) -> bytes:
        """The document one worker gets. cuda: handles described anew for each worker, as
        torch.multiprocessing does per send (each takes its own ref-counter slot)."""
        if self.document.device != "cuda":
            return self.document.to_json()
        weights, kv = self.buffers
        return replace(self.document, cuda=CudaExport(describe(weights), describe(kv))).to_json()


# ---------------------------------------------------------------------------------------------- export

def export_memory(config: ArenaConfig) -> Exported:
    """The weights and the KV pool the workers get. On the CPU: a dead predecessor's segments when
    they hold what this arena would make (services.arena.segments), else the weights loaded once
    into new ones."""
    model_dir = resolve_model_dir(config.model, config.cache_dir)
    model_config = ModelConfig.from_dir(model_dir)
    dtype = DTYPES[config.dtype]
    spec = KVCacheSpec.for_model(model_config, config.block_size, dtype, config.num_kv_blocks,
                                 config.kv_cache_memory_bytes)
    if config.device == "cuda":
        reclaim_stale(config)
        return _export_cuda(config, model_dir, model_config, spec)
    made_from = segments.identity(model_dir, config.dtype, spec)
    reopened = segments.reopen(config.segment_prefix, made_from, model_config, dtype)
    reclaim_stale(config)                    # what was not re-opened, before new memory is taken
    if reopened is None:
        return _export_new(config, model_dir, model_config, spec, made_from)
    log.info("re-opened the segments of the arena before this one: weights %s (%.1f MiB), KV pool %s "
             "(%d blocks, kept as the workers left it)", reopened.weights.name, reopened.weights.size / 2**20,
             reopened.kv.name, spec.num_blocks)
    return Exported(reopened.weights.size, reopened.kv.size, reopened.document, (reopened.weights, reopened.kv))


def _export_new(config: ArenaConfig, model_dir: Path, model_config: ModelConfig, spec: KVCacheSpec,
                made_from: dict) -> Exported:
    """Load the weights once into a packed segment, allocate the KV segment, then write the record
    that lets a restarted arena re-open both."""
    started = time.monotonic()
    weights = load_engine_weights(model_dir, model_config, spec.dtype)
    manifest, size = layout(weights)
    weights_segment = create_segment(owned_name(config.segment_prefix, "weights"), max(size, 1))
    pack_into(weights_segment.tensor(), weights, manifest)            # the one copy into shared memory
    del weights
    _release_freed_memory()
    log.info("weights: %d tensors, %.1f MiB in %s (%.1f s)", len(manifest), size / 2**20, weights_segment.name,
             time.monotonic() - started)
    kv_segment = create_segment(owned_name(config.segment_prefix, "kv"), spec.num_bytes)   # zeroed by the kernel
    log.info("KV pool: %d blocks of %d tokens, %.1f MiB in %s", spec.num_blocks, spec.block_size,
             spec.num_bytes / 2**20, kv_segment.name)
    document = ArenaExport(
        arena_pid=os.getpid(), weights_segment=weights_segment.name, weights_manifest=manifest,
        kv_segment=kv_segment.name, kv_spec=_kv_layout(spec, config.dtype),
        model_dir=str(model_dir), model_config_path=str(model_dir / "config.json"),
        model_config=model_config_to_dict(model_config), memory_id=new_memory_id())
    record = segments.write_record(config.segment_prefix, document, made_from)
    return Exported(weights_segment.size, kv_segment.size, document, (weights_segment, kv_segment, record))


def new_memory_id() -> str:
    """The id of memory just made. A hand-off names the memory its KV is in (Handoff.kv_memory): a
    re-opened set keeps its id in its record, new memory gets a new one, and decode resumes a request
    in place only over the memory its KV was written to."""
    return secrets.token_hex(8)


def _kv_layout(spec: KVCacheSpec, dtype: str) -> KVLayout:
    return KVLayout(spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim, dtype)


def _export_cuda(config: ArenaConfig, model_dir: Path, model_config: ModelConfig, spec: KVCacheSpec) -> Exported:
    """The same two buffers on cuda:0, one allocation each: weights packed by the same manifest, KV zeroed."""
    started = time.monotonic()
    weights = load_engine_weights(model_dir, model_config, spec.dtype)
    manifest, size = layout(weights)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    weights_buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=device)     # [bytes], one allocation
    pack_into(weights_buffer, weights, manifest)                                      # host -> device, once
    del weights
    _release_freed_memory()
    kv_buffer = torch.zeros(spec.num_bytes, dtype=torch.uint8, device=device)        # [bytes], one allocation
    torch.cuda.synchronize(device)                    # both complete before any worker maps them
    log.info("weights: %d tensors, %.1f MiB on %s; KV pool: %d blocks of %d tokens, %.1f MiB (%.1f s)",
             len(manifest), size / 2**20, device, spec.num_blocks, spec.block_size, spec.num_bytes / 2**20,
             time.monotonic() - started)
    document = ArenaExport(
        arena_pid=os.getpid(), weights_segment="", weights_manifest=manifest, kv_segment="",
        kv_spec=_kv_layout(spec, config.dtype),
        model_dir=str(model_dir), model_config_path=str(model_dir / "config.json"),
        model_config=model_config_to_dict(model_config), device="cuda", memory_id=new_memory_id(),
        cuda=CudaExport(describe(weights_buffer), describe(kv_buffer)))   # checks both export before SERVING
    return Exported(weights_buffer.numel(), kv_buffer.numel(), document, (weights_buffer, kv_buffer))


def _release_freed_memory() -> None:
    """Give the freed private weights back to the OS (glibc keeps freed heap otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                                                            # not glibc: nothing to do


def publish_model_info(config: ArenaConfig, document: ArenaExport) -> None:
    """The model and pool limits under KeySpace.model_info: field `json` (ModelInfo, read by the
    gateway) and one plain field per value for people and scripts (`redis-cli hgetall`)."""
    mc = document.config()
    kv = document.kv_spec
    info = ModelInfo(name=Path(document.model_dir).name, model_dir=document.model_dir, architecture=mc.architecture,
                     vocab_size=mc.vocab_size, max_model_len=mc.max_position, block_size=kv.block_size,
                     num_kv_blocks=kv.num_blocks, eos_token_ids=mc.eos_token_ids, dtype=kv.dtype, mode="split")
    fields = {
        "json": json.dumps(asdict(info)), "name": info.name, "model_dir": info.model_dir,
        "architecture": mc.architecture, "vocab_size": mc.vocab_size, "max_position": mc.max_position,
        "num_layers": mc.num_layers, "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "dtype": kv.dtype,
        "block_size": kv.block_size, "num_kv_blocks": kv.num_blocks, "eos_token_ids": json.dumps(list(mc.eos_token_ids)),
        "arena_pid": document.arena_pid,
    }
    client = redis.Redis.from_url(config.redis_url)
    deadline = time.monotonic() + REDIS_WAIT_S
    while True:
        try:
            client.hset(KeySpace(config.key_prefix).model_info, mapping=fields)
            break
        except redis.ConnectionError as e:
            if time.monotonic() > deadline:
                raise ConnectionError(f"Redis at {redact_url(config.redis_url)} unreachable for {REDIS_WAIT_S:.0f} s: {e}") from e
            time.sleep(0.2)
    client.close()


# ---------------------------------------------------------------------------------------------- servers

def listen_private(path: Path) -> socket.socket:
    """A Unix socket at `path`, mode 0600, in a directory only this user can enter."""
    private_dir(path.parent)
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()           # nobody listens: a dead arena's
            else:
                raise RuntimeError(f"another arena already answers on {path}: stop it or pick another --socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.settimeout(0.2)            # the accept loop polls its stop flag
    return listener


def serve_socket(listener: socket.socket, document: bytes | Callable[[], bytes], metrics: ArenaMetrics,
                 stop: threading.Event) -> None:
    """Answer every same-uid connection with the document (or what `document()` makes), one per connection."""
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return                      # listener closed: shutting down
        with conn:
            pid, uid, _ = peer_credentials(conn)
            if uid != os.getuid():
                metrics.refused_peers.inc()
                log.warning("refused arena connection from pid %d uid %d (we are uid %d)", pid, uid, os.getuid())
                continue
            try:
                conn.settimeout(5.0)
                conn.sendall(document() if callable(document) else document)
                metrics.attachments.inc()
                log.info("attached pid %d", pid)
            except OSError as e:
                log.warning("pid %d went away while attaching: %s", pid, e)
            except RuntimeError as e:          # cuda: the handles could not be described
                log.error("could not answer pid %d: %s", pid, e)


def start_health_server(port: int) -> tuple[grpc.Server, health.HealthServicer, int]:
    """grpc.health.v1 (NOT_SERVING until the memory is exported) and reflection; the bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[InputInterceptor()],
                         options=[("grpc.so_reuseport", 0)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    return server, health_servicer, bound


# ---------------------------------------------------------------------------------------------- life

def check_no_live_arena(config: ArenaConfig) -> None:
    for name in list_segments(config.segment_prefix):
        owner = segment_owner(name, config.segment_prefix)
        if owner is not None and owner != os.getpid() and pid_alive(owner):
            raise RuntimeError(f"stack {config.stack_id!r} already has a live arena (pid {owner} holds {name}); "
                               "stop it or pick another --stack-id")


def reclaim_stale(config: ArenaConfig) -> None:
    """Unlink the segments dead arenas left that this one did not re-open."""
    for name in reclaim_segments(config.segment_prefix):
        log.warning("unlinked %s, left behind by a dead arena", name)


def cleanup(config: ArenaConfig, listener: socket.socket | None, socket_inode: int | None) -> None:
    """Unlink everything this process created; safe to call with start-up only half done."""
    if listener is not None:
        listener.close()
    try:
        if socket_inode is not None and os.stat(config.socket_path).st_ino == socket_inode:
            os.unlink(config.socket_path)       # ours, not a successor's
    except FileNotFoundError:
        pass
    for name in list_segments(config.segment_prefix):
        if segment_owner(name, config.segment_prefix) == os.getpid() and unlink_segment(name):
            log.info("unlinked %s", name)


def run(config: ArenaConfig, shutdown: Shutdown) -> int:
    server = health_servicer = listener = socket_inode = None
    stop = shutdown.requested
    try:
        check_no_live_arena(config)
        metrics = ArenaMetrics()
        metrics.serve(config.metrics_port)
        server, health_servicer, port = start_health_server(config.port)
        log.info("health on 127.0.0.1:%d, loading %s", port, config.model or "the default model")
        exported = export_memory(config)
        metrics.weights_bytes.set(exported.weights_bytes)
        metrics.kv_bytes.set(exported.kv_bytes)
        metrics.kv_blocks.set(exported.document.kv_spec.num_blocks)
        publish_model_info(config, exported.document)
        listener = listen_private(config.socket_path)
        socket_inode = os.stat(config.socket_path).st_ino
        threading.Thread(target=serve_socket, name="arena-socket", daemon=True,
                         args=(listener, exported.answer, metrics, stop)).start()
        shutdown.interrupt = False
        if stop.is_set():
            return 0
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("arena %s serving on %s (pid %d)", config.stack_id, config.socket_path, os.getpid())
        stop.wait()
        log.info("shutting down")
        return 0
    finally:
        shutdown.interrupt = False
        stop.set()
        if health_servicer is not None:
            health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        cleanup(config, listener, socket_inode)
        if server is not None:
            server.stop(grace=0.5)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s arena %(levelname)s %(message)s")
    config = parse_args(argv)
    shutdown = Shutdown()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shutdown)
    try:
        return run(config, shutdown)
    except SystemExit as e:                     # a signal during start-up
        log.info("stopped while starting")
        return int(e.code or 0)
    except Exception as e:
        if shutdown.signalled:
            # The SystemExit raised inside a C extension (safetensors, torch) can come back out as
            # another exception, e.g. a ValueError about an UntypedStorage: the signal, not a failure.
            log.info("stopped while starting (%s: %s)", type(e).__name__, e)
            return 0
        log.exception("arena failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
