"""The audit log: a keyed chain in which an edited, dropped, reordered or (given the published head)
truncated entry is found, and which an insider without the tenant's key cannot rewrite."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from conftest import random_batch


@pytest.fixture
def keys(tmp_path):
    from tensafe_keys.store import LocalKeyProvider

    return LocalKeyProvider(tmp_path / "keys")


@pytest.fixture
def log(tmp_path, keys):
    from tensafe_trainer.storage.audit import AuditTrail

    trail = AuditTrail(tmp_path / "audit", keys)
    audit = trail.log("acme")
    audit.append_many([dict(operation="forward_backward", training_client_id="tc-1", tenant_id="acme",
                            request_hash=f"{i:064x}", success=True) for i in range(5)])
    return audit


def lines(log):
    return log.path.read_text().splitlines()


def verify(log, expect_head=None):
    from tensafe_trainer.storage.audit import verify as run

    return run(log.path, log.generations(), expect_head)


def test_intact_chain_verifies(log):
    ok, count, message = verify(log)
    assert ok and count == 5, message
    entries = list(log.entries())
    assert entries[0].prev_hash == "0" * 64
    assert all(entries[i + 1].prev_hash == entries[i].record_hash for i in range(4))
    assert log.path.stat().st_mode & 0o777 == 0o600 and log.path.parent.stat().st_mode & 0o777 == 0o700


def test_records_are_macs_under_the_tenant_key_not_plain_hashes(log, keys):
    import hmac

    from tensafe_trainer.storage.crypto import canonical_json

    entry = json.loads(lines(log)[2])
    body = {k: v for k, v in entry.items() if k != "record_hash"}
    unkeyed = hashlib.sha256(entry["prev_hash"].encode() + canonical_json(body)).hexdigest()
    keyed = hmac.new(keys.chain_key("acme"), entry["prev_hash"].encode() + canonical_json(body),
                     hashlib.sha256).hexdigest()
    assert entry["record_hash"] == keyed != unkeyed
    assert keys.chain_key("acme") != keys.audit_key("acme")  # the request hashes have a key of their own


def test_an_insider_who_edits_and_recomputes_the_whole_chain_is_caught(log):
    """The old unkeyed chain let anyone with write access recompute every hash; without the key the
    recomputed chain does not verify."""
    from tensafe_trainer.storage.audit import GENESIS
    from tensafe_trainer.storage.crypto import canonical_json

    rows, prev, forged = lines(log), GENESIS, []
    for row in rows:
        entry = json.loads(row)
        if entry["sequence"] == 2:
            entry["success"] = False
        entry["prev_hash"] = prev
        body = {k: v for k, v in entry.items() if k != "record_hash"}
        entry["record_hash"] = prev = hashlib.sha256(prev.encode() + canonical_json(body)).hexdigest()
        forged.append(json.dumps(entry, sort_keys=True))
    log.path.write_text("\n".join(forged) + "\n")
    ok, count, message = verify(log)
    assert not ok and count == 0 and "line 1" in message and "does not verify" in message


def test_a_truncated_tail_is_caught_with_the_published_head(log):
    head = log.head()
    assert head.sequence == 4
    rows = lines(log)
    log.path.write_text("\n".join(rows[:3]) + "\n")  # the last two entries dropped: a valid shorter chain
    assert verify(log)[0]  # undetectable without the head ...
    ok, count, message = verify(log, (head.sequence, head.record_hash))
    assert not ok and count == 3 and "truncated" in message  # ... caught with it
    log.path.write_text("\n".join(rows) + "\n")
    assert verify(log, (head.sequence, head.record_hash))[0]
    assert not verify(log, (head.sequence, "f" * 64))[0]


def test_the_writer_refuses_to_extend_an_edited_or_truncated_log(log):
    from tg_tinker import AuditIntegrityError

    rows = lines(log)
    event = dict(operation="optim_step", training_client_id="tc-1", tenant_id="acme", request_hash="0" * 64,
                 success=True)
    log.path.write_text("\n".join(rows[:3]) + "\n")  # truncated behind what this writer wrote
    with pytest.raises(AuditIntegrityError, match="truncated or replaced"):
        log.append_many([event])
    entry = json.loads(rows[4])
    entry["success"] = False
    log.path.write_text("\n".join(rows[:4] + [json.dumps(entry)]) + "\n")  # last record edited
    with pytest.raises(AuditIntegrityError, match="does not verify"):
        log.append_many([event])
    assert log.path.read_text().count("\n") == 5  # nothing appended


def test_edited_entry_is_found(log):
    rows = lines(log)
    entry = json.loads(rows[2])
    entry["success"] = False
    rows[2] = json.dumps(entry, sort_keys=True)
    log.path.write_text("\n".join(rows) + "\n")
    ok, count, message = verify(log)
    assert not ok and count == 2 and "line 3" in message and "edited" in message


def test_dropped_entry_is_found(log):
    rows = lines(log)
    del rows[1]
    log.path.write_text("\n".join(rows) + "\n")
    ok, count, message = verify(log)
    assert not ok and count == 1 and "line 2" in message


def test_reordered_entries_are_found(log):
    rows = lines(log)
    rows[1], rows[2] = rows[2], rows[1]
    log.path.write_text("\n".join(rows) + "\n")
    ok, _, message = verify(log)
    assert not ok and "line 2" in message


def test_a_line_with_a_duplicated_key_does_not_verify(log):
    """The MAC covers the parsed record; a second "operation" key placed before the real one would show a
    forged value to grep while the record verified."""
    rows = lines(log)
    rows[2] = '{"operation": "NOTHING-TO-SEE", ' + rows[2][1:]
    log.path.write_text("\n".join(rows) + "\n")
    ok, count, message = verify(log)
    assert not ok and count == 2 and "line 3" in message


def test_a_new_writer_verifies_the_whole_chain_before_extending_it(log, keys):
    """Entries dropped from the middle, the real tail kept: the last record verifies, the chain does not."""
    from tensafe_trainer.storage.audit import AuditLog

    from tg_tinker import AuditIntegrityError

    rows = lines(log)
    log.path.write_text("\n".join(rows[:2] + rows[4:]) + "\n")
    writer = AuditLog(log.path, keys, "acme")  # a restarted trainer
    with pytest.raises(AuditIntegrityError, match="does not verify .*sequence 4 where 2 was expected"):
        writer.append_many([dict(operation="optim_step", training_client_id="tc-1", tenant_id="acme",
                                 request_hash="0" * 64, success=True)])


def test_cli_verify_needs_the_key_and_reports_the_first_broken_link(log, tmp_path):
    base = [sys.executable, "-m", "tensafe_trainer", "audit", "verify", str(log.path), "--tenant", "acme"]
    command = base + ["--keys", str(tmp_path / "keys" / "acme.json")]  # the fixture's key set
    good = subprocess.run(command, capture_output=True, text=True)
    assert good.returncode == 0 and "chain intact" in good.stdout, good.stdout + good.stderr
    head = log.head()
    rows = lines(log)
    log.path.write_text("\n".join(rows[:4]) + "\n")
    truncated = subprocess.run(command + ["--expect-head", head.text], capture_output=True, text=True)
    assert truncated.returncode == 1 and "truncated" in truncated.stdout
    del rows[3]
    log.path.write_text("\n".join(rows) + "\n")
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 1 and "line 4" in bad.stdout
    keyless = subprocess.run(base + ["--home", str(tmp_path / "elsewhere")], capture_output=True, text=True)
    assert keyless.returncode == 2 and "no audit key" in keyless.stderr
    log.path.unlink()
    gone = subprocess.run(command, capture_output=True, text=True)
    assert gone.returncode == 1 and "no audit log at" in gone.stderr


def test_every_operation_is_audited_through_the_service(service, tc):
    tc.forward_backward(random_batch()).result()
    tc.optim_step().result()
    checkpoint = tc.save_state()
    tc.load_state(checkpoint.artifact_id)
    entries = service.get_audit_logs(training_client_id=tc.id, limit=4)
    assert [e.operation for e in entries] == ["forward_backward", "optim_step", "save_state", "load_state"]
    assert entries[2].artifact_ids_produced == [checkpoint.artifact_id]
    assert entries[3].artifact_ids_consumed == [checkpoint.artifact_id]
    assert all(e.success for e in entries)
    assert service.get_audit_logs(operation="save_state", limit=1)[0].artifact_ids_produced
    import os
    from pathlib import Path

    from tensafe_trainer.storage.audit import verify as run
    from tensafe_trainer.storage.paths import key_provider

    home = Path(os.environ["TENSAFE_HOME"])
    ok, _, message = run(home / "audit" / "default.jsonl", key_provider(home).chain_key("default"),
                         (checkpoint.audit_head.sequence, checkpoint.audit_head.record_hash))
    assert ok, message
    assert entries[2].sequence == checkpoint.audit_head.sequence  # the save's result names its own entry


def test_audit_reads_refuse_an_edited_or_truncated_log_under_a_running_trainer(service, tensafe_home):
    """Issue #26, finding 7: `/v1/audit` served an edited entry, and after a truncation `/v1/audit/head` answered
    an earlier head. Reads verify the whole chain and never serve a log that ends before what the trainer wrote."""
    from pathlib import Path

    from tensafe_trainer.storage.audit import AuditTrail
    from tensafe_trainer.storage.paths import key_provider
    from tg_tinker import AuditIntegrityError, ServiceClient

    with ServiceClient(service.base_url, service.transport.token, tenant_id="audit-tamper") as svc:
        for seed in range(3):  # six audited operations of the tenant
            svc.delete_dataset(svc.register_dataset(random_batch(rows=2, width=4, seed=seed)).dataset_id)
        head = svc.audit_head()
        assert head.sequence == 5 and len(svc.get_audit_logs()) == 6
        path = AuditTrail(Path(tensafe_home) / "audit", key_provider(Path(tensafe_home))).path("audit-tamper")
        intact = path.read_text().splitlines()

        edited = json.loads(intact[2])
        edited["artifact_ids_produced"] = ["art-" + "0" * 32]  # the insider's edit, in place
        path.write_text("\n".join(intact[:2] + [json.dumps(edited, sort_keys=True)] + intact[3:]) + "\n")
        with pytest.raises(AuditIntegrityError, match="line 3"):
            svc.get_audit_logs()
        with pytest.raises(AuditIntegrityError, match="does not verify"):
            svc.audit_head()

        path.write_text("\n".join(intact[:4]) + "\n")  # the last two entries dropped: a valid shorter chain
        with pytest.raises(AuditIntegrityError, match="ends at sequence 3, before the published head 5"):
            svc.audit_head()
        with pytest.raises(AuditIntegrityError, match="truncated"):
            svc.get_audit_logs()

        path.write_text("\n".join(intact) + "\n")
        assert svc.audit_head() == head and len(svc.get_audit_logs()) == 6


def test_resume_latest_refuses_when_the_newest_checkpoint_file_is_gone(service, tensafe_home):
    """Issue #26, finding 8: removing the newest checkpoint file silently rolled `resume_from="latest"` back a step
    (every trainer pod starts with it). The audit chain names each save's artifacts: a missing newest is an error."""
    from pathlib import Path

    from tg_tinker import TGTinkerError

    from conftest import tiny_config

    config = tiny_config()
    victim = service.create_training_client(config, client_id="latest-victim")
    try:
        victim.forward_backward(random_batch())
        victim.optim_step()
        older = victim.save_state()
        victim.forward_backward(random_batch(seed=1))
        victim.optim_step()
        newest = victim.save_state()
        assert (older.step, newest.step) == (1, 2)
    finally:
        victim.close()
    removed = list((Path(tensafe_home) / "artifacts" / "default").glob(f"{newest.artifact_id}.*"))
    assert removed
    for path in removed:  # the insider's `rm`
        path.unlink()
    with pytest.raises(TGTinkerError, match=f"{newest.artifact_id}, the newest save .* is missing"):
        service.create_training_client(config, client_id="latest-victim", resume_from="latest")
    rolled_back = service.create_training_client(config, client_id="latest-victim", resume_from=older.artifact_id)
    try:  # a rollback said out loud is still possible
        assert rolled_back.step == 1
    finally:
        rolled_back.close()


def test_the_log_writes_only_the_declared_operations_and_events(log):
    from tg_tinker.operations import AUDITED, OPERATIONS, SERVICE_EVENTS

    assert set(OPERATIONS) <= AUDITED and not set(OPERATIONS) & set(SERVICE_EVENTS)
    with pytest.raises(ValueError, match="not an audited"):  # a misspelt event is a bug, never a silent entry
        log.append_many([dict(operation="forward_backwards", training_client_id="tc-1", tenant_id="acme",
                              request_hash="0" * 64, success=True)])
    ok, count, message = verify(log)
    assert ok and count == 5, message


def test_a_query_for_an_operation_the_log_never_records_is_refused(service, tc):
    from tg_tinker.errors import ValidationError

    with pytest.raises(ValidationError, match="save_state"):  # the answer names what the log records
        service.get_audit_logs(operation="save_sate")
    assert service.get_audit_logs(operation="grant_artifact") == []  # declared, not yet recorded: empty
