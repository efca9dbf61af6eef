"""deploy/k8s against Kubernetes' own schemas and against the code it runs (docs/deploying.md).

Offline, no cluster: the checked-in manifests are what deploy/k8s/render.py renders; every object
validates, strictly (an unknown field fails), against the pinned Kubernetes version's OpenAPI schemas
(kubernetes-validate); the names that tie objects together resolve (Service selectors and target
ports, StatefulSet service names, PDB selectors, volumes, ConfigMaps, the Secret, the GPU claim); and
every container's command line, run through the manifest's own copy of pair_entry.py for each pair
ordinal as a pod runs it, is parsed by that process's own argparse parser with the container's
environment, so the manifests cannot drift from the code (as tests/test_compose.py does for compose).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_compose import parse_command

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "k8s"


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


render = _load(DEPLOY / "render.py", "duoserve_k8s_render")
VARIANTS = sorted(render.VARIANTS)
WORKLOADS = ("StatefulSet", "Deployment")
PAIR_ROLES = tuple(render.PAIR_PORTS)


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict[str, Any]]]:
    return {name: list(yaml.safe_load_all((DEPLOY / name / render.OUTPUT).read_text())) for name in VARIANTS}


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def templates(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, its pod template) for every StatefulSet and Deployment."""
    return [(o, o["spec"]["template"]) for o in objects if o["kind"] in WORKLOADS]


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def selects(selector: dict[str, str], pod: dict[str, Any]) -> bool:
    return selector.items() <= pod["metadata"]["labels"].items()


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
            assert source["secretKeyRef"]["name"] == render.SECRET and source["secretKeyRef"]["optional"] is True
        else:
            env[item["name"]] = str(secret_file) if item["value"] == render.SECRET_FILE else item["value"]
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
    role = {module: role for role, module in render.MODULES.items()}.get(argv[2]) or argv[2].split(".")[1]
    return role, parse_command(role, argv[3:])


# ------------------------------------------------------------------------------------------ files, schemas

