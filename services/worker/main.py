"""Start a worker process: prefill, decode or colocated (see `services.worker.loop` for a request's life).

Start-up: config from argv -> pin to its cores -> attach the arena's weights and KV pool (split)
or load the model privately (colocated) -> the KV block pool in Redis -> gRPC (Worker, health,
reflection) and metrics -> warm-up iteration -> SERVING -> loop until SIGTERM/SIGINT.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Sequence

import redis
import torch

from services.common.contracts import KeySpace
from services.common.model_info import ModelInfo, write_model_info
from services.common import cuda_driver, redis_retry, shares
from services.common.redis_blocks import RedisBlockAllocator
from services.engine.kv_cache import KVCacheSpec, allocate_kv_pool
from services.engine.llm_engine import DTYPES
from services.engine.loader import load_engine_weights, resolve_model_dir
from services.engine.model import LlamaModel
from services.engine.model_config import ModelConfig
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerMode
from services.worker.compute import apply_cpu_share, current_cpus
from services.worker import succession
from services.worker.config import Phase, WorkerConfig, parse_args
from services.worker.control import ShareState, WorkerControl
from services.worker.green import GreenRetune
from services.worker.loop import Worker
from services.worker.metrics import WorkerMetrics
from services.worker.servicer import set_serving, start_worker_server

log = logging.getLogger("duoserve.worker")

MODES = {Phase.PREFILL: SchedulerMode.PREFILL, Phase.DECODE: SchedulerMode.DECODE,
         Phase.COLOCATED: SchedulerMode.HYBRID}


def _load_private(config: WorkerConfig) -> tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor, KVCacheSpec, Path]:
    """Colocated mode: weights and KV pool owned by this process."""
    model_dir = resolve_model_dir(config.model, config.cache_dir)
    model_config = ModelConfig.from_dir(model_dir)
    dtype = DTYPES[config.dtype]
    spec = KVCacheSpec.for_model(model_config, 16, dtype, config.num_kv_blocks, config.kv_cache_memory_bytes)
    weights, kv_cache = load_engine_weights(model_dir, model_config, dtype), allocate_kv_pool(spec)
    if config.device == "cuda":           # no arena: this process's own copies on cuda:0
        weights = {name: t.to("cuda:0") for name, t in weights.items()}
        kv_cache = kv_cache.to("cuda:0")
    return model_config, weights, kv_cache, spec, model_dir


def _load(config: WorkerConfig):
    if config.phase is Phase.COLOCATED:
        return _load_private(config), None
    from services.arena.client import attach_arena
    view = attach_arena(config.arena_socket, timeout=120.0, device=config.device)
    return (view.model_config, view.weights, view.kv_cache, view.kv_spec, view.model_dir), view


def build_worker(config: WorkerConfig, stack_cpus: tuple[int, ...]) -> tuple[Worker, object]:
    (model_config, weights, kv_cache, spec, model_dir), arena_view = _load(config)
    client = redis_retry.client(config.redis_url)
    keys = KeySpace(config.key_prefix)
    blocks = RedisBlockAllocator(client, keys)
    blocks.init_pool(spec.num_blocks, spec.block_size)
    if config.phase is Phase.COLOCATED:   # nobody else holds the weights: publish what is served
        write_model_info(client, keys.model_info, ModelInfo(
            name=model_dir.name, model_dir=str(model_dir), architecture=model_config.architecture,
            vocab_size=model_config.vocab_size, max_model_len=model_config.max_position,
            block_size=spec.block_size, num_kv_blocks=spec.num_blocks, eos_token_ids=model_config.eos_token_ids,
            dtype=config.dtype, mode="colocated"))
    chunk = config.chunk_size if config.phase is Phase.COLOCATED else config.max_num_batched_tokens
    scheduler = Scheduler(SchedulerConfig(
        mode=MODES[config.phase], block_size=spec.block_size, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, chunk_size=chunk,
        max_model_len=model_config.max_position, eos_token_ids=model_config.eos_token_ids,
        prefix_caching=config.prefix_caching, cache_salt=_cache_salt(config, arena_view)), blocks)
    # cpu, "packed": a private oneDNN copy of each linear weight (the arena's plain copy stays the source);
    # "shared": GEMMs over the arena's segment in place (see docs/architecture.md, "Weights on the CPU").
    pack = config.weights == "packed" and config.device == "cpu"
    runner = ModelRunner(LlamaModel(model_config, weights, pack_weights=pack), kv_cache, spec.block_size)
    cpus = config.cpu_ids or stack_cpus
    # cuda: the share is the MPS limit this process started with (its host threads keep their cores).
    if config.device == "cuda":
        share, units = shares.share_of_percentage(config.mps_percentage or 100), 0    # SMs: measured by probe_units
    else:
        share, units = shares.UnitSpace.cpu(len(stack_cpus)).share_of(len(cpus)), len(cpus)
    control = WorkerControl(ShareState(share, cpus,
                                       config.max_num_batched_tokens if config.phase is not Phase.DECODE else 0,
                                       num_units=units))
    metrics = WorkerMetrics(config.phase.value, model_name=model_dir.name)   # the name ModelInfo serves it under
    metrics.compute_share.set(share)
    metrics.read_when_scraped(lambda: len(scheduler.running), lambda: len(scheduler.waiting),
                              lambda: _kv_usage(blocks))
    metrics.read_prefix_cache(lambda: scheduler.prefix_query_tokens, lambda: scheduler.prefix_hit_tokens)
    return Worker(config, scheduler, runner, Sampler(), client, control, metrics, stack_cpus=stack_cpus,
                  kv_memory=arena_view.memory_id if arena_view is not None else ""), arena_view


def _cache_salt(config: WorkerConfig, arena_view) -> str:
    """What makes a block key name this KV memory: the arena's memory id (prefill and decode map the
    same one; an arena restarted on new memory has another, so no key of the old memory's blocks ever
    matches again). The colocated engine's pool is its own process's memory: a key of its own."""
    if arena_view is not None and arena_view.memory_id:
        return arena_view.memory_id
    return config.worker_id


def _green_retune(config: WorkerConfig, share: float) -> GreenRetune | None:
    """The green partitions, the worker's stream on the one for its first share; None (logged) when
    the driver cannot make them: the worker exits before it serves rather than run uncapped."""
    try:
        green = GreenRetune.create(config.green_shares)
        green.apply(share)
    except (cuda_driver.CudaDriverError, ValueError) as e:
        log.error("--retune-mode green: cannot make green-context partitions: %s; use --retune-mode "
                  "succession (MPS percentages) instead", e)
        return None
    return green


def _kv_usage(blocks: RedisBlockAllocator) -> float:
    """The shared pool's use now (one LLEN, on the metrics thread); NaN while Redis does not answer."""
    try:
        return 1 - blocks.num_free / blocks.num_blocks
    except redis.RedisError:
        return float("nan")


