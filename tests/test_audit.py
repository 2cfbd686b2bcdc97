"""The audit log: a hash chain in which an edited, dropped or reordered entry is found."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import random_batch


@pytest.fixture
def log(tmp_path):
    from tensafe_trainer.audit import AuditLog

    audit = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        audit.append(operation="forward_backward", training_client_id="tc-1", tenant_id="acme",
                     request_hash=f"{i:064x}", success=True)
    return audit


def lines(log):
    return log.path.read_text().splitlines()


def verify(log):
    from tensafe_trainer.audit import verify as run

    return run(log.path)


def test_intact_chain_verifies(log):
    ok, count, message = verify(log)
    assert ok and count == 5, message
    entries = list(log.entries())
    assert entries[0].prev_hash == "0" * 64
    assert all(entries[i + 1].prev_hash == entries[i].record_hash for i in range(4))


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


def test_rehashed_forgery_without_the_chain_is_found(log):
    from tensafe_trainer.audit import _entry_hash

    rows = lines(log)
    entry = json.loads(rows[3])
    entry["operation"] = "load_state"
    entry["record_hash"] = _entry_hash(entry)  # a forger who recomputes this entry's own hash
    rows[3] = json.dumps(entry, sort_keys=True)
    log.path.write_text("\n".join(rows) + "\n")
    ok, count, message = verify(log)
    assert not ok and count == 4 and "line 5" in message and "prev_hash" in message


def test_cli_verify_reports_the_first_broken_link(log):
    command = [sys.executable, "-m", "tensafe_trainer", "audit", "verify", str(log.path)]
    good = subprocess.run(command, capture_output=True, text=True)
    assert good.returncode == 0 and "chain intact" in good.stdout
    rows = lines(log)
    del rows[3]
    log.path.write_text("\n".join(rows) + "\n")
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 1 and "line 4" in bad.stdout


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
    from tensafe_trainer.audit import verify as run
    import os
    from pathlib import Path

    ok, _, message = run(Path(os.environ["TENSAFE_HOME"]) / "audit" / "audit.jsonl")
    assert ok, message
