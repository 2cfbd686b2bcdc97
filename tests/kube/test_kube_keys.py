"""Tenant keys in a Kubernetes Secret: the provider against the test cluster's API, and the trainer pod's
view of the same key through the mounted Secret file."""

from __future__ import annotations

import base64
import json
import os

import pytest

from tg_tinker import ArtifactIntegrityError, ArtifactNotFoundError

PAYLOAD = os.urandom(2 * 1024 * 1024 + 5)


@pytest.fixture
def provider(cluster, namespace, tmp_path):
    """The tenant's Secret through the API, and the trainer's data-key volume (here a folder)."""
    from tensafe_keys.kubernetes import KubernetesSecretKeyProvider

    return KubernetesSecretKeyProvider(cluster.core, namespace, "acme-keys", tmp_path / "data-keys")


def secret_data(cluster, namespace):
    return cluster.core.read_namespaced_secret("acme-keys", namespace).data or {}


def test_keys_in_a_secret_rotate_rewrap_or_reencrypt_and_shred(cluster, namespace, provider, tmp_path):
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_keys.store import LocalKeyProvider

    store = ArtifactStore(tmp_path / "artifacts", provider)
    info = store.put(PAYLOAD, tenant_id="acme", training_client_id="tc-1", kind="checkpoint", step=1)
    assert list(secret_data(cluster, namespace)) == ["acme.json"]  # created on first use

    # The pod's view: the Secret's one key mounted as a file, read by the plain local provider.
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    (mounted / "acme.json").write_bytes(base64.b64decode(secret_data(cluster, namespace)["acme.json"]))
    pod_keys = LocalKeyProvider(mounted, tmp_path / "data-keys")
    assert ArtifactStore(tmp_path / "artifacts", pod_keys).get("acme", info.artifact_id) == PAYLOAD

    new_kid, retired = store.rotate("acme")
    assert new_kid != info.key_id and store.info("acme", info.artifact_id).key_id == new_kid and retired == []
    assert store.get("acme", info.artifact_id) == PAYLOAD

    # Re-encrypting rotation: the Secret keeps only the new KEK, and a copy taken before is dead.
    path = tmp_path / "artifacts" / "acme" / f"{info.artifact_id}.tsa"
    before = path.read_bytes()
    last_kid, retired = store.rotate("acme", reencrypt=True)
    assert sorted(retired) == sorted([info.key_id, new_kid])
    assert list(json.loads(base64.b64decode(secret_data(cluster, namespace)["acme.json"]))["keys"]) == [last_kid]
    assert store.get("acme", info.artifact_id) == PAYLOAD
    path.write_bytes(before)
    with pytest.raises(ArtifactIntegrityError, match="re-encrypted"):
        store.get("acme", info.artifact_id)

    store.keys.shred("acme")
    assert "acme.json" not in secret_data(cluster, namespace) and not (tmp_path / "data-keys" / "acme").exists()
    with pytest.raises(ArtifactNotFoundError, match="data key"):
        store.get("acme", info.artifact_id)


def test_other_values_in_the_secret_survive_key_changes(cluster, namespace, provider):
    provider.put_value("token", b"s3cret")
    provider.active_key("acme")
    provider.rotate("acme")
    assert provider.get_value("token") == b"s3cret"
    assert sorted(secret_data(cluster, namespace)) == ["acme.json", "token"]


def test_concurrent_rotations_cannot_drop_a_key(cluster, namespace, provider):
    from tensafe_keys.kubernetes import KubernetesSecretKeyProvider

    from tg_tinker import TGTinkerError

    provider.active_key("acme")
    other = KubernetesSecretKeyProvider(cluster.core, namespace, "acme-keys")

    def rotate_elsewhere():
        """Another process's rotation: a key added to the key set in the Secret."""
        keyset = json.loads(other.get_value("acme.json"))
        keyset["keys"]["acme/kek-elsewhere"] = base64.b64encode(os.urandom(32)).decode()
        other.put_value("acme.json", json.dumps(keyset).encode())

    class RacedAPI:
        """The API as the rotating provider sees it: the other rotation lands right after its first read."""

        raced = False

        def __getattr__(self, name):
            return getattr(cluster.core, name)

        def read_namespaced_secret(self, *args, **kwargs):
            secret = cluster.core.read_namespaced_secret(*args, **kwargs)
            if not self.raced:
                self.raced = True
                rotate_elsewhere()
            return secret

    racing = KubernetesSecretKeyProvider(RacedAPI(), namespace, "acme-keys")
    with pytest.raises(TGTinkerError, match="changed while its keys were being updated"):
        racing.rotate("acme")
    keys = json.loads(other.get_value("acme.json"))["keys"]
    assert len(keys) == 2 and "acme/kek-elsewhere" in keys  # the other rotation's key survived
