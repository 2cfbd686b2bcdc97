"""One mapping from TenSafe's errors to HTTP answers, for both doors and for the Gate before either.

Both doors answer ``{"error": {"type", "message", "details"}}``; the Tinker wire adds ``detail`` (what its SDK
prints) and never uses a status its SDK retries for minutes (408, 409, 429, 5xx) for a refusal that will not
change: TenSafe's 409s (a client in ERROR, a spent budget) become 400 there.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi.responses import JSONResponse

from tg_tinker.errors import (
    ArtifactNotFoundError,
    AuthenticationError,
    ClientFailedError,
    DPBudgetExceededError,
    PermissionDeniedError,
    TGTinkerError,
    TrainingClientNotFoundError,
    ValidationError,
)

from tensafe_trainer.api.tinker import PREFIX as TINKER_PREFIX

# Errors the caller made (the Tinker wire's "user" category); everything else is the server's.
USER_ERRORS = (ValidationError, DPBudgetExceededError, ArtifactNotFoundError, PermissionDeniedError,
               TrainingClientNotFoundError, ClientFailedError)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a caller's string echoed in an answer (a lone surrogate in an
    id, say) can never make the answer itself fail to encode (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def on_tinker_wire(path: str) -> bool:
    """A request to the Tinker wire: authenticated by a Tinker key (the Gate) and answered the Tinker way."""
    return path.startswith(TINKER_PREFIX + "/")


def status_of(error: TGTinkerError, path: str, status: Optional[int] = None) -> int:
    """``status``: the one a framework already chose (Starlette's 404 for an unknown path, say)."""
    status = status or error.http_status
    if not on_tinker_wire(path):
        return status
    if status == 409:
        return 400
    if isinstance(error, AuthenticationError) and not isinstance(error, PermissionDeniedError):
        return 401
    return status


def answer(error: TGTinkerError, path: str, headers: Optional[dict] = None,
           status: Optional[int] = None) -> JSONResponse:
    body = {"error": error.to_wire()}
    if on_tinker_wire(path):
        body["detail"] = error.message
    return AsciiJSONResponse(body, status_code=status_of(error, path, status), headers=headers)


def category(error: BaseException) -> str:
    """A failed Tinker future's category: "user" for what the caller can fix, "server" for the rest."""
    return "user" if isinstance(error, USER_ERRORS) else "server"
