"""A TrainingClient with ``spec.tinker.enabled``: its trainer pod serves the official tinker SDK for the client's
tenant, with a key from the client's Secret, and Tinker models train under the client's own DP config, on its
PrivacyBudget."""

from __future__ import annotations

import base64
import json

import pytest

from tg_tinker.resources import GROUP, PRIVACY_BUDGETS, VERSION, key_secret_name, privacy_budget_name, tinker_key_key

from conftest import TINY, dp_config, tiny_config
from accounting_helpers import pld_epsilon
from kube_helpers import wait_for

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402


def apply_training_client(cluster, namespace: str, name: str, training: dict, tenant: str) -> dict:
    """As GitOps would: the custom resource as YAML (JSON is YAML), through kubectl."""
    manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingClient",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"tenantId": tenant, "training": training, "tinker": {"enabled": True}}}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    return wait_for("the trainer to be ready", lambda: (
        tc := cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainingclients", name))
        .get("status", {}).get("phase") == "READY" and tc, timeout=180)


def test_a_training_clients_pod_serves_tinker_under_its_dp(cluster, namespace, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    dp = dp_config(dataset_id="tinker-data", target_epsilon=40.0)
    training = json.loads(tiny_config(dp_config=dp).model_dump_json())
    tc = apply_training_client(cluster, namespace, "tk", training, tenant="acme")

    secret = cluster.core.read_namespaced_secret(key_secret_name(tc), namespace)
    api_key = base64.b64decode(secret.data[tinker_key_key(tc)]).decode()
    assert api_key.startswith("tml-")
    pod = cluster.core.read_namespaced_pod("tk-trainer", namespace)
    assert api_key not in json.dumps(pod.to_dict(), default=str)  # the key is a file from the Secret, in no spec
    base_url = f"http://{pod.status.pod_ip}:8000"  # the test cluster's flat network: a port-forward elsewhere

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    model = service.create_lora_training_client(base_model=TINY, rank=4).result()
    rows = [[(7 * i + j) % 500 for j in range(12)] for i in range(4)]
    data = [types.Datum(model_input=types.ModelInput.from_ints(r[:-1]),
                        loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * 11}) for r in rows]
    model.forward_backward(data, "cross_entropy").result()
    step = model.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    # The client's DP: its noise and its ledger; the Tinker client's own batches charged at q = 1 (the client's
    # dataset_size 1000 is only a claim), each figure at or above Google's PLD for what was spent.
    assert step.metrics["dp/noise_multiplier"] == 1.0
    assert step.metrics["dp/sample_rate"] == 1.0
    assert 40 > step.metrics["dp/epsilon"] >= pld_epsilon(((1.0, 1.0, 1),))
    budget = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PRIVACY_BUDGETS,
                                                         privacy_budget_name("acme", "tinker-data"))
    status = budget["status"]
    assert status["steps"] >= 1  # spent on the client's PrivacyBudget, where every pod reads it
    spent = tuple((h["noiseMultiplier"], h["sampleRate"], h["steps"]) for h in status["history"])
    assert status["epsilon"] >= pld_epsilon(spent)  # what `kubectl get pb` shows
    with pytest.raises(tinker.UnprocessableEntityError, match="forward_backward_custom is refused under DP"):
        model.forward_backward_custom(data, lambda d, lp: (sum(-x.sum() for x in lp), {})).result()
    with pytest.raises(tinker.PermissionDeniedError, match="model roots"):  # no other folder of the pod's disks
        service.create_lora_training_client(base_model="/etc", rank=4).result()
    service.close("success").result()

    with pytest.raises(tinker.AuthenticationError):  # another key opens nothing here
        tinker.ServiceClient(base_url=base_url, api_key="tml-" + "x" * 43).create_lora_training_client(
            base_model=TINY, rank=4).result()
