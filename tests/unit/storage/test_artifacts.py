"""Encrypted artifacts: round trips, tampering, keys, rotation, shredding, atomicity, path escapes."""

from __future__ import annotations

import os

import pytest

from tg_tinker import ArtifactIntegrityError, ArtifactNotFoundError, ValidationError


@pytest.fixture
def store(tmp_path):
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_keys.store import LocalKeyProvider

    return ArtifactStore(tmp_path / "artifacts", LocalKeyProvider(tmp_path / "keys"))


PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # not a multiple of the AES block: exercises the tail


def put(store, payload=PAYLOAD, tenant="acme", client="tc-1"):
    return store.put(payload, tenant_id=tenant, training_client_id=client, kind="checkpoint", step=3)


def path_of(store, info):
    return store.root / info.tenant_id / f"{info.artifact_id}.tsa"


def test_round_trip_is_bit_exact_and_hash_is_of_stored_bytes(store):
    import hashlib

    info = put(store)
    stored = store.read_raw("acme", info.artifact_id)
    assert info.size_bytes == len(stored) and info.content_hash == hashlib.sha256(stored).hexdigest()
    assert PAYLOAD not in stored and PAYLOAD[:64] not in stored  # really encrypted
    assert store.get("acme", info.artifact_id) == PAYLOAD
    assert [i.artifact_id for i in store.list("acme")] == [info.artifact_id]


def test_large_payload_streams_through_chunks_and_background_syncs(store, monkeypatch):
    from tensafe_trainer.storage import crypto
    synced = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(crypto, "SYNC_EVERY", crypto.CHUNK)
    monkeypatch.setattr(crypto.os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd)))
    big = os.urandom(crypto.CHUNK * 3 + 12345)
    info = put(store, big)
    assert store.get("acme", info.artifact_id) == big
    assert len(synced) >= 2  # the disk was put to work before the end


def test_a_failing_background_sync_fails_the_save_and_leaves_nothing(store, monkeypatch):
    """An fdatasync error is reported once per open file: swallowed on the sync thread, the final fsync
    could succeed over lost data."""
    import errno

    from tensafe_trainer.storage import crypto
    def failing(fd):
        raise OSError(errno.EIO, "simulated disk error")

    monkeypatch.setattr(crypto, "SYNC_EVERY", crypto.CHUNK)
    monkeypatch.setattr(crypto.os, "fdatasync", failing)
    with pytest.raises(OSError, match="simulated disk error"):
        put(store, os.urandom(crypto.CHUNK * 3))
    assert store.list("acme") == [] and list((store.root / "acme").iterdir()) == []


@pytest.mark.parametrize("where", ["magic", "header", "wrapped_key", "nonce", "body_start", "body_middle", "tag"])
def test_one_flipped_bit_anywhere_is_detected(store, where):
    import json

    info = put(store)
    path = path_of(store, info)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[5:9], "big")
    header_text = data[9:9 + header_len].decode()
    header = json.loads(header_text)
    if where == "wrapped_key":  # kept in the key store, not in the file
        [key_file] = (store.keys.folder / "artifacts" / "acme").glob(f"{info.artifact_id}.*.key")
        entry = json.loads(key_file.read_text())
        entry["wrapped_dek"] = entry["wrapped_dek"][:3] + ("A" if entry["wrapped_dek"][3] != "A" else "B") + \
            entry["wrapped_dek"][4:]
        key_file.write_text(json.dumps(entry))
    else:
        offsets = {
            "magic": 0, "header": 9 + header_text.index(header["sealed"]) + 5,
            "nonce": 9 + header_text.index(header["nonce"]) + 2,
            "body_start": 9 + header_len, "body_middle": len(data) // 2, "tag": len(data) - 3,
        }
        data[offsets[where]] ^= 0x04
        path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError):
        store.get("acme", info.artifact_id)


