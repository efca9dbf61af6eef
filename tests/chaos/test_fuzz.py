"""A property-based fuzz of the public API (issue 13) against a real split stack with a small KV pool.

Hypothesis generates requests (fuzz_requests.py, fuzz_http.py): valid ones (tiny max_tokens) and ones
with one fault each, sent as raw bytes through gRPC (the SDK could not send invalid UTF-8 or corrupt
protobuf) and as JSON through the HTTP API. Properties:
  every fault gets INVALID_ARGUMENT (HTTP 400) whose message starts with the faulty field; a valid
  request completes; bytes that are not a request never get UNKNOWN or INTERNAL
  a burst beyond the queue gets RESOURCE_EXHAUSTED for the excess, never anything worse
  afterwards: every process up with the same pid, no restart, every KV block free again, no traceback
  in any log, and one gateway log line per undecodable request
`make test` runs 2,000 gRPC and 300 HTTP examples (~2 minutes); --chaos-long (`make chaos`)
ten times as many.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings

import duoserve
from duoserve import errors, stack
from duoserve.stack import Mode, StackConfig
from services.common.contracts import KeySpace
from services.common.redis_blocks import free_count
from tests.chaos.fuzz_http import HttpCase, http_cases
from tests.chaos.fuzz_requests import Case, Limits, cases

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scale(request) -> int:
    """Ten times the examples under --chaos-long (`make chaos`)."""
    return 10 if request.config.getoption("--chaos-long") else 1

GRPC_EXAMPLES = 2_000          # x10 under --chaos-long (`make chaos`)
HTTP_EXAMPLES = 300
NUM_BLOCKS = 64                 # 1,024 tokens: prompts beyond it are refused, not queued
MAX_QUEUE_LEN = 4
EMPTY = "prompt: tokenizes to no tokens"     # a valid prompt of characters the vocabulary lacks (\x04, \x16, ...)
FUZZ = settings(deadline=None, database=None, derandomize=False, print_blob=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("fuzz"), cache_dir=default_model_dir.parent,
                         name="fuzz", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, max_queue_len=MAX_QUEUE_LEN,
                         startup_timeout_s=300)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    state = stack.read_state(config.state_path)
    yield config, state
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)


@pytest.fixture(scope="module")
def tally() -> collections.Counter:
    """Requests sent, by API and by fault; the last test checks the logs against it."""
    return collections.Counter()


def _limits(target: str) -> Limits:
    with duoserve.Client(target, timeout=30) as client:
        info = client.model_info()
    return Limits(info["vocab_size"], info["max_context"], NUM_BLOCKS * info["block_size"])


def _call(channel: grpc.Channel, case: Case) -> tuple[str, str]:
    """(status name, details) of one raw call."""
    timeout = 60 if case.codes == ("OK",) else 8
    path = f"/duoserve.v1.Generation/{case.method}"
    try:
        if case.method == "Generate":
            for _ in channel.unary_stream(path)(case.data, timeout=timeout):
                pass
        else:
            channel.unary_unary(path)(case.data, timeout=timeout)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


def test_grpc_requests_get_the_right_status_naming_the_field(fuzz_stack, tally, scale):
    _, state = fuzz_stack
    limits = _limits(state.gateway_target)
    channel = grpc.insecure_channel(state.gateway_target)

    @settings(FUZZ, max_examples=GRPC_EXAMPLES * scale)
    @given(case=cases(limits))
    def check(case: Case) -> None:
        code, details = _call(channel, case)
        tally["grpc"] += 1
        tally[f"grpc {case.what}"] += 1
        if case.what == "valid" and code == "INVALID_ARGUMENT" and details.startswith(EMPTY):
            return
        assert code in case.codes, f"{case.what} {case.method} got {code}: {details!r} ({case.data[:200]!r})"
        if case.field is not None:
            assert details.startswith(case.field), f"expected {case.field!r} first: {details!r}"

    try:
        check()
    finally:
        channel.close()
        print(f"gRPC fuzz: {dict(tally)}", file=sys.stderr)


def _post(url: str, body: bytes) -> tuple[int, dict | None]:
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status, None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_http_requests_get_the_right_status_naming_the_field(fuzz_stack, tally, scale):
    _, state = fuzz_stack
    limits = _limits(state.gateway_target)

    @settings(FUZZ, max_examples=HTTP_EXAMPLES * scale)
    @given(case=http_cases(limits.vocab_size))
    def check(case: HttpCase) -> None:
        status, body = _post(state.http_url + case.route, case.body)
        tally["http"] += 1
        tally[f"http {case.what}"] += 1
        if case.what == "valid" and status == 400 and body["error"]["message"].startswith(EMPTY):
            return
        assert status == case.status, f"{case.what} got {status}: {body} ({case.body[:200]!r})"
        if case.field is not None:
            message = body["error"]["message"]
            fields = case.field if isinstance(case.field, tuple) else (case.field,)
            assert message.startswith(fields), f"expected {case.field!r} first: {message!r}"

    try:
        check()
    finally:
        print(f"HTTP fuzz: {dict(tally)}", file=sys.stderr)


def test_a_burst_beyond_the_queue_gets_resource_exhausted(fuzz_stack):
    _, state = fuzz_stack

    def one(i: int) -> str:
        with duoserve.Client(state.gateway_target, timeout=120) as client:
            try:
                client.generate(token_ids=[100 + i + k for k in range(200)], max_tokens=2, temperature=0)
                return "OK"
            except errors.DuoserveError as e:
                return e.code

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        got = collections.Counter(pool.map(one, range(24)))
    assert set(got) <= {"OK", "RESOURCE_EXHAUSTED"} and got["OK"] and got["RESOURCE_EXHAUSTED"], got


def _free_blocks(state: stack.StackState) -> int:
    client = redis.Redis.from_url(state.redis_url)
    try:
        return free_count(client, KeySpace(state.key_prefix))
    finally:
        client.close()


def test_nothing_crashed_leaked_or_logged_a_traceback(fuzz_stack, tally):
    config, started = fuzz_stack
    out = io.StringIO()
    stack.status(config.state_dir, config.name, as_json=True, out=out)
    now = {p["name"]: p for p in json.loads(out.getvalue())["processes"]}
    for record in started.processes:
        assert now[record.name]["pid"] == record.pid and now[record.name]["restarts"] == 0, now[record.name]
        assert now[record.name]["health"] == "SERVING", now[record.name]
    deadline = time.monotonic() + 30
    while (free := _free_blocks(started)) != NUM_BLOCKS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert free == NUM_BLOCKS, f"{NUM_BLOCKS - free} KV blocks leaked"
    for record in started.processes:
        text = Path(record.log).read_text(errors="replace")
        assert "Traceback" not in text, f"{record.name}'s log has a traceback:\n{text[-3000:]}"
    gateway_log = Path(next(r.log for r in started.processes if r.name == "gateway")).read_text(errors="replace")
    refused = gateway_log.count("refused an undecodable request")
    assert refused >= tally["grpc utf8"], (refused, dict(tally))
    if tally["grpc"]:
        assert tally["grpc"] >= GRPC_EXAMPLES and tally["http"] >= HTTP_EXAMPLES, dict(tally)
