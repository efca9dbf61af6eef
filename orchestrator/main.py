"""The orchestrator process: the SLO-aware share controller and the Admin API (`duoctl`'s server).

Start-up: config -> Redis -> the model's shape from the stack's model info (waits for it) -> the
performance model with the CPU prior -> settings restored from Redis -> Admin gRPC + health ->
the control loop (see `orchestrator.controller` for a tick's life) until SIGTERM/SIGINT.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from typing import Sequence

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from duoserve.v1 import admin_pb2, admin_pb2_grpc
from orchestrator.admin import AdminServicer, BearerAuth
from orchestrator.config import OrchestratorConfig, parse_args
from orchestrator.controller import Controller
from orchestrator.perf_model import DeviceSpec, ModelShape, PerfModel
from orchestrator.policy import Policy, PolicyConfig
from orchestrator.redis_state import RedisState
from services.common.contracts import KeySpace
from services.common.grpc_input import InputInterceptor
from services.common.metrics_http import serve_metrics
from services.common.model_info import read_model_info
from services.engine.model_config import ModelConfig

log = logging.getLogger("duoserve.orchestrator")
SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def build_controller(config: OrchestratorConfig, client: redis.Redis, stop: threading.Event) -> Controller | None:
    keys = KeySpace(config.key_prefix)
    while (info := read_model_info(client, keys.model_info)) is None:
        if stop.wait(0.5):
            return None
    shape = ModelShape.from_model_config(ModelConfig.from_dir(info.model_dir), DTYPE_BYTES.get(info.dtype, 4))
    model = PerfModel(DeviceSpec.cpu(len(config.stack_cpus)), shape)
    policy = Policy(model, PolicyConfig(overlap=config.overlap, switch_cost_ms=config.switch_cost_ms,
                                        probe_prompt_tokens=256))
    return Controller(config, RedisState(client, keys), policy)


def serve(config: OrchestratorConfig) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    interceptors = [BearerAuth(config.admin_token)] if config.admin_token else []
    interceptors.append(InputInterceptor())         # undecodable requests: INVALID_ARGUMENT naming the field
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors,
                         options=[("grpc.so_reuseport", 0)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    if server.add_insecure_port(f"127.0.0.1:{config.port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{config.port}")
    client = redis.Redis.from_url(config.redis_url)
    controller = build_controller(config, client, stop)
    if controller is None:
        return 0
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(controller, "cpu"), server)
    serve_metrics(config.metrics_port, controller.metrics.registry)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("orchestrator serving on 127.0.0.1:%d (cores %s, token %s)", config.port, config.stack_cpus,
             "required" if config.admin_token else "not required")
    controller.run(stop)
    server.stop(grace=1.0)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    sys.exit(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