def test_truncated_file_is_detected(store):
    info = put(store)
    path = path_of(store, info)
    for keep in (len(path.read_bytes()) - 1, 100, 5):
        path.write_bytes(path.read_bytes()[:keep])
        with pytest.raises(ArtifactIntegrityError):
            store.get("acme", info.artifact_id)


def test_swapped_header_is_detected(store):
    from tensafe_trainer.storage import crypto
    a, b = put(store), put(store, os.urandom(1000))
    pa, pb = path_of(store, a), path_of(store, b)
    with open(pa, "rb") as f:
        _, offset_a = crypto.read_header(f)
    with open(pb, "rb") as f:
        _, offset_b = crypto.read_header(f)
    # b's header (a valid header of this tenant) in front of a's ciphertext, stored under b's name
    pb.write_bytes(pb.read_bytes()[:offset_b] + pa.read_bytes()[offset_a:])
    with pytest.raises(ArtifactIntegrityError):
        store.get("acme", b.artifact_id)


def test_renamed_artifact_and_other_tenant_are_refused(store):
    a = put(store)
    b = put(store)
    path_of(store, b).write_bytes(path_of(store, a).read_bytes())  # a's bytes under b's id
    with pytest.raises(ArtifactIntegrityError, match="artifact_id"):
        store.get("acme", b.artifact_id)
    other = put(store, tenant="globex")
    path_of(store, other).write_bytes(path_of(store, a).read_bytes())  # acme's artifact in globex's folder
    with pytest.raises(ArtifactIntegrityError, match="tenant"):
        store.get("globex", other.artifact_id)
    with pytest.raises(ArtifactNotFoundError):
        store.get("globex", a.artifact_id)  # tenants do not see each other's artifacts


def test_wrong_key_is_refused(store, tmp_path):
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_keys.store import LocalKeyProvider

    info = put(store)
    # the data keys, but a different key set (KEKs) under the same tenant name
    stranger = ArtifactStore(store.root, LocalKeyProvider(tmp_path / "other-keys", tmp_path / "keys" / "artifacts"))
    stranger.keys.active_key("acme")
    with pytest.raises(ArtifactIntegrityError, match="not available|does not unwrap"):
        stranger.get("acme", info.artifact_id)
    with pytest.raises(ArtifactNotFoundError, match="data key"):  # the key sets without the data keys
        ArtifactStore(store.root, LocalKeyProvider(tmp_path / "keys", tmp_path / "no-data-keys")).get(
            "acme", info.artifact_id)


