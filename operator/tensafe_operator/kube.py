"""The few Kubernetes API calls the operator makes, over the official ``kubernetes`` client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tg_tinker.resources import GROUP, PRIVACY_BUDGETS, TRAINING_CLIENTS, TRAINING_OPERATIONS, VERSION


def load_config() -> None:
    """In-cluster service account when running in a pod, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


@dataclass
class Kube:
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    rbac: client.RbacAuthorizationV1Api

    @classmethod
    def connect(cls) -> "Kube":
        load_config()
        api = client.ApiClient()
        return cls(client.CoreV1Api(api), client.CustomObjectsApi(api), client.RbacAuthorizationV1Api(api))

    # ----- custom resources ---------------------------------------------------------------------------
    def training_client(self, namespace: str, name: str) -> Optional[dict]:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                         TRAINING_CLIENTS, name))

    def training_clients(self, namespace: Optional[str]) -> list[dict]:
        if namespace:
            return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, TRAINING_CLIENTS)["items"]
        return self.custom.list_cluster_custom_object(GROUP, VERSION, TRAINING_CLIENTS)["items"]

    def patch_status(self, plural: str, namespace: str, name: str, status: dict) -> None:
        _or_none(lambda: self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status}))

    def delete_operation(self, namespace: str, name: str) -> None:
        _or_none(lambda: self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                     TRAINING_OPERATIONS, name))

    # ----- children -----------------------------------------------------------------------------------
    def pod(self, namespace: str, name: str) -> Optional[dict]:
        return _or_none(lambda: self._plain(self.core.read_namespaced_pod(name, namespace)))

    def create(self, obj: dict) -> bool:
        """Create unless it exists; True if this call created it."""
        namespace, kind = obj["metadata"]["namespace"], obj["kind"]
        create = {"Pod": self.core.create_namespaced_pod, "Service": self.core.create_namespaced_service,
                  "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
                  "Secret": self.core.create_namespaced_secret,
                  "ServiceAccount": self.core.create_namespaced_service_account,
                  "Event": self.core.create_namespaced_event,
                  "Role": self.rbac.create_namespaced_role, "RoleBinding": self.rbac.create_namespaced_role_binding,
                  "PrivacyBudget": lambda ns, body: self.custom.create_namespaced_custom_object(
                      GROUP, VERSION, ns, PRIVACY_BUDGETS, body)}[kind]
        try:
            create(namespace, obj)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def delete_pod(self, namespace: str, name: str) -> None:
        _or_none(lambda: self.core.delete_namespaced_pod(name, namespace))

    def secret(self, namespace: str, name: str) -> Optional[dict]:
        """A Secret's metadata (labels, owners), never its data; None if it does not exist."""
        secret = _or_none(lambda: self.core.read_namespaced_secret(name, namespace))
        return None if secret is None else {"metadata": self._plain(secret.metadata)}

    def claim(self, namespace: str, name: str) -> Optional[dict]:
        return _or_none(lambda: self._plain(self.core.read_namespaced_persistent_volume_claim(name, namespace)))

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes]:
        """A Secret's data, decoded; empty if it does not exist."""
        import base64

        secret = _or_none(lambda: self.core.read_namespaced_secret(name, namespace))
        return {k: base64.b64decode(v) for k, v in ((secret.data or {}) if secret is not None else {}).items()}

    def _plain(self, obj: Any) -> dict:
        return self.core.api_client.sanitize_for_serialization(obj)


def _or_none(call):
    try:
        return call()
    except ApiException as error:
        if error.status == 404:
            return None
        raise
