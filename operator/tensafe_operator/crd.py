"""The ``TrainingClient``, ``TrainingOperation`` and ``PrivacyBudget`` custom resource definitions
(tensafe.io/v1alpha1).

``spec.training`` is the SDK's ``TrainingConfig`` (same field names), its schema generated from that
model. ``crds/*.yaml`` is this module's output, written by ``python -m tensafe_operator.crd crds/``
and kept equal to it by a test: the YAML is what users ``kubectl apply``; this is where it comes from.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from tg_tinker.config import TrainingConfig
from tg_tinker.resources import GROUP, OPERATION_TYPES, VERSION
from tg_tinker.types import ClientStatus

from .schema import model_schema

# Fields that define the model: changing them would make every checkpoint of the client unloadable.
IMMUTABLE_TRAINING_FIELDS = ("model_ref", "lora_config", "dtype")


def _immutable(message: str) -> list[dict[str, str]]:
    return [{"rule": "self == oldSelf", "message": message}]


def _training_schema() -> dict[str, Any]:
    schema = model_schema(TrainingConfig)
    for field in IMMUTABLE_TRAINING_FIELDS:
        schema["properties"][field]["x-kubernetes-validations"] = _immutable(f"{field} is immutable")
    # A rule on a property only runs when both old and new values exist: removing lora_config (switching
    # to full fine-tuning) needs a rule one level up.
    schema["x-kubernetes-validations"] = [{"rule": "has(self.lora_config) == has(oldSelf.lora_config)",
                                           "message": "lora_config cannot be added or removed"}]
    return schema


def _condition_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string"}, "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"}, "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer"}}}


def training_client_crd() -> dict[str, Any]:
    spec = {"type": "object", "required": ["training"], "properties": {
        "training": _training_schema(),
        "tenantId": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$", "default": "default",
                     "x-kubernetes-validations": _immutable("tenantId is immutable")},
        "image": {"type": "string", "description": "trainer image; the operator's default when empty. Only images "
                  "on the operator's allow-list (Helm value trainer.allowedImages) run; another is refused"},
        "resources": {"type": "object", "properties": {
            "gpus": {"type": "integer", "minimum": 0, "description": "absent: the installation's default"},
            "cpu": {"type": "string"}, "memory": {"type": "string"}}},
        "artifactStore": {"type": "object", "description": "PersistentVolumeClaim for artifacts and audit log "
                          "(default <name>-artifacts); a named one must carry the label tensafe.io/tenant=<tenantId> "
                          "(the operator creates it so when missing), else the client is refused",
                          "properties": {"claimName": {"type": "string"},
                                         "size": {"type": "string", "default": "10Gi"}}},
        "keySecretRef": {"type": "object", "description": "Secret with the tenant key set and the bearer token "
                         "(default <name>-keys; the operator creates it or fills in what is missing). A named one "
                         "must carry the label tensafe.io/tenant=<tenantId>, else the client is refused",
                         "required": ["name"], "properties": {"name": {"type": "string"}}},
        "suspend": {"type": "boolean", "default": False},
        "tinker": {"type": "object", "description": "serve the official tinker SDK's API (/api/v1) for this client's "
                   "tenant: the operator puts a tml- key in the key Secret (tinker.<uid>); models created through it "
                   "train under this client's DP config, on its ledger", "properties": {
                       "enabled": {"type": "boolean", "default": False}}},
        "tls": {"type": "object", "description": "serve the trainer over HTTPS with this kubernetes.io/tls Secret "
                "(tls.crt, tls.key, ca.crt; e.g. from cert-manager for <name>-trainer.<namespace>.svc), labelled "
                "tensafe.io/tenant=<tenantId> (cert-manager: secretTemplate.labels), else the client is refused",
                "required": ["secretName"], "properties": {"secretName": {"type": "string"}}},
    }}
    status = {"type": "object", "properties": {
        "phase": {"type": "string", "enum": [s.value for s in ClientStatus]},
        "reason": {"type": "string", "description": "why the phase is what it is (e.g. Unschedulable, CrashLoop)"},
        "message": {"type": "string", "description": "the reason, for a person"},
        "conditions": {"type": "array", "items": _condition_schema(),
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        "observedGeneration": {"type": "integer"},
        "podName": {"type": "string"}, "endpoint": {"type": "string"},
        "step": {"type": "integer"},
        "privacy": {"type": "object", "properties": {
            "totalEpsilon": {"type": "number", "nullable": True},
            "unbounded": {"type": "boolean", "description": "the epsilon is infinite (no privacy guarantee): JSON "
                          "numbers cannot say so, and totalEpsilon is then absent"}}},
        "lastCheckpoint": {"type": "string"},
        "auditHead": {"type": "object", "description": "the tenant's audit chain head after this client's last "
                      "entry: `tensafe audit verify --expect-head <sequence>:<recordHash>` catches a truncated log",
                      "properties": {"sequence": {"type": "integer"}, "recordHash": {"type": "string"}}},
        "restarts": {"type": "integer", "description": "trainer pods replaced after they died"},
        "failureStreak": {"type": "integer", "description": "trainer pods in a row that died soon after starting"},
        "refusal": {"type": "object", "nullable": True, "description": "the operator refused this spec generation "
                    "(ForeignSecret, ForeignVolume, ImageNotAllowed): no trainer pod runs", "properties": {
                        "reason": {"type": "string"}, "message": {"type": "string"},
                        "generation": {"type": "integer"}}},
    }}
    columns = [("Phase", "string", ".status.phase"), ("Reason", "string", ".status.reason"),
               ("Model", "string", ".spec.training.model_ref"), ("Step", "integer", ".status.step"),
               ("Epsilon", "number", ".status.privacy.totalEpsilon"),
               ("Age", "date", ".metadata.creationTimestamp")]
    return _crd("TrainingClient", "trainingclients", ["tc"], spec, status, columns)


def training_operation_crd() -> dict[str, Any]:
    spec = {"type": "object", "required": ["trainingClientRef", "type"],
            "x-kubernetes-validations": _immutable("a TrainingOperation's spec is immutable"), "properties": {
                "trainingClientRef": {"type": "object", "required": ["name"],
                                      "properties": {"name": {"type": "string"}}},
                "type": {"type": "string", "enum": list(OPERATION_TYPES)},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0, "default": 86400,
                                            "description": "the operator deletes the finished operation then"},
                "parameters": {"type": "object", "properties": {
                    "includeOptimizer": {"type": "boolean", "default": True},
                    "artifactId": {"type": "string", "pattern": r"^art-[0-9a-f]{32}$"},
                    "name": {"type": "string", "maxLength": 128},
                    "kind": {"type": "string", "enum": ["checkpoint", "sampler"], "default": "checkpoint"},
                    "sealed": {"type": "string", "maxLength": 1 << 20, "description":
                               "name and metadata sealed for the trainer under the tenant's key (the SDK's "
                               "tg_tinker.sealing): never in clear in etcd"}}},
            }}
    status = {"type": "object", "properties": {
        "phase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed"]},
        "result": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "message": {"type": "string"},
        "operationId": {"type": "string"},
        "startTime": {"type": "string", "format": "date-time"},
        "completionTime": {"type": "string", "format": "date-time"},
    }}
    columns = [("Client", "string", ".spec.trainingClientRef.name"), ("Type", "string", ".spec.type"),
               ("Phase", "string", ".status.phase"), ("Artifact", "string", ".status.result.artifact_id"),
               ("Age", "date", ".metadata.creationTimestamp")]
    return _crd("TrainingOperation", "trainingoperations", ["tops"], spec, status, columns)


def privacy_budget_crd() -> dict[str, Any]:
    """The privacy ledger of one (tenant, dataset) in a namespace, shared by every trainer pod on that data.

    Trainers add to ``status.history`` (reserving steps in chunks, with optimistic concurrency); the rules
    refuse any write that lowers it. It has no owner: deleting a TrainingClient keeps it."""
    spec = {"type": "object", "required": ["tenantId"],
            "x-kubernetes-validations": _immutable("a PrivacyBudget's spec is immutable"), "properties": {
                "tenantId": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
                "datasetId": {"type": "string", "description": "absent: the tenant's steps that name no dataset"},
                "epsilonBudget": {"type": "number", "description": "no trainer steps past it (with its delta)"},
                "delta": {"type": "number"}}}
    entry = {"type": "object", "required": ["noiseMultiplier", "sampleRate", "steps"], "properties": {
        "noiseMultiplier": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
        "sampleRate": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
        "steps": {"type": "integer", "minimum": 1, "x-kubernetes-validations": [
            {"rule": "self >= oldSelf", "message": "spent privacy budget cannot be lowered"}]}}}
    # Nothing may lower the record: an entry's steps only grow (entries are matched by their (sigma, q) key), no
    # entry, history, total or status may go, and the total is the entries' sum.
    status = {"type": "object", "x-kubernetes-validations": [
        {"rule": "!has(oldSelf.history) || has(self.history)", "message": "the privacy history cannot be removed"},
        {"rule": "!has(oldSelf.steps) || (has(self.steps) && self.steps >= oldSelf.steps)",
         "message": "spent privacy budget cannot be lowered"},
        {"rule": "!has(self.history) || (has(self.steps) && self.history.map(e, e.steps).sum() == self.steps)",
         "message": "steps is the sum of the history's steps"}], "properties": {
        "history": {"type": "array", "items": entry, "maxItems": 256, "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["noiseMultiplier", "sampleRate"],
                    "description": "every DP step reserved on this data, by (noise multiplier, sample rate)",
                    "x-kubernetes-validations": [{
                        "rule": "oldSelf.all(o, self.exists(n, n.noiseMultiplier == o.noiseMultiplier && "
                                "n.sampleRate == o.sampleRate))",
                        "message": "an entry of the privacy history cannot be removed"}]},
        "steps": {"type": "integer", "description": "steps reserved in all (spent or about to be)"},
        "epsilon": {"type": "number", "description": "epsilon of the history at delta, by the last writer"},
        "delta": {"type": "number"}, "accountant": {"type": "string"},
        "lastWriter": {"type": "string", "description": "the training client that last reserved steps"},
        "groupSize": {"type": "integer", "minimum": 1, "description": "the data's privacy unit: rows per group "
                      "clipped as one, set by the first step; steps of another unit are refused",
                      "x-kubernetes-validations": [{"rule": "self == oldSelf",
                                                    "message": "the privacy unit of a ledger cannot change"}]},
    }}
    columns = [("Tenant", "string", ".spec.tenantId"), ("Dataset", "string", ".spec.datasetId"),
               ("Epsilon", "number", ".status.epsilon"), ("Budget", "number", ".spec.epsilonBudget"),
               ("Steps", "integer", ".status.steps"), ("Age", "date", ".metadata.creationTimestamp")]
    crd = _crd("PrivacyBudget", "privacybudgets", ["pb"], spec, status, columns)
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"] = [
        {"rule": "!has(oldSelf.status) || has(self.status)", "message": "a PrivacyBudget's status cannot be removed"}]
    return crd


def _crd(kind: str, plural: str, short: list[str], spec: dict, status: dict, columns) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP, "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": short, "categories": ["tensafe"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": n, "type": t, "jsonPath": p} for n, t, p in columns],
                "schema": {"openAPIV3Schema": {"type": "object", "required": ["spec"], "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                    "metadata": {"type": "object"}, "spec": spec, "status": status}}},
            }],
        },
    }


def render(crd: dict[str, Any]) -> str:
    return "# Generated by `python -m tensafe_operator.crd crds/` from the SDK's models: do not edit.\n" + \
        yaml.safe_dump(crd, sort_keys=False, width=120)


def all_crds() -> dict[str, dict[str, Any]]:
    return {f"{c['metadata']['name']}.yaml": c
            for c in (training_client_crd(), training_operation_crd(), privacy_budget_crd())}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "crds")
    target.mkdir(parents=True, exist_ok=True)
    for filename, crd in all_crds().items():
        (target / filename).write_text(render(crd))
        print(f"wrote {target / filename}")
