"""The stack's credentials without a stack: the secret file, URL redaction, the bearer interceptors
(thread-pool and asyncio servers, real gRPC on loopback) and TLS with a self-signed certificate."""
from __future__ import annotations

import asyncio
import stat
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from duoserve import credentials, healthcheck
from duoserve.channel import certificate_name, open_aio_channel, open_channel
from duoserve.stack_procs import grpc_health
from duoserve.v1 import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.auth import AsyncBearerAuth, BearerAuth, interceptors
from services.common.tls import TlsFiles, add_port
from tests.certs import needs_openssl, self_signed


# ---------------------------------------------------------------------------------------------
# The secret and the URLs that carry it
# ---------------------------------------------------------------------------------------------

def test_the_secret_is_made_once_mode_0600_and_reused(tmp_path):
    first = credentials.ensure_secret(tmp_path)
    path = tmp_path / credentials.SECRET_FILE
    assert len(first) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.ensure_secret(tmp_path) == first == credentials.stack_secret(tmp_path)
    assert credentials.stack_secret(tmp_path / "none") is None
    path.chmod(0o644)                                     # readable by others: refused, with the fix
    with pytest.raises(credentials.CredentialError, match="chmod 600"):
        credentials.ensure_secret(tmp_path)


def test_secrets_come_from_the_environment_or_a_file(tmp_path):
    secret_file = tmp_path / "s"
    secret_file.write_text("from-file\n")
    secret_file.chmod(0o600)
    assert credentials.secret_from_env({"DUOSERVE_SECRET": "direct"}) == "direct"
    assert credentials.secret_from_env({"DUOSERVE_SECRET_FILE": str(secret_file)}) == "from-file"
    assert credentials.secret_from_env({}) == ""
    assert credentials.secret_from_env({"DUOSERVE_SECRET": "", "DUOSERVE_SECRET_FILE": str(secret_file)}) == ""
    env = {"DUOSERVE_REDIS_PASSWORD_FILE": str(secret_file)}
    assert credentials.redis_url_from_env(env, "redis://redis:6379/0") == "redis://:from-file@redis:6379/0"
    assert credentials.redis_url_from_env(env, "redis://:other@redis:6379/0") == "redis://:other@redis:6379/0"
    assert credentials.redis_url_from_env({}, "redis://redis:6379/0") == "redis://redis:6379/0"


def test_urls_with_passwords_are_redacted():
    url = credentials.with_password("redis://127.0.0.1:6379/0", "p@ss/word")
    assert credentials.url_password(url) == "p@ss/word"
    assert credentials.redact_url(url) == "redis://:***@127.0.0.1:6379/0"
    assert credentials.redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert credentials.redact_url("redis://h:1/0") == "redis://h:1/0" and credentials.redact_url(None) is None
    assert credentials.url_password("redis://h:1/0") is None


# ---------------------------------------------------------------------------------------------
# Interceptors on real servers
# ---------------------------------------------------------------------------------------------

class _Worker(worker_pb2_grpc.WorkerServicer):
    def Drain(self, request, context):
        return worker_pb2.DrainResponse(drained=True)


class _Generation(generation_pb2_grpc.GenerationServicer):
    async def Generate(self, request, context):
        yield generation_pb2.GenerateResponse(request_id="ok")

    async def Tokenize(self, request, context):
        return generation_pb2.TokenizeResponse(token_ids=[7])


def _sync_server(guard, tls=None):
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=guard)
    worker_pb2_grpc.add_WorkerServicer_to_server(_Worker(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0") if tls is None else server.add_secure_port(
        "127.0.0.1:0", tls.server_credentials())
    server.start()
    return server, f"127.0.0.1:{port}"


def _drain(target, **kwargs):
    with open_channel(target, **kwargs) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Drain(worker_pb2.DrainRequest(), timeout=5)


def _health(target, **kwargs):
    with open_channel(target, **kwargs) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_bearer_auth_refuses_calls_without_a_token_and_leaves_health_open():
    server, target = _sync_server([BearerAuth(["right", "other"], "ask the operator")])
    try:
        for token in (None, "wrong", "righ"):
            with pytest.raises(grpc.RpcError) as refused:
                _drain(target, token=token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in refused.value.details() and "ask the operator" in refused.value.details()
        assert _drain(target, token="right").drained and _drain(target, token="other").drained
        assert _health(target) == health_pb2.HealthCheckResponse.SERVING      # probes need no token
    finally:
        server.stop(None)


def test_no_token_no_interceptor():
    assert interceptors(["", ""], "x") == []
    with pytest.raises(ValueError):
        BearerAuth([""], "x")


def test_async_bearer_auth_refuses_unary_and_streaming_calls():
    async def main():
        server = grpc.aio.server(interceptors=[AsyncBearerAuth(["k"], "the API key")])
        health_pb2_grpc.add_HealthServicer_to_server(health_async.HealthServicer(), server)
        generation_pb2_grpc.add_GenerationServicer_to_server(_Generation(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = f"127.0.0.1:{port}"
        try:
            async with open_aio_channel(target) as channel:       # health's Check is open
                stub = health_pb2_grpc.HealthStub(channel)
                assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1
            for token in (None, "wrong"):
                async with open_aio_channel(target, token=token) as channel:
                    stub = generation_pb2_grpc.GenerationStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:      # a streaming method
                        async for _ in stub.Generate(generation_pb2.GenerateRequest(prompt="x"), timeout=5):
                            pass
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "the API key" in refused.value.details()
                    with pytest.raises(grpc.aio.AioRpcError) as refused:      # a unary one
                        await stub.Tokenize(generation_pb2.TokenizeRequest(text="x"), timeout=5)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with open_aio_channel(target, token="k") as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                assert [r.request_id async for r in stub.Generate(generation_pb2.GenerateRequest(), timeout=5)] == ["ok"]
                assert list((await stub.Tokenize(generation_pb2.TokenizeRequest(), timeout=5)).token_ids) == [7]
        finally:
            await server.stop(None)
    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------

@needs_openssl
def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = self_signed(tmp_path, "duoserve.test", ips=())
    assert certificate_name(cert) == "duoserve.test"
    tls = TlsFiles.of(cert, key)
    server, target = _sync_server([BearerAuth(["s"], "x")], tls=tls)
    try:
        # The certificate names duoserve.test, the target is 127.0.0.1: the name must be given.
        assert _drain(target, tls=str(cert), server_name="duoserve.test", token="s").drained
        with pytest.raises(grpc.RpcError) as unchecked:
            _drain(target, tls=str(cert), token="s")
        assert unchecked.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            _drain(target, token="s")                     # plaintext to a TLS port
        # The supervisor's (and a container's) health check: trusts the certificate, asks for its name.
        assert grpc_health(target, 5.0, tls_cert=cert) == "SERVING"
        assert grpc_health(target, 2.0) == "UNREACHABLE"
        assert healthcheck.main([target, "--tls-ca", str(cert)]) == 0
    finally:
        server.stop(None)


def test_tls_files_both_or_neither(tmp_path):
    assert TlsFiles.of(None, None) is None
    with pytest.raises(ValueError, match="both"):
        TlsFiles.of(tmp_path / "c", None)
    with pytest.raises(ValueError, match="no such file"):
        TlsFiles.of(tmp_path / "c", tmp_path / "k")
    server = grpc.server(futures.ThreadPoolExecutor(1))
    try:
        add_port(server, "127.0.0.1:0", None)
    finally:
        server.stop(None)
