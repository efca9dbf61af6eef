"""The client SDK on its own: request building, response conversion, error mapping, cancellation.

No gateway here (end-to-end tests run against the real one). Calls that need a network go to
a closed port over real gRPC, which is how UNAVAILABLE and cancellation really arrive.
"""
from __future__ import annotations

import asyncio
import gc
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

import duoserve
from duoserve import errors
from duoserve.async_client import AsyncStream
from duoserve.client import Stream
from duoserve.messages import TokenLogprob, _Joiner, build_generate_request, model_info_to_dict, to_chunk
from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def closed_port_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# --- request building ------------------------------------------------------------------------

def test_prompt_only_sends_no_sampling_at_all():
    request = build_generate_request("Hello")
    assert request.WhichOneof("input") == "prompt" and request.prompt == "Hello"
    assert not request.HasField("sampling")
    assert request.request_id == "" and request.priority == 0 and request.slo_class == ""
    assert pb.GenerateRequest.FromString(request.SerializeToString()) == pb.GenerateRequest(prompt="Hello")


def test_messages_fill_the_chat_case_of_the_oneof():
    request = build_generate_request(messages=[{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}])
    assert request.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in request.messages.messages] == [
        ("system", "Be brief."), ("user", "Hi")]


def test_token_ids_fill_the_token_case_of_the_oneof_even_when_empty():
    assert list(build_generate_request(token_ids=(1, 2, 3)).token_ids.ids) == [1, 2, 3]
    assert build_generate_request(token_ids=[]).WhichOneof("input") == "token_ids"
    assert build_generate_request(messages=[]).WhichOneof("input") == "messages"


@pytest.mark.parametrize("inputs", [{}, {"prompt": "a", "token_ids": [1]},
                                    {"prompt": "a", "messages": [], "token_ids": [1]}])
def test_exactly_one_input(inputs):
    with pytest.raises(errors.InvalidArgument, match="exactly one of prompt, messages or token_ids"):
        build_generate_request(**inputs)


def test_only_given_sampling_fields_are_sent_and_zero_differs_from_unset():
    sampling = build_generate_request("x", temperature=0, top_k=0, seed=0).sampling
    assert sampling.HasField("temperature") and sampling.temperature == 0.0
    assert sampling.HasField("top_k") and sampling.HasField("seed")
    assert not sampling.HasField("max_tokens") and not sampling.HasField("top_p")
    assert not sampling.stop and not sampling.stop_token_ids and not sampling.ignore_eos


def test_every_sampling_field_is_carried():
    request = build_generate_request(
        "x", max_tokens=32, temperature=0.7, top_p=0.9, top_k=40, seed=-5, stop=["\n\n", "END"],
        stop_token_ids=[2, 7], ignore_eos=True, request_id="r-1", priority=3, slo_class="batch")
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (32, 0.7, 0.9, 40, -5)
    assert list(s.stop) == ["\n\n", "END"] and list(s.stop_token_ids) == [2, 7] and s.ignore_eos
    assert (request.request_id, request.priority, request.slo_class) == ("r-1", 3, "batch")


def test_penalties_min_tokens_and_logprobs_are_carried_and_zero_differs_from_unset():
    s = build_generate_request("x", presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.3,
                               min_tokens=4, logprobs=0).sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_tokens) == (0.5, -1.0, 1.3, 4)
    assert s.HasField("logprobs") and s.logprobs == 0
    unset = build_generate_request("x", max_tokens=3).sampling
    assert not any(unset.HasField(f) for f in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                                               "min_tokens", "logprobs"))


def test_logprobs_come_with_their_chunk_and_join_into_the_completion():
    def lp(token, value, top=()):
        return pb.TokenLogprob(token_id=token, logprob=value,
                               top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])
    joiner = _Joiner()
    for response in (pb.GenerateResponse(request_id="r", token_ids=[1], text="a",
                                         logprobs=[lp(1, -0.5, [(1, -0.5), (9, -1.0)])]),
                     pb.GenerateResponse(request_id="r", token_ids=[2], text="b", logprobs=[lp(2, -2.0)],
                                         finish_reason=pb.FINISH_REASON_STOP)):
        chunk = to_chunk(response)
        joiner.add(chunk)
    assert chunk.logprobs == (TokenLogprob(2, -2.0),)
    assert joiner.completion().logprobs == (TokenLogprob(1, -0.5, ((1, -0.5), (9, -1.0))), TokenLogprob(2, -2.0))
    assert to_chunk(pb.GenerateResponse(token_ids=[3])).logprobs == ()


def test_a_single_stop_string_is_one_stop_string():
    assert list(build_generate_request("x", stop="END").sampling.stop) == ["END"]


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 2**40}, "max_tokens"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": 5}, "prompt"),
    ({"token_ids": "abc"}, "token_ids"),
    ({"token_ids": [1, "2"]}, "token_ids"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\].content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, r"messages\[0\]: unsupported keys 'name'"),
    ({"messages": ["hi"]}, r"messages\[0\]"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages"),
])
def test_bad_arguments_raise_invalid_argument_naming_the_field(kwargs, field):
    with pytest.raises(errors.InvalidArgument, match=f"^INVALID_ARGUMENT: {field}") as info:
        build_generate_request(**kwargs)
    assert isinstance(info.value, ValueError)


