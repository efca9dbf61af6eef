"""docker-compose.yml, as the compose tool reads it, against the code it runs.

`docker-compose config` (Debian's Python v1 works without a Docker engine) or `docker compose config`
resolves anchors, merges and variables exactly as `up` would; the checks then run on its output:
which services each profile enables, health checks, GPU reservations only where CUDA runs, shared
namespaces, the one published port, and every process's command line parsed by that process's own
argparse parser with the container's environment, so the file cannot drift from the code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

PROFILES = {
    "gpu": {"redis", "mps", "arena", "prefill", "decode", "orchestrator", "gateway"},
    "cpu": {"redis", "arena-cpu", "prefill-cpu", "decode-cpu", "orchestrator", "gateway"},
}
GPU_SERVICES = {"mps", "arena", "prefill", "decode"}
CUDA_PROCESSES = {"arena", "prefill", "decode"}          # MPS clients
ROLE = {"arena": "arena", "prefill": "prefill", "decode": "decode",
        "arena-cpu": "arena", "prefill-cpu": "prefill", "decode-cpu": "decode",
        "orchestrator": "orchestrator", "gateway": "gateway"}
MODULE = {"arena": "services.arena.main", "prefill": "services.prefill.main", "decode": "services.decode.main",
          "orchestrator": "orchestrator.main", "gateway": "services.gateway.main"}


def compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=60).returncode == 0:
        return ["docker", "compose"]
    return None


TOOL = compose_tool()
pytestmark = pytest.mark.skipif(TOOL is None, reason="neither `docker-compose` nor `docker compose` is installed "
                                                     "(`make install` tries apt-get install docker-compose)")


def run_config(profile: str | None) -> subprocess.CompletedProcess:
    # The file's own defaults, not whatever this shell exports (DUOSERVE_PORT, DUOSERVE_GPU, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUOSERVE_", "COMPOSE_"))}
    profile_args = ["--profile", profile] if profile else []
    return subprocess.run([*TOOL, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), *profile_args,
                           "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def enabled(services: dict[str, Any], profile: str | None) -> dict[str, Any]:
    """Compose's rule: a service with no profiles is always on, else when one of its profiles is active.
    (`docker compose config` applies it already; docker-compose v1 prints every service.)"""
    return {name: s for name, s in services.items()
            if not s.get("profiles") or (profile is not None and profile in s["profiles"])}


@pytest.fixture(scope="module")
def stacks() -> dict[str, dict[str, Any]]:
    """Per profile: the enabled services of the resolved file."""
    out = {}
    for profile in PROFILES:
        result = run_config(profile)
        assert result.returncode == 0, f"{TOOL} --profile {profile} config failed:\n{result.stderr}"
        out[profile] = enabled(yaml.safe_load(result.stdout)["services"], profile)
    return out


def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):                       # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(volume, container path) of each mount, from the short (v1) or the long (v2) syntax."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source")), str(v["target"])))
        else:
            source, target = str(v).split(":")[:2]
            out.append((source, target))
    return out


def published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host port, container port) of each published port, from the short or the long syntax."""
    ports = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.append((str(p.get("published")), int(p["target"])))
        else:
            host, _, target = str(p).rpartition(":")
            ports.append((host.rpartition(":")[2], int(target)))
    return ports


def parse_command(role: str, argv: list[str]):
    """The process's frozen config, from its own parser (the environment is the caller's)."""
    if role == "arena":
        from services.arena.config import parse_args
        return parse_args(argv)
    if role in ("prefill", "decode"):
        from services.worker.config import Phase, parse_args
        return parse_args(Phase(role), argv)
    if role == "gateway":
        from services.gateway.config import parse_args
        return parse_args(argv)
    from orchestrator.config import parse_args
    return parse_args(argv)


def test_the_file_is_valid_without_a_profile() -> None:
    result = run_config(None)
    assert result.returncode == 0, result.stderr
    assert set(enabled(yaml.safe_load(result.stdout)["services"], None)) == {"redis"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_enables_the_whole_stack(stacks, profile: str) -> None:
    services = stacks[profile]
    assert set(services) == PROFILES[profile]
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        assert test and not service["healthcheck"].get("disable"), f"{name} has no health check"
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on {dep}, which {profile} does not run"
            assert how.get("condition") == "service_healthy", f"{name} -> {dep}: {how}"
        for key in ("network_mode", "ipc"):
            mode = service.get(key, "")
            if mode.startswith("service:"):
                assert mode.split(":", 1)[1] in services, f"{name}.{key} = {mode}"


def test_gpu_reservations_only_where_cuda_runs(stacks) -> None:
    gpu_ids = set()
    for name, service in stacks["gpu"].items():
        reserved = devices(service)
        if name not in GPU_SERVICES:
            assert not reserved, f"{name} reserves a GPU it does not use"
            continue
        assert len(reserved) == 1 and reserved[0]["driver"] == "nvidia", name
        assert "gpu" in reserved[0]["capabilities"], name
        gpu_ids.add(tuple(reserved[0].get("device_ids") or ()))
        env = environment(service)
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/nvidia-mps"      # the daemon's and every client's
        assert ("mps-pipe", env["CUDA_MPS_PIPE_DIRECTORY"]) in mounts(service), name
        if name in CUDA_PROCESSES:
            assert 1 <= int(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]) <= 100, name
            assert "--device" in service["command"] and "cuda" in service["command"], name
    assert gpu_ids == {("0",)}, "every CUDA process must be an MPS client of the same device"
    assert stacks["gpu"]["mps"]["command"][:2] == ["nvidia-cuda-mps-control", "-f"]