def test_key_file_is_private(store, tmp_path):
    put(store)
    assert (tmp_path / "keys" / "acme.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700


def test_rotation_rewraps_without_reencrypting(store):
    from tensafe_trainer.storage import crypto
    import json

    info = put(store)
    path = path_of(store, info)
    before = path.read_bytes()
    new_kid, retired = store.rotate("acme")
    assert new_kid != info.key_id and retired == []
    assert path.read_bytes() == before  # the data key is re-wrapped in the key store: the file is untouched
    with open(path, "rb") as f:
        tag = crypto.key_tag(crypto.read_header(f)[0])
    entry = json.loads((store.keys.folder / "artifacts" / "acme" / f"{info.artifact_id}.{tag}.key").read_text())
    assert entry["kid"] == new_kid
    rotated = store.info("acme", info.artifact_id)
    assert rotated.key_id == new_kid and rotated.content_hash == info.content_hash
    assert store.get("acme", info.artifact_id) == PAYLOAD
    assert put(store).key_id == new_kid


def test_crypto_shredding_makes_artifacts_unreadable(store):
    info = put(store)
    store.keys.shred("acme")  # the key set and every data key
    with pytest.raises(ArtifactNotFoundError, match="data key"):
        store.get("acme", info.artifact_id)


def test_crash_between_write_and_rename_keeps_the_previous_artifact(store, monkeypatch):
    first = put(store)

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr("tensafe_trainer.storage.artifacts.os.replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        put(store, os.urandom(100))
    monkeypatch.undo()
    assert store.get("acme", first.artifact_id) == PAYLOAD
    assert [p.name for p in (store.root / "acme").iterdir() if p.name.startswith(".")] == []  # no temp left
    assert [i.artifact_id for i in store.list("acme")] == [first.artifact_id]


@pytest.mark.parametrize("artifact_id", ["../keys/acme", "art-../../x", "art-" + "g" * 32, "/etc/passwd",
                                         "art-" + "0" * 31, "art-" + "0" * 32 + "/..", ""])
def test_artifact_ids_cannot_escape_the_store(store, artifact_id):
    with pytest.raises(ArtifactNotFoundError):
        store.get("acme", artifact_id)


@pytest.mark.parametrize("tenant", ["..", "../x", "a/b", "", "x" * 65])
def test_tenant_ids_cannot_escape_the_store(store, tenant):
    with pytest.raises(ValidationError):
        put(store, tenant=tenant)


@pytest.mark.parametrize("field", ["nonce", "wrap_nonce", "wrapped_dek"])
@pytest.mark.parametrize("bad", ["not base64!", "AAAA", "", None])
def test_malformed_header_fields_are_integrity_errors(store, field, bad):
    """Whatever a flipped bit makes of a header field (invalid base64, wrong length, gone), it is refused."""
    import json

    info = put(store)
    path = path_of(store, info)
    data = path.read_bytes()
    header_len = int.from_bytes(data[5:9], "big")
    header = json.loads(data[9:9 + header_len])
    header[field] = bad
    body = json.dumps(header).encode()
    path.write_bytes(data[:5] + len(body).to_bytes(4, "big") + body + data[9 + header_len:])
    with pytest.raises(ArtifactIntegrityError):
        store.get("acme", info.artifact_id)


def index_path_of(store, info):
    return store.root / info.tenant_id / f"{info.artifact_id}.json"


@pytest.mark.parametrize("damage", ["missing", "torn", "garbage", "stale size"])
def test_a_lost_or_torn_index_entry_is_rebuilt_from_the_artifact(store, damage):
    """The index is not fsynced (a save costs one file fsync, like torch.save): after a crash it may be
    gone or empty, and the artifact file alone must give back the same description."""
    import json

    info = put(store)
    index = index_path_of(store, info)
    if damage == "missing":
        index.unlink()
    elif damage == "torn":
        index.write_bytes(b"")
    elif damage == "garbage":
        index.write_bytes(b'{"artifact_id": "art-')
    else:
        index.write_text(json.dumps({**json.loads(index.read_text()), "size_bytes": 1}))
    assert store.info("acme", info.artifact_id) == info
    assert [i.artifact_id for i in store.list("acme")] == [info.artifact_id]
    assert json.loads(index.read_text()) == {"artifact_id": info.artifact_id, "size_bytes": info.size_bytes,
                                             "content_hash": info.content_hash, "key_id": info.key_id}  # written back


def test_a_rotation_interrupted_before_the_index_is_rewritten_reports_the_new_key(store):
    import hashlib

    info = put(store)
    index = index_path_of(store, info)
    before = index.read_bytes()
    kid, _ = store.rotate("acme")
    index.write_bytes(before)  # as a crash before the rotation rewrote it leaves it
    rebuilt = store.info("acme", info.artifact_id)
    assert rebuilt.key_id == kid != info.key_id
    assert rebuilt.content_hash == hashlib.sha256(store.read_raw("acme", info.artifact_id)).hexdigest()
    assert store.get("acme", info.artifact_id) == PAYLOAD


def test_the_description_is_sealed_and_authenticated(store):
    """Only ids, algorithm, key id and nonces are in clear; the sealed description cannot be edited."""
    import base64
    import json

    info = store.put(PAYLOAD, tenant_id="acme", training_client_id="tc-cohort", kind="checkpoint", step=3,
                     name="hiv-cohort-2024-patients", metadata={"dataset_version": "ward-7"})
    path = path_of(store, info)
    data = path.read_bytes()
    header_len = int.from_bytes(data[5:9], "big")
    header = json.loads(data[9:9 + header_len])
    assert set(header) == {"v", "alg", "nonce", "tenant", "artifact_id", "sealed", "sealed_nonce"}
    for secret in (b"hiv-cohort", b"ward-7", b"tc-cohort", b"checkpoint"):
        assert secret not in data and secret not in index_path_of(store, info).read_bytes()
    described = store.info("acme", info.artifact_id)
    assert (described.name, described.metadata, described.training_client_id, described.step) == (
        "hiv-cohort-2024-patients", {"dataset_version": "ward-7"}, "tc-cohort", 3)
    sealed = bytearray(base64.b64decode(header["sealed"]))
    sealed[3] ^= 1
    header["sealed"] = base64.b64encode(bytes(sealed)).decode()
    body = json.dumps(header).encode()
    path.write_bytes(data[:5] + len(body).to_bytes(4, "big") + body + data[9 + header_len:])
    with pytest.raises(ArtifactIntegrityError, match="description .* failed authentication"):
        store.info("acme", info.artifact_id)


def test_every_bit_flipped_in_the_tenant_field_is_an_integrity_error(store, tmp_path):
    """Offline decryption takes the tenant from the header: a flip there must read as tampering (or as a data
    key this store does not hold), not as a bad command-line argument."""
    import io

    from tensafe_trainer.storage import crypto
    info = put(store, payload=b"x" * 100)
    data = path_of(store, info).read_bytes()
    start = data.index(b'"tenant":"acme"') + len(b'"tenant":"')
    for offset in range(start, start + 4):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            with pytest.raises((ArtifactIntegrityError, ArtifactNotFoundError)):
                header, _ = crypto.read_header(io.BytesIO(bytes(flipped)))
                crypto.decrypt_from(io.BytesIO(bytes(flipped)), len(flipped),
                                    crypto.Binding(header["tenant"], "", header["artifact_id"]), store.keys)


def test_files_are_0600_and_folders_0700_and_reads_create_no_folder(store):
    info = put(store)
    for path in (path_of(store, info), index_path_of(store, info)):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (store.root / "acme").stat().st_mode & 0o777 == 0o700
    assert store.root.stat().st_mode & 0o777 == 0o700
    assert store.list("nobody") == []
    with pytest.raises(ArtifactNotFoundError):
        store.info("nobody", info.artifact_id)
    assert not (store.root / "nobody").exists()


def test_reencrypting_rotation_retires_the_old_key_so_a_copy_taken_before_is_dead(store, tmp_path):
    """The insider's backup: a copy of the artifact and of the key set taken before rotation."""
    import shutil

    from tensafe_trainer.storage import crypto
    info = put(store)
    copy = path_of(store, info).read_bytes()
    shutil.copy(tmp_path / "keys" / "acme.json", tmp_path / "keyset-before.json")
    kid, retired = store.rotate("acme", reencrypt=True)
    assert retired == [info.key_id] and kid != info.key_id
    assert store.get("acme", info.artifact_id) == PAYLOAD and store.info("acme", info.artifact_id).key_id == kid
    with open(tmp_path / "keys" / "acme.json") as f:
        assert list(__import__("json").load(f)["keys"]) == [kid]
    path_of(store, info).write_bytes(copy)  # the old copy put back in place
    with pytest.raises(ArtifactIntegrityError, match="re-encrypted"):
        store.get("acme", info.artifact_id)
    with open(path_of(store, info), "rb") as f:  # it is the old copy, refused for want of its data key
        assert crypto.read_header(f)[0]["nonce"] in copy.decode(errors="replace")


def test_reencryption_destroys_no_key_while_an_artifact_cannot_move(store):
    damaged, intact = put(store), put(store)
    path = path_of(store, damaged)
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # its tag: it cannot be decrypted, so it cannot be re-encrypted
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError):
        store.rotate("acme", reencrypt=True)
    assert store.keys.key("acme", damaged.key_id)  # nothing destroyed (a destroyed key raises)
    assert store.get("acme", intact.artifact_id) == PAYLOAD


def test_shredding_removes_keys_files_and_index_entries(store, tmp_path):
    info = store.put(PAYLOAD, tenant_id="acme", training_client_id="tc-1", kind="checkpoint", step=1,
                     name="hiv-cohort-2024-patients")
    copy = path_of(store, info).read_bytes()
    assert store.shred("acme") == 2
    assert not (store.root / "acme").exists() and not (tmp_path / "keys" / "acme.json").exists()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"hiv-cohort" not in path.read_bytes(), path
    private = store.root / "acme"
    private.mkdir()
    (private / f"{info.artifact_id}.tsa").write_bytes(copy)  # a backup restored
    with pytest.raises(ArtifactNotFoundError, match="data key"):
        store.info("acme", info.artifact_id)


def test_an_artifact_renamed_with_its_index_entry_is_refused_not_relisted(store):
    """Renaming both files moves the artifact to another id: its header still names the old one."""
    from tensafe_trainer.storage.artifacts import new_artifact_id

    info = put(store)
    other = new_artifact_id()
    path_of(store, info).rename(store.root / "acme" / f"{other}.tsa")
    index_path_of(store, info).rename(store.root / "acme" / f"{other}.json")
    with pytest.raises(ArtifactIntegrityError, match="renamed, swapped or foreign"):
        store.info("acme", other)
    assert store.list("acme") == []


def test_a_damaged_artifact_is_left_out_of_listings_and_can_be_deleted(store):
    damaged, intact = put(store), put(store)
    path = path_of(store, damaged)
    path.write_bytes(b"XXXX" + path.read_bytes()[4:])
    with pytest.raises(ArtifactIntegrityError):
        store.info("acme", damaged.artifact_id)
    assert [i.artifact_id for i in store.list("acme")] == [intact.artifact_id]
    store.delete("acme", damaged.artifact_id)
    assert not path.exists() and not index_path_of(store, damaged).exists()
    with pytest.raises(ArtifactNotFoundError):
        store.delete("acme", damaged.artifact_id)


def test_deleting_an_artifact_kills_every_earlier_copy_and_only_that_one(store):
    """The insider's backup of the home: a copy of the file taken before ``delete`` never opens again (its data
    key was destroyed in the key store), while the tenant's other artifacts stay readable."""
    doomed, kept = put(store), put(store, os.urandom(500))
    backup = path_of(store, doomed).read_bytes()
    store.delete("acme", doomed.artifact_id)
    path_of(store, doomed).write_bytes(backup)  # put back from the backup
    with pytest.raises(ArtifactNotFoundError, match="data key"):
        store.get("acme", doomed.artifact_id)
    assert [i.artifact_id for i in store.list("acme")] == [kept.artifact_id]  # not listed either
    assert store.get("acme", kept.artifact_id) is not None
    with pytest.raises(ArtifactNotFoundError):  # deleting it again: nothing there to delete
        store.delete("acme", "art-" + "0" * 32)


def test_a_deleted_dataset_does_not_come_back_from_a_restored_file(store):
    from tensafe_trainer.privacy import datasets
    from tg_tinker.types import RegisterDataset

    first = datasets.register(store, RegisterDataset(dataset_id="cohort", tenant_id="acme",
                                                     examples=[{"input_ids": [1, 2, 3]}]))
    backup = (store.root / "acme" / f"{first.artifact_id}.tsa").read_bytes()
    datasets.delete(store, "acme", "cohort")
    (store.root / "acme" / f"{first.artifact_id}.tsa").write_bytes(backup)
    with pytest.raises(ArtifactNotFoundError):
        datasets.describe(store, "acme", "cohort")
    assert datasets.load_examples(store, "acme", "cohort") is None
    again = datasets.register(store, RegisterDataset(dataset_id="cohort", tenant_id="acme",
                                                     examples=[{"input_ids": [7, 8]}, {"input_ids": [9]}]))
    assert again.artifact_id != first.artifact_id
    assert datasets.load_examples(store, "acme", "cohort") == [{"input_ids": [7, 8]}, {"input_ids": [9]}]


def test_rotation_keeps_readable_the_artifacts_of_another_home_on_the_same_key_store(tmp_path):
    """Homes share the per-user key store by default: retiring a KEK must not kill another home's artifacts."""
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_keys.store import LocalKeyProvider

    keys = LocalKeyProvider(tmp_path / "keys")
    here, there = ArtifactStore(tmp_path / "a", keys), ArtifactStore(tmp_path / "b", keys)
    mine, theirs = put(here), put(there, os.urandom(64))
    kid, retired = here.rotate("acme", reencrypt=True)
    assert retired == [mine.key_id]
    assert there.info("acme", theirs.artifact_id).key_id == kid and there.get("acme", theirs.artifact_id)
    assert here.get("acme", mine.artifact_id) == PAYLOAD


def test_a_version_2_file_with_its_data_key_in_the_header_is_read_and_moved_on_reencryption(store):
    """Files written before data keys moved to the key store: an independent writer of the version 2 layout."""
    import base64
    import json
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from tensafe_trainer.storage import crypto
    kid, kek = store.keys.active_key("acme")
    artifact_id, dek, nonce = "art-" + "ab" * 16, os.urandom(32), os.urandom(12)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    header = {"v": 2, "alg": "AES-256-GCM", "nonce": b64(nonce), "tenant": "acme", "artifact_id": artifact_id}
    sealed_nonce = os.urandom(12)
    description = {"kind": "checkpoint", "step": 1, "created_at": 0.0, "training_client": "tc-old", "name": None}
    header["sealed"] = b64(AESGCM(dek).encrypt(sealed_nonce, crypto.canonical_json(description), crypto.canonical_json(
        {"sealed": "description", "tenant": "acme", "artifact_id": artifact_id})))
    header["sealed_nonce"] = b64(sealed_nonce)
    wrap_nonce = os.urandom(12)
    header.update(kid=kid, wrap_nonce=b64(wrap_nonce), wrapped_dek=b64(AESGCM(kek).encrypt(
        wrap_nonce, dek, crypto.canonical_json({"kid": kid, "tenant": "acme", "artifact_id": artifact_id}))))
    aad = crypto.canonical_json({k: v for k, v in header.items() if k not in ("kid", "wrapped_dek", "wrap_nonce")})
    body = json.dumps(header).encode()
    (store.root / "acme").mkdir(mode=0o700, exist_ok=True)
    path = store.root / "acme" / f"{artifact_id}.tsa"
    path.write_bytes(struct.pack(">4sBI", b"TSAF", 2, len(body)) + body + AESGCM(dek).encrypt(nonce, b"old", aad))
    assert store.get("acme", artifact_id) == b"old" and store.owner("acme", artifact_id) == "tc-old"
    store.rotate("acme", reencrypt=True)
    with open(path, "rb") as f:
        assert crypto.read_header(f)[0]["v"] == crypto.VERSION
    assert store.get("acme", artifact_id) == b"old"


def test_a_key_file_written_or_deleted_is_fsynced_with_its_folder(tmp_path, monkeypatch):
    """A power cut must not bring back a key a shred or a deletion destroyed, nor lose one a save wrote."""
    from pathlib import Path

    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_keys.store import LocalKeyProvider

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    keys = LocalKeyProvider(tmp_path / "keys")
    store = ArtifactStore(tmp_path / "artifacts", keys)
    info = put(store, b"x")
    data_keys = tmp_path / "keys" / "artifacts" / "acme"
    [key_file] = data_keys.glob(f"{info.artifact_id}.*.key")
    assert {str(tmp_path / "keys"), str(data_keys)} <= set(synced)  # the folders, after the renames
    for written in (tmp_path / "keys" / "acme.json", key_file):  # each file, under its temporary name
        assert any(Path(p).parent == written.parent and Path(p).name.startswith(f".{written.name}.") for p in synced)
    synced.clear()
    store.delete("acme", info.artifact_id)
    assert str(data_keys) in synced and not key_file.exists()
    synced.clear()
    keys.shred("acme")
    assert str(tmp_path / "keys") in synced and not (tmp_path / "keys" / "acme.json").exists()


def test_a_delete_racing_a_reencrypting_rotation_stays_deleted(store, monkeypatch):
    """The attacker review's race: re-encryption had read the artifact when a delete destroyed its key and file;
    it then wrote it back under a new key. Now the two take the tenant's lock in turn."""
    import threading
    import time

    from tensafe_trainer.storage import crypto
    doomed, kept = put(store, b"secret-weights"), put(store, b"other")
    real = crypto.decrypt_with_description
    deleting: list[threading.Thread] = []

    def decrypt_then_let_a_delete_in(src, size, binding, keys):
        opened = real(src, size, binding, keys)
        if binding.artifact_id == doomed.artifact_id and not deleting:
            deleting.append(threading.Thread(target=store.delete, args=("acme", doomed.artifact_id)))
            deleting[0].start()
            time.sleep(0.3)  # without the lock, the delete finishes here
        return opened

    monkeypatch.setattr(crypto, "decrypt_with_description", decrypt_then_let_a_delete_in)
    store.rotate("acme", reencrypt=True)
    deleting[0].join(timeout=30)
    assert [i.artifact_id for i in store.list("acme")] == [kept.artifact_id]
    with pytest.raises(ArtifactNotFoundError):
        store.get("acme", doomed.artifact_id)


def test_a_save_whose_data_key_cannot_be_stored_fails_and_leaves_no_file(tmp_path):
    """The data key is written beside the payload: if the key store refuses it (here, a key set given on the
    command line, read-only), the save fails and no artifact appears that nothing could ever open."""
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_keys.store import LocalKeyProvider, StaticKeyProvider

    keyset = LocalKeyProvider(tmp_path / "keys").complete("acme")
    store = ArtifactStore(tmp_path / "artifacts", StaticKeyProvider("acme", keyset))
    with pytest.raises(ValidationError, match="read-only"):
        put(store, os.urandom(3 << 20))
    assert list((tmp_path / "artifacts" / "acme").iterdir()) == []


def test_a_delete_racing_a_plain_rotation_stays_deleted(store, monkeypatch):
    """Second attacker review: a plain rotation read a data key, a delete destroyed it, and the rotation wrote it
    back re-wrapped, so a backup of the file opened again. The rotation now re-wraps under the tenant's lock."""
    import threading
    import time

    doomed, kept = put(store, b"secret weights"), put(store, b"other")
    backup = path_of(store, doomed).read_bytes()
    real_put = store.keys.put_artifact_key
    deleting: list[threading.Thread] = []

    def put_after_a_delete_got_in(tenant_id, artifact_id, tag, entry):
        if artifact_id == doomed.artifact_id and not deleting:
            deleting.append(threading.Thread(target=store.delete, args=("acme", doomed.artifact_id)))
            deleting[0].start()
            time.sleep(0.3)  # without the lock, the delete finishes here
        real_put(tenant_id, artifact_id, tag, entry)

    monkeypatch.setattr(store.keys, "put_artifact_key", put_after_a_delete_got_in)
    store.rotate("acme")
    deleting[0].join(timeout=30)
    path_of(store, doomed).write_bytes(backup)  # the insider's copy put back
    assert [i.artifact_id for i in store.list("acme")] == [kept.artifact_id]
    with pytest.raises(ArtifactNotFoundError):
        store.get("acme", doomed.artifact_id)