# --- responses -------------------------------------------------------------------------------

def test_a_middle_chunk_has_no_finish_reason_or_usage():
    chunk = to_chunk(pb.GenerateResponse(request_id="r", token_ids=[5, 6], text=" wor"))
    assert chunk == duoserve.Chunk(request_id="r", text=" wor", token_ids=(5, 6))


def test_the_last_chunk_has_finish_reason_and_usage():
    usage = pb.Usage(prompt_tokens=4, completion_tokens=2, queue_time_ms=1.5, ttft_ms=20.0, e2e_ms=31.0)
    chunk = to_chunk(pb.GenerateResponse(request_id="r", finish_reason=pb.FINISH_REASON_LENGTH, usage=usage))
    assert chunk.finish_reason == "length"
    assert chunk.usage == duoserve.Usage(4, 2, 1.5, 20.0, 31.0)


@pytest.mark.parametrize("reason, label", [(pb.FINISH_REASON_STOP, "stop"), (pb.FINISH_REASON_LENGTH, "length"),
                                           (pb.FINISH_REASON_CANCELLED, "cancelled"),
                                           (pb.FINISH_REASON_ERROR, "error"), (99, "unknown")])
def test_finish_reasons(reason, label):
    assert to_chunk(pb.GenerateResponse(finish_reason=reason)).finish_reason == label


def test_chunks_join_into_a_completion():
    joiner = _Joiner()
    for response in (pb.GenerateResponse(request_id="r", token_ids=[1], text="Hel"),
                     pb.GenerateResponse(request_id="r", token_ids=[2, 3], text="lo"),
                     pb.GenerateResponse(request_id="r", finish_reason=pb.FINISH_REASON_STOP,
                                         usage=pb.Usage(prompt_tokens=2, completion_tokens=3))):
        joiner.add(to_chunk(response))
    completion = joiner.completion()
    assert completion == duoserve.Completion(request_id="r", text="Hello", token_ids=(1, 2, 3),
                                             finish_reason="stop", usage=duoserve.Usage(2, 3, 0.0, 0.0, 0.0))


def test_a_stream_that_ends_without_finish_reason_is_an_internal_error():
    joiner = _Joiner()
    joiner.add(to_chunk(pb.GenerateResponse(request_id="r", token_ids=[1], text="a")))
    with pytest.raises(errors.Internal, match="without a finish reason"):
        joiner.completion()


def test_model_info_is_a_plain_dict_with_every_field():
    info = pb.ModelInfo(model="tiny-llama", architecture="LlamaForCausalLM", vocab_size=32000,
                        max_context=2048, max_tokens=1024, block_size=16, num_kv_blocks=512,
                        mode=pb.SERVING_MODE_SPLIT)
    assert model_info_to_dict(info) == {
        "model": "tiny-llama", "architecture": "LlamaForCausalLM", "vocab_size": 32000,
        "max_context": 2048, "max_tokens": 1024, "block_size": 16, "num_kv_blocks": 512,
        "mode": "split"}
    assert model_info_to_dict(pb.ModelInfo(mode=pb.SERVING_MODE_COLOCATED))["mode"] == "colocated"


# --- errors ----------------------------------------------------------------------------------

