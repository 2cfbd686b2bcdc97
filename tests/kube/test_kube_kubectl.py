"""What a user does with kubectl: apply the examples, read the printer columns, get refused with a reason."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest
import yaml

from kube_helpers import ROOT, wait_for

MODEL_OF_THE_DEV_EXAMPLE = yaml.safe_load((ROOT / "examples" / "dev" / "trainingclient.yaml").read_text())[
    "spec"]["training"]["model_ref"]


def test_apply_examples_then_get_shows_the_printer_columns(cluster, namespace):
    applied = cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples"))
    assert "trainingclient.tensafe.io/support-bot created" in applied.stdout
    assert "trainingoperation.tensafe.io/support-bot-checkpoint-1 created" in applied.stdout

    table = wait_for("the operator's first status", lambda: (
        t := cluster.kubectl("get", "tc", "-n", namespace).stdout.splitlines()) and "INITIALIZING" in t[1] and t)
    assert table[0].split() == ["NAME", "PHASE", "REASON", "MODEL", "STEP", "EPSILON", "AGE"]
    assert table[1].split()[0:2] == ["support-bot", "INITIALIZING"] and "smollm2-135m" in table[1]
    assert cluster.kubectl("get", "tops", "-n", namespace).stdout.split()[:6] == [
        "NAME", "CLIENT", "TYPE", "PHASE", "ARTIFACT", "AGE"]

    # The example asks for a GPU; this node has none, and the status says so (as a real scheduler would).
    def unschedulable():
        tc = json.loads(cluster.kubectl("get", "tc", "support-bot", "-n", namespace, "-o", "json").stdout)
        ready = {c["type"]: c for c in tc.get("status", {}).get("conditions", [])}.get("Ready", {})
        return ready.get("reason") == "Unschedulable" and ready
    assert "Insufficient nvidia.com/gpu" in wait_for("the scheduling reason", unschedulable)["message"]
    # ... where people look: `kubectl get tc` shows the reason beside the phase, and a Warning Event says why.
    assert cluster.kubectl("get", "tc", "-n", namespace).stdout.splitlines()[1].split()[:3] == [
        "support-bot", "INITIALIZING", "Unschedulable"]
    events = wait_for("the Warning event", lambda: [
        e for e in cluster.core.list_namespaced_event(namespace).items
        if e.involved_object.name == "support-bot" and e.reason == "Unschedulable"])
    assert events[0].type == "Warning" and "Insufficient nvidia.com/gpu" in events[0].message
    assert events[0].involved_object.kind == "TrainingClient"
    described = cluster.kubectl("describe", "tc", "support-bot", "-n", namespace).stdout
    assert "Events:" in described and "Unschedulable" in described.split("Events:")[1]

    again = cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples"))
    assert "support-bot unchanged" in again.stdout
    cluster.kubectl("delete", "-n", namespace, "-f", str(ROOT / "examples" / "trainingclient.yaml"))
    wait_for("the pod to go", lambda: not cluster.core.list_namespaced_pod(namespace).items)


def readme_block(after: str) -> list[str]:
    """The shell lines of the README's first code block after the line containing ``after``."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(after):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_readmes_dev_cluster_flow_reaches_ready_as_written(cluster):
    """Exactly the README's kubectl lines, in the default namespace as a newcomer runs them, on the test
    cluster (the README's first line starts it; here the session's cluster is already up)."""
    lines = readme_block("### The test cluster")
    assert lines[0].startswith(".venv/bin/tensafe dev-cluster") and lines[1].startswith("export KUBECONFIG=")
    commands = lines[2:]
    assert any("examples/dev/trainingclient.yaml" in c for c in commands)
    try:
        for command in commands:
            words = shlex.split(command)
            while words:
                argv = words[:words.index("&&")] if "&&" in words else words
                words = words[len(argv) + 1:]
                assert argv[0] == "kubectl", command
                result = cluster.kubectl(*argv[1:], check=False)
                assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
        tc = json.loads(cluster.kubectl("get", "tc", "hello-tensafe", "-o", "json").stdout)
        assert tc["status"]["phase"] == "READY" and tc["status"]["reason"] == "TrainerReady"
    finally:
        cluster.kubectl("delete", "-f", str(ROOT / "examples" / "dev" / "trainingclient.yaml"), check=False)
        wait_for("the dev example's pod to go", lambda: not [p for p in cluster.core.list_namespaced_pod(
            "default").items if p.metadata.name == "hello-tensafe-trainer"], timeout=60)


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


def test_make_demo_kube_walks_the_kubernetes_path_end_to_end():
    """`make demo-kube` (its own dev cluster): apply the dev example, READY, train, save, show, stop."""
    import sys

    if os.environ.get("TENSAFE_TEST_KUBECONFIG"):
        pytest.skip("the demo starts a dev cluster of its own")
    demo = subprocess.run([sys.executable, "-m", "tensafe_devcluster.demo", "--steps", "3"], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = demo.stdout
    assert "trainingclient.tensafe.io/hello-tensafe condition met" in out
    assert "step 3: loss" in out and "receipt verified" in out
    tc_row = [line for line in out.splitlines() if line.startswith("trainingclient.tensafe.io/hello-tensafe ")][-1]
    assert tc_row.split()[1:4] == ["READY", "TrainerReady", MODEL_OF_THE_DEV_EXAMPLE] and tc_row.split()[4] == "3"
    top_row = [line for line in out.splitlines() if line.startswith("trainingoperation.tensafe.io/hello-tensafe")][-1]
    assert top_row.split()[2:4] == ["save_state", "Succeeded"]
    assert "dev cluster stopped" in out
