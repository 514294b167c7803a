"""The Kubernetes manifests, rendered as kustomize renders them, against the Kubernetes API schemas
(kubernetes-validate, strict) and KEDA's; then what they must say about maskq."""

from __future__ import annotations

import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from config.settings import LANES, Settings
from tests.conftest import ROOT
from tests.support.command_lines import leaks
from tests.support.keda_schemas import SCHEMAS
from tests.support.kustomize import render

KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE, GPU = KUBERNETES / "base", KUBERNETES / "overlays" / "gpu"


@pytest.fixture(scope="module", params=["base", "gpu"])
def rendered(request):
    return render(BASE if request.param == "base" else GPU)


def kinds(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod(doc) -> dict:
    return doc["spec"]["template"]["spec"]


def test_every_resource_validates_against_its_schema(rendered):
    version = kubernetes_validate.latest_version()
    for doc in rendered:
        schema = SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error or unknown field


def test_a_typo_is_caught(rendered):
    """The validation above can fail: an unknown field in a Deployment, and in a ScaledObject."""
    web = dict(kinds(rendered, "Deployment")["web"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {**web, "spec": {**web["spec"], "replica": 2}}, kubernetes_validate.latest_version(), strict=True
        )
    scaled = kinds(rendered, "ScaledObject")["worker-batch"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}, SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]
        )


def test_one_scaled_object_per_lane_scales_that_lanes_workers_on_its_redis_list(rendered):
    scaled = kinds(rendered, "ScaledObject")
    deployments = kinds(rendered, "Deployment")
    assert sorted(s["spec"]["triggers"][0]["metadata"]["listName"] for s in scaled.values()) == sorted(LANES)
    for so in scaled.values():
        lane = so["spec"]["triggers"][0]["metadata"]["listName"]
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        assert target["metadata"]["labels"]["maskq.dev/lane"] == lane
        command = pod(target)["containers"][0]["command"]
        queues = command[command.index("-Q") + 1].split(",")
        assert queues[0] == lane and queues == [q for q in LANES if LANES.index(q) >= LANES.index(lane)]
        assert so["spec"]["triggers"][0]["authenticationRef"]["name"] in kinds(rendered, "TriggerAuthentication")
    assert scaled["worker-batch"]["spec"]["minReplicaCount"] == 0  # batch workers may scale to zero
    assert scaled["worker-interactive"]["spec"]["minReplicaCount"] >= 1


def test_workers_outlive_their_longest_job_when_stopped(rendered):
    config = kinds(rendered, "ConfigMap")["maskq-config"]["data"]
    hard_limit = float(config.get("MASKQ_JOB_HARD_TIME_LIMIT_S", Settings().job_hard_time_limit_s))
    workers = [
        d
        for d in kinds(rendered, "Deployment").values()
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    ]
    assert len(workers) == len(LANES)
    for worker in workers:
        spec = pod(worker)
        container = spec["containers"][0]
        assert spec["terminationGracePeriodSeconds"] > hard_limit
        assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])  # warm shutdown
        assert container["command"][:3] == ["python", "-m", "workers.launch"]
        soft_shutdown = {e["name"]: e.get("value") for e in container["env"]}["MASKQ_WORKER_SOFT_SHUTDOWN_S"]
        assert hard_limit <= float(soft_shutdown) < spec["terminationGracePeriodSeconds"]


def test_every_maskq_variable_named_is_a_setting():
    """A misspelt MASKQ_ variable would be ignored by the service: every one in the manifests is a setting."""
    fields = {f"MASKQ_{name.upper()}" for name in Settings.model_fields}
    named = set(re.findall(r"\bMASKQ_[A-Z0-9_]+", "".join(p.read_text() for p in KUBERNETES.rglob("*.yaml"))))
    assert named and named <= fields, sorted(named - fields)


