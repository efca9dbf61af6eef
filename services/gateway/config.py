"""The gateway's configuration: built once in `main` from the command line and the environment."""
from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """One gateway process."""

    redis_url: str                  # where queues and the model info live
    key_prefix: str                 # Redis key space of the stack
    port: int                       # public gRPC port (Generation, health, reflection)
    metrics_port: int = 0           # Prometheus /metrics; 0 disables
    host: str = "127.0.0.1"         # bind address of the gRPC server
    max_queue_len: int = 256        # requests waiting for prefill before RESOURCE_EXHAUSTED
    max_tokens_limit: int = 4096    # largest max_tokens a request may ask for
    max_prompt_chars: int = 1 << 20 # bound on a text prompt before tokenizing it
    max_messages: int = 256         # bound on chat messages per request
    default_max_tokens: int = 256   # when a request leaves max_tokens unset
    tokenizer_threads: int = 1      # threads tokenizing prompts off the event loop (HF's releases the GIL)
    max_tokenize_waiting: int = 64  # prompts waiting for those threads before RESOURCE_EXHAUSTED
    max_body_bytes: int = 16 << 20  # an HTTP request body larger than this is refused (413)
    stall_timeout_s: float = 120.0  # no token for this long: the request fails UNAVAILABLE
    model_wait_s: float = 300.0     # how long to wait at start for the stack to publish its model
    gateway_id: str = ""            # names this process's reply stream
    http_port: int = 0              # OpenAI-compatible HTTP API (/v1/completions, ...); 0 disables
    http_host: str = "127.0.0.1"    # bind address of the HTTP API
    peer_metrics: tuple[tuple[str, str], ...] = ()   # (process name, HOST:PORT) of the stack's other
                                    # /metrics endpoints, merged into the HTTP API's /metrics

    def __post_init__(self) -> None:
        if self.max_queue_len < 1 or self.max_tokens_limit < 1:
            raise ValueError("max_queue_len and max_tokens_limit must be at least 1")
        if self.tokenizer_threads < 1 or self.max_tokenize_waiting < 1:
            raise ValueError("tokenizer_threads and max_tokenize_waiting must be at least 1")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")


def _peer(text: str) -> tuple[str, str]:
    """NAME=HOST:PORT, e.g. decode=127.0.0.1:9101."""
    name, sep, target = text.partition("=")
    host, colon, port = target.rpartition(":")
    if not (sep and name and host and colon and port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, target


def parse_args(argv: Sequence[str] | None = None) -> GatewayConfig:
    env = os.environ
    p = argparse.ArgumentParser(prog="duoserve-gateway", description="duoserve gateway: the public gRPC API")
    p.add_argument("--redis-url", default=env.get("REDIS_URL"), required=env.get("REDIS_URL") is None)
    p.add_argument("--key-prefix", default=env.get("DUOSERVE_KEY_PREFIX", "duo"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--max-queue-len", type=int, default=256)
    p.add_argument("--max-tokens-limit", type=int, default=4096)
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--tokenizer-threads", type=int, default=1,
                   help="threads tokenizing prompts off the event loop (each takes up to a core under a flood)")
    p.add_argument("--http-port", type=int, default=0,
                   help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics, ...); 0: off")
    p.add_argument("--http-host", default="127.0.0.1", help="bind address of the HTTP API")
    p.add_argument("--peer-metrics", type=_peer, action="append", default=[], metavar="NAME=HOST:PORT",
                   help="another process's Prometheus endpoint, served again (labelled process=NAME) by the "
                        "HTTP API's /metrics; repeat per process (`duoserve up` passes every one of the stack)")
    a = p.parse_args(argv)
    return GatewayConfig(redis_url=a.redis_url, key_prefix=a.key_prefix, port=a.port, host=a.host,
                         metrics_port=a.metrics_port, max_queue_len=a.max_queue_len,
                         max_tokens_limit=a.max_tokens_limit, default_max_tokens=a.default_max_tokens,
                         tokenizer_threads=a.tokenizer_threads,
                         gateway_id=f"gw-{os.getpid()}-{uuid.uuid4().hex[:8]}", http_port=a.http_port,
                         http_host=a.http_host, peer_metrics=tuple(a.peer_metrics))
