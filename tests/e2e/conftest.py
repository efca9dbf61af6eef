"""Real stacks for end-to-end tests: redis-server, arena, workers and gateway as real processes.

One stack per mode per test session (start-up costs ~20 s on 2 cores); tests must leave it as they
found it (every request finished or cancelled, every block free).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import redis

from duoserve import stack
from duoserve.credentials import bearer, secret_of
from duoserve.stack import Mode, StackConfig, StackState
from services.common.contracts import KeySpace
from services.common.redis_blocks import free_count


class RunningStack:
    def __init__(self, config: StackConfig, state: StackState) -> None:
        self.config = config
        self.state = state
        self.target = state.gateway_target
        self.redis = redis.Redis.from_url(state.redis_url)
        self.keys = KeySpace(state.key_prefix)

    def process(self, name: str):
        return next(p for p in self.state.processes if p.name == name)

    @property
    def secret(self) -> str | None:
        """The stack's secret (the workers' control service and the Admin API want it), from its file."""
        return secret_of(self.state.secret_file)

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that carries the secret."""
        return bearer(self.secret)

    def num_free_blocks(self) -> int:
        return free_count(self.redis, self.keys)

    def wait_free_blocks(self, expected: int, timeout: float = 60.0) -> int:
        """Poll the KV free count until it is `expected` (blocks come back within an iteration or two)."""
        deadline = time.monotonic() + timeout
        while (free := self.num_free_blocks()) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return free

    def reload_state(self) -> None:
        self.state = stack.read_state(self.config.state_path)


def start_stack(mode: Mode, tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path,
                dtype: str = "float32", prefix_caching: bool = True) -> RunningStack:
    name = f"e2e-{mode.value}" + ("" if dtype == "float32" else f"-{dtype}") + ("" if prefix_caching else "-nocache")
    config = StackConfig(state_dir=tmp_path_factory.mktemp(f"stack-{mode.value}"),
                         cache_dir=default_model_dir.parent, name=name, mode=mode, dtype=dtype,
                         num_kv_blocks=512, max_queue_len=64, startup_timeout_s=300, prefix_caching=prefix_caching)
    say = lambda msg: print(msg, file=sys.stderr)   # noqa: E731
    stack.up(config, detach=True, say=say)
    return RunningStack(config, stack.read_state(config.state_path))


def stop_stack(running: RunningStack) -> None:
    stack.down(running.config.state_dir, running.config.name, stop_timeout_s=10, say=lambda m: None)


@pytest.fixture(scope="session")
def split_stack(tmp_path_factory, default_model_dir):
    running = start_stack(Mode.SPLIT, tmp_path_factory, default_model_dir)
    yield running
    stop_stack(running)


@pytest.fixture(scope="session")
def colocated_stack(tmp_path_factory, default_model_dir):
    running = start_stack(Mode.COLOCATED, tmp_path_factory, default_model_dir)
    yield running
    stop_stack(running)


@pytest.fixture(params=["split", "colocated"])
def any_stack(request):
    return request.getfixturevalue(f"{request.param}_stack")
