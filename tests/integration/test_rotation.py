"""Rotation rotates everything (issue #26, finding 6): after `tensafe artifact rotate`, whoever kept a copy of
the old key set can neither extend the audit chain nor sign a receipt that verifies, nor seal parameters the
trainer opens; what was made before the rotation still verifies."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_batch, tiny_config


def event(i: int) -> dict:
    return dict(operation="forward_backward", training_client_id="tc-1", tenant_id="acme",
                request_hash=f"{i:064x}", success=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensafe_trainer", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def keys(home):
    from tensafe_trainer.storage.paths import key_provider

    return key_provider(home)


def forge(leaked: dict, prev: dict, **overrides) -> dict:
    """What an insider holding the leaked key set appends: the next record, MACed with the old chain key."""
    from tensafe_trainer.storage.audit import next_record
    from tensafe_keys.store import chain_key_of, secrets_id_of

    record = next_record({"id": secrets_id_of(leaked), "chain_key": chain_key_of(leaked)}, prev,
                     **{**event(99), "success": False, **overrides})
    return record


def rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_rows(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_after_rotate_an_entry_forged_with_the_old_key_set_is_refused(home, keys):
    from tensafe_trainer.storage.audit import AuditTrail, next_record, verify
    from tg_tinker import AuditIntegrityError
    from tensafe_keys.store import chain_key_of

    trail = AuditTrail(home / "audit", keys)
    trail.log("acme").append_many([event(i) for i in range(5)])
    leaked = json.loads(json.dumps(keys.complete("acme")))  # the insider's copy of the key set
    rotated = cli("artifact", "rotate", "--reencrypt", "--tenant", "acme", "--home", str(home))
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "audit, receipt and sealing keys replaced" in rotated.stdout
    keyset = keys.complete("acme")
    assert keyset["audit"] != leaked["audit"] and keyset["receipt"] != leaked["receipt"]
    assert leaked["receipt"] not in json.dumps(keyset)  # the old signing seed is destroyed, not kept

    writer = AuditTrail(home / "audit", keys)  # the trainer, restarted or not: it reads the key set per write
    written = writer.log("acme").append_many([event(i) for i in range(5, 7)])
    assert {entry.key_id for entry in written} == {keyset["secrets_id"]}
    path = trail.path("acme")
    records = [json.loads(line) for line in rows(path)]
    assert records[5]["operation"] == "rotate_keys" and records[5]["key_id"] == "s1"
    assert records[5]["next_key_id"] == keyset["secrets_id"]
    ok, count, message = verify(path, keyset)
    assert ok and count == 8, message
    intact = rows(path)

    # 1. The next record, forged with the old key (naming it, or naming none as the first records do).
    for overrides in ({}, {"key_id": None}):
        forged = forge(leaked, records[-1])
        if "key_id" in overrides:
            del forged["key_id"]
            from tensafe_trainer.storage.audit import record_mac

            forged["record_hash"] = record_mac(chain_key_of(leaked), forged)
        write_rows(path, intact + [json.dumps(forged, sort_keys=True)])
        ok, count, message = verify(path, keyset)
        assert not ok and count == 8 and "line 9" in message, message
        assert ("retired at sequence 5" in message) if not overrides else ("names no key" in message)
        with pytest.raises(AuditIntegrityError):
            AuditTrail(home / "audit", keys).log("acme").append_many([event(100)])  # nor built upon

    # 2. The log cut back to the rotation, and continued with the old key from there.
    write_rows(path, intact[:6] + [json.dumps(forge(leaked, records[5]), sort_keys=True)])
    ok, _, message = verify(path, keyset)
    assert not ok and "after its retirement" in message, message

    # 3. The old segment rewritten with the old key, up to and including its rotation record.
    from tensafe_trainer.storage.audit import GENESIS, Generations

    old = Generations(leaked).active
    prev, rewritten = None, []
    for record in records[:6]:
        fields = {k: v for k, v in record.items() if k not in ("record_hash", "sequence", "prev_hash", "entry_id",
                                                               "timestamp", "key_id")}
        event_fields = dict(operation=fields["operation"], training_client_id=fields["training_client_id"],
                            tenant_id="acme", request_hash=fields["request_hash"],
                            success=fields["success"] if record["sequence"] != 2 else False,
                            next_key_id=fields.get("next_key_id"))
        prev = next_record(old, prev, **event_fields)
        rewritten.append(json.dumps(prev, sort_keys=True))
    assert json.loads(rewritten[0])["prev_hash"] == GENESIS
    write_rows(path, rewritten)
    ok, _, message = verify(path, keyset)
    assert not ok and "line 6" in message and "not the key rotation the key set records" in message, message

    # 4. The log cut back before the rotation: the key set remembers it.
    write_rows(path, intact[:4])
    ok, _, message = verify(path, keyset)
    assert not ok and "before the key rotation at sequence 5" in message, message

    write_rows(path, intact)
    assert verify(path, keyset)[0]


def test_a_receipt_signed_with_the_old_key_after_rotation_is_refused_and_old_receipts_still_verify(home, keys):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tensafe_trainer.storage.audit import AuditTrail
    from tg_tinker import ReceiptVerificationError, verify_receipt
    from tg_tinker.receipts import public_key_pem, sign_receipt

    trail = AuditTrail(home / "audit", keys)
    entries = trail.log("acme").append_many([event(i) for i in range(3)])
    head = lambda entry: {"tenant_id": "acme", "sequence": entry.sequence, "record_hash": entry.record_hash}  # noqa: E731
    claims = {"tenant": "acme", "artifact_id": "art-" + "0" * 32, "epsilon": 8.0}
    before = sign_receipt({**claims, "audit_head": head(entries[-1])}, keys.receipt_key("acme"))
    leaked = json.loads(json.dumps(keys.complete("acme")))
    old_key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(leaked["receipt"]))

    generation, rotation = trail.rotate_keys("acme")
    after = trail.log("acme").append_many([event(9)])[0]
    listed = keys.receipt_public_keys("acme")
    assert [k["status"] for k in listed["keys"]] == ["active", "retired"]
    assert listed["keys"][1]["retired_at"] == rotation.sequence == 3
    current_pem = listed["keys"][0]["public_key"]
    assert current_pem == public_key_pem(keys.receipt_key("acme")) != public_key_pem(old_key)

    # What the insider signs with the old key after the rotation: epsilon 0.01, today's audit head.
    forged = sign_receipt({**claims, "epsilon": 0.01, "audit_head": head(after)}, old_key)
    with pytest.raises(ReceiptVerificationError, match="after its retirement at audit sequence 3"):
        verify_receipt(forged, listed)
    with pytest.raises(ReceiptVerificationError, match="not by this public key"):
        verify_receipt(forged, current_pem)  # today's public key is another key
    headless = sign_receipt({**claims, "epsilon": 0.01}, old_key)
    with pytest.raises(ReceiptVerificationError, match="names no audit head"):
        verify_receipt(headless, listed)
    with pytest.raises(ReceiptVerificationError, match="none of tenant 'acme'"):
        verify_receipt(sign_receipt({**claims, "audit_head": head(after)}, Ed25519PrivateKey.generate()), listed)

    # What was signed before the rotation still verifies, with the key list; new receipts with either.
    assert verify_receipt(before, listed)["epsilon"] == 8.0
    fresh = sign_receipt({**claims, "audit_head": head(after)}, keys.receipt_key("acme"))
    assert verify_receipt(fresh, listed) == verify_receipt(fresh, current_pem)

    # `tensafe receipt verify` with the key set file (or the key list) does the same.
    keyset_file = home / "acme-keys.json"
    keyset_file.write_text(json.dumps(keys.complete("acme")))
    list_file = home / "receipt-keys.json"
    list_file.write_text(json.dumps(listed))
    for name, receipt in (("forged", forged), ("before", before)):
        (home / f"{name}.json").write_text(json.dumps(receipt))
    refused = cli("receipt", "verify", str(home / "forged.json"), "--public-key", str(keyset_file))
    assert refused.returncode == 1 and "after its retirement" in refused.stderr, refused.stdout + refused.stderr
    accepted = cli("receipt", "verify", str(home / "before.json"), "--public-key", str(list_file))
    assert accepted.returncode == 0 and "epsilon: 8.0" in accepted.stdout, accepted.stdout + accepted.stderr
    assert generation == keys.secrets_id("acme")


def test_rotation_replaces_the_sealing_and_request_hash_keys(home, keys):
    from tensafe_trainer.storage.audit import AuditTrail
    from tg_tinker import ValidationError
    from tg_tinker.sealing import seal, sealing_key, unseal

    leaked = json.loads(json.dumps(keys.complete("acme")))
    old_audit_key = keys.audit_key("acme")
    sealed_before = seal(keys.sealing_key("acme"), "tc-1", {"name": "before"})
    AuditTrail(home / "audit", keys).rotate_keys("acme")
    with pytest.raises(ValidationError, match="under a key since rotated"):
        unseal(keys.sealing_key("acme"), "tc-1", seal(sealing_key(leaked), "tc-1", {"name": "planted"}))
    with pytest.raises(ValidationError):
        unseal(keys.sealing_key("acme"), "tc-1", sealed_before)
    assert keys.audit_key("acme") != old_audit_key  # request hashes under the leaked key stop at the rotation


def test_an_interrupted_rotation_blocks_the_chain_until_it_is_completed(home, keys):
    """The rotation record is written first, then the key set: a crash between the two leaves a log that no writer
    extends (it names a key the key set lacks) until `rotate` runs again and completes that very rotation."""
    from tensafe_trainer.storage.audit import ROTATE, AuditTrail, next_record, verify
    from tg_tinker import AuditIntegrityError, ValidationError
    from tensafe_keys.store import StaticKeyProvider

    trail = AuditTrail(home / "audit", keys)
    log = trail.log("acme")
    log.append_many([event(i) for i in range(2)])
    with pytest.raises(ValidationError, match="read-only"):
        AuditTrail(home / "audit", StaticKeyProvider("acme", keys.complete("acme"))).rotate_keys("acme")
    assert len(rows(log.path)) == 2  # a key set that cannot be written: the log is left alone

    last = json.loads(rows(log.path)[-1])
    record = next_record(log.generations().active, last, operation=ROTATE, training_client_id=None, tenant_id="acme",
                     request_hash="0" * 64, success=True, next_key_id="s2-interrupted")
    write_rows(log.path, rows(log.path) + [json.dumps(record, sort_keys=True)])  # the crash: key set not written
    with pytest.raises(AuditIntegrityError, match="interrupted"):
        AuditTrail(home / "audit", keys).log("acme").append_many([event(5)])
    generation, entry = AuditTrail(home / "audit", keys).rotate_keys("acme")
    assert generation == "s2-interrupted" == keys.secrets_id("acme") and entry.sequence == 2
    AuditTrail(home / "audit", keys).log("acme").append_many([event(6)])
    ok, count, message = verify(log.path, keys.complete("acme"))
    assert ok and count == 4, message


def test_a_running_trainer_follows_a_rotation(service, tensafe_home):
    """`tensafe artifact rotate --reencrypt` while the trainer serves the tenant: the next save's receipt is signed
    by the new key and its audit entry is in the new segment; the receipt key list verifies receipts of both
    keys; the old key's forgery is refused; the checkpoint re-encrypted under the new KEK still loads."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tensafe_trainer.storage.audit import AuditTrail, verify
    from tensafe_trainer.storage.paths import key_provider
    from tg_tinker import ReceiptVerificationError, ServiceClient, verify_receipt
    from tg_tinker.receipts import sign_receipt

    tenant = "rotating"
    keys = key_provider(Path(tensafe_home))
    with ServiceClient(service.base_url, service.transport.token, tenant_id=tenant) as svc:
        tc = svc.create_training_client(tiny_config())
        try:
            tc.forward_backward(random_batch())
            tc.optim_step()
            first = tc.save_state()
            keyed = {"request": {"type": "export_adapter"}, "idempotency_key": "before-rotation"}
            submitted = svc.transport.request("POST", f"/v1/clients/{tc.id}/operations", json=keyed)
            leaked = json.loads(json.dumps(keys.complete(tenant)))
            env = {**os.environ}
            rotated = subprocess.run([sys.executable, "-m", "tensafe_trainer", "artifact", "rotate", "--reencrypt",
                                      "--tenant", tenant, "--home", str(tensafe_home)], capture_output=True,
                                     text=True, env=env, timeout=300)
            assert rotated.returncode == 0, rotated.stdout + rotated.stderr
            # A retry's match does not depend on the audit key: the same request after the rotation is a retry.
            retried = svc.transport.request("POST", f"/v1/clients/{tc.id}/operations", json=keyed)
            assert retried["operation_id"] == submitted["operation_id"]
            tc.forward_backward(random_batch(seed=1))
            tc.optim_step()
            second = tc.save_state()
            assert tc.load_state(first.artifact_id).step == 1
        finally:
            tc.close()
        listed = svc.transport.request("GET", "/v1/receipts/public_keys", params={"tenant_id": tenant})
        current = svc.receipt_public_key()
    assert first.receipt["key_id"] != second.receipt["key_id"]
    assert [k["status"] for k in listed["keys"]] == ["active", "retired"]
    assert verify_receipt(first.receipt, listed)["artifact_id"] == first.artifact_id
    assert verify_receipt(second.receipt, listed) == verify_receipt(second.receipt, current)
    with pytest.raises(ReceiptVerificationError):
        verify_receipt(first.receipt, current)  # a rotated key: only the key list places it before the rotation
    old_key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(leaked["receipt"]))
    claims = json.loads(second.receipt["payload"])
    with pytest.raises(ReceiptVerificationError, match="after its retirement"):
        verify_receipt(sign_receipt({**claims, "epsilon": 0.01}, old_key), listed)

    keyset = keys.complete(tenant)
    path = AuditTrail(Path(tensafe_home) / "audit", keys).path(tenant)
    records = [json.loads(line) for line in rows(path)]
    saves = [r for r in records if r["operation"] == "save_state"]
    assert [r["key_id"] for r in saves] == ["s1", keyset["secrets_id"]]
    assert saves[1]["sequence"] == second.audit_head.sequence
    ok, _, message = verify(path, keyset, (second.audit_head.sequence, second.audit_head.record_hash))
    assert ok and "1 key rotation" in message, message
