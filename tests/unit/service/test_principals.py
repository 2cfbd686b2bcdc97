"""One principal type for the trainer's token, a client's token and a Tinker key (service/principals.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tensafe_trainer.service.principals import Principal, Scope
from tg_tinker.errors import PermissionDeniedError
from tg_tinker.types import ArtifactInfo


def artifact(tenant: str, client: str) -> ArtifactInfo:
    return ArtifactInfo(artifact_id="art-1", tenant_id=tenant, training_client_id=client, kind="checkpoint", step=1,
                        created_at=0.0, size_bytes=1, content_hash="0" * 64, key_id="k")


def test_the_trainers_token_reaches_everything_and_is_not_metered():
    trainer = Principal.trainer()
    trainer.check("any-client")
    trainer.check_tenant("any-tenant")
    trainer.check_artifact(artifact("acme", "c1"))
    assert trainer.visible(None) is None and trainer.meter is None


def test_a_clients_token_reaches_its_client_and_its_tenant_only():
    session = SimpleNamespace(client_id="c1", tenant_id="acme")
    client = Principal.client(session)
    assert client.scope is Scope.CLIENT and client.meter is session
    client.check("c1")
    with pytest.raises(PermissionDeniedError):
        client.check("c2")
    with pytest.raises(PermissionDeniedError):
        client.check_tenant("other")
    with pytest.raises(PermissionDeniedError):
        client.check_artifact(artifact("acme", "c2"))
    client.check_artifact(artifact("acme", "c2"), granted={"art-1"})
    assert client.visible(None) == "c1"


def test_a_tinker_key_reaches_its_tenant_and_no_v1_client():
    key = Principal.tinker_key("0123456789abcdef", "acme", "ci")
    assert key.meter is key and not key.is_trainer
    key.check_tenant("acme")
    key.check_artifact(artifact("acme", "tk-x"))
    for reach in (lambda: key.check("c1"), lambda: key.check(None), lambda: key.check_tenant("other"),
                  lambda: key.check_artifact(artifact("other", "tk-x")), lambda: key.visible(None)):
        with pytest.raises(PermissionDeniedError):
            reach()


def test_principals_are_told_apart_by_identity_so_each_keeps_its_own_refusal_budget():
    a, b = Principal.tinker_key("k", "acme"), Principal.tinker_key("k", "acme")
    assert a != b and len({a, b}) == 2