def test_cpu_profile_has_no_gpu_and_no_mps(stacks) -> None:
    for name, service in stacks["cpu"].items():
        assert not devices(service), f"{name} reserves a GPU in the cpu profile"
        assert not any(k.startswith(("CUDA_MPS_", "NVIDIA_")) for k in environment(service)), name
        assert "cuda" not in (service.get("command") or []), name
        assert "duoserve:gpu" != service.get("image"), name


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_one_pod_and_one_published_port(stacks, profile: str) -> None:
    """Arena, workers, orchestrator (and MPS) share redis's network, IPC and PID namespaces; the
    gateway alone publishes ports (gRPC and HTTP), and redis's own port is not published."""
    services = stacks[profile]
    owner = services["redis"]
    assert owner.get("ipc") == "shareable"
    assert owner.get("shm_size")
    assert owner.get("init") is True                     # the pod's pid 1 reaps orphans
    for name, service in services.items():
        if name in ("redis", "gateway"):
            continue
        for key in ("network_mode", "ipc", "pid"):
            assert service.get(key) == "service:redis", f"{name}.{key}"
    ports = {name: published(s) for name, s in services.items() if published(s)}
    assert set(ports) == {"redis"} or set(ports) == {"gateway"}, ports     # a pod's ports sit on its owner
    gateway = services["gateway"]
    assert published(gateway) == [("50051", 50051), ("8000", 8000)]
    assert all(p[1] != 6379 for plist in ports.values() for p in plist)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_commands_parse_with_each_process_parser(stacks, profile: str, monkeypatch, tmp_path) -> None:
    """Each command line and environment, through the real parse_args: flags, choices and required
    arguments as the process itself checks them. Ports, socket and Redis agree between services; the
    stack's secret (a compose secret, here a file of ours) reaches each as its Redis password and token."""
    secret = tmp_path / "duoserve"
    secret.write_text("compose-s3cret\n")
    configs = {}
    for name, service in stacks[profile].items():
        if name not in ROLE:
            continue                                     # redis, mps: not our processes
        role = ROLE[name]
        command = [str(a) for a in service["command"]]
        if role in ("prefill", "decode"):             # a succession's successor outlives the first worker
            assert command[:3] == ["python", "-m", "duoserve.reaper"], f"{name}: {command}"
            command = command[3:]
        assert command[:3] == ["python", "-m", MODULE[role]], f"{name}: {command}"
        for key in [k for k in os.environ if k.startswith("DUOSERVE_") or k in ("REDIS_URL",)]:
            monkeypatch.delenv(key)
        assert "duoserve" in [s if isinstance(s, str) else s["source"] for s in service.get("secrets", ())], name
        for key, value in environment(service).items():
            monkeypatch.setenv(key, str(secret) if value == "/run/secrets/duoserve" else value)
        configs[role] = (name, parse_command(role, command[3:]))

    assert set(configs) == set(MODULE)
    ports = set()
    for role, (name, config) in configs.items():
        service = stacks[profile][name]
        assert config.redis_url == "redis://:compose-s3cret@redis:6379/0"
        assert config.key_prefix == "duo"
        assert service["healthcheck"]["test"][-2:] == ["duoserve.healthcheck", f"127.0.0.1:{config.port}"], name
        ports.add(config.port)
    assert len(ports) == len(configs), "processes in one network namespace need distinct ports"

    assert configs["orchestrator"][1].secret == "compose-s3cret"
    assert configs["prefill"][1].secret == configs["decode"][1].secret == "compose-s3cret"
    arena = configs["arena"][1]
    for worker in ("prefill", "decode"):
        assert configs[worker][1].arena_socket == arena.socket_path
        assert configs[worker][1].cache_dir == arena.cache_dir
    assert arena.cache_dir == Path("/var/cache/duoserve")
    assert configs["gateway"][1].host == "0.0.0.0"
    assert configs["gateway"][1].port == published(stacks[profile]["gateway"])[0][1]


def test_dockerfile_makes_every_mounted_directory(stacks) -> None:
    """A fresh named volume takes its owner and mode from the image's directory: the Dockerfile must
    create each one for the non-root user (the arena refuses a socket directory it does not own)."""
    dockerfile = DOCKERFILE.read_text()
    targets = {target for profile in stacks.values() for name, s in profile.items() if name != "redis"
               for _, target in mounts(s)}
    assert targets == {"/var/cache/duoserve", "/run/duoserve/arena", "/run/nvidia-mps", "/var/log/nvidia-mps"}
    for target in targets:
        assert target in dockerfile, f"the Dockerfile does not create {target}"
    assert "USER duoserve" in dockerfile


def test_redis_wants_the_secret_and_no_password_is_in_the_file(stacks) -> None:
    """Redis gets the compose secret as `requirepass` through a file, never on its command line, and
    its health check authenticates; the compose file holds no password of its own."""
    redis = stacks["cpu"]["redis"]
    command = " ".join(redis["command"])
    assert "requirepass %s" in command and "/run/secrets/duoserve" in command and "--requirepass" not in command
    assert "redis-server /tmp/auth.conf" in command
    assert "/run/secrets/duoserve" in " ".join(redis["healthcheck"]["test"])
    assert "requirepass" not in COMPOSE_FILE.read_text().replace("requirepass %s", "")
