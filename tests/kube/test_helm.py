"""The Helm chart, with a real helm binary: lint, render, and the rendered manifests checked against the
Kubernetes 1.37 schemas. The chart's CRDs are the generated ones in crds/."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from kube_helpers import ROOT, helm_binary

CHART = ROOT / "helm" / "tensafe"


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    binary = helm_binary(tmp_path_factory.mktemp("helm"))

    def run(*args: str) -> str:
        result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout
    return run


def render(helm, *sets: str) -> list[dict]:
    args = ["template", "tensafe", str(CHART), "--namespace", "tensafe-system", "--include-crds"]
    for value in sets:
        args += ["--set", value]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


def by_kind(docs):
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def test_chart_lints(helm):
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict")


def test_chart_crds_are_the_generated_ones():
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), f"copy crds/{crd.name} into the chart"
    names = [sorted(p.name for p in (folder / "crds").glob("*.yaml")) for folder in (CHART, ROOT)]
    assert names[0] == names[1]


def test_rendered_manifests_validate_against_the_kubernetes_schemas(helm):
    import kubernetes_validate

    for values in ([], ["operator.watchNamespaces={ml,research}"]):
        for doc in render(helm, *values):
            if doc["kind"] == "CustomResourceDefinition" or doc["apiVersion"].startswith("tensafe.io"):
                continue  # checked by the API (test_kube_*), not part of the built-in schemas
            kubernetes_validate.validate(doc, "1.37", strict=True)


def test_operator_deployment_is_single_recreate_and_locked_down(helm):
    kinds = by_kind(render(helm, "operator.image.tag=1.2.3"))
    assert sorted(kinds) == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment",
                             "ServiceAccount"]
    deployment = kinds["Deployment"][0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/tensafe/tensafe-operator:1.2.3"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TENSAFE_TRAINER_IMAGE"] == "ghcr.io/tensafe/tensafe-trainer:0.1.0"


def test_rbac_is_least_privilege_and_namespaced_when_asked(helm):
    cluster_wide = by_kind(render(helm))["ClusterRole"][0]["rules"]
    for rule in cluster_wide:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    secrets = next(r for r in cluster_wide if r["resources"] == ["secrets"])
    assert secrets["verbs"] == ["get", "create", "patch"]  # no list/watch: it reads only the Secrets it names
    pods = next(r for r in cluster_wide if r["resources"] == ["pods"])
    assert "update" not in pods["verbs"] and "patch" not in pods["verbs"]

    kinds = by_kind(render(helm, "operator.watchNamespaces={ml,research}"))
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert sorted(r["metadata"]["namespace"] for r in kinds["Role"]) == ["ml", "research"]
    args = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--namespace=ml", "--namespace=research"]


def test_trainer_defaults_reach_the_operator(helm):
    import json

    from tensafe_operator.builders import TrainerDefaults

    deployment = by_kind(render(helm, "trainer.resources.gpus=1", "trainer.nodeSelector.pool=gpu"))["Deployment"][0]
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    defaults = TrainerDefaults.parse(env["TENSAFE_TRAINER_DEFAULTS"])
    assert defaults.resources == {"gpus": 1} and defaults.node_selector == {"pool": "gpu"}
    assert json.loads(env["TENSAFE_TRAINER_DEFAULTS"])["tolerations"] == []


def test_trainer_images_are_an_allow_list_defaulting_to_the_charts_own(helm):
    """Issue #26: a TrainingClient's spec.image runs only if the operator's allow-list has it."""
    from tensafe_operator.builders import image_allowed, parse_allowed_images

    def allowed(*sets):
        container = by_kind(render(helm, *sets))["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        return env["TENSAFE_TRAINER_IMAGE"], parse_allowed_images(env["TENSAFE_ALLOWED_IMAGES"])

    default, images = allowed()
    assert images == ("ghcr.io/tensafe/tensafe-trainer:0.1.0",) == (default,)
    assert not image_allowed("ghcr.io/tensafe/tensafe-trainer:0.0.9", images, default)
    default, images = allowed("trainer.allowedImages={registry.example/tensafe-trainer:*,other.example/t:1}")
    assert images == ("registry.example/tensafe-trainer:*", "other.example/t:1")
    assert image_allowed("registry.example/tensafe-trainer:2", images, default) and image_allowed(default, images,
                                                                                                    default)
