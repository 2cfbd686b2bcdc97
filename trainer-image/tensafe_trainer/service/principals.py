"""Who a request is from, whichever door it came through: one type for the trainer's own token, a client's token
(``/v1``) and a tenant's Tinker key (``/api/v1``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from tg_tinker.errors import PermissionDeniedError
from tg_tinker.types import ArtifactInfo


class Scope(str, enum.Enum):
    TRAINER = "trainer"  # the trainer's own token: every tenant, every client
    CLIENT = "client"  # one client instance's token: that client, its artifacts, its tenant's reads it may make
    TINKER_KEY = "tinker_key"  # a tenant's Tinker key: that tenant, on the Tinker wire only


@dataclass(frozen=True, eq=False)  # identity, not value: a refusal budget is kept per principal object (api/gate.py)
class Principal:
    scope: Scope
    tenant_id: Optional[str] = None  # None: every tenant (the trainer's token)
    client_id: Optional[str] = None  # a client's token: its client
    session: Any = field(default=None, repr=False)  # a client's token: the one client instance it was issued for
    key_id: Optional[str] = None  # a Tinker key: its digest's first 16 hex digits (names it, opens nothing)
    name: str = ""  # a Tinker key's name, as its creator gave it

    @classmethod
    def trainer(cls) -> "Principal":
        return cls(Scope.TRAINER)

    @classmethod
    def client(cls, session) -> "Principal":
        return cls(Scope.CLIENT, session.tenant_id, session.client_id, session)

    @classmethod
    def tinker_key(cls, key_id: str, tenant_id: str, name: str = "") -> "Principal":
        return cls(Scope.TINKER_KEY, tenant_id, key_id=key_id, name=name)

    @property
    def is_trainer(self) -> bool:
        return self.scope is Scope.TRAINER

    @property
    def meter(self) -> Any:
        """What this principal's refusals are counted against: its client instance, or its key; the trainer's
        own token is not metered."""
        return None if self.is_trainer else self.session if self.scope is Scope.CLIENT else self

    def check(self, client_id: Optional[str]) -> None:
        """May act on client ``client_id`` (a client's token: its own only; a Tinker key: no /v1 client)."""
        if self.scope is Scope.TINKER_KEY:
            raise PermissionDeniedError("a Tinker key opens nothing on TenSafe's own API")
        if self.scope is Scope.CLIENT and client_id != self.client_id:
            raise PermissionDeniedError(f"this token belongs to training client {self.client_id!r}; it cannot use "
                                        f"{client_id or 'other clients'!r}")

    def check_tenant(self, tenant_id: str) -> None:
        if not self.is_trainer and tenant_id != self.tenant_id:
            raise PermissionDeniedError(f"this credential belongs to tenant {self.tenant_id!r}; it cannot reach "
                                        f"tenant {tenant_id!r}", {"tenant_id": tenant_id})

    def check_artifact(self, info: ArtifactInfo, granted: frozenset[str] | set[str] = frozenset()) -> None:
        """A client's token reaches its own client's artifacts, and those granted to it; the trainer's token
        reaches every one."""
        self.check_tenant(info.tenant_id)
        if self.scope is Scope.TINKER_KEY:
            return  # the Tinker wire: a key's tenant's checkpoints are its own
        if self.scope is Scope.CLIENT and info.training_client_id != self.client_id \
                and info.artifact_id not in granted:
            raise PermissionDeniedError(
                f"artifact {info.artifact_id} belongs to another training client: the token of client "
                f"{self.client_id!r} opens its own artifacts only; use the trainer's own token to load, sample "
                "or download another client's artifact, or grant it to this client with "
                "ServiceClient.grant_artifact", {"artifact_id": info.artifact_id})

    def visible(self, training_client_id: Optional[str]) -> Optional[str]:
        """The client filter of a listing: a client's token sees its own client only, whatever it asked."""
        if self.is_trainer:
            return training_client_id
        self.check(training_client_id or self.client_id)
        return self.client_id
