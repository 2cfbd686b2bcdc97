"""Insiders (issue #14), scripted against a real trainer: another client's token, an administrator with write
access to the volume, a backup that outlives a deletion, and a third party checking a receipt."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys

import httpx
import pytest
import torch

from conftest import random_batch, tiny_config
from tg_tinker import (
    ArtifactIntegrityError,
    AuditIntegrityError,
    AuthenticationError,
    OperationLostError,
    PermissionDeniedError,
    ReceiptVerificationError,
    ServiceClient,
    verify_receipt,
)
from tg_tinker.transport import Transport

SECRET_NAME = "hiv-cohort-2024-patients"
SECRET_NOTE = "ward-7-discharges"


def tensafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensafe_trainer", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("insiders-home")


@pytest.fixture(scope="module")
def svc(home):
    with ServiceClient(home=home) as service:
        yield service


@pytest.fixture(scope="module")
def alice(svc):
    client = svc.create_training_client(tiny_config(), client_id="alice")
    client.forward_backward(random_batch())
    client.optim_step().result()
    yield client
    client.close()


@pytest.fixture(scope="module")
def bob(svc):
    client = svc.create_training_client(tiny_config(), client_id="bob")
    yield client
    client.close()


def as_client(svc, client) -> Transport:
    return Transport(svc.base_url, client.info.access_token)


def test_a_clients_token_reaches_its_own_artifacts_only_on_every_path(svc, alice, bob):
    bobs = bob.save_state()
    bobs_sampler = bob.save_weights_for_sampler("b")
    alices = alice.save_state()
    load_bobs = {"request": {"type": "load_state", "artifact_id": bobs.artifact_id}}
    with as_client(svc, alice) as token:
        refusals = {
            "load_state": lambda: token.request("POST", "/v1/clients/alice/operations", json=load_bobs),
            "sampling client": lambda: token.request("POST", "/v1/sampling_clients",
                                                     json={"artifact_id": bobs_sampler}),
            "pull_artifact": lambda: token.request("GET", f"/v1/artifacts/{bobs.artifact_id}/content", raw=True),
            "artifact info": lambda: token.request("GET", f"/v1/artifacts/{bobs.artifact_id}"),
        }
        for path, call in refusals.items():
            with pytest.raises(PermissionDeniedError, match="belongs to another training client.*trainer's own token"):
                call()
        with pytest.raises(PermissionDeniedError, match="belongs to another training client"):  # nothing queued
            token.request("POST", "/v1/clients/alice/operations/batch", json={"submissions": [load_bobs]})
        with pytest.raises(PermissionDeniedError, match="tenant 'default'"):
            token.request("GET", "/v1/artifacts", params={"tenant_id": "globex"})
        with pytest.raises(PermissionDeniedError, match="tenant 'default'"):
            token.request("GET", "/v1/audit", params={"tenant_id": "globex"})
        with pytest.raises(AuthenticationError, match="trainer's own token"):  # resume_from: creating needs it
            token.request("POST", "/v1/training_clients", json={
                "config": tiny_config().model_dump(mode="json"), "resume_from": bobs.artifact_id})
        assert [a["artifact_id"] for a in token.request("GET", "/v1/artifacts")] == [alices.artifact_id]
        # Its own artifacts: a sampler from its own checkpoint, and a load.
        own = token.request("POST", "/v1/sampling_clients", json={"artifact_id": alices.artifact_id})
        assert own["client_id"].startswith("sc-") and own["access_token"]
    # Another client's operation id is as unknown to alice's token as a wrong one: it confirms nothing, and
    # names no client (the attacker review of #27's one future store).
    bobs_op = svc.transport.request("POST", "/v1/clients/bob/operations", json={"request": {"type": "export_adapter"}})
    with as_client(svc, alice) as token:
        for poll in (lambda: token.request("GET", f"/v1/operations/{bobs_op['operation_id']}"),
                     lambda: token.request("POST", "/v1/operations/wait",
                                           json={"operation_ids": [bobs_op["operation_id"]]}),
                     lambda: token.request("POST", f"/v1/operations/{bobs_op['operation_id']}/cancel")):
            with pytest.raises(OperationLostError) as refused:
                poll()
            assert "bob" not in str(refused.value)
    with pytest.raises(PermissionDeniedError, match="belongs to another training client"):
        alice.load_state(bobs.artifact_id)  # through the SDK: alice's client uses alice's token
    assert alice.load_state(alices.artifact_id).status == "loaded"
    # An explicit grant, given with the trainer's own token and audited, lets alice's token load it.
    svc.grant_artifact(bobs.artifact_id, "alice")
    assert alice.load_state(bobs.artifact_id).status == "loaded"
    grant = svc.get_audit_logs(training_client_id="alice", operation="grant_artifact", limit=1)[0]
    assert grant.artifact_ids_consumed == [bobs.artifact_id]
    with as_client(svc, alice) as token, pytest.raises(AuthenticationError, match="trainer's own token"):
        token.request("POST", f"/v1/artifacts/{bobs_sampler}/grants", json={"training_client_id": "alice"})
    # The trainer's own token may load any, and the audit log records what was consumed.
    record = svc.transport.request("POST", "/v1/clients/alice/operations", json=load_bobs)
    svc.transport.request("GET", f"/v1/operations/{record['operation_id']}", params={"wait": 30})
    loads = svc.get_audit_logs(training_client_id="alice", operation="load_state", limit=1)
    assert loads[0].artifact_ids_consumed == [bobs.artifact_id] and loads[0].success


def test_a_token_dies_with_its_client_instance_even_when_the_id_is_reused_by_another_tenant(svc):
    """acme's "shared" is terminated and globex creates "shared": acme's old token must not drive it."""
    body = {"config": tiny_config().model_dump(mode="json"), "client_id": "shared", "tenant_id": "acme"}
    old = svc.transport.request("POST", "/v1/training_clients", json=body)
    svc.transport.request("DELETE", "/v1/clients/shared")
    new = svc.transport.request("POST", "/v1/training_clients", json={**body, "tenant_id": "globex"})
    try:
        fb = {"request": {"type": "forward_backward", "batch": random_batch()}}
        export = {"request": {"type": "export_adapter"}}
        with Transport(svc.base_url, old["access_token"]) as stale:
            for method, path, payload in (("GET", "/v1/clients/shared", None),
                                          ("POST", "/v1/clients/shared/operations", fb),
                                          ("POST", "/v1/clients/shared/operations", export),
                                          ("DELETE", "/v1/clients/shared", None)):
                with pytest.raises(AuthenticationError, match="since replaced|'shared' was terminated"):
                    stale.request(method, path, json=payload)
        with Transport(svc.base_url, new["access_token"]) as fresh:
            assert fresh.request("GET", "/v1/clients/shared")["tenant_id"] == "globex"
    finally:
        svc.transport.request("DELETE", "/v1/clients/shared")


def test_a_sampler_made_from_an_artifact_is_on_record(svc, alice):
    sampler_weights = alice.save_weights_for_sampler("for-sampling")
    sampler = svc.create_sampling_client(artifact_id=sampler_weights)
    try:
        [entry] = [e for e in svc.get_audit_logs(operation="create_sampling_client", limit=100)
                   if e.training_client_id == sampler.id]
        assert entry.artifact_ids_consumed == [sampler_weights] and entry.success
    finally:
        sampler.close()


def test_receipts_sign_the_privacy_claim_and_break_on_any_change(svc, alice, home, tmp_path):
    saved = alice.save_state(metadata={"note": SECRET_NOTE})
    public_key = svc.receipt_public_key()
    assert public_key.startswith("-----BEGIN PUBLIC KEY-----")
    claims = verify_receipt(saved.receipt, public_key)
    stored = svc.pull_artifact(saved.artifact_id)
    assert claims["content_hash"] == saved.content_hash == hashlib.sha256(stored).hexdigest()
    assert (claims["artifact_id"], claims["tenant"], claims["training_client"], claims["step"], claims["dp"]) == (
        saved.artifact_id, "default", "alice", saved.step, False)
    assert claims["audit_head"] == saved.audit_head.model_dump() and claims["artifact_kind"] == "checkpoint"
    assert claims["base_model"] == alice.config.model_ref
    assert SECRET_NOTE not in json.dumps(saved.receipt)  # claims, never the user's metadata
    assert saved.metadata == {"note": SECRET_NOTE}  # the SDK hands the caller back its own metadata
    signature = saved.receipt["signature"]
    malleable = signature[:-3] + chr(ord(signature[-3]) ^ 1) + signature[-2:]  # the padding bits of "...X=="
    for field, value in (("payload", saved.receipt["payload"].replace('"step":', '"step":1')),
                         ("signature", base64.b64encode(bytes(64)).decode()), ("signature", malleable)):
        with pytest.raises(ReceiptVerificationError, match="does not verify"):
            verify_receipt({**saved.receipt, field: value}, public_key)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from tg_tinker.receipts import public_key_pem

    with pytest.raises(ReceiptVerificationError, match="not by this public key"):
        verify_receipt(saved.receipt, public_key_pem(Ed25519PrivateKey.generate()))

    sampler = alice.save_weights_for_sampler("s1")
    assert verify_receipt(sampler.receipt, public_key)["artifact_kind"] == "sampler"

    folder = alice.export_adapter(tmp_path / "adapter")
    (tmp_path / "key.pem").write_text(public_key)
    exported = verify_receipt(folder / "tensafe-receipt.json", tmp_path / "key.pem")
    assert exported["content_hash"] == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    ok = tensafe("receipt", "verify", str(folder), "--public-key", str(tmp_path / "key.pem"))
    assert ok.returncode == 0 and "matches" in ok.stdout and "content_hash" in ok.stdout, ok.stderr
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())  # decrypted weights: the caller's
    config = folder / "adapter_config.json"
    original = config.read_bytes()
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 80'))  # another adapter
    changed = tensafe("receipt", "verify", str(folder), "--public-key", str(tmp_path / "key.pem"))
    assert changed.returncode == 1 and "adapter_config_hash" in changed.stderr
    config.write_bytes(original)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    swapped = tensafe("receipt", "verify", str(folder), "--public-key", str(tmp_path / "key.pem"))
    assert swapped.returncode == 1 and "the receipt is for" in swapped.stderr


def test_a_pulled_file_decrypts_offline_and_a_flipped_bit_leaves_no_output(svc, alice, home, tmp_path):
    checkpoint = alice.save_state()
    data = svc.pull_artifact(checkpoint.artifact_id)
    with open(tmp_path / "checkpoint.bin", "wb") as f:  # the training guide's code
        f.write(data)
    out = tmp_path / "state.pt"
    done = tensafe("artifact", "decrypt", str(tmp_path / "checkpoint.bin"), "--out", str(out), "--home", str(home))
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)
    assert state["step"] == checkpoint.step and out.stat().st_mode & 0o777 == 0o600
    # With only the key set, as a file or as the tenant's key Secret exported from Kubernetes.
    from tensafe_trainer.storage.paths import artifact_keys_dir, keys_dir

    keyset = (keys_dir(home) / "default.json").read_text()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "acme-keys"},
              "data": {"default.json": base64.b64encode(keyset.encode()).decode(), "token": "eA=="}}
    (tmp_path / "secret.json").write_text(json.dumps(secret))
    (tmp_path / "keyset.json").write_text(keyset)
    for keys in ("keyset.json", "secret.json"):
        again = tmp_path / f"again-{keys}.pt"
        done = tensafe("artifact", "decrypt", str(tmp_path / "checkpoint.bin"), "--out", str(again),
                       "--keys", str(tmp_path / keys), "--artifact-keys", str(artifact_keys_dir(home)),
                       "--home", str(tmp_path / "nowhere"))
        assert done.returncode == 0 and again.read_bytes() == out.read_bytes(), done.stderr
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 1
    (tmp_path / "flipped.bin").write_bytes(bytes(flipped))
    refused = tensafe("artifact", "decrypt", str(tmp_path / "flipped.bin"), "--out", str(tmp_path / "x.pt"),
                      "--home", str(home))
    assert refused.returncode == 1 and "ArtifactIntegrityError" in refused.stderr
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob(".x.pt*"))
    exported = tensafe("artifact", "export", str(tmp_path / "checkpoint.bin"), "--out", str(tmp_path / "peft"),
                       "--home", str(home))
    assert exported.returncode == 0 and (tmp_path / "peft" / "adapter_model.safetensors").exists(), exported.stderr
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "peft").iterdir()} == {0o600}
    # A link planted at the output receives nothing: it is replaced, its target never written.
    from tensafe_trainer.storage.artifacts import write_private

    planted = tmp_path / "planted"
    (tmp_path / "link.pt").symlink_to(planted)
    write_private(tmp_path / "link.pt", b"plaintext")
    assert not planted.exists() and not (tmp_path / "link.pt").is_symlink()
    assert (tmp_path / "link.pt").stat().st_mode & 0o777 == 0o600


def test_the_audit_chain_fails_closed_and_a_truncated_log_is_caught(svc, alice, bob, home):
    saved = alice.save_state()
    log = home / "audit" / "default.jsonl"
    rows = log.read_text().splitlines()
    assert log.stat().st_mode & 0o777 == 0o600
    # The insider drops the tail from the save on: a valid shorter chain, caught with the published head.
    truncated = "\n".join(rows[:saved.audit_head.sequence]) + "\n"
    log.write_text(truncated)
    verdict = tensafe("audit", "verify", "--home", str(home), "--expect-head", saved.audit_head.text)
    assert verdict.returncode == 1 and "truncated" in verdict.stdout
    # ... and the trainer refuses to extend the truncated chain: the operation fails, and so does the client
    # (it ran an operation that is not on record); the server serves on.
    failed = alice.forward_backward(random_batch())
    with pytest.raises(AuditIntegrityError, match="truncated or replaced"):
        failed.result(timeout=60)
    assert httpx.get(f"{svc.base_url}/healthz").json() == {"status": "ok"}
    assert alice.refresh().status.value == "ERROR" and "truncated or replaced" in alice.info.error
    log.write_text("\n".join(rows) + "\n")  # the administrator restores the log
    bob.forward_backward(random_batch()).result(timeout=60)  # the chain verifies again: other clients go on
    intact = tensafe("audit", "verify", "--home", str(home), "--expect-head", saved.audit_head.text)
    assert intact.returncode == 0 and "published head" in intact.stdout, intact.stdout
    head = svc.audit_head()
    assert head.sequence > saved.audit_head.sequence and bob.refresh().info.audit_head.sequence == head.sequence


def test_exports_are_built_in_memory(monkeypatch, tmp_path):
    """No plaintext adapter file on the trainer's disk: the export never touches a temporary folder."""
    import tempfile

    from engine_helpers import make_engine
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_keys.store import LocalKeyProvider
    from tensafe_trainer.engine.operations import Runtime

    runtime = Runtime("tc-1", "default", "training", make_engine(),
                      ArtifactStore(tmp_path / "a", LocalKeyProvider(tmp_path / "k")))

    def no_disk(*args, **kwargs):
        raise AssertionError("export touched a temporary folder")

    for name in ("mkdtemp", "mkstemp", "TemporaryDirectory", "NamedTemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_disk)
    from tg_tinker.types import ExportAdapterRequest

    outcome = runtime.execute(ExportAdapterRequest())
    assert outcome.result.files == ["adapter_config.json", "adapter_model.safetensors"]
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(outcome.result.archive_b64))) as tar:
        names = tar.getnames()
    assert names == outcome.result.files and outcome.receipt_claims["artifact_kind"] == "adapter_export"