def run(phase: Phase, argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {phase.value} %(levelname)s %(message)s")
    config = parse_args(phase, argv)
    stack_cpus = config.stack_cpus or current_cpus()
    if config.cpu_ids:
        apply_cpu_share(config.cpu_ids)
    worker, arena_view = build_worker(config, stack_cpus)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.control.stop())
    handed = None
    if config.takeover_from:              # a standby: warm up, then wait for the old worker's state
        succession.warm_up(worker)
        handed = succession.wait_for_state(worker, config.takeover_from)
        if handed is None:
            if arena_view is not None:
                arena_view.close()
            return 1
    # A standby binds the ports the old worker has just closed: everyone finds it where the old one was.
    server, health_servicer = succession.bind_retrying(
        lambda: start_worker_server(config, worker.control, stack_cpus), timeout_s=10.0 if handed else 0.0)
    succession.bind_retrying(lambda: worker.metrics.serve(config.metrics_port), timeout_s=10.0 if handed else 0.0)
    if handed is not None:
        worker.import_state(handed)
    if config.retune_mode == "green":
        worker.green = _green_retune(config, worker.control.share.share)
        if worker.green is None:
            return 2
    if config.retune_mode == "succession":
        def release_ports() -> None:
            server.stop(None).wait()
            worker.metrics.close()
        worker.succession = succession.Succession(worker, release_ports)
    worker.probe_units()                  # SMs (cuda) or cores (cpu) its share gives it, for duoctl
    worker.report()                       # visible to the orchestrator before the first iteration
    set_serving(health_servicer, True)
    log.info("%s worker %s serving on 127.0.0.1:%d (cores %s)", phase.value, config.worker_id, config.port,
             worker.control.share.cpu_ids)
    try:
        if handed is not None:
            succession.record_switch(worker, handed)   # its first iteration starts now
        worker.run_forever()
    finally:
        if worker.succession is not None:
            worker.succession.withdraw()     # stopped while a standby was warming up: it goes too
        set_serving(health_servicer, False)
        worker.cancel_all(f"{phase.value} worker shut down")
        server.stop(grace=1.0)
        if worker.green is not None:
            worker.green.close()
        if arena_view is not None:
            arena_view.close()
    return 0