def test_services_and_budgets_select_pods_that_exist(rendered):
    templates = [
        pod_labels
        for d in rendered
        if d["kind"] in ("Deployment", "StatefulSet")
        for pod_labels in [d["spec"]["template"]["metadata"]["labels"]]
    ]
    for service in kinds(rendered, "Service").values():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), service["metadata"]["name"]
    for budget in kinds(rendered, "PodDisruptionBudget").values():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in templates)
    for workload in [d for d in rendered if d["kind"] in ("Deployment", "StatefulSet")]:
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )


def test_one_beat_flower_behind_auth_and_no_public_service(rendered):
    beat = kinds(rendered, "Deployment")["beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    flower = pod(kinds(rendered, "Deployment")["flower"])["containers"][0]
    assert "FLOWER_BASIC_AUTH" in {e["name"] for e in flower["env"]}
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in kinds(rendered, "Service").values())
    assert all(d.get("metadata", {}).get("namespace") == "maskq" for d in rendered if d["kind"] != "Namespace")


def test_the_gpu_overlay_gives_each_worker_one_gpu_and_the_cuda_image():
    docs = render(GPU)
    for name, deployment in kinds(docs, "Deployment").items():
        container = pod(deployment)["containers"][0]
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MASKQ_DEVICE"] == "cuda" and env["MASKQ_GPUS"] == "all"
            assert container["image"] == "maskq:cuda"
        else:
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}), name
            assert container["image"] == "maskq:cuda"  # one image for the whole stack, as in compose
    base = kinds(render(BASE), "Deployment")
    assert pod(base["worker-batch"])["containers"][0]["image"] == "maskq:latest"


def test_every_yaml_file_parses():
    for path in KUBERNETES.rglob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text())), path


def workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def containers(workload) -> list[dict]:
    return pod(workload)["containers"] + pod(workload).get("initContainers", [])


