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
        kubernetes_validate.validate({**web, "spec": {**web["spec"], "replica": 2}},
                                     kubernetes_validate.latest_version(), strict=True)
    scaled = kinds(rendered, "ScaledObject")["worker-batch"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "minReplicas": 0}},
                            SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])


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
    workers = [d for d in kinds(rendered, "Deployment").values()
               if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
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
    templates = [pod_labels for d in rendered if d["kind"] in ("Deployment", "StatefulSet")
                 for pod_labels in [d["spec"]["template"]["metadata"]["labels"]]]
    for service in kinds(rendered, "Service").values():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), service["metadata"]["name"]
    for budget in kinds(rendered, "PodDisruptionBudget").values():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels in templates)
    for workload in [d for d in rendered if d["kind"] in ("Deployment", "StatefulSet")]:
        assert workload["spec"]["selector"]["matchLabels"].items() <= \
            workload["spec"]["template"]["metadata"]["labels"].items()


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