def test_checked_in_files_are_what_render_py_renders() -> None:
    assert render.main(["--check"]) == 0, "run: python deploy/k8s/render.py"
    for name in VARIANTS:
        kustomization = yaml.safe_load((DEPLOY / name / "kustomization.yaml").read_text())
        assert kustomization["resources"] == [render.OUTPUT]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_kubernetes(docs, variant: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the test extra: `make install` (pip install -e '.[test]')")
    kinds = []
    for obj in docs[variant]:
        kubernetes_validate.validate(obj, render.KUBERNETES_VERSION, strict=True)
        kinds.append(obj["kind"])
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "duoserve"
    expected = {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget"}
    assert set(kinds) == expected | ({"ResourceClaimTemplate"} if variant == "gpu" else set())
    assert "Secret" not in kinds, "the stack's secret is made by the operator, never checked in"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kubectls_kustomize_builds_the_same_objects(docs, variant: str) -> None:
    """`kubectl apply -k deploy/k8s/<variant>` applies exactly the file's objects (kubectl's built-in
    kustomize, offline)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / variant)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(docs[variant], key=key)


# ------------------------------------------------------------------------------------------ cross-references

@pytest.mark.parametrize("variant", VARIANTS)
def test_services_and_budgets_select_pods_by_their_labels_and_port_names(docs, variant: str) -> None:
    objects = docs[variant]
    pods = templates(objects)
    for workload, pod in pods:
        assert selects(workload["spec"]["selector"]["matchLabels"], pod), workload["metadata"]["name"]
        if workload["kind"] == "StatefulSet":         # its governing Service is headless and selects it
            service = named(objects, "Service", workload["spec"]["serviceName"])
            assert service["spec"]["clusterIP"] == "None" and selects(service["spec"]["selector"], pod)
    for service in of_kind(objects, "Service"):
        chosen = [pod for _, pod in pods if selects(service["spec"]["selector"], pod)]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {len(chosen)} pod templates"
        ports = {p["name"]: p["containerPort"] for c in chosen[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] == port["name"] and ports[port["name"]] == port["port"], port
    for budget in of_kind(objects, "PodDisruptionBudget"):
        chosen = [w for w, pod in pods if selects(budget["spec"]["selector"]["matchLabels"], pod)]
        assert [w["metadata"]["name"] for w in chosen] == [budget["metadata"]["name"]]
    assert {b["metadata"]["name"] for b in of_kind(objects, "PodDisruptionBudget")} == {"duoserve-gateway",
                                                                                      "duoserve-pair"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_volumes_configmaps_secrets_and_claims_resolve(docs, variant: str) -> None:
    check_references(docs[variant])


def test_a_checkpoint_claim_is_mounted_read_only_in_every_duoserve_container() -> None:
    """`render.py --model-claim models --model /models/...`: valid, resolved, and where the model is read."""
    v = dataclasses.replace(render.VARIANTS["gpu"], model_claim="models", model="/models/Llama-3.1-8B-Instruct")
    objects = list(yaml.safe_load_all(render.render(v)))
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in objects:
        kubernetes_validate.validate(obj, render.KUBERNETES_VERSION, strict=True)
    check_references(objects)
    for _, pod in templates(objects):
        for container in all_containers(pod):
            if container["name"] in ("redis", "metrics"):
                continue
            assert {"name": "weights", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
            assert {"name": "DUOSERVE_MODEL", "value": v.model} in container["env"]


def check_references(objects: list[dict[str, Any]]) -> None:
    for workload, pod in templates(objects):
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["name"]: c for c in spec.get("resourceClaims", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                named(objects, "ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                assert volume["secret"]["secretName"] == render.SECRET
                assert volume["secret"]["items"] == [{"key": "secret", "path": "secret"}]
        for claim in claims.values():
            named(objects, "ResourceClaimTemplate", claim["resourceClaimTemplateName"])
        persistent = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        mounted = set()
        for container in all_containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in {*volumes, *persistent}, f"{container['name']} mounts {mount['name']}"
                mounted.add(mount["name"])
            for claim in container["resources"].get("claims", []):
                assert claim["name"] in claims, f"{container['name']}: no pod claim {claim['name']}"
            assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
        assert mounted == {*volumes, *persistent}, f"{workload['metadata']['name']}: a volume nobody mounts"
        assert spec["automountServiceAccountToken"] is False     # no pod talks to the API server


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_and_scrape_annotations_name_ports_the_pod_has(docs, variant: str) -> None:
    for _, pod in templates(docs[variant]):
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        annotations = pod["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) in ports.values()
            assert annotations["prometheus.io/path"] == "/metrics"
        for container in pod["spec"]["containers"]:
            own = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert {"readinessProbe", "livenessProbe"} <= set(container), f"{container['name']} lacks probes"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind, {})
                for how in ("grpc", "tcpSocket"):
                    if how in probe:
                        port = probe[how]["port"]
                        assert port in own or port in own.values(), f"{container['name']}.{kind}: port {port}"


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
        assert command[:3] == ["python", f"{render.ENTRY_DIR}/pair_entry.py", container["name"]]
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
        assert (config.port, config.metrics_port) == render.PAIR_PORTS[role]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[kind]["exec"]["command"][-2:] == ["duoserve.healthcheck", f"127.0.0.1:{config.port}"]
        ports |= {config.port, config.metrics_port}
    assert len(ports) == 2 * len(PAIR_ROLES), "one network namespace: every port distinct"
    relay = _load(REPO / "duoserve" / "metrics_relay.py", "metrics_relay_check").parse_args(
        configs["metrics"][0]["command"][3:])
    assert dict(relay.peers) == {role: f"127.0.0.1:{render.PAIR_PORTS[role][1]}" for role in PAIR_ROLES}
    assert relay.port == render.RELAY_PORT and relay.host == "0.0.0.0"

    arena = configs["arena"][1]
    for worker in ("prefill", "decode"):
        worker_config = configs[worker][1]
        assert worker_config.arena_socket == arena.socket_path and worker_config.cache_dir == arena.cache_dir
        assert worker_config.secret == "k8s-s3cret" and worker_config.device == arena.device
    assert arena.cache_dir == Path(render.CACHE_DIR) and arena.socket_path.parent.parent == Path(render.SHARED_DIR)
    orchestrator = configs["orchestrator"][1]
    assert orchestrator.secret == "k8s-s3cret" and orchestrator.device == arena.device == v.device
    if v.device == "cpu":                           # the pair's cores, split as `duoserve up` splits a stack's
        from duoserve.stack_plan import StackConfig
        stack = StackConfig(state_dir=tmp_path, cache_dir=tmp_path, cpus=orchestrator.stack_cpus)
        assert len(set(orchestrator.stack_cpus)) == min(v.pair_cores, len(os.sched_getaffinity(0)))
        assert configs["prefill"][1].cpu_ids == stack.worker_cpus()["prefill"]
        assert configs["decode"][1].cpu_ids == stack.worker_cpus()["decode"]


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
                                  "--cpus", str(cores[7 % len(cores)])]
    bad = subprocess.run([sys.executable, str(script), "arena", "echo"], env={**env, "POD_NAME": "pair"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "not a StatefulSet pod's name" in bad.stderr


def test_pair_cores_are_disjoint_runs_that_wrap() -> None:
    entry = _load(DEPLOY / "pair_entry.py", "pair_entry_unit")
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


def pair_prefixes_of(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --pair-prefixes list, argv without the flag)."""
    i = argv.index("--pair-prefixes")
    return argv[i + 1].split(","), argv[:i] + argv[i + 2:]


def gateway_knows_pair_prefixes() -> bool:
    from services.gateway.config import parse_args
    try:
        parse_args(["--redis-url", "redis://x:1/0", "--port", "1", "--pair-prefixes", "duo:p0"])
    except SystemExit:
        return False
    return True


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateway_routes_over_every_pair_and_parses(docs, variant: str, tmp_path, monkeypatch) -> None:
    objects = docs[variant]
    pod, container, argv = gateway_command(objects)
    prefixes, rest = pair_prefixes_of(argv)
    statefulset = named(objects, "StatefulSet", "duoserve-pair")
    entry = entry_module(objects)
    pair_env = {e["name"]: e.get("value", "") for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    expected = [entry.argv_for("arena", ["x"], {**pair_env, "POD_NAME": f"duoserve-pair-{i}"}, [0])[-1]
                for i in range(statefulset["spec"]["replicas"])]
    assert prefixes == expected, "every pair's key space, and no other, is routed to"
    secret = tmp_path / "secret"
    secret.write_text("k8s-s3cret\n")
    env = env_of(container, "duoserve-gateway-0", secret)
    role, config = parse_in(container, argv if gateway_knows_pair_prefixes() else rest, env, monkeypatch)
    assert role == "gateway" and config.host == config.http_host == "0.0.0.0"
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


def test_the_gateway_parser_takes_pair_prefixes() -> None:
    if not gateway_knows_pair_prefixes():
        pytest.xfail("--pair-prefixes is not in services/gateway/config.py yet (issue 16, routing)")


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


# ------------------------------------------------------------------------------------------ variants

def test_the_gpu_pairs_share_one_claimed_gpu_under_the_dra_drivers_mps(docs) -> None:
    objects = docs["gpu"]
    (claim,) = of_kind(objects, "ResourceClaimTemplate")
    (request,) = claim["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"] == {"deviceClassName": "gpu.nvidia.com", "count": 1}
    (config,) = claim["spec"]["spec"]["devices"]["config"]
    assert config["opaque"]["parameters"]["sharing"] == {"strategy": "MPS"}      # no caps of its own
    pod = named(objects, "StatefulSet", "duoserve-pair")["spec"]["template"]
    for container in pod["spec"]["containers"]:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        cuda = container["name"] in ("arena", "prefill", "decode")
        assert bool(container["resources"].get("claims")) == cuda, container["name"]
        assert "CUDA_MPS_PIPE_DIRECTORY" not in env          # the DRA driver sets it, matching its daemon
        assert ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in env) == cuda
        if cuda:
            assert 1 <= int(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]) <= 100
        assert "/dev/shm" not in [m["mountPath"] for m in container.get("volumeMounts", [])]   # the driver's


def test_the_cpu_variant_has_no_gpu_and_its_own_shared_memory(docs) -> None:
    text = (DEPLOY / "cpu" / render.OUTPUT).read_text()
    assert "nvidia" not in text and "CUDA_" not in text and "resourceClaims" not in text
    pod = named(docs["cpu"], "StatefulSet", "duoserve-pair")["spec"]["template"]
    assert pod["spec"]["shareProcessNamespace"] is True
    shm = [v for v in pod["spec"]["volumes"] if v["name"] == "shm"]
    assert shm == [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": render.VARIANTS["cpu"].shm_size}}]
    for container in pod["spec"]["containers"]:
        has_shm = any(m["mountPath"] == "/dev/shm" for m in container.get("volumeMounts", []))
        assert has_shm == (container["name"] in ("arena", "prefill", "decode")), container["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_redis_keeps_an_append_only_file_and_wants_the_secret(docs, variant: str) -> None:
    statefulset = named(docs[variant], "StatefulSet", "duoserve-redis")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    command = container["command"][2]
    assert "requirepass %s" in command and f"cat {render.SECRET_FILE}" in command and "--requirepass" not in command
    assert "--appendonly yes" in command and "--dir /data" in command
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert render.SECRET_FILE in " ".join(container["readinessProbe"]["exec"]["command"])
    text = (DEPLOY / variant / render.OUTPUT).read_text()
    assert "requirepass" not in text.replace("requirepass %s", "")