def test_every_pod_runs_unprivileged_as_a_non_root_user_on_a_read_only_root(rendered):
    image_user = int(re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    for workload in workloads(rendered):
        name, spec = workload["metadata"]["name"], pod(workload)
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for container in containers(workload):
            own = container["securityContext"]
            assert own["allowPrivilegeEscalation"] is False and not own.get("privileged"), name
            assert own["capabilities"] == {"drop": ["ALL"]}, name
            assert own["readOnlyRootFilesystem"] is True, name
            # A read-only root leaves volumes to write to: the temporary folder among them.
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name
            if container["image"].startswith("maskq"):
                assert context["runAsUser"] == image_user, name  # the Dockerfile's user


def isolated(policies, labels: dict) -> list[dict]:
    return [
        p
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"]
        and p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
    ]


def admitted(policies, target: dict, port: str, source: dict, namespace: str = "maskq") -> bool:
    """Whether the NetworkPolicies let a pod (``source`` labels, in ``namespace``) reach ``target`` on ``port``.

    NetworkPolicy's rules for the matchLabels selectors these manifests use; a namespace's labels are
    the ``kubernetes.io/metadata.name`` Kubernetes gives it.
    """
    selecting = isolated(policies, target)
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(p["port"] == port for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                namespaces = peer.get("namespaceSelector")
                in_namespace = (
                    namespace == "maskq"
                    if namespaces is None
                    else namespaces.get("matchLabels", {}).items() <= {"kubernetes.io/metadata.name": namespace}.items()
                )
                pods = peer.get("podSelector", {}).get("matchLabels", {})
                if in_namespace and pods.items() <= source.items():
                    return True
    return False


def test_network_policies_let_in_only_the_web_redis_clients_keda_and_the_metrics_scraper(rendered):
    policies = list(kinds(rendered, "NetworkPolicy").values())
    labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(rendered)}
    assert all(isolated(policies, pod_labels) for pod_labels in labels.values())  # no pod is left open
    stranger = {"app": "something-else"}
    # The web: from anywhere, on its port.
    assert admitted(policies, labels["web"], "http", stranger, namespace="ingress-nginx")
    # Redis: maskq's own pods and KEDA, nobody else, on the Redis port only; and it calls no one.
    for client in ("web", "worker-interactive", "worker-batch", "webhooks", "beat", "flower"):
        assert admitted(policies, labels["redis"], "redis", labels[client]), client
    assert admitted(policies, labels["redis"], "redis", {"app": "keda-operator"}, namespace="keda")
    assert not admitted(policies, labels["redis"], "redis", stranger)
    assert not admitted(policies, labels["redis"], "redis", labels["web"], namespace="default")
    assert not admitted(policies, labels["redis"], "http", labels["web"])
    redis_policy = kinds(rendered, "NetworkPolicy")["redis"]["spec"]
    assert "Egress" in redis_policy["policyTypes"] and not redis_policy.get("egress")
    # The workers' metrics: Prometheus's namespace only, not the web, not another namespace.
    assert admitted(policies, labels["worker-default"], "metrics", {"app": "prometheus"}, namespace="monitoring")
    assert not admitted(policies, labels["worker-default"], "metrics", labels["web"])
    assert not admitted(policies, labels["worker-default"], "metrics", stranger, namespace="default")
    # Flower, beat, the webhooks worker: nothing comes in.
    for name in ("flower", "beat", "webhooks"):
        assert not admitted(policies, labels[name], "http", stranger, namespace="ingress-nginx"), name


def test_worker_metrics_listen_on_the_pod_address_not_on_every_interface(rendered):
    assert "MASKQ_WORKER_METRICS_HOST" not in kinds(rendered, "ConfigMap")["maskq-config"]["data"]
    for name, deployment in kinds(rendered, "Deployment").items():
        env = {e["name"]: e for e in pod(deployment)["containers"][0].get("env", [])}
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
            assert env["MASKQ_WORKER_METRICS_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", name


def redis_config(rendered) -> dict[str, str]:
    text = kinds(rendered, "ConfigMap")["redis-config"]["data"]["valkey.conf"]
    return dict(line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def quantity(text: str) -> int:
    """Bytes, from a Kubernetes quantity (``4Gi``) or a Redis size (``3gb``: Redis's gb are 1024³)."""
    number, unit = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", text.strip()).groups()
    return (
        int(number)
        * {"": 1, "ki": 2**10, "mi": 2**20, "gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}[unit.lower()]
    )


def test_redis_stays_below_its_memory_limit_evicts_nothing_and_keeps_an_append_only_file(rendered):
    config = redis_config(rendered)
    assert config["maxmemory-policy"] == "noeviction"  # job records must never be evicted
    assert config["appendonly"] == "yes" and config["appendfsync"] in ("everysec", "always")
    redis = kinds(rendered, "StatefulSet")["redis"]
    container = pod(redis)["containers"][0]
    limit = quantity(container["resources"]["limits"]["memory"])
    # Refusing writes when full, rather than being killed: room left for the AOF rewrite and clients.
    assert 0 < quantity(config["maxmemory"]) <= 0.8 * limit
    assert "/etc/valkey/valkey.conf" in " ".join(container["command"] + container["args"])
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod(redis)["volumes"]}
    assert mounted["config"] == "/etc/valkey" and volumes["config"]["configMap"]["name"] == "redis-config"


def test_no_password_is_on_a_command_line(rendered):
    for workload in workloads(rendered):
        for container in containers(workload):
            secrets = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            secrets |= {"REDIS_PASSWORD", "MASKQ_REDIS_URL", "FLOWER_BASIC_AUTH"}  # envFrom: the secret's keys
            commands = [container.get("command", []) + container.get("args", [])]
            commands += [
                probe["exec"]["command"]
                for key in ("readinessProbe", "livenessProbe", "startupProbe")
                if "exec" in (probe := container.get(key, {}))
            ]
            commands += [container["lifecycle"]["preStop"]["exec"]["command"]] if "lifecycle" in container else []
            for words in commands:
                assert not leaks(words, secrets), (workload["metadata"]["name"], words)