def test_shredding_leaves_nothing_readable_in_the_home(tmp_path):
    """A save with a telling name and metadata; an insider keeps a copy; the tenant is shredded. Nothing
    anywhere in the home names the data, before or after, and the copy no longer opens."""
    home = tmp_path / "home"
    with ServiceClient(home=home) as service:
        tc = service.create_training_client(tiny_config(), client_id="cohort")
        tc.forward_backward(random_batch())
        tc.optim_step().result()
        saved = tc.save_state(metadata={"note": SECRET_NOTE, "cohort": SECRET_NAME})
        sampler = tc.save_weights_for_sampler(SECRET_NAME)
        [listed] = [a for a in service.list_artifacts() if a.artifact_id == sampler]
        assert listed.name == SECRET_NAME  # the owner still sees its names
        record = service.transport.request("POST", f"/v1/clients/{tc.id}/operations", json={
            "request": {"type": "save_state", "name": SECRET_NAME, "metadata": {"note": SECRET_NOTE}}})
        done = service.transport.request("GET", f"/v1/operations/{record['operation_id']}", params={"wait": 30})
        assert done["status"] == "succeeded"
        assert SECRET_NAME not in json.dumps(done) and SECRET_NOTE not in json.dumps(done)
        copy = service.pull_artifact(saved.artifact_id)
        tc.close()

    def readable() -> list[str]:
        return [str(p) for p in home.rglob("*") if p.is_file() and (
            SECRET_NAME.encode() in p.read_bytes() or SECRET_NOTE.encode() in p.read_bytes())]

    assert readable() == []  # sealed from the start: headers, index entries, results, audit log
    done = tensafe("artifact", "shred", "--yes", "--home", str(home))
    assert done.returncode == 0, done.stderr
    assert readable() == []
    from tensafe_trainer.storage.paths import keys_dir

    assert not (home / "artifacts" / "default").exists() and not (keys_dir(home) / "default.json").exists()
    assert not (home / "audit" / "default.jsonl").exists()
    (tmp_path / "copy.bin").write_bytes(copy)
    dead = tensafe("artifact", "decrypt", str(tmp_path / "copy.bin"), "--out", str(tmp_path / "x"), "--home", str(home))
    assert dead.returncode == 1 and "data key is not in this key store" in dead.stderr


