"""The gateway process: the public gRPC API (duoserve.v1.Generation) in front of the stack's queues.

Start-up: config -> gRPC server up at once with health NOT_SERVING (calls get UNAVAILABLE) ->
wait for the stack's model info in Redis -> tokenizer loaded -> reply reader started -> SERVING.
A request's life here is told in `services.gateway.frontend`.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Sequence

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from duoserve.v1 import generation_pb2, generation_pb2_grpc
from services.gateway.config import GatewayConfig, parse_args
from services.gateway.errors import ErrorInterceptor
from services.gateway.frontend import Frontend
from services.gateway.metrics import GatewayMetrics
from services.gateway.servicer import GenerationServicer

log = logging.getLogger("duoserve.gateway")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


async def serve(config: GatewayConfig) -> None:
    metrics = GatewayMetrics()
    metrics.serve(config.metrics_port)
    frontend = Frontend(config, aioredis.Redis.from_url(config.redis_url), metrics)
    # No SO_REUSEPORT: a port clash must fail loudly (the supervisor relaunches on a new port).
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[("grpc.so_reuseport", 0)])
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(frontend), server)
    health_servicer = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    if server.add_insecure_port(f"{config.host}:{config.port}") == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await frontend.wait_for_model()
    reader = asyncio.create_task(frontend.read_replies())
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gateway %s serving on %s:%d", config.gateway_id, config.host, config.port)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    reader.cancel()
    await frontend.client.delete(frontend.reply_stream)
    await frontend.client.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    asyncio.run(serve(parse_args(argv)))
    sys.exit(0)


if __name__ == "__main__":
    main()
