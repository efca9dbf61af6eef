"""deploy/k8s's command lines against the code they run (docs/deploying.md): for pairs 0 and 1, every
pair container's command, run through the manifest's own copy of pair_entry.py as a pod runs it, and
the gateway's, parsed by that process's own argparse parser with the container's environment (as
tests/test_compose.py does for compose); the entry script itself run; the gateway's init container
run. The schema and cross-reference checks are in tests/test_k8s.py."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from deploy.k8s import objects as k8s
from deploy.k8s import pair_entry, render
from duoserve import metrics_relay
from tests.test_compose import parse_command
from tests.test_k8s import PAIR_ROLES, VARIANTS, docs, named  # noqa: F401 (docs: a fixture)


def entry_module(objects: list[dict[str, Any]]) -> types.ModuleType:
    """The pair entry script exactly as the pods get it: the ConfigMap's text."""
    text = named(objects, "ConfigMap", "duoserve-pair-entry")["data"]["pair_entry.py"]
    module = types.ModuleType("pair_entry_from_configmap")
    sys.modules[module.__name__] = module
    exec(compile(text, "pair_entry.py", "exec"), module.__dict__)
    return module


def env_of(container: dict[str, Any], pod_name: str, secret_file: Path) -> dict[str, str]:
    """The container's environment as the kubelet makes it: values, the pod's name, optional Secret keys
    absent (the operator made only `secret`), and the Secret's mount replaced by a file of ours."""
    env = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
        elif "secretKeyRef" in source:
            assert source["secretKeyRef"]["name"] == k8s.SECRET and source["secretKeyRef"]["optional"] is True
        else:
            env[item["name"]] = str(secret_file) if item["value"] == k8s.SECRET_FILE else item["value"]
    return env