def test_reencrypting_rotation_kills_a_copy_taken_before(tmp_path):
    from tensafe_trainer.cli.admin import open_store

    store = open_store(tmp_path)
    info = store.put(b"weights", tenant_id="default", training_client_id="tc-1", kind="checkpoint", step=1)
    (tmp_path / "before.bin").write_bytes(store.read_raw("default", info.artifact_id))
    plain = tensafe("artifact", "rotate", "--home", str(tmp_path))
    assert plain.returncode == 0 and "old keys kept" in plain.stdout
    still = tensafe("artifact", "decrypt", str(tmp_path / "before.bin"), "--out", str(tmp_path / "a"),
                    "--home", str(tmp_path))
    assert still.returncode == 0  # plain rotation re-wraps: documented, and this is why --reencrypt exists
    done = tensafe("artifact", "rotate", "--reencrypt", "--home", str(tmp_path))
    assert done.returncode == 0 and "retired keys destroyed" in done.stdout, done.stderr
    dead = tensafe("artifact", "decrypt", str(tmp_path / "before.bin"), "--out", str(tmp_path / "b"),
                   "--home", str(tmp_path))
    assert dead.returncode == 1 and "re-encrypted" in dead.stderr and not (tmp_path / "b").exists()
    assert open_store(tmp_path).get("default", info.artifact_id) == b"weights"
    from tensafe_trainer.storage import crypto
    before = (tmp_path / "before.bin").read_bytes()
    with pytest.raises(ArtifactIntegrityError):
        crypto.decrypt_from(io.BytesIO(before), len(before), crypto.Binding("default", "", info.artifact_id),
                            open_store(tmp_path).keys)


