"""Security on a real split stack started as `duoserve up` does, with TLS and an API key.

The stack's secret (made by `up`, mode 0600) guards the workers' control service, the Admin API and
the stack's Redis, and is on no process's command line; the gateway serves gRPC and HTTPS with a
self-signed certificate made here, and both want the API key (/health and /metrics open). The fast
tests check the plan alone: no secret anywhere in an argv, `--no-auth` leaves everything open.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis

import duoserve
from duoserve import stack
from duoserve.channel import open_channel
from duoserve.credentials import redact_url
from duoserve.stack import Layout, Mode, StackConfig
from duoserve.v1 import worker_pb2, worker_pb2_grpc
from tests.certs import needs_openssl, self_signed
from tests.e2e.conftest import RunningStack, stop_stack

API_KEY = "sk-test-0123456789"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---------------------------------------------------------------------------------------------
# The plan (no process)
# ---------------------------------------------------------------------------------------------

def _plan(tmp_path: Path, secret: str, **overrides) -> dict[str, stack.ProcessSpec]:
    config = StackConfig(state_dir=tmp_path, cache_dir=tmp_path, cpus=(0,), **overrides)
    layout = replace(Layout.new(config.stack_dir), secret=secret)
    ports = {n: (1000 + 10 * i, 1001 + 10 * i, 1002 + 10 * i) for i, n in
             enumerate(n for stage in stack.stage_names(config) for n in stage)}
    return {p.name: p for stage in stack.plan(config, layout, ports) for p in stage}


def test_no_secret_or_key_on_any_command_line(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    specs = _plan(tmp_path, "s3cret", api_key=API_KEY, admin_token="t0ken", tls_cert=cert, tls_key=cert)
    for spec in specs.values():
        argv = " ".join(spec.argv)
        assert "s3cret" not in argv and API_KEY not in argv and "t0ken" not in argv, spec.name
    assert dict(specs["gateway"].env)["DUOSERVE_API_KEY"] == API_KEY
    assert specs["gateway"].health == specs["orchestrator"].health == "grpc-tls"
    assert "--tls-cert" in specs["gateway"].argv and "--tls-cert" in specs["orchestrator"].argv
    assert "--tls-cert" not in specs["prefill"].argv           # loopback only: the secret guards them


def test_no_auth_leaves_the_secret_out(tmp_path):
    specs = _plan(tmp_path, "")
    # Set, empty: a secret exported in the operator's shell does not reach the processes either.
    assert all(dict(specs[n].env)["DUOSERVE_SECRET"] == "" for n in ("prefill", "decode", "orchestrator"))
    assert dict(specs["gateway"].env)["DUOSERVE_API_KEY"] == ""
    assert dict(specs["decode"].env)["REDIS_URL"].startswith("redis://127.0.0.1:")     # no password
    assert "auth.conf" not in " ".join(specs["redis"].argv)
    assert stack.StackConfig(state_dir=tmp_path, cache_dir=tmp_path, auth=False).auth is False


# ---------------------------------------------------------------------------------------------
# A real stack
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory, default_model_dir):
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and openssl")
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    config = StackConfig(state_dir=tmp_path_factory.mktemp("stack-secure"), cache_dir=default_model_dir.parent,
                         name="e2e-secure", mode=Mode.SPLIT, num_kv_blocks=256, startup_timeout_s=300,
                         tls_cert=cert, tls_key=key, api_key=API_KEY)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    running = RunningStack(config, stack.read_state(config.state_path))
    running.cert = cert
    yield running
    stop_stack(running)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def _cmdlines() -> dict[int, str]:
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


@pytest.mark.slow
@needs_openssl
def test_the_secret_is_private_and_on_no_command_line(secure_stack):
    s = secure_stack
    secret = s.secret
    assert secret and _mode(s.state.secret_file) == 0o600 and _mode(s.config.state_path) == 0o600
    assert _mode(s.config.stack_dir) == 0o700
    assert _mode(s.config.stack_dir / "redis" / "auth.conf") == 0o600
    ours = {r.pid for r in s.state.processes} | {s.state.supervisor_pid}
    cmdlines = _cmdlines()
    assert ours <= set(cmdlines)                                # every process of the stack was read
    leaking = {pid: line for pid, line in cmdlines.items() if secret in line or API_KEY in line}
    assert not leaking, leaking
    for line in (subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()):
        assert secret not in line and API_KEY not in line
    status = subprocess.run([sys.executable, "-m", "duoserve.cli", "status", "--name", s.config.name,
                             "--state-dir", str(s.config.state_dir), "--json"], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert secret not in status.stdout and json.loads(status.stdout)["redis_url"] == redact_url(s.state.redis_url)
    for log in (s.config.stack_dir / "logs").iterdir():        # nothing logged it either
        assert secret not in log.read_text(errors="replace"), log


@pytest.mark.slow
@needs_openssl
def test_redis_wants_the_password(secure_stack):
    port = next(r.port for r in secure_stack.state.processes if r.name == "redis")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:     # what any local user could send
        raw.sendall(b"PING\r\nKEYS *\r\n")
        answer = b""
        while answer.count(b"\r\n") < 2:
            answer += raw.recv(4096)
    assert answer.startswith(b"-NOAUTH") and answer.count(b"-NOAUTH") == 2, answer
    bare = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        bare.ping()
    bare.close()
    assert secure_stack.redis.ping()                             # the state's URL carries it


@pytest.mark.slow
@needs_openssl
def test_worker_control_wants_the_secret(secure_stack):
    s = secure_stack
    for name in ("prefill", "decode"):
        target = s.process(name).target
        for token in (None, "wrong"):
            with open_channel(target, token=token) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                for call, request in ((stub.Drain, worker_pb2.DrainRequest()),
                                      (stub.SetComputeShare, worker_pb2.SetComputeShareRequest(share=1.0)),
                                      (stub.GetStats, worker_pb2.GetStatsRequest())):
                    with pytest.raises(grpc.RpcError) as refused:
                        call(request, timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, call)
        with open_channel(target, token=s.secret) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            current = stub.GetStats(worker_pb2.GetStatsRequest(), timeout=10).share
            again = stub.SetComputeShare(worker_pb2.SetComputeShareRequest(
                share=current.share, cpu_ids=list(current.cpu_ids)), timeout=10)     # the same share: no change
            assert list(again.cpu_ids) == list(current.cpu_ids)


@pytest.mark.slow
@needs_openssl
def test_admin_api_wants_the_secret_over_tls(secure_stack):
    s = secure_stack
    target = s.process("orchestrator").target
    env = {k: v for k, v in os.environ.items() if k not in ("DUOSERVE_ADMIN_TOKEN", "DUOCTL_TLS_CA")}

    def duoctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "duoserve.duoctl", *args, "status", "--json"],
                              capture_output=True, text=True, timeout=60, env=env)
    refused = duoctl("--target", target, "--tls-ca", str(s.cert))
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    plaintext = duoctl("--target", target, "--token", s.secret)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr
    assert duoctl("--target", target, "--tls-ca", str(s.cert), "--token", s.secret).returncode == 0
    local = duoctl("--name", s.config.name, "--state-dir", str(s.config.state_dir))   # the stack's own credentials
    assert local.returncode == 0, local.stderr
    assert {w["phase"] for w in json.loads(local.stdout)["workers"]} == {"prefill", "decode"}


@pytest.mark.slow
@needs_openssl
def test_generate_over_tls_with_the_api_key(secure_stack):
    s = secure_stack
    with duoserve.Client(s.target, tls=str(s.cert), api_key=API_KEY, timeout=300) as client:
        reply = client.generate(messages=QUESTION, max_tokens=12, temperature=0)
        assert "Paris" in reply.text
        with client.stream("One two three", max_tokens=4, temperature=0) as chunks:
            assert sum(len(c.token_ids) for c in chunks) == 4
    with duoserve.Client(s.target, tls=str(s.cert), timeout=30) as client:
        with pytest.raises(duoserve.errors.Unauthenticated):
            client.generate("hi", max_tokens=2)
        with pytest.raises(duoserve.errors.Unauthenticated):
            client.tokenize("hi")
    with duoserve.Client(s.target, api_key=API_KEY, timeout=10) as client:     # plaintext to a TLS port
        with pytest.raises(duoserve.errors.Unavailable):
            client.generate("hi", max_tokens=2)

    async def async_reply() -> str:
        async with duoserve.AsyncClient(s.target, tls=str(s.cert), api_key=API_KEY, timeout=300) as client:
            return (await client.generate(messages=QUESTION, max_tokens=12, temperature=0)).text
    import asyncio
    assert asyncio.run(async_reply()) == reply.text
    # The command line, finding the stack by name: its certificate, the key from the flag.
    out = subprocess.run([sys.executable, "-m", "duoserve.cli", "generate", "--name", s.config.name, "--state-dir",
                          str(s.config.state_dir), "--max-tokens", "12", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DUOSERVE_API_KEY": API_KEY})
    assert out.returncode == 0 and out.stdout.strip() == reply.text, out.stderr


def _https(url: str, cert: Path, body: dict | None = None, key: str | None = None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300, context=ssl.create_default_context(cafile=str(cert))) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.mark.slow
@needs_openssl
def test_https_api_wants_the_key_but_health_and_metrics_do_not(secure_stack):
    s = secure_stack
    url = s.state.http_url
    assert url.startswith("https://")
    body = {"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    status, reply = _https(f"{url}/v1/completions", s.cert, body, key=API_KEY)
    assert status == 200 and reply["choices"][0]["text"], reply
    for key in (None, "wrong"):
        status, refused = _https(f"{url}/v1/completions", s.cert, body, key=key)
        assert status == 401 and refused["error"]["type"] == "AuthenticationError", refused
        assert _https(f"{url}/v1/models", s.cert, key=key)[0] == 401
        assert _https(f"{url}/tokenize", s.cert, {"prompt": "x"}, key=key)[0] == 401
    assert _https(f"{url}/health", s.cert)[0] == 200
    status, metrics = _https(f"{url}/metrics", s.cert)
    assert status == 200 and "duoserve:" in metrics
    # curl, as an operator would; plain HTTP to the TLS port gets no answer.
    curl = subprocess.run(["curl", "-sS", "--cacert", str(s.cert), "-H", f"Authorization: Bearer {API_KEY}",
                           f"{url}/v1/models"], capture_output=True, text=True, timeout=60)
    assert curl.returncode == 0 and json.loads(curl.stdout)["data"][0]["id"], curl.stderr
    plain = subprocess.run(["curl", "-sS", "--max-time", "10", url.replace("https://", "http://") + "/health"],
                           capture_output=True, text=True)
    assert plain.returncode != 0 or "200" not in plain.stdout
