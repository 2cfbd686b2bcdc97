"""Schemathesis fuzzes the trainer's OpenAPI schema: no request may produce a 5xx or take the server down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tg_tinker import ClientStatus, ServiceClient

from conftest import random_batch, tiny_config


def test_fuzzing_the_api_finds_no_server_error(tmp_path):
    schemathesis = Path(sys.executable).parent / "schemathesis"
    with ServiceClient(home=tmp_path / "home") as service:
        tc = service.create_training_client(tiny_config())
        config = tmp_path / "schemathesis.toml"
        # Aim the client-scoped operations at a real client, so the queue's own validation is reached.
        config.write_text(f'[[operations]]\ninclude-path-regex = "^/v1/clients/"\n'
                          f'parameters = {{ client_id = "{tc.id}" }}\n')
        schema = tmp_path / "openapi.json"  # the schema itself needs the token: fetched, then given as a file
        schema.write_text(json.dumps(service.transport.request("GET", "/openapi.json")))
        command = [str(schemathesis), "--config-file", str(config), "run", str(schema), "--url", service.base_url,
                   "-H", f"Authorization: Bearer {service.transport.token}", "--checks", "not_a_server_error",
                   "-n", "40", "--seed", "1", "--request-timeout", "60",
                   # creating clients would start an engine process per generated body; DELETE would end ours
                   "--exclude-path", "/v1/training_clients", "--exclude-path", "/v1/sampling_clients",
                   "--exclude-method", "DELETE"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        assert "passed" in run.stdout
        assert service.transport.request("GET", "/healthz") == {"status": "ok"}
        assert tc.refresh().status in (ClientStatus.READY, ClientStatus.BUSY)
        tc.close()  # the fuzzer may have queued minutes of valid sampling work: drop it, don't wait for it
        after = service.create_training_client(tiny_config())
        assert after.forward_backward(random_batch()).result(timeout=120).tokens_processed == 60
