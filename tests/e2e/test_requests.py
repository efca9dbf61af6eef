"""Requests through a real stack: equality with the offline engine, concurrency, cancellation,
bad input, and a gateway restart while the workers keep running."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import duoserve
from duoserve import errors
from services.engine.llm_engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors."]


@pytest.fixture(scope="module")
def offline_tokens(default_model_dir):
    engine = LLMEngine.from_config(EngineConfig(model=str(default_model_dir), num_kv_blocks=128))
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    outs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    return [list(o.token_ids) for o in outs]


def test_greedy_output_equals_offline_engine(any_stack, offline_tokens):
    with duoserve.Client(any_stack.target, timeout=120) as client:
        for prompt, expected in zip(PROMPTS, offline_tokens):
            got = client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0)
            assert list(got.token_ids) == expected
            assert got.usage.completion_tokens == len(expected) and got.usage.ttft_ms > 0


def test_sixteen_concurrent_streams_complete(any_stack):
    start_free = any_stack.num_free_blocks()
    results: list = [None] * 16

    def run(i: int) -> None:
        with duoserve.Client(any_stack.target, timeout=300) as client:
            chunks = list(client.stream(messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                        max_tokens=16, temperature=0.7, seed=i, ignore_eos=True))
            results[i] = chunks

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for chunks in results:
        assert chunks is not None and chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == 16
    assert any_stack.wait_free_blocks(start_free) == start_free


def _long_stream_started(client: duoserve.Client, tokens: int = 8):
    """A 400-token stream, left open once its first `tokens` tokens have arrived."""
    stream = client.stream(prompt="Tell me a very long story about a dragon.", max_tokens=400, ignore_eos=True)
    received = 0
    for chunk in stream:
        received += len(chunk.token_ids)
        if received >= tokens:
            return stream
    raise AssertionError(f"the stream ended after {received} tokens")


def test_cancelled_stream_frees_its_blocks(any_stack):
    start_free = any_stack.num_free_blocks()
    with duoserve.Client(any_stack.target, timeout=300) as client:
        stream = _long_stream_started(client)
        assert any_stack.num_free_blocks() < start_free              # it holds blocks now
        stream.close()
    assert any_stack.wait_free_blocks(start_free) == start_free


BAD_INPUTS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="word " * 9000), "prompt"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=1_000_000), "max_tokens"),
    (dict(prompt="hi", temperature=-0.5), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", top_k=-1), "top_k"),
    (dict(prompt="hi", stop=["x"] * 100), "stop"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(token_ids=[1, 2, 10**6]), "token_ids"),
]


def test_bad_input_is_invalid_argument_and_disturbs_nothing(any_stack):
    with duoserve.Client(any_stack.target, timeout=300) as client:
        running = client.stream(messages=[{"role": "user", "content": "Describe the ocean."}], max_tokens=48,
                                temperature=0, ignore_eos=True)
        first = next(iter(running))
        for kwargs, field in BAD_INPUTS:
            with pytest.raises(errors.InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
                client.generate(**kwargs)
        rest = list(running)
        assert rest[-1].finish_reason == "length"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 48


def test_full_queue_is_resource_exhausted(split_stack):
    """With prefill paused, requests beyond the gateway's queue limit (64 here) are refused; the rest finish."""
    start_free = split_stack.num_free_blocks()
    prefill = split_stack.process("prefill")
    outcomes: list = []

    def run(i: int) -> None:
        try:
            with duoserve.Client(split_stack.target, timeout=120) as client:
                outcomes.append(client.generate(prompt=f"Question {i}?", max_tokens=2))
        except errors.DuoserveError as e:
            outcomes.append(e)

    os.kill(prefill.pid, signal.SIGSTOP)           # hold prefill so the queue cannot drain
    threads = [threading.Thread(target=run, args=(i,)) for i in range(80)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 180          # generous: 80 clients on 2 busy cores
        while not any(isinstance(o, errors.ResourceExhausted) for o in outcomes) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.kill(prefill.pid, signal.SIGCONT)
    for t in threads:
        t.join(timeout=180)
    refused = [o for o in outcomes if isinstance(o, errors.ResourceExhausted)]
    served = [o for o in outcomes if isinstance(o, duoserve.Completion)]
    assert refused and "queue" in refused[0].message
    assert len(refused) + len(served) == 80
    assert split_stack.wait_free_blocks(start_free) == start_free


def _cpus_of(pid: int) -> set[int]:
    """Cores allowed to every thread of a process (the union; they should all agree)."""
    allowed = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        allowed |= os.sched_getaffinity(int(tid))
    return allowed


def test_set_compute_share_moves_cores_live(split_stack):
    orchestrator = split_stack.process("orchestrator")
    os.kill(orchestrator.pid, signal.SIGSTOP)       # this test sets the shares itself
    try:
        _set_compute_share_moves_cores_live(split_stack)
    finally:
        os.kill(orchestrator.pid, signal.SIGCONT)


def _apply_share(split_stack, stub, share: float, cpu_ids: list[int]) -> None:
    """Set prefill's share, let an iteration apply it, wait until its threads run on exactly those cores."""
    from duoserve.v1 import worker_pb2
    reply = stub.SetComputeShare(worker_pb2.SetComputeShareRequest(share=share, cpu_ids=cpu_ids), timeout=10)
    assert reply.pending                              # applied at the next iteration boundary
    with duoserve.Client(split_stack.target, timeout=120) as client:   # an iteration happens
        client.generate(prompt="Hello", max_tokens=2)
    prefill = split_stack.process("prefill")
    deadline = time.monotonic() + 10
    while _cpus_of(prefill.pid) != set(cpu_ids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cpus_of(prefill.pid) == set(cpu_ids)


def _set_compute_share_moves_cores_live(split_stack):
    import grpc
    from duoserve.v1 import worker_pb2, worker_pb2_grpc
    prefill = split_stack.process("prefill")
    all_cpus = sorted(os.sched_getaffinity(0))
    from duoserve.channel import open_channel
    stub = worker_pb2_grpc.WorkerStub(open_channel(prefill.target, token=split_stack.secret))
    before = stub.GetStats(worker_pb2.GetStatsRequest(), timeout=10)
    assert before.phase == worker_pb2.PHASE_PREFILL
    # The orchestrator ran in auto mode until it was stopped and may have moved prefill already:
    # start from one core whatever it decided.
    _apply_share(split_stack, stub, 0.5, all_cpus[:1])
    _apply_share(split_stack, stub, 1.0, all_cpus)
    after = stub.GetStats(worker_pb2.GetStatsRequest(), timeout=10)
    assert not after.share.pending and after.share.applied_at_unix_ms > 0 and list(after.share.cpu_ids) == all_cpus
    with pytest.raises(grpc.RpcError) as bad:
        stub.SetComputeShare(worker_pb2.SetComputeShareRequest(share=0.5, cpu_ids=[999]), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cpu_ids" in bad.value.details()
    _apply_share(split_stack, stub, 0.5, all_cpus[:1])


MODEL_NAME = "smollm2-135m-instruct"     # the served name of the default model (its converted directory)


def _scrape(port: int) -> dict[str, float]:
    """Every sample of a metrics port: 'name{labels}' -> value."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return predicate()


def test_a_cancelled_request_leaves_the_worker_gauges_and_counts_as_abort(split_stack):
    """Decode's running count and KV use drop when a request is cancelled, with the loop idle after
    it (they used to keep their last values until the next request); the gateway counts it, as vLLM
    does, under finished_reason="abort"."""
    gateway, decode = split_stack.process("gateway").metrics_port, split_stack.process("decode").metrics_port
    labels = f'model_name="{MODEL_NAME}",phase="decode"'
    running, kv_use = f"duoserve:num_requests_running{{{labels}}}", f"duoserve:kv_cache_usage_perc{{{labels}}}"
    aborted = f'duoserve:request_success_total{{finished_reason="abort",model_name="{MODEL_NAME}"}}'
    aborted_before = _scrape(gateway)[aborted]
    start_free = split_stack.num_free_blocks()
    num_blocks = int(split_stack.redis.hget(split_stack.keys.kv_meta, "num_blocks"))
    with duoserve.Client(split_stack.target, timeout=300) as client:
        stream = _long_stream_started(client)
        assert _scrape(decode)[running] == 1.0 and _scrape(decode)[kv_use] > 1 - start_free / num_blocks
        stream.close()
    assert split_stack.wait_free_blocks(start_free) == start_free
    idle = lambda: _scrape(decode)[running] == 0.0 and _scrape(decode)[kv_use] == 1 - start_free / num_blocks  # noqa: E731
    assert _wait_for(idle), _scrape(decode)
    assert _wait_for(lambda: _scrape(gateway)[aborted] == aborted_before + 1), _scrape(gateway)


def test_every_process_serves_prometheus_metrics(split_stack):
    import urllib.error
    import urllib.request
    expected = {
        "gateway": ["duoserve:time_to_first_token_seconds", "duoserve:inter_token_latency_seconds",
                    "duoserve:e2e_request_latency_seconds", "duoserve:prompt_tokens_total",
                    "duoserve:generation_tokens_total", "duoserve:num_requests_running",
                    "duoserve:num_requests_waiting"],
        "prefill": ["duoserve:compute_share", "duoserve:kv_cache_usage_perc", "duoserve:prompt_tokens_total",
                    "duoserve:iteration_seconds"],
        "decode": ["duoserve:compute_share", "duoserve:num_requests_running", "duoserve:generation_tokens_total",
                   "duoserve:handoff_latency_seconds"],
        "arena": ["duoserve:arena_weights_bytes", "duoserve:arena_kv_bytes"],
        "orchestrator": ["duoserve:perf_model_relative_error", "duoserve:compute_share_decided"],
    }
    with duoserve.Client(split_stack.target, timeout=120) as client:
        client.generate(prompt="Hello there", max_tokens=4, ignore_eos=True)
    for name, metrics in expected.items():
        proc = split_stack.process(name)
        assert proc.metrics_port, f"{name} has no metrics port"
        text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
        for metric in metrics:
            assert metric in text, f"{name} does not export {metric}"
        with pytest.raises(urllib.error.HTTPError) as other_path:       # /metrics only
            urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/v1/models", timeout=10)
        assert other_path.value.code == 404, name
    finished = f'duoserve:request_success_total{{finished_reason="length",model_name="{MODEL_NAME}"}}'
    assert _scrape(split_stack.process("gateway").metrics_port)[finished] >= 1
    assert _scrape(split_stack.process("decode").metrics_port)[
        f'duoserve:generation_tokens_total{{model_name="{MODEL_NAME}",phase="decode"}}'] >= 3


def test_gateway_restart_while_workers_keep_running(split_stack):
    """The stack's supervisor restarts a killed gateway; the workers go on as they were."""
    gateway = split_stack.process("gateway")
    workers = {name: split_stack.process(name).pid for name in ("prefill", "decode", "arena")}
    os.kill(gateway.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while split_stack.process("gateway").restarts < gateway.restarts + 1:
        assert time.monotonic() < deadline, "the supervisor did not restart the gateway"
        time.sleep(0.25)
        split_stack.reload_state()
    with duoserve.Client(split_stack.target, timeout=120) as client:
        while True:
            try:
                got = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=16, temperature=0)
                break
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    assert "Paris" in got.text
    for name, pid in workers.items():
        os.kill(pid, 0)                                  # still the same processes


def test_a_request_id_runs_once_at_a_time_and_is_free_again_after(split_stack):
    with duoserve.Client(split_stack.target, timeout=300) as client:
        running = client.stream(prompt="Tell me a story", max_tokens=400, temperature=0, ignore_eos=True,
                                request_id="same-id")
        next(iter(running))
        with pytest.raises(errors.InvalidArgument, match="already running"):
            client.generate(prompt="hi", max_tokens=2, request_id="same-id")
        running.close()                                  # cancelled: the id is free again at once
        deadline = time.monotonic() + 30
        while True:                                      # (the gateway releases it as the stream ends)
            try:
                again = client.generate(prompt="hi", max_tokens=3, temperature=0, ignore_eos=True,
                                        request_id="same-id")
                break
            except errors.InvalidArgument:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert again.request_id == "same-id" and len(again.token_ids) == 3   # not dropped as cancelled