class FailedCall(grpc.RpcError):
    """What grpc raises for a failed call: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    (grpc.StatusCode.CANCELLED, errors.Cancelled),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
    (grpc.StatusCode.INTERNAL, errors.Internal),
])
def test_each_status_code_maps_to_its_error(code, cls):
    error = errors.from_rpc_error(FailedCall(code, "max_tokens: must be at least 1"))
    assert type(error) is cls and isinstance(error, errors.DuoserveError)
    assert error.code == code.name and error.status_code is code
    assert error.message == "max_tokens: must be at least 1"
    assert str(error) == f"{code.name}: max_tokens: must be at least 1"


def test_codes_without_a_class_keep_their_name():
    error = errors.from_rpc_error(FailedCall(grpc.StatusCode.UNIMPLEMENTED, "no such method"))
    assert type(error) is errors.DuoserveError and error.code == "UNIMPLEMENTED"
    bare = errors.from_rpc_error(grpc.RpcError("odd"))       # no code() at all
    assert type(bare) is errors.DuoserveError and bare.code == "UNKNOWN" and bare.message == "odd"


def test_errors_survive_pickling_with_their_code():
    for error in (errors.ResourceExhausted("queue full"), errors.DuoserveError("x", code="ABORTED")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and (copy.code, copy.message) == (error.code, error.message)


def test_an_unreachable_server_is_unavailable():
    with duoserve.Client(closed_port_target(), timeout=10) as client:
        with pytest.raises(errors.Unavailable):
            client.tokenize("hi")
        with pytest.raises(errors.Unavailable):
            client.model_info()
        with pytest.raises(errors.Unavailable):
            client.generate("hi", max_tokens=4)
        with pytest.raises(errors.Unavailable):
            list(client.stream(token_ids=[1, 2]))
        with pytest.raises(errors.InvalidArgument):          # checked before any call
            client.generate()


def test_an_unreachable_server_is_unavailable_async():
    async def main():
        async with duoserve.AsyncClient(closed_port_target(), timeout=10) as client:
            with pytest.raises(errors.Unavailable):
                await client.tokenize("hi")
            with pytest.raises(errors.Unavailable):
                await client.model_info()
            with pytest.raises(errors.Unavailable):
                await client.generate("hi")
            with pytest.raises(errors.Unavailable):
                async for _ in client.stream(messages=[{"role": "user", "content": "hi"}]):
                    pass
    asyncio.run(main())


def test_an_async_client_belongs_to_one_event_loop():
    client = duoserve.AsyncClient(closed_port_target())

    async def use():
        with pytest.raises(errors.Unavailable):
            await client.tokenize("hi")
    asyncio.run(use())
    with pytest.raises(RuntimeError, match="one AsyncClient per event loop"):
        asyncio.run(use())


# --- cancellation: real calls kept pending (wait_for_ready on a closed port) -------------------
# call.cancelled() is checked first: code() would block forever on a call nobody cancelled.

def pending_call(channel: grpc.Channel):
    return pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(prompt="x"), wait_for_ready=True)


@pytest.fixture
def channel():
    with grpc.insecure_channel(closed_port_target()) as channel:
        yield channel


def test_closing_a_stream_cancels_the_call(channel):
    call = pending_call(channel)
    stream = Stream(call)
    stream.close()
    assert call.cancelled() and call.code() == grpc.StatusCode.CANCELLED
    assert list(stream) == []


def test_leaving_the_with_block_cancels_the_call(channel):
    call = pending_call(channel)
    with Stream(call):
        pass
    assert call.cancelled() and call.code() == grpc.StatusCode.CANCELLED


def test_dropping_a_stream_cancels_the_call(channel):
    call = pending_call(channel)
    stream = Stream(call)
    del stream
    gc.collect()
    assert call.cancelled() and call.code() == grpc.StatusCode.CANCELLED


def test_closing_from_another_thread_ends_the_iteration_quietly(channel):
    call = pending_call(channel)
    stream = Stream(call)
    timers = [threading.Timer(0.2, stream.close),
              threading.Timer(10, call.cancel)]        # fails the test (Cancelled) instead of hanging
    for timer in timers:
        timer.start()
    try:
        assert list(stream) == []
    finally:
        for timer in timers:
            timer.cancel()


def test_async_stream_close_and_context_manager_cancel_the_call():
    async def main():
        async with grpc.aio.insecure_channel(closed_port_target()) as channel:
            call = pending_call(channel)
            stream = AsyncStream(call)
            await stream.aclose()
            assert call.cancelled() and await call.code() == grpc.StatusCode.CANCELLED
            assert [chunk async for chunk in stream] == []

            call = pending_call(channel)
            async with AsyncStream(call):
                pass
            assert call.cancelled() and await call.code() == grpc.StatusCode.CANCELLED

            call = pending_call(channel)
            stream = AsyncStream(call)
            del stream
            gc.collect()
            assert call.cancelled() and await call.code() == grpc.StatusCode.CANCELLED
    asyncio.run(main())


def test_async_close_from_another_task_ends_the_iteration_quietly():
    async def main():
        async with grpc.aio.insecure_channel(closed_port_target()) as channel:
            call = pending_call(channel)
            stream = AsyncStream(call)
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, stream.close)
            backstop = loop.call_later(10, call.cancel)   # fails the test instead of hanging
            assert [chunk async for chunk in stream] == []
            backstop.cancel()
    asyncio.run(main())


def test_cancelling_the_consuming_task_cancels_the_call():
    async def main():
        async with grpc.aio.insecure_channel(closed_port_target()) as channel:
            call = pending_call(channel)
            stream = AsyncStream(call)

            async def consume():
                async for _ in stream:
                    pass
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert call.cancelled() and await call.code() == grpc.StatusCode.CANCELLED
    asyncio.run(main())


# --- the package -----------------------------------------------------------------------------

def test_importing_duoserve_loads_no_torch_or_transformers():
    code = ("import sys, duoserve; "
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'services'})))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_package_exports():
    assert duoserve.__version__ == "0.1.0"
    assert set(duoserve.__all__) == {"Client", "AsyncClient", "Completion", "Chunk", "Usage",
                                     "errors", "__version__"}
    assert duoserve.errors is errors


def test_pip_install_duoserve_is_the_client_only():
    """`pip install duoserve` brings grpcio and protobuf; everything the servers need is the `server` extra."""
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=;\[ ]", dep, 1)[0] for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf"}
    server = {re.split(r"[<>=;\[ ]", dep, 1)[0] for dep in project["optional-dependencies"]["server"]}
    assert {"torch", "redis", "fastapi", "uvicorn", "transformers"} <= server


def test_server_commands_in_a_client_install_say_what_to_install(monkeypatch, capsys):
    import importlib.util
    from duoserve.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["up", "--port", "0", "--http-port", "0"]) == 2
    assert "pip install 'duoserve[server]'" in capsys.readouterr().err