def parse_in(container: dict[str, Any], argv: list[str], env: dict[str, str], monkeypatch) -> tuple[str, Any]:
    """(role, its frozen config) from the process's own parser, in the container's environment."""
    for key in [k for k in os.environ if k.startswith(("DUOSERVE_", "CUDA_MPS_")) or k == "REDIS_URL"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if argv[:3] == ["python", "-m", "duoserve.reaper"]:
        argv = argv[3:]
    assert argv[:2] == ["python", "-m"], argv
    role = {module: role for role, module in k8s.MODULES.items()}.get(argv[2]) or argv[2].split(".")[1]
    return role, parse_command(role, argv[3:])


# ------------------------------------------------------------------------------------------ files, schemas


# ------------------------------------------------------------------------------------------ commands

def pair_configs(objects, ordinal: int, tmp_path: Path, monkeypatch) -> dict[str, tuple[dict, Any]]:
    """role -> (container, config) of pair `ordinal`'s processes, each command run through the
    ConfigMap's pair_entry.py with this machine's cores, then parsed by its own parser."""
    entry = entry_module(objects)
    statefulset = named(objects, "StatefulSet", "duoserve-pair")
    secret = tmp_path / "secret"
    secret.write_text("k8s-s3cret\n")
    out = {}
    for container in statefulset["spec"]["template"]["spec"]["containers"]:
        command = container["command"]
        if container["name"] == "metrics":
            out["metrics"] = (container, None)
            continue
        assert command[:3] == ["python", f"{k8s.ENTRY_DIR}/pair_entry.py", container["name"]]
        env = env_of(container, f"{statefulset['metadata']['name']}-{ordinal}", secret)
        argv = entry.argv_for(command[2], command[3:], env, sorted(os.sched_getaffinity(0)))
        role, config = parse_in(container, argv, env, monkeypatch)
        assert role == container["name"]
        out[role] = (container, config)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ordinal", [0, 1])
def test_pair_commands_parse_with_each_process_parser(docs, variant: str, ordinal: int, tmp_path,
                                                      monkeypatch) -> None:
    v = render.VARIANTS[variant]
    configs = pair_configs(docs[variant], ordinal, tmp_path, monkeypatch)
    assert set(configs) == {*PAIR_ROLES, "metrics"}
    ports = set()
    for role in PAIR_ROLES:
        container, config = configs[role]
        assert config.key_prefix == f"{v.key_base}:p{ordinal}", role          # pair i's key space
        assert config.redis_url == "redis://:k8s-s3cret@duoserve-redis:6379/0", role
        assert (config.port, config.metrics_port) == k8s.PAIR_PORTS[role]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[kind]["exec"]["command"][-2:] == ["duoserve.healthcheck", f"127.0.0.1:{config.port}"]
        ports |= {config.port, config.metrics_port}
    assert len(ports) == 2 * len(PAIR_ROLES), "one network namespace: every port distinct"
    relay = metrics_relay.parse_args(configs["metrics"][0]["command"][3:])
    assert dict(relay.peers) == {role: f"127.0.0.1:{k8s.PAIR_PORTS[role][1]}" for role in PAIR_ROLES}
    assert relay.port == k8s.RELAY_PORT and relay.host == "0.0.0.0"

    arena = configs["arena"][1]
    for worker in ("prefill", "decode"):
        worker_config = configs[worker][1]
        assert worker_config.arena_socket == arena.socket_path and worker_config.cache_dir == arena.cache_dir
        assert worker_config.secret == "k8s-s3cret" and worker_config.device == arena.device
    assert arena.cache_dir == Path(k8s.CACHE_DIR) and arena.socket_path.parent.parent == Path(k8s.SHARED_DIR)
    orchestrator = configs["orchestrator"][1]
    assert orchestrator.secret == "k8s-s3cret" and orchestrator.device == arena.device == v.device
    if v.device == "cpu":                           # the pair's cores, split as `duoserve up` splits a stack's
        from duoserve.stack_plan import StackConfig
        stack = StackConfig(state_dir=tmp_path, cache_dir=tmp_path, cpus=orchestrator.stack_cpus)
        assert len(set(orchestrator.stack_cpus)) == min(v.pair_cores, len(os.sched_getaffinity(0)))
        assert configs["prefill"][1].cpu_ids == stack.worker_cpus()["prefill"]
        assert configs["decode"][1].cpu_ids == stack.worker_cpus()["decode"]
        for role in ("prefill", "decode"):                 # shares are fractions of the pair's cores
            assert configs[role][1].stack_cpus == tuple(sorted(set(orchestrator.stack_cpus)))


def test_the_entry_script_execs_the_command_with_the_pair_flags(docs, tmp_path) -> None:
    """The ConfigMap's script itself, run as a pod runs it: it execs CMD (here `echo`) with the flags."""
    script = tmp_path / "pair_entry.py"
    script.write_text(named(docs["cpu"], "ConfigMap", "duoserve-pair-entry")["data"]["pair_entry.py"])
    env = {"PATH": os.environ["PATH"], "POD_NAME": "duoserve-pair-7", "DUOSERVE_KEY_BASE": "duo",
           "DUOSERVE_PAIR_CORES": "1"}
    out = subprocess.run([sys.executable, str(script), "decode", "echo", "python", "-m", "services.decode.main"],
                         env=env, capture_output=True, text=True, timeout=30, check=True)
    cores = sorted(os.sched_getaffinity(0))
    assert out.stdout.split() == ["python", "-m", "services.decode.main", "--key-prefix", "duo:p7",
                                  "--cpus", str(cores[7 % len(cores)]), "--stack-cpus", str(cores[7 % len(cores)])]
    bad = subprocess.run([sys.executable, str(script), "arena", "echo"], env={**env, "POD_NAME": "pair"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "not a StatefulSet pod's name" in bad.stderr


def test_pair_cores_are_disjoint_runs_that_wrap() -> None:
    entry = pair_entry
    assert entry.pair_index("duoserve-pair-12") == 12
    assert [entry.pair_cores(i, 2, range(8)) for i in range(5)] == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 1)]
    assert entry.pair_cores(1, 4, [3, 1]) == (1, 3)                       # fewer cores than asked: each once
    assert entry.role_cores("prefill", (4, 5, 6)) == (4,) and entry.role_cores("decode", (4, 5, 6)) == (5, 6)
    assert entry.role_cores("decode", (4,)) == (4,) and entry.role_cores("orchestrator", (4, 5)) == (4, 5)


def gateway_command(objects) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    deployment = named(objects, "Deployment", "duoserve-gateway")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return pod, container, container["command"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateway_routes_over_every_pair_and_parses(docs, variant: str, tmp_path, monkeypatch) -> None:
    objects = docs[variant]
    pod, container, argv = gateway_command(objects)
    prefixes = argv[argv.index("--pair-prefixes") + 1].split(",")
    statefulset = named(objects, "StatefulSet", "duoserve-pair")
    entry = entry_module(objects)
    pair_env = {e["name"]: e.get("value", "") for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    expected = [entry.argv_for("arena", ["x"], {**pair_env, "POD_NAME": f"duoserve-pair-{i}"}, [0])[-1]
                for i in range(statefulset["spec"]["replicas"])]
    assert prefixes == expected, "every pair's key space, and no other, is routed to"
    secret = tmp_path / "secret"
    secret.write_text("k8s-s3cret\n")
    env = env_of(container, "duoserve-gateway-0", secret)
    role, config = parse_in(container, argv, env, monkeypatch)
    assert list(config.pairs) == prefixes                                # what it routes between
    assert role == "gateway" and config.host == config.http_host == "0.0.0.0"
    assert config.key_prefix == render.VARIANTS[variant].key_base       # the pairs' prefixes extend it
    assert config.redis_url == "redis://:k8s-s3cret@duoserve-redis:6379/0" and config.api_key == ""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port}
    assert container["readinessProbe"]["grpc"]["port"] == config.port          # the kubelet's grpc.health.v1
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.http_port)   # the HTTP API's /metrics
    (init,) = pod["spec"]["initContainers"]
    code = init["command"][2]
    ast.parse(code)
    from services.engine import loader
    assert "resolve_model_dir" in code and callable(loader.resolve_model_dir)
    assert env_of(init, "x", secret)["DUOSERVE_MODEL"] == env["DUOSERVE_MODEL"] == render.VARIANTS[variant].model


def test_the_gateway_init_container_resolves_the_model_as_the_arena_does(docs, tmp_path) -> None:
    """The init container's code, run as the pod runs it, on a checkpoint directory (found in place,
    nothing converted): it prints the directory the arena's `resolve_model_dir(model, cache_dir)`
    (services/arena/main.py) publishes, so the gateway finds the tokenizer at that path."""
    from services.engine.loader import resolve_model_dir
    init = named(docs["cpu"], "Deployment", "duoserve-gateway")["spec"]["template"]["spec"]["initContainers"][0]
    checkpoint = tmp_path / "Some-Model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    env = {**os.environ, "DUOSERVE_MODEL": str(checkpoint), "DUOSERVE_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, *init["command"][1:]], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert Path(out.stdout.strip()) == resolve_model_dir(str(checkpoint), tmp_path / "cache") == checkpoint
