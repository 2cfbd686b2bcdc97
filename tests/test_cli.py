"""The command line and the SDK's backend selection fail loudly and clearly."""

from __future__ import annotations

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
