"""The gateway's configuration: built once in `main` from the command line and the environment."""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from typing import Sequence

from duoserve.credentials import API_KEY_ENV, redis_url_from_env, secret_from_env
from services.common.tls import TlsFiles


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
    gateway_id: str = ""            # the same after a restart, so the restarted gateway adopts its predecessor's
                                    # requests at once (each process runs under `<gateway_id>~<8 hex>`: peers.py)
    orphan_timeout_s: float = 30.0  # an adopted request no client re-attached to for this long is cancelled
    takeover_s: float = 60.0        # a gateway of the stack dead this long (lease not renewed) has its requests
                                    # adopted by a live one (takeover.py); longer than a supervised restart
    http_port: int = 0              # OpenAI-compatible HTTP API (/v1/completions, ...); 0 disables
    http_host: str = "127.0.0.1"    # bind address of the HTTP API
    peer_metrics: tuple[tuple[str, str], ...] = ()   # (process name, HOST:PORT) of the stack's other
                                    # /metrics endpoints, merged into the HTTP API's /metrics
    api_key: str = field(default="", repr=False)   # non-empty: both APIs want `authorization: Bearer
                                    # <key>` (HTTP: /v1/* and the tokenizer routes; /health, /metrics open)
    tls: TlsFiles | None = None     # both APIs over TLS (gRPC and HTTPS)
    pair_prefixes: tuple[str, ...] = ()   # the pairs' Redis key spaces it routes between (duoserve/pairs.py);
                                    # empty: one pair, under key_prefix itself

    def __post_init__(self) -> None:
        if self.max_queue_len < 1 or self.max_tokens_limit < 1:
            raise ValueError("max_queue_len and max_tokens_limit must be at least 1")
        if self.tokenizer_threads < 1 or self.max_tokenize_waiting < 1:
            raise ValueError("tokenizer_threads and max_tokenize_waiting must be at least 1")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.orphan_timeout_s <= 0:
            raise ValueError(f"orphan_timeout_s must be positive, got {self.orphan_timeout_s}")
        if self.takeover_s <= 0:
            raise ValueError(f"takeover_s must be positive, got {self.takeover_s}")
        if len(set(self.pair_prefixes)) != len(self.pair_prefixes) or any(not p for p in self.pair_prefixes):
            raise ValueError(f"--pair-prefixes must be distinct and non-empty, got {list(self.pair_prefixes)}")

    @property
    def pairs(self) -> tuple[str, ...]:
        """The key spaces of the pairs this gateway routes between (one: its own)."""
        return self.pair_prefixes or (self.key_prefix,)


def _peer(text: str) -> tuple[str, str]:
    """NAME=HOST:PORT, e.g. decode=127.0.0.1:9101."""
    name, sep, target = text.partition("=")
    host, colon, port = target.rpartition(":")
    if not (sep and name and host and colon and port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, target


def _default_gateway_id(port: int) -> str:
    """Stable across restarts on this host and port (one gateway per port); any free port (0): this process's."""
    return f"gw-{socket.gethostname()}-{port}" if port else f"gw-{socket.gethostname()}-pid{os.getpid()}"


def parse_args(argv: Sequence[str] | None = None) -> GatewayConfig:
    env = os.environ
    p = argparse.ArgumentParser(prog="duoserve-gateway", description="duoserve gateway: the public gRPC API")
    p.add_argument("--redis-url", default=env.get("REDIS_URL"), required=env.get("REDIS_URL") is None,
                   help="env REDIS_URL (`duoserve up` hands it so: it carries the stack's Redis password)")
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
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on both APIs, as vLLM's --api-key; prefer env "
                        "DUOSERVE_API_KEY (or DUOSERVE_API_KEY_FILE): a flag shows in `ps`")
    p.add_argument("--tls-cert", default=env.get("DUOSERVE_TLS_CERT"),
                   help="PEM certificate chain: serve gRPC and HTTP over TLS (env DUOSERVE_TLS_CERT)")
    p.add_argument("--tls-key", default=env.get("DUOSERVE_TLS_KEY"), help="its PEM private key (env DUOSERVE_TLS_KEY)")
    p.add_argument("--gateway-id", default=env.get("DUOSERVE_GATEWAY_ID"),
                   help="names this gateway's reply stream and request records in Redis; keep it across restarts "
                        "to re-adopt the requests in flight (default: gw-HOSTNAME-PORT)")
    p.add_argument("--orphan-timeout-s", type=float, default=float(env.get("DUOSERVE_ORPHAN_TIMEOUT_S", 30.0)),
                   help="after a restart, a request in flight whose client does not re-attach within this many "
                        "seconds is cancelled and its KV blocks freed")
    p.add_argument("--gateway-takeover-s", type=float, default=float(env.get("DUOSERVE_GATEWAY_TAKEOVER_S", 60.0)),
                   help="another gateway of the stack whose lease has not been renewed for this many seconds (it "
                        "died and did not come back under its id) has its requests adopted by this one; an Attach "
                        "for one of them adopts them at once")
    p.add_argument("--pair-prefixes", default=env.get("DUOSERVE_PAIR_PREFIXES", ""),
                   help="comma-separated Redis key prefixes of the pairs to route between (`duoserve up --pairs N` "
                        "passes <prefix>:p0,...; env DUOSERVE_PAIR_PREFIXES); default: one pair under --key-prefix")
    a = p.parse_args(argv)
    return GatewayConfig(pair_prefixes=tuple(x.strip() for x in a.pair_prefixes.split(",") if x.strip()),redis_url=redis_url_from_env(env, a.redis_url), key_prefix=a.key_prefix, port=a.port, host=a.host,
                         metrics_port=a.metrics_port, max_queue_len=a.max_queue_len,
                         max_tokens_limit=a.max_tokens_limit, default_max_tokens=a.default_max_tokens,
                         tokenizer_threads=a.tokenizer_threads,
                         gateway_id=a.gateway_id or _default_gateway_id(a.port),
                         orphan_timeout_s=a.orphan_timeout_s, takeover_s=a.gateway_takeover_s, http_port=a.http_port,
                         http_host=a.http_host, peer_metrics=tuple(a.peer_metrics),
                         api_key=a.api_key or secret_from_env(env, API_KEY_ENV), tls=TlsFiles.of(a.tls_cert, a.tls_key))
