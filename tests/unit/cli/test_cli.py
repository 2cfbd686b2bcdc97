"""The command line and the SDK's backend selection fail loudly and clearly."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from tg_tinker import ServiceClient, TGTinkerError, ValidationError


def test_serve_refuses_to_start_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "TENSAFE_AUTH_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "tensafe_trainer", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "TENSAFE_AUTH_TOKEN" in done.stderr


def test_shred_needs_confirmation(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tensafe_trainer", "artifact", "shred", "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--yes" in done.stderr


def test_backend_selection_errors(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="backend must be one of"):
        ServiceClient(backend="carrier-pigeon")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(TGTinkerError, match="no usable Kubernetes configuration"):
        ServiceClient(backend="kubernetes")
    with pytest.raises(ValidationError, match="needs base_url"):
        ServiceClient(backend="remote")


def test_unreachable_trainer_is_a_connection_error():
    from tg_tinker import ConnectionError as TrainerUnreachable

    with ServiceClient(base_url="http://127.0.0.1:9", api_key="x") as service:
        service.transport.retries, service.transport.backoff = 1, 0.01
        with pytest.raises(TrainerUnreachable, match="unreachable after 2 attempts"):
            service.list_training_clients()


# --- Rough edges of the offline tools (insider audit, #26 finding 10): a one-line error, never a traceback --

def tensafe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensafe_trainer", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


@pytest.fixture
def keys_env(tmp_path):
    """An environment whose key sets, home, config and user folders all lie in ``tmp_path``."""
    env = dict(os.environ, HOME=str(tmp_path / "user"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               TENSAFE_HOME=str(tmp_path / "home"), TENSAFE_KEYS_DIR=str(tmp_path / "keys"))
    env.pop("TENSAFE_ARTIFACT_KEYS_DIR", None)
    return env


@pytest.fixture
def keys_in_process(keys_env, monkeypatch):
    """``keys_env`` for this test process too (what it calls in-process finds the same folders)."""
    for name, value in keys_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TENSAFE_ARTIFACT_KEYS_DIR", raising=False)


def a_keyset(tmp_path) -> dict:
    from tensafe_keys.store import LocalKeyProvider

    return LocalKeyProvider(tmp_path / "made").complete("default")


def windows(secret: str, width: int = 8) -> list[str]:
    """Every ``width``-character piece of ``secret``: a message quoting any of it leaks part of the key."""
    return [secret[i:i + width] for i in range(len(secret) - width + 1)]


def test_a_damaged_key_set_file_prints_no_key(tmp_path, keys_env):
    keyset = a_keyset(tmp_path)
    kek = next(iter(keyset["keys"].values()))
    secrets_ = [kek, keyset["audit"], keyset["receipt"]]
    text = json.dumps(keyset, indent=1)
    damaged = {
        # cut short right after the KEK (a partial copy, a full disk): the YAML error quoted that line
        "cut.json": text[:text.index(kek) + len(kek)].encode(),
        "comma.json": text.replace(",", "", 1).encode(),  # one character lost
        "secret.yaml": ("apiVersion: v1\nkind: Secret\ndata:\n  default.json: "
                        + base64.b64encode(text.encode()).decode() + "\n   bad: [indent\n").encode(),
        "binary.json": b"\x00\x9f\xff" + text.encode(),  # neither JSON nor YAML
    }
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        for command in (["audit", "verify", "--keys", str(tmp_path / name)],
                        ["artifact", "decrypt", "art-" + "0" * 32, "--out", str(tmp_path / "out"),
                         "--keys", str(tmp_path / name)]):
            done = tensafe(*command, env=keys_env)
            error = one_line_error(done)
            assert name in error, error
            leaked = [w for s in secrets_ for w in windows(s) if w in done.stderr + done.stdout]
            assert not leaked, (name, command, done.stderr)
            if name == "secret.yaml":  # nor the base64 of the key set a Secret carries
                encoded = base64.b64encode(text.encode()).decode()
                assert not [w for w in windows(encoded, 12) if w in done.stderr], done.stderr
    assert not (tmp_path / "out").exists()
    missing = one_line_error(tensafe("audit", "verify", "--keys", str(tmp_path / "nothere.json"), env=keys_env))
    assert "nothere.json" in missing
    wrong = tmp_path / "wrong.json"  # valid JSON, a KEK that is not 32 bytes: refused at load, not mid-decrypt
    wrong.write_text(json.dumps({**keyset, "keys": {keyset["active"]: base64.b64encode(b"short").decode()}}))
    assert "32-byte" in one_line_error(tensafe("audit", "verify", "--keys", str(wrong), env=keys_env))


def test_exporting_a_dataset_is_refused_in_one_line(tmp_path, keys_env, keys_in_process):
    from tensafe_trainer.cli.admin import open_store

    home = tmp_path / "home"
    home.mkdir()
    store = open_store(home)
    info = store.put(json.dumps([{"text": "a private row"}]).encode(), tenant_id="default",
                     training_client_id="_datasets", kind="dataset", step=0, name="ds-1")
    (tmp_path / "pulled.bin").write_bytes(store.read_raw("default", info.artifact_id))
    for source in (info.artifact_id, str(tmp_path / "pulled.bin")):
        error = one_line_error(tensafe("artifact", "export", source, "--home", str(home), "--out",
                                       str(tmp_path / "adapter"), env=keys_env))
        assert "dataset" in error and "a private row" not in error, error
        assert not (tmp_path / "adapter").exists()
    # decrypt still writes any artifact's contents
    done = tensafe("artifact", "decrypt", info.artifact_id, "--home", str(home), "--out", str(tmp_path / "rows"),
                   env=keys_env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "rows").read_text()) == [{"text": "a private row"}]


def test_read_only_commands_create_no_folder(tmp_path, keys_env):
    def everything() -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}

    before = everything()
    missing = str(tmp_path / "missing")
    for command in (["audit", "verify", "--home", missing], ["audit", "verify"],
                    ["artifact", "list", "--home", missing], ["artifact", "list"],
                    ["artifact", "decrypt", "art-" + "0" * 32, "--home", missing, "--out", str(tmp_path / "o")],
                    ["artifact", "export", "art-" + "0" * 32, "--home", missing, "--out", str(tmp_path / "o")],
                    ["artifact", "rotate", "--home", missing], ["artifact", "shred", "--yes", "--home", missing]):
        one_line_error(tensafe(*command, env=keys_env))
        assert everything() == before, command
    # The same without TENSAFE_KEYS_DIR (keys in the default place): nothing created there either.
    default_keys = {k: v for k, v in keys_env.items() if k != "TENSAFE_KEYS_DIR"}
    one_line_error(tensafe("audit", "verify", "--home", missing, env=default_keys))
    assert everything() == before


def test_an_empty_or_missing_audit_log_does_not_verify(tmp_path, keys_env):
    from tensafe_keys.store import LocalKeyProvider

    LocalKeyProvider(tmp_path / "keys").complete("default")
    log = tmp_path / "home" / "audit" / "default.jsonl"
    log.parent.mkdir(parents=True)
    for content in ("", "\n\n"):
        log.write_text(content)
        error = one_line_error(tensafe("audit", "verify", "--home", str(tmp_path / "home"), env=keys_env))
        assert "nothing to verify" in error, error
        explicit = one_line_error(tensafe("audit", "verify", str(log), env=keys_env))
        assert "nothing to verify" in explicit
    log.unlink()
    assert "nothing to verify" in one_line_error(tensafe("audit", "verify", "--home", str(tmp_path / "home"),
                                                         env=keys_env))


# --- Tinker keys: listed, revoked for good (an old key file put back brings none back), revoked by a shred ---

def key_id(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:16]


def test_tinker_keys_are_listed_and_revoked(tmp_path, keys_env):
    import hashlib

    (tmp_path / "home").mkdir()
    acme = tensafe("tinker-key", "create", "--tenant", "acme", "--name", "laptop\x1b[2J", env=keys_env).stdout.strip()
    other = tensafe("tinker-key", "create", "--tenant", "other", env=keys_env).stdout.strip()
    assert acme.startswith("tml-") and other.startswith("tml-")
    listed = tensafe("tinker-key", "list", env=keys_env)
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[key_id(acme), "acme"], [key_id(other), "other"]]
    assert "laptop?[2J" in lines[0] and "\x1b" not in listed.stdout  # a label prints no control character
    for secret in (acme, other):  # neither a key nor its whole digest
        assert secret not in listed.stdout and hashlib.sha256(secret.encode()).hexdigest() not in listed.stdout
    only = tensafe("tinker-key", "list", "--tenant", "other", env=keys_env).stdout.splitlines()
    assert len(only) == 1 and only[0].startswith(key_id(other))
    assert tensafe("tinker-key", "list", "--tenant", "nobody", env=keys_env).stdout.strip() == \
        "no Tinker keys of tenant nobody"

    keys_file = tmp_path / "home" / "tinker" / "keys.json"
    old_copy = keys_file.read_bytes()
    revoked = tensafe("tinker-key", "revoke", key_id(acme), env=keys_env)
    assert revoked.returncode == 0 and len(revoked.stdout.splitlines()) == 1, revoked.stderr
    assert key_id(acme) in revoked.stdout and "acme" in revoked.stdout and acme not in revoked.stdout
    assert json.loads((tmp_path / "keys" / "revoked.list").read_text()) == \
        [hashlib.sha256(acme.encode()).hexdigest()]  # kept with the key sets, not in the home
    assert [line.split()[0] for line in tensafe("tinker-key", "list", env=keys_env).stdout.splitlines()] == \
        [key_id(other)]
    assert "no Tinker key" in one_line_error(tensafe("tinker-key", "revoke", key_id(acme), env=keys_env))
    for wrong in ("nothex", acme, "0" * 8):
        error = one_line_error(tensafe("tinker-key", "revoke", wrong, env=keys_env))
        assert "not a Tinker key id" in error and acme not in error, error
    keys_file.write_bytes(old_copy)  # an insider puts an old copy back: listed as revoked, revoked once more
    back = tensafe("tinker-key", "list", env=keys_env).stdout.splitlines()
    assert back[0].startswith(key_id(acme)) and back[0].endswith("[REVOKED]") and "[" not in back[1]
    assert tensafe("tinker-key", "revoke", key_id(acme), env=keys_env).returncode == 0
    assert len(json.loads(keys_file.read_text())["keys"]) == 1
    missing = one_line_error(tensafe("tinker-key", "revoke", key_id(other), "--home", str(tmp_path / "none"),
                                     env=keys_env))
    assert "no Tinker key" in missing and not (tmp_path / "none").exists()


def test_a_shred_revokes_the_tenants_tinker_keys(tmp_path, keys_env, keys_in_process):
    from tensafe_trainer.service.tinker.keys import TinkerKeys, create_key
    from tg_tinker import AuthenticationError

    home = tmp_path / "home"
    home.mkdir()
    shredded, kept = create_key(home, "default"), create_key(home, "other")
    old_copy = (home / "tinker" / "keys.json").read_bytes()
    done = tensafe("artifact", "shred", "--yes", "--home", str(home), env=keys_env)
    assert done.returncode == 0, done.stderr
    for _ in range(2):  # after the shred, and with the key file of before it put back
        keys = TinkerKeys(home)
        assert keys.resolve(kept).tenant_id == "other"
        with pytest.raises(AuthenticationError, match="unknown Tinker API key"):
            keys.resolve(shredded)
        (home / "tinker" / "keys.json").write_bytes(old_copy)


def test_receipt_verify_of_a_file_not_utf8_is_one_line(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tg_tinker.receipts import public_key_pem, sign_receipt

    private = Ed25519PrivateKey.generate()
    (tmp_path / "key.pem").write_text(public_key_pem(private))
    (tmp_path / "receipt.json").write_text(json.dumps(sign_receipt({"tenant": "t"}, private)))
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00private-content-\x9c\x80")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "tensafe-receipt.json").write_bytes(b"{\"payload\": \"\xe9\"}")
    for receipt, key in ((tmp_path / "binary", tmp_path / "key.pem"),
                         (tmp_path / "folder", tmp_path / "key.pem"),
                         (tmp_path / "receipt.json", tmp_path / "binary")):
        error = one_line_error(tensafe("receipt", "verify", str(receipt), "--public-key", str(key)))
        bad = receipt if receipt.name != "receipt.json" else key
        assert str(bad) in error and "UTF-8" in error and "private-content" not in error, error
    ok = tensafe("receipt", "verify", str(tmp_path / "receipt.json"), "--public-key", str(tmp_path / "key.pem"))
    assert ok.returncode == 0 and "tenant: t" in ok.stdout, ok.stderr


def test_revocation_survives_a_tenant_named_like_it_and_a_planted_twin(tmp_path):
    """Second attacker review: a tenant named `revoked` shared its key-set file name with the revocation list,
    so shredding it deleted the list; and a planted entry under another tenant with the victim's digest got the
    victim's key revoked by an operator cleaning it up."""
    import json

    from tensafe_trainer.service.tinker.keys import TinkerKeys, create_key, keys_file, revoke_key
    from tg_tinker import AuthenticationError, ValidationError
    from tensafe_keys.store import LocalKeyProvider

    home, store = tmp_path / "home", LocalKeyProvider(tmp_path / "keys")
    home.mkdir()
    gone, kept = create_key(home, "alice", keys=store), create_key(home, "victim", keys=store)
    entries = json.loads(keys_file(home).read_text())["keys"]
    revoke_key(home, entries[0]["digest"][:16], keys=store)
    store.complete("revoked")
    store.shred("revoked")
    keys_file(home).write_text(json.dumps({"keys": entries}))  # the old file put back
    tinker_keys = TinkerKeys(home, keys=store)
    with pytest.raises(AuthenticationError):
        tinker_keys.resolve(gone)
    twin = {**entries[1], "tenant_id": "evil", "mac": "0" * 64}
    keys_file(home).write_text(json.dumps({"keys": entries[1:] + [twin]}))
    with pytest.raises(ValidationError, match="several tenants"):
        revoke_key(home, entries[1]["digest"][:16], keys=store)
    assert TinkerKeys(home, keys=store).resolve(kept).tenant_id == "victim"
