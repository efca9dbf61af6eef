"""A split stack in bfloat16: the shared-memory weights and KV pool in bf16, prefill writing bf16 keys
and values that decode reads in place, every per-layer op on the CPU kernels' bf16 path."""
from __future__ import annotations

import pytest

import duoserve
from duoserve.stack import Mode
from tests.e2e.conftest import start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.long]   # a bfloat16 stack of its own (~1 minute): `make chaos` runs it, `make test` does not


@pytest.fixture(scope="module")
def bf16_stack(tmp_path_factory, default_model_dir):
    running = start_stack(Mode.SPLIT, tmp_path_factory, default_model_dir, dtype="bfloat16")
    yield running
    stop_stack(running)


def test_bf16_split_stack_answers_and_returns_its_blocks(bf16_stack):
    start_free = bf16_stack.num_free_blocks()
    with duoserve.Client(bf16_stack.target, timeout=120) as client:
        got = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                              max_tokens=16, temperature=0)
        assert "Paris" in got.text
        chunks = list(client.stream(prompt="Once upon a time", max_tokens=24, temperature=0.8, seed=3,
                                    ignore_eos=True))
        assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 24
    assert bf16_stack.wait_free_blocks(start_free) == start_free
