"""deploy/k8s against Kubernetes' own schemas and against the code it runs (docs/deploying.md).

Offline, no cluster: the checked-in manifests are what `python -m deploy.k8s.render` renders; every
object validates, strictly (an unknown field fails), against the pinned Kubernetes version's OpenAPI
schemas (kubernetes-validate); kubectl's kustomize builds the same objects; the names that tie objects
together resolve (Service selectors and target ports, StatefulSet service names, PDB selectors,
volumes, ConfigMaps, the Secret, the GPU claim); probes and scrape annotations name ports the pods
have. The command lines against each process's parser: tests/test_k8s_commands.py.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.k8s import objects as k8s
from deploy.k8s import render

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "k8s"


VARIANTS = sorted(render.VARIANTS)
WORKLOADS = ("StatefulSet", "Deployment")
PAIR_ROLES = tuple(k8s.PAIR_PORTS)


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
        kubernetes_validate.validate(obj, k8s.KUBERNETES_VERSION, strict=True)
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
        kubernetes_validate.validate(obj, k8s.KUBERNETES_VERSION, strict=True)
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
                assert volume["secret"]["secretName"] == k8s.SECRET
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
    assert "requirepass %s" in command and f"cat {k8s.SECRET_FILE}" in command and "--requirepass" not in command
    assert "--appendonly yes" in command and "--dir /data" in command
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert k8s.SECRET_FILE in " ".join(container["readinessProbe"]["exec"]["command"])
    text = (DEPLOY / variant / render.OUTPUT).read_text()
    assert "requirepass" not in text.replace("requirepass %s", "")
