"""The orchestrator process: the SLO-aware share controller and the Admin API (`duoctl`'s server).

Start-up: config -> Redis -> the model's shape from the stack's model info (waits for it) -> the
device (cpu: the stack's cores; cuda: the SMs the workers measured, `--num-sms` to override) -> the
performance model with that device's prior -> settings restored from Redis -> Admin gRPC + health ->
the control loop (see `orchestrator.controller` for a tick's life) until SIGTERM/SIGINT.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Sequence

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from duoserve.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.admin import AdminServicer
from orchestrator.config import OrchestratorConfig, parse_args
from orchestrator.controller import Controller
from orchestrator.coresidency import for_device
from orchestrator.hold import HoldConfig
from orchestrator.perf_model import ModelShape, PerfModel, device_for, h100
from orchestrator.policy import Policy, PolicyConfig
from orchestrator.redis_state import RedisState
from services.common import auth
from services.common.contracts import KeySpace
from services.common.tls import add_port
from services.common.grpc_input import InputInterceptor
from services.common.metrics_http import serve_metrics
from services.common import redis_retry
from services.common.model_info import ModelInfo, read_model_info
from services.common.shares import device_sms
from services.engine.model_config import ModelConfig

log = logging.getLogger("duoserve.orchestrator")
SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SM_WAIT_S = 30.0         # cuda: how long to wait for a worker's SM count before using the prior's


def _model_info_now(client: redis.Redis, keys: KeySpace) -> ModelInfo | None:
    try:
        return read_model_info(client, keys.model_info)
    except redis_retry.CONNECTION_ERRORS:
        return None              # Redis not up (yet, or again): asked again


def _measured_sms(config: OrchestratorConfig, state: RedisState, stop: threading.Event) -> int | None:
    """cuda: the GPU's SMs: `--num-sms`, else the most any worker measured (its report's SM counts:
    the SM probe's, or the driver's; services.worker.compute_units; `shares.device_sms` undoes an MPS
    cap on the reported count). Without a measurement within SM_WAIT_S the prior's count is used, with
    a warning. None: stopped while waiting."""
    if config.num_sms:
        return config.num_sms
    deadline = time.monotonic() + SM_WAIT_S
    while True:
        try:
            measured = max((device_sms(w.units_used, w.units_total, w.share)
                            for w in state.snapshot().workers.values() if w.units_kind == "sm"), default=0)
        except redis_retry.CONNECTION_ERRORS:
            measured = 0
        if measured > 0:
            return measured
        if time.monotonic() > deadline:
            prior = h100().num_units
            log.warning("no worker reported its SM count within %.0f s: predicting for %d SMs (the H100 prior); "
                        "pass --num-sms to say otherwise", SM_WAIT_S, prior)
            return prior
        if stop.wait(0.5):
            return None


def build_controller(config: OrchestratorConfig, client: redis.Redis, stop: threading.Event) -> Controller | None:
    keys = KeySpace(config.key_prefix)
    while (info := _model_info_now(client, keys)) is None:
        if stop.wait(0.5):
            return None
    shape = ModelShape.from_model_config(ModelConfig.from_dir(info.model_dir), DTYPE_BYTES.get(info.dtype, 4))
    state = RedisState(client, keys)
    num_units = len(config.stack_cpus) if config.device == "cpu" else _measured_sms(config, state, stop)
    if num_units is None:
        return None
    model = PerfModel(device_for(config.device, num_units), shape)
    log.info("device %s: %d %ss (%s prior)", config.device, model.units.num_units, model.units.unit, model.device.kind)
    coresidency = for_device(model.device.kind, config.coresidency_calibration)
    hold = HoldConfig(config.persist_ticks, config.min_dwell_ms, comfort_headroom=config.comfort_headroom)
    policy = Policy(model, PolicyConfig(overlap=config.overlap, switch_cost_ms=config.switch_cost_ms,
                                        probe_prompt_tokens=256, coresidency=coresidency, hold=hold))
    return Controller(config, state, policy)


def serve(config: OrchestratorConfig) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    guard = auth.interceptors((config.admin_token, config.secret),
                              "duoctl --token TOKEN (env DUOSERVE_ADMIN_TOKEN); on the stack's machine duoctl "
                              "--name NAME uses the stack's secret by itself")
    interceptors = [*guard, InputInterceptor()]     # undecodable requests: INVALID_ARGUMENT naming the field
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors,
                         options=[("grpc.so_reuseport", 0)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    add_port(server, f"127.0.0.1:{config.port}", config.tls)
    client = redis_retry.client(config.redis_url)
    controller = build_controller(config, client, stop)
    if controller is None:
        return 0
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(controller, controller.model.device.kind), server)
    serve_metrics(config.metrics_port, controller.metrics.registry)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("orchestrator serving on 127.0.0.1:%d%s (%s: %d %ss, token %s)", config.port,
             " over TLS" if config.tls else "", config.device, controller.model.units.num_units,
             controller.model.units.unit, "required" if guard else "not required")
    controller.run(stop)
    server.stop(grace=1.0)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    sys.exit(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
