"""Requests that do not decode (services/common/grpc_input.py): INVALID_ARGUMENT naming the field, one
log line, no traceback; on a sync server (workers, orchestrator, arena) and on the gateway's grpc.aio
server behind its ErrorInterceptor (before the servicer runs)."""
from __future__ import annotations

import asyncio
import logging
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc
from services.common.grpc_input import InputInterceptor, bad_utf8_field, describe
from services.gateway.errors import ErrorInterceptor
from services.gateway.servicer import GenerationServicer

BAD = b"\xff"


def _with_bad_string(message, text: str) -> bytes:
    """`message` serialized with the UTF-8 of `text` replaced by one invalid byte."""
    raw = message.SerializeToString()
    assert raw.count(text.encode()) == 1
    return raw.replace(text.encode(), text.encode()[:-1] + BAD)


@pytest.mark.parametrize("message, marker, path", [
    (pb.GenerateRequest(prompt="hello"), "hello", "prompt"),
    (pb.GenerateRequest(request_id="rid-1", prompt="x"), "rid-1", "request_id"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(stop=["aa", "bbb"])), "bbb", "sampling.stop[1]"),
    (pb.GenerateRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="assistant", content="yo!")])),
     "yo!", "messages.messages[1].content"),
    (pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="x")])),
     "system", "messages.messages[0].role"),
    (pb.GenerateRequest(prompt="x", slo_class="batch"), "batch", "slo_class"),
    (pb.TokenizeRequest(text="some text"), "some text", "text"),
])
def test_the_field_that_is_not_utf8_is_named(message, marker, path):
    data = _with_bad_string(message, marker)
    with pytest.raises(Exception) as e:
        type(message).FromString(data)
    reason = describe(type(message), data, e.value)
    assert reason.startswith(f"{path}: not valid UTF-8 (byte 0xff at offset {len(marker.encode()) - 1})")


def test_corrupt_bytes_name_the_message():
    for data in (b"\xff\xff\xff", b"\x12\x50abc", b"\x0a"):
        with pytest.raises(Exception) as e:
            pb.GenerateRequest.FromString(data)
        assert bad_utf8_field(pb.GenerateRequest.DESCRIPTOR, data) is None
        assert describe(pb.GenerateRequest, data, e.value).startswith(
            "request: not a valid duoserve.v1.GenerateRequest message (")


def _refusals(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "duoserve.grpc"]


def _assert_one_line(caplog, reason_start: str) -> None:
    assert [r.getMessage().split(": ", 1)[1] for r in _refusals(caplog)][0].startswith(
        "refused an undecodable request: " + reason_start)
    assert len(_refusals(caplog)) == 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_sync_server_refuses_with_invalid_argument(caplog):
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[InputInterceptor()])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")      # raw bytes in and out
            with pytest.raises(grpc.RpcError) as e:
                check(_with_bad_string(health_pb2.HealthCheckRequest(service="svc"), "svc"), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("service: not valid UTF-8")
            _assert_one_line(caplog, "service: not valid UTF-8")
            caplog.clear()
            with pytest.raises(grpc.RpcError) as e:
                check(b"\xff\xff", timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid grpc.health.v1.HealthCheckRequest message" in e.value.details()
            ok = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING     # valid requests pass untouched
    finally:
        server.stop(None)


def test_gateway_refuses_before_the_servicer_runs(caplog):
    """The servicer has no frontend: reaching it would fail INTERNAL, so INVALID_ARGUMENT proves the
    request was refused on the way in."""
    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(frontend=None), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_async.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        seen = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                generate = channel.unary_stream("/duoserve.v1.Generation/Generate")
                tokenize = channel.unary_unary("/duoserve.v1.Generation/Tokenize")
                calls = [
                    lambda: _drain(generate(_with_bad_string(pb.GenerateRequest(prompt="abc"), "abc"), timeout=5)),
                    lambda: _drain(generate(b"\x0a\x05ab", timeout=5)),
                    lambda: tokenize(_with_bad_string(pb.TokenizeRequest(text="abc"), "abc"), timeout=5)]
                for call in calls:
                    try:
                        await call()
                    except grpc.aio.AioRpcError as e:
                        seen.append((e.code(), e.details()))
                ok = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert ok.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(None)
        return seen

    seen = asyncio.run(scenario())
    assert [code for code, _ in seen] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert seen[0][1].startswith("prompt: not valid UTF-8")
    assert seen[1][1].startswith("request: not a valid duoserve.v1.GenerateRequest message")
    assert seen[2][1].startswith("text: not valid UTF-8")
    assert len(_refusals(caplog)) == 3
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def _drain(call) -> None:
    async for _ in call:
        pass
