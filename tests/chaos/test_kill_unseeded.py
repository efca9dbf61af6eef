"""Unseeded sampling survives a killed worker: the stream a client reads stays one sample of the model.

A request without a seed cannot be drawn again the same way, so the worker that takes it over must
go on from the tokens the client already has, never from its prompt (the gateway would drop the
re-drawn tokens at positions it already sent, then send ones drawn after a different text). Each
test: 16 requests sampled at temperature 0.8 with no seed, `kill -9` of the worker generating them;
every stream ends with all its tokens, each token's logprob (reported by whichever worker drew it) is
the model's for that token after exactly the tokens before it in the stream (teacher-forced with
`transformers`), and every KV block is back. Colocated: the restarted engine recomputes prompt and
delivered tokens, then draws on. Split: decode resumes in place from its progress record.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import time

import pytest
import torch

import duoserve
from duoserve import stack
from duoserve.stack import Mode, StackConfig
from tests.chaos import chaos_ops as ops

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512
NUM_REQUESTS = 16
PROMPT_TOKENS = 32
MAX_TOKENS = 64
LOGPROB_TOLERANCE = 0.05     # ours vs transformers in float32 (logits agree within 1e-3 relative)


@pytest.fixture(scope="module", params=[
    pytest.param(("colocated", Mode.COLOCATED), id="colocated"),
    pytest.param(("decode", Mode.SPLIT), id="split-decode", marks=pytest.mark.chaos_long),   # make chaos
])
def victim_stack(request, tmp_path_factory, default_model_dir):
    victim, mode = request.param
    config = StackConfig(state_dir=tmp_path_factory.mktemp(f"chaos-{mode.value}"), cache_dir=default_model_dir.parent,
                         name=f"chaos-unseeded-{mode.value}", mode=mode, num_kv_blocks=NUM_BLOCKS,
                         startup_timeout_s=300, with_orchestrator=False)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    yield config, victim
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    assert stack.read_state(config.state_path) is None


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def _teacher_forced(hf_model, prompt: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[i] | prompt + tokens[:i]) for every i, from one forward pass."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()   # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()


def test_unseeded_streams_stay_consistent_across_a_kill(victim_stack, hf_model):
    config, victim = victim_stack
    target = ops.state(config).gateway_target
    prompts = [[100 + (7 * i + k) % 2000 for k in range(PROMPT_TOKENS)] for i in range(NUM_REQUESTS)]
    record = next(r for r in ops.state(config).processes if r.name == victim)
    restarts = ops.status(config)[victim]["restarts"]
    received = [0] * NUM_REQUESTS              # tokens each stream had read when the worker was killed
    at_kill: list[list[int]] = []

    def one(i: int):
        token_ids, logprobs, usage = [], [], None
        with duoserve.Client(target, timeout=300) as client:
            for chunk in client.stream(token_ids=prompts[i], max_tokens=MAX_TOKENS, temperature=0.8,
                                       ignore_eos=True, logprobs=0):
                token_ids += chunk.token_ids
                logprobs += [lp.logprob for lp in chunk.logprobs]
                received[i] = len(token_ids)
                usage = chunk.usage or usage
        return token_ids, logprobs, usage

    with concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(NUM_REQUESTS)]
        deadline = time.monotonic() + 120
        while sum(received) < NUM_REQUESTS * MAX_TOKENS // 4:     # every stream well under way
            assert time.monotonic() < deadline, "the requests did not start"
            time.sleep(0.05)
        os.kill(record.pid, signal.SIGKILL)
        at_kill.append(list(received))
        results = [f.result() for f in futures]

    print(f"{victim} killed with streams at {at_kill[0]} of {MAX_TOKENS} tokens", file=sys.stderr)
    assert any(0 < n < MAX_TOKENS for n in at_kill[0])     # killed mid-generation
    for i, (tokens, logprobs, usage) in enumerate(results):
        assert len(tokens) == len(logprobs) == MAX_TOKENS and usage.completion_tokens == MAX_TOKENS
        want = _teacher_forced(hf_model, prompts[i], tokens)
        worst = max(abs(g - w) for g, w in zip(logprobs, want))
        assert worst < LOGPROB_TOLERANCE, f"stream {i}: a token's logprob is off by {worst:.3f} (killed at " \
                                          f"{at_kill[0][i]}): it was drawn after other tokens than the stream's"
    assert ops.wait_all_free(config, NUM_BLOCKS, timeout=60) == NUM_BLOCKS             # nothing leaked
    deadline = time.monotonic() + 60
    while ops.status(config)[victim]["restarts"] < restarts + 1:
        assert time.monotonic() < deadline, f"{victim} not restarted"
        time.sleep(0.25)
