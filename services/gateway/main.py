"""The gateway process: the public gRPC API (duoserve.v1.Generation) in front of the stack's queues.

Start-up: config -> gRPC server (and the OpenAI-compatible HTTP API, when --http-port is set) up at once
with health NOT_SERVING (calls get UNAVAILABLE, /health 503) -> wait for the stack's model info in
Redis -> tokenizer loaded -> reply reader started -> SERVING, then NOT_SERVING whenever Redis does not
answer (redis_watch.py). Both APIs run in this one event loop over one Frontend; SIGTERM drains both
(NOT_SERVING, /health 503) and stops them.
A request's life here is told in `services.gateway.frontend` (and `services.gateway.openai_serving`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Sequence

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from duoserve.v1 import generation_pb2, generation_pb2_grpc
from services.common import redis_retry
from services.common.auth import AsyncBearerAuth
from services.common.tls import add_port
from services.gateway.config import GatewayConfig, parse_args
from services.gateway.errors import ErrorInterceptor
from services.gateway.failover import move_off_dead_pairs
from services.gateway.frontend import Frontend
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_http import HttpState, bind, start_http
from services.gateway.redis_watch import RedisWatch
from services.gateway.servicer import GenerationServicer
from services.gateway.takeover import LeaseLost, Takeover

log = logging.getLogger("duoserve.gateway")
SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
EXIT_LEASE_LOST = 3


async def serve(config: GatewayConfig) -> None:
    metrics = GatewayMetrics()
    metrics.serve(config.metrics_port)
    frontend = Frontend(config, redis_retry.async_client(config.redis_url), metrics)
    takeover = Takeover(frontend, config.takeover_s)
    # No SO_REUSEPORT: a port clash must fail loudly (the supervisor relaunches on a new port).
    guard = [AsyncBearerAuth([config.api_key], "this gateway's API key (the SDK's api_key=)")] if config.api_key else []
    server = grpc.aio.server(interceptors=[*guard, ErrorInterceptor()], options=[("grpc.so_reuseport", 0)])
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(frontend), server)
    health_servicer = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    add_port(server, f"{config.host}:{config.port}", config.tls)
    http_state = HttpState(frontend, config.peer_metrics, api_key=config.api_key, tls=config.tls)
    http_socket = bind(config.http_host, config.http_port) if config.http_port else None
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    http = start_http(http_state, http_socket) if http_socket else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await frontend.wait_for_model()
    await takeover.start()                     # a predecessor's requests in flight, if it was killed
    reader = asyncio.create_task(frontend.read_replies())
    sweeper = asyncio.create_task(frontend.sweep_orphans())
    leases = asyncio.create_task(takeover.run())
    routing = [asyncio.create_task(frontend.pairs.run())]          # several pairs: the view, the moves
    if not frontend.pairs.is_single:
        routing.append(asyncio.create_task(move_off_dead_pairs(frontend)))

    async def set_serving(is_serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)
        http_state.serving = is_serving

    await set_serving(True)
    watch = asyncio.create_task(RedisWatch(frontend, set_serving).run())
    log.info("gateway %s serving on %s:%d%s%s%s", frontend.gateway_id, config.host, config.port,
             f", HTTP{'S' if config.tls else ''} on {config.http_host}:{config.http_port}" if http else "",
             " over TLS" if config.tls else "", ", API key required" if config.api_key else "")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({stopping, leases}, return_when=asyncio.FIRST_COMPLETED)
    if leases.done() and isinstance(leases.exception(), LeaseLost):
        # Its requests are the adopter's now: a graceful stop would cancel them and delete their records.
        log.error("%s; exiting at once", leases.exception())
        os._exit(EXIT_LEASE_LOST)
    if leases.done():
        leases.result()                        # a bug: raised
    leases.cancel()
    watch.cancel()
    http_state.serving = False
    await health_servicer.enter_graceful_shutdown()
    if http:
        http[0].should_exit = True             # stops accepting; open streams get timeout_graceful_shutdown
    await server.stop(grace=2.0)
    if http:
        await http[1]
    reader.cancel()
    sweeper.cancel()
    for task in routing:
        task.cancel()
    with contextlib.suppress(*redis_retry.CONNECTION_ERRORS):     # Redis away: the stream stays (`down` removes it)
        await frontend.shutdown()
        await takeover.close()
    await frontend.client.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    asyncio.run(serve(parse_args(argv)))
    sys.exit(0)


if __name__ == "__main__":
    main()
