"""What a user does with kubectl: apply the examples, read the printer columns, get refused with a reason."""

from __future__ import annotations

import json
import subprocess

from kube_helpers import ROOT, wait_for


def test_apply_examples_then_get_shows_the_printer_columns(cluster, namespace):
    applied = cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples"))
    assert "trainingclient.tensafe.io/support-bot created" in applied.stdout
    assert "trainingoperation.tensafe.io/support-bot-checkpoint-1 created" in applied.stdout

    table = wait_for("the operator's first status", lambda: (
        t := cluster.kubectl("get", "tc", "-n", namespace).stdout.splitlines()) and "INITIALIZING" in t[1] and t)
    assert table[0].split() == ["NAME", "PHASE", "MODEL", "STEP", "EPSILON", "AGE"]
    assert table[1].split()[:3] == ["support-bot", "INITIALIZING", "smollm2-135m"]
    assert cluster.kubectl("get", "tops", "-n", namespace).stdout.split()[:6] == [
        "NAME", "CLIENT", "TYPE", "PHASE", "ARTIFACT", "AGE"]

    # The example asks for a GPU; this node has none, and the status says so (as a real scheduler would).
    def unschedulable():
        tc = json.loads(cluster.kubectl("get", "tc", "support-bot", "-n", namespace, "-o", "json").stdout)
        ready = {c["type"]: c for c in tc.get("status", {}).get("conditions", [])}.get("Ready", {})
        return ready.get("reason") == "Unschedulable" and ready
    assert "Insufficient nvidia.com/gpu" in wait_for("the scheduling reason", unschedulable)["message"]

    again = cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples"))
    assert "support-bot unchanged" in again.stdout
    cluster.kubectl("delete", "-n", namespace, "-f", str(ROOT / "examples" / "trainingclient.yaml"))
    wait_for("the pod to go", lambda: not cluster.core.list_namespaced_pod(namespace).items)


def test_kustomization_renders_for_gitops():
    from kube_helpers import KUBECTL

    rendered = subprocess.run([KUBECTL, "kustomize", str(ROOT / "examples")], capture_output=True, text=True,
                              check=True).stdout
    assert rendered.count("namespace: ml-training") == 2 and "kind: TrainingOperation" in rendered


def test_invalid_and_unknown_fields_are_refused_with_the_reason(cluster, namespace):
    manifest = """
apiVersion: tensafe.io/v1alpha1
kind: TrainingClient
metadata: {name: wrong}
spec:
  training: {model_ref: smollm2-135m, lora_config: {rank: 0}}
"""
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest, check=False)
    assert refused.returncode != 0 and "spec.training.lora_config.rank" in refused.stderr
    typo = manifest.replace("rank: 0", "rank: 8, rnak: 8")
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=typo, check=False)
    assert refused.returncode != 0 and "unknown field" in refused.stderr and "rnak" in refused.stderr


def test_dev_cluster_command_serves_a_cluster_kubectl_can_use(tmp_path):
    import os
    import signal
    import sys
    import time

    from kube_helpers import KUBECTL

    kubeconfig = tmp_path / "kubeconfig"
    process = subprocess.Popen([sys.executable, "-m", "tensafe_trainer", "dev-cluster", "--kubeconfig",
                                str(kubeconfig), "--no-operator", "--root", str(tmp_path / "state")],
                               stdout=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        assert "TenSafe dev cluster at https://127.0.0.1:" in banner, banner
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        crds = subprocess.run([KUBECTL, "get", "crds", "-o", "name"], env=env, capture_output=True, text=True)
        assert crds.stdout.split() == ["customresourcedefinition.apiextensions.k8s.io/privacybudgets.tensafe.io",
                                       "customresourcedefinition.apiextensions.k8s.io/trainingclients.tensafe.io",
                                       "customresourcedefinition.apiextensions.k8s.io/trainingoperations.tensafe.io"]
    finally:
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.returncode == 0


def test_kubectl_creates_namespaces_and_secrets(cluster):
    """kubectl writes built-in objects as protobuf; the test cluster reads these kinds."""
    import base64
    import uuid

    name = f"k-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("create", "secret", "generic", "tenant", "-n", name, "--from-literal=token=s3cret")
    secret = cluster.core.read_namespaced_secret("tenant", name)
    assert base64.b64decode(secret.data["token"]) == b"s3cret" and secret.type == "Opaque"
    cluster.core.delete_namespace(name)
