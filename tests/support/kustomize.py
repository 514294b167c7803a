"""Render a kustomization as ``kustomize build`` would, for the features maskq's manifests use.

``resources`` (files and folders), ``namespace``, ``images`` (newName/newTag by image name) and
``patches`` (a JSON 6902 patch file with a ``target`` of ``kind``, ``name`` and/or ``labelSelector``
``key=value[,key=value]``), applied in kustomize's order: resources, patches, images, namespace.
Any other field fails loudly, so a manifest that starts using one is not validated wrongly.
"""

from __future__ import annotations

from pathlib import Path

import jsonpatch
import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace"}


def render(folder: Path) -> list[dict]:
    folder = Path(folder)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml uses {sorted(unknown)}, which this renderer does not know")
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        matched = [i for i, doc in enumerate(docs) if _matches(doc, patch["target"])]
        if not matched:
            raise ValueError(f"patch {patch['path']} matches no resource")
        for i in matched:
            docs[i] = jsonpatch.apply_patch(docs[i], operations)
    for image in kustomization.get("images", []):
        for container in _containers(docs):
            name = (
                container["image"].split("@")[0].rsplit(":", 1)[0]
                if ":" in container["image"].split("/")[-1]
                else container["image"]
            )
            if name == image["name"]:
                container["image"] = (
                    f"{image.get('newName', name)}:{image['newTag']}"
                    if "newTag" in image
                    else image.get("newName", name)
                )
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    return docs


def _matches(doc: dict, target: dict) -> bool:
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and doc["metadata"]["name"] != target["name"]:
        return False
    if "labelSelector" in target:
        labels = doc["metadata"].get("labels", {})
        for pair in target["labelSelector"].split(","):
            key, _, value = pair.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _containers(docs: list[dict]):
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
        yield from pod.get("containers", [])
        yield from pod.get("initContainers", [])
