"""HTTPS between the SDK and a trainer: `tensafe serve --tls-cert/--tls-key`, verified by the SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tg_tinker import ConnectionError as TrainerUnreachable
from tg_tinker import ServiceClient

from conftest import random_batch, tiny_config


@pytest.fixture
def https_trainer(tmp_path):
    from tensafe_devcluster.tls import write_serving_certificate

    ca, cert, key = write_serving_certificate(tmp_path / "pki")
    ready = tmp_path / "ready.json"
    env = dict(os.environ, TENSAFE_AUTH_TOKEN="tls-test-token", TENSAFE_HOME=str(tmp_path / "home"))
    process = subprocess.Popen([sys.executable, "-m", "tensafe_trainer", "serve", "--port", "0", "--ready-file",
                                str(ready), "--tls-cert", str(cert), "--tls-key", str(key), "--log-level", "warning"],
                               env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "trainer did not start"
            time.sleep(0.1)
        yield f"https://127.0.0.1:{json.loads(ready.read_text())['port']}", ca
    finally:
        process.terminate()
        process.wait(30)


def test_sdk_trains_over_https_with_the_ca_and_refuses_without_it(https_trainer):
    url, ca = https_trainer
    with ServiceClient(url, "tls-test-token", verify=ca) as service:
        tc = service.create_training_client(tiny_config())
        assert tc.forward_backward(random_batch()).result().loss > 0
    with ServiceClient(url, "tls-test-token") as untrusting:  # system CAs only
        with pytest.raises(TrainerUnreachable, match="does not verify"):
            untrusting.list_training_clients()
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
        httpx.get(url.replace("https", "http") + "/healthz")
