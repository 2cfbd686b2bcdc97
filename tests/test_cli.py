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


def a_keyset(tmp_path) -> dict:
    from tg_tinker.keys import LocalKeyProvider

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


def test_exporting_a_dataset_is_refused_in_one_line(tmp_path, keys_env, monkeypatch):
    for name, value in keys_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TENSAFE_ARTIFACT_KEYS_DIR", raising=False)
    from tensafe_trainer.admin import open_store

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
    from tg_tinker.keys import LocalKeyProvider

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
