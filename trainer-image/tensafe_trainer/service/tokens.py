"""Bearer tokens: which principal a token names, and what a revoked one hears.

The trainer's own token is compared in constant time; a client's token is looked up by its SHA-256 in the
service's token map, and opens only the client instance it was issued for.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
from typing import Optional

from tg_tinker.errors import AuthenticationError

from tensafe_trainer.service.principals import Principal


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class RevokedTokens:
    """The digests of the latest revoked tokens, each with why: what such a token hears (bounded)."""

    def __init__(self, capacity: int = 10_000):
        self.capacity = capacity
        self._why: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    def remember(self, digest: bytes, why: str) -> None:
        self._why[digest] = why
        while len(self._why) > self.capacity:
            self._why.popitem(last=False)

    def why(self, digest: bytes) -> Optional[str]:
        return self._why.get(digest)


def replaced(client_id: str) -> str:
    """What a token of a client replaced under the same id hears."""
    return f"this token belonged to an earlier client {client_id!r}, since replaced: it opens nothing any more"


def terminated(client_id: str) -> str:
    """What a token of a terminated client hears."""
    return f"this token's client {client_id!r} was terminated: it opens nothing any more"


def resolve(state, admin_token: Optional[str], header: str) -> Principal:
    """The principal an ``Authorization`` header names; AuthenticationError if none. A client's token
    opens only the client instance it was issued for: once that client is terminated, or replaced by a
    new one under the same id (perhaps another tenant's), the token is revoked for good."""
    if admin_token is None:
        return Principal.trainer()
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationError("missing or wrong bearer token for this trainer")
    if hmac.compare_digest(presented.encode(), admin_token.encode()):
        return Principal.trainer()
    digest = token_digest(presented)  # a lookup by SHA-256: what timing can leak is about the hash
    principal = state.client_tokens.get(digest) if state is not None else None
    if principal is None:
        raise AuthenticationError((state.revoked.why(digest) if state is not None else None)
                                  or "missing or wrong bearer token for this trainer")
    if state.sessions.get(principal.client_id) is not principal.session:
        why = replaced(principal.client_id)
    elif principal.session.terminated:
        why = terminated(principal.client_id)
    else:
        return principal
    state.revoke(principal.session, why)  # normally done when it happened; this is the backstop
    raise AuthenticationError(why)
