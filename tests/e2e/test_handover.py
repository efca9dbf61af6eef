"""Retune by succession with real processes (services/worker/succession.py, duoserve/standbys.py):
SetComputeShare on decode and on prefill while greedy streams run; the foreground supervisor starts a
standby at the new share, which takes over; every stream ends as the offline engine's greedy output,
no KV block leaks, the switch latency is reported, the supervisor records the successors, a share
sent during a succession is queued and applied after it, and `duoserve down` leaves nothing behind.
The cuda backend always retunes this way (an MPS limit is fixed per process); on the CPU it is forced
with DUOSERVE_RETUNE_MODE=succession, so CI runs the whole path (with the publish unthreaded,
DUOSERVE_OVERLAP_PUBLISH=off: every other stack test runs it threaded, the default)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

import duoserve
from duoserve import stack
from duoserve.stack import StackConfig
from duoserve.v1 import worker_pb2, worker_pb2_grpc
from services.common import succession
from services.common.contracts import WorkerReport, from_json
from services.engine.llm_engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from tests.e2e.conftest import RunningStack

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Explain gravity to a child.", "Name two planets.", "Describe a cat in one sentence.",
           "What is two plus two?", "Give me a word that rhymes with blue."]
MAX_TOKENS = 64
LONG_PROMPT = " ".join(f"item {i}," for i in range(100))   # ~400 tokens: several prefill chunks of 64
KEEPER_TOKENS = 1000                                          # outlasts both successions on a slow machine
NEW_CUDA_SHARE = 0.7                                          # cuda: the new MPS percentage / 100


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def handover_stack(request, tmp_path_factory, default_model_dir):
    """A foreground `duoserve up` (its supervisor starts and follows the workers' successors), succession forced."""
    device = request.param
    state_dir = tmp_path_factory.mktemp(f"stack-handover-{device}")
    env = {**os.environ, "DUOSERVE_RETUNE_MODE": "succession",  # read by the workers (and their successors)
           "DUOSERVE_OVERLAP_PUBLISH": "off",                       # and the unthreaded publish
           "DUOSERVE_PORT": "0", "DUOSERVE_HTTP_PORT": "0"}        # not 50051/8000: other stacks may run
    env.pop("REDIS_URL", None)
    err = open(state_dir / "up.err", "w+")
    up = subprocess.Popen([sys.executable, "-m", "duoserve.cli", "up", "--name", "e2e-handover", "--state-dir",
                           str(state_dir), "--cache-dir", str(default_model_dir.parent), "--num-kv-blocks", "256",
                           "--max-num-batched-tokens", "64", "--no-orchestrator", "--startup-timeout", "300",
                           "--device", device],
                          env=env, stdout=subprocess.PIPE, stderr=err, text=True)   # 64: prompts take several chunks
    try:
        target = up.stdout.readline().strip()                 # printed once every process is SERVING
        assert target.startswith("127.0.0.1:"), (state_dir / "up.err").read_text()
        config = StackConfig(state_dir=state_dir, cache_dir=default_model_dir.parent, name="e2e-handover")
        running = RunningStack(config, stack.read_state(config.state_path))
        running.supervisor, running.device = up, device
        yield running
    finally:
        stack.down(state_dir, "e2e-handover", stop_timeout_s=10, say=lambda m: None)
        if up.poll() is None:
            up.kill()
        up.wait()
        err.close()


@pytest.fixture(scope="module")
def offline_tokens(handover_stack, default_model_dir):
    engine = LLMEngine.from_config(EngineConfig(model=str(default_model_dir), num_kv_blocks=128,
                                                device=handover_stack.device))
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    return [list(o.token_ids) for o in engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]


def _report(running: RunningStack, phase: str) -> WorkerReport:
    return from_json(WorkerReport, running.redis.hget(running.keys.worker_stats(phase), "m"))


def _new_share(running: RunningStack) -> worker_pb2.SetComputeShareRequest:
    """cpu: every core (2 here: prefill and decode start on one each); cuda: another MPS percentage."""
    if running.device == "cuda":
        return worker_pb2.SetComputeShareRequest(share=NEW_CUDA_SHARE)
    return worker_pb2.SetComputeShareRequest(share=1.0, cpu_ids=sorted(os.sched_getaffinity(0)))


def _call(running: RunningStack, phase: str, method: str, request):
    with grpc.insecure_channel(running.process(phase).target) as channel:
        return getattr(worker_pb2_grpc.WorkerStub(channel), method)(request, timeout=10, metadata=running.auth)


def _set_share(running: RunningStack, phase: str, request=None) -> worker_pb2.ComputeShare:
    reply = _call(running, phase, "SetComputeShare", request or _new_share(running))
    assert reply.pending                                # applied by the successor (or after it)
    return reply


def _retuning(running: RunningStack, phase: str) -> bool:
    """The supervisor has started a standby for the worker now serving `phase`."""
    report = _report(running, phase)
    return succession.launch_for(running.redis, running.keys.prefix, phase, report.worker_id) is not None


def _queued_while_retuning(running: RunningStack, phase: str) -> bool:
    """Asking again (the same share) once the succession is under way: queued, never refused."""
    if not _retuning(running, phase):
        return False
    reply = _set_share(running, phase)
    assert reply.status in (worker_pb2.SHARE_STATUS_QUEUED, worker_pb2.SHARE_STATUS_ACCEPTED)   # ACCEPTED: the
    return reply.status == worker_pb2.SHARE_STATUS_QUEUED          # successor answered, the switch just happened


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    return stack.process_start_time(pid) is not None


def _retune_under_load(s: RunningStack, old: dict[str, int]) -> list[list[int]]:
    """Decode retuned with 4 streams mid-generation (and one cancelled meanwhile); prefill retuned with
    long prompts mid-prefill. Returns the 8 greedy streams' tokens."""
    results: list = [None] * len(PROMPTS)
    started = [threading.Event() for _ in PROMPTS]

    def run(i: int) -> None:
        tokens: list[int] = []
        with duoserve.Client(s.target, timeout=300) as client:
            for chunk in client.stream(messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=MAX_TOKENS,
                                       temperature=0):
                tokens.extend(chunk.token_ids)
                started[i].set()
        results[i] = tokens

    stop_load, loaded, numbers = threading.Event(), [], itertools.count()

    def load() -> None:                                 # keeps prefill mid-prompt at every boundary
        with duoserve.Client(s.target, timeout=300) as client:
            while not stop_load.is_set():               # each prompt its own from its first block: no cache hit
                prompt = f"Request {next(numbers)}: {LONG_PROMPT}"
                loaded.append(client.generate(prompt=prompt, max_tokens=2, temperature=0, ignore_eos=True))

    kept: list[int] = []

    def keep_decoding() -> None:                        # a stream surely mid-decode when decode hands over
        with duoserve.Client(s.target, timeout=300) as client:
            stream = client.stream(prompt="Tell me a long story.", max_tokens=KEEPER_TOKENS, ignore_eos=True)
            for chunk in stream:
                kept.extend(chunk.token_ids)
                if stop_load.is_set():
                    break
            stream.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    loaders = [threading.Thread(target=load) for _ in range(3)] + [threading.Thread(target=keep_decoding)]
    loaders[-1].start()
    for t in threads[:4]:
        t.start()
    _wait(lambda: all(e.is_set() for e in started[:4]), 120, "the first streams' tokens")
    _set_share(s, "decode")
    _wait(lambda: _queued_while_retuning(s, "decode"), 30, "decode to start its succession")
    with duoserve.Client(s.target, timeout=300) as client:   # a cancel during the succession is honoured
        doomed = client.stream(prompt="Tell me a long story.", max_tokens=400, ignore_eos=True)
        next(iter(doomed))
        doomed.close()
    for t in threads[4:] + loaders[:-1]:
        t.start()
    _set_share(s, "prefill")
    try:
        for phase in old:
            _wait(lambda: _report(s, phase).pid not in (0, old[phase]), 90, f"{phase}'s successor")
    finally:
        stop_load.set()
        for t in threads + loaders:
            t.join(timeout=300)
    assert loaded and all(c.usage.completion_tokens == 2 for c in loaded)
    assert 0 < len(kept) < KEEPER_TOKENS       # it ran across both successions and was cancelled after
    return results


def _handed_over(log_path: str, what: str) -> bool:
    """The successor's log says it took over some `what` ("running requests" or "queue entries")."""
    text = open(log_path).read()
    return "took over from" in text and f" 0 {what}" not in text.split("took over from")[1].splitlines()[0]


def test_retune_by_succession_keeps_every_stream(handover_stack, offline_tokens):
    s = handover_stack
    start_free = s.num_free_blocks()
    old = {phase: s.process(phase).pid for phase in ("prefill", "decode")}
    assert _retune_under_load(s, old) == offline_tokens      # nothing lost, nothing changed
    for phase, pid in old.items():
        _wait(lambda: not _alive(pid), 30, f"the old {phase} worker to exit")
        _wait(lambda: not _report(s, phase).share_pending, 30, f"{phase}'s share to be in effect")
        report = _report(s, phase)
        assert report.share == pytest.approx(_new_share(s).share)
        assert report.share_switch_ms > report.share_switch_stall_ms > 0
    assert _handed_over(s.process("decode").log, "running requests")
    assert _handed_over(s.process("prefill").log, "queue entries")
    assert s.wait_free_blocks(start_free) == start_free

    new = {phase: _report(s, phase).pid for phase in old}
    recorded = lambda: {r.name: r.pid for r in stack.read_state(s.config.state_path).processes if r.name in old}  # noqa: E731
    _wait(lambda: recorded() == new, 10, "the supervisor to record the successors")
    assert s.supervisor.poll() is None                  # an old worker's exit is no failure of the stack
    on_file = {r.name: r for r in stack.read_state(s.config.state_path).processes}
    if s.device == "cpu":                                # the role's command line is its successor's now
        assert on_file["decode"].argv[on_file["decode"].argv.index("--cpus") + 1] == \
            ",".join(map(str, _new_share(s).cpu_ids))
    assert all("--takeover-from" not in r.argv for r in on_file.values())
    followed = stack.follow_successions(stack.read_state(s.config.state_path))
    assert all(p.health == "SERVING" for p in stack.stack_status(followed))
    decode = next(r for r in followed.processes if r.name == "decode")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{decode.metrics_port}/metrics", timeout=10).read().decode()
    assert 'duoserve:share_switch_seconds_count{model_name="smollm2-135m-instruct",phase="decode"} 1.0' in metrics
    with duoserve.Client(s.target, timeout=120) as client:   # the successors serve
        assert client.generate(prompt="Hello", max_tokens=4, temperature=0).usage.completion_tokens >= 1

    _a_share_sent_during_a_succession_is_applied_after_it(s)
    followed = stack.follow_successions(stack.read_state(s.config.state_path))
    pids = [r.pid for r in followed.processes] + list(old.values())
    assert stack.down(s.config.state_dir, s.config.name, stop_timeout_s=10, say=lambda m: None) == 0
    assert s.supervisor.wait(60) == 0
    assert not [pid for pid in pids if _alive(pid)]
    assert not list(stack.SHM_DIR.glob(f"{followed.segment_prefix}*"))


def _a_share_sent_during_a_succession_is_applied_after_it(s: RunningStack) -> None:
    """Prefill back to one core (a succession), and while it runs a token budget on top: queued, not
    refused or dropped, and in force on the successor once it serves (in place: same cores)."""
    old_pid = _report(s, "prefill").pid
    first = (worker_pb2.SetComputeShareRequest(share=0.5) if s.device == "cuda"
             else worker_pb2.SetComputeShareRequest(share=0.5, cpu_ids=sorted(os.sched_getaffinity(0))[:1]))
    assert _set_share(s, "prefill", first).status == worker_pb2.SHARE_STATUS_RETUNING
    _wait(lambda: _retuning(s, "prefill"), 30, "prefill's succession to start")
    second = worker_pb2.SetComputeShareRequest()
    second.CopyFrom(first)
    second.token_budget = 48
    queued = _set_share(s, "prefill", second)
    assert queued.status == worker_pb2.SHARE_STATUS_QUEUED and queued.token_budget == 48
    _wait(lambda: _report(s, "prefill").pid not in (0, old_pid), 120, "prefill's successor")
    _wait(lambda: not _report(s, "prefill").share_pending, 30, "the queued share to be applied")
    report = _report(s, "prefill")
    expected = first.share if s.device == "cuda" else 1 / len(os.sched_getaffinity(0))
    assert report.token_budget == 48 and report.share == pytest.approx(expected)
    stats = _call(s, "prefill", "GetStats", worker_pb2.GetStatsRequest())
    assert stats.share.status == worker_pb2.SHARE_STATUS_APPLIED and stats.share.token_budget == 48
    with duoserve.Client(s.target, timeout=120) as client:   # the successor serves
        assert client.generate(prompt=LONG_PROMPT, max_tokens=2, temperature=0).usage.completion_tokens >= 1