def test_a_copy_of_the_home_decrypts_nothing_in_a_fresh_environment(svc, bob, home, tmp_path):
    """The insider's backup of the home, taken to another machine (no access to the key store): no key set
    is in it, no artifact, no dataset and no name decrypts, and a trainer started on it reads nothing."""
    import os
    import shutil

    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_trainer.storage.paths import key_provider

    saved = bob.save_state(metadata={"cohort": SECRET_NAME})
    svc.register_dataset([{"input_ids": [11, 12, 13]}], dataset_id="ward-7")
    copy = tmp_path / "copied-home"
    shutil.copytree(home, copy)
    for path in copy.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b'"active"' not in data and not path.name.endswith(".key"), path  # no key set, no data key
            assert SECRET_NAME.encode() not in data, path
    fresh = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "fresh-config"))
    fresh.pop("TENSAFE_KEYS_DIR", None)
    out = subprocess.run([sys.executable, "-m", "tensafe_trainer", "artifact", "decrypt", saved.artifact_id,
                          "--out", str(tmp_path / "x.pt"), "--home", str(copy)], capture_output=True, text=True,
                         env=fresh)
    assert out.returncode != 0 and not (tmp_path / "x.pt").exists()
    os.environ["XDG_CONFIG_HOME"], before = str(tmp_path / "fresh-config"), os.environ["XDG_CONFIG_HOME"]
    try:
        store = ArtifactStore(copy / "artifacts", key_provider(copy))
    finally:
        os.environ["XDG_CONFIG_HOME"] = before
    assert store.list("default") == []  # every artifact, the dataset included, is unreadable
    assert ArtifactStore(home / "artifacts", key_provider(home)).get("default", saved.artifact_id)  # the original


def test_a_server_whose_keys_lie_inside_its_home_refuses_to_start(tmp_path):
    import os

    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    (home / "keys" / "default.json").write_text("{}")  # where versions before kept them
    env = dict(os.environ, TENSAFE_AUTH_TOKEN="t")
    env.pop("TENSAFE_KEYS_DIR", None)
    for extra in ({}, {"TENSAFE_KEYS_DIR": str(home / "inside")}):
        refused = subprocess.run([sys.executable, "-m", "tensafe_trainer", "serve", "--home", str(home), "--port", "0"],
                                 capture_output=True, text=True, env={**env, **extra}, timeout=120)
        assert refused.returncode != 0 and "inside the data folder" in refused.stderr, refused.stderr
        assert "--allow-keys-in-home" in refused.stderr and "Traceback" not in refused.stderr


def test_without_a_key_the_home_names_no_client_and_no_dataset(svc, home):
    """Finding 9: the audit log and the ledger file names showed client ids, dataset ids and which client
    produced which artifact. Client ids are sealed in the audit log and ledgers are named by pseudonym; the
    trainer still reads both back (its answers name the client)."""
    from conftest import dp_config

    client = svc.create_training_client(tiny_config(dp_config=dp_config(dataset_id="ward7-cohort")),
                                        client_id="oncology-trial-42")
    client.forward_backward(random_batch())
    client.optim_step().result()
    saved = client.save_state()
    secrets = (b"oncology-trial-42", b"ward7-cohort")
    for path in home.rglob("*"):
        assert not any(s.decode() in path.name for s in secrets), path
        if path.is_file():
            assert not any(s in path.read_bytes() for s in secrets), path
    entries = svc.get_audit_logs(training_client_id="oncology-trial-42")
    assert entries and {e.training_client_id for e in entries} == {"oncology-trial-42"}
    assert saved.artifact_id in {a for e in entries for a in e.artifact_ids_produced}
    client.close()


def test_a_used_home_does_not_start_with_a_new_key_store(svc, bob, home, tmp_path):
    """The attacker reviews' budget reset: a home pointed at a fresh key store (before, by editing a keys-id file
    in the home) got a new names key, so every ledger read as empty. The key store now follows the home's path,
    which nothing in the home chooses; a used home found at another path (moved, or copied there) does not start
    with new keys."""
    import os
    import shutil

    bob.save_state()
    copy = tmp_path / "moved-home"
    shutil.copytree(home, copy)
    env = dict(os.environ, TENSAFE_AUTH_TOKEN="t")
    env.pop("TENSAFE_KEYS_DIR", None)
    refused = subprocess.run([sys.executable, "-m", "tensafe_trainer", "serve", "--home", str(copy), "--port", "0"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode != 0 and "its key store" in refused.stderr and "is new" in refused.stderr, \
        refused.stderr
    assert not any(path.name == "keys-id" for path in copy.rglob("*"))  # nothing in the home names the key store
