"""HTTP transport to a trainer: bearer auth, retries with backoff, errors mapped to TenSafe types.

Every request is safe to retry: reads are idempotent, and submissions carry an idempotency key that
the trainer uses to return the operation it already created instead of running it twice.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from typing import Any, Optional, Union

import httpx

from .errors import AuthenticationError, ConnectionError, TGTinkerError, error_from_wire

RETRY_STATUSES = {502, 503, 504}
JSON_CONTENT = {"content-type": "application/json"}
Verify = Union[bool, str, os.PathLike, ssl.SSLContext]


def tls_context(verify: Verify) -> Union[bool, ssl.SSLContext]:
    """``verify`` as httpx takes it: a CA bundle path (or PEM text) becomes an SSL context."""
    if isinstance(verify, (bool, ssl.SSLContext)):
        return verify
    text = os.fspath(verify)
    if "-----BEGIN CERTIFICATE-----" in text:
        return ssl.create_default_context(cadata=text)
    return ssl.create_default_context(cafile=text)


class Transport:
    def __init__(self, base_url: str, token: Optional[str], *, timeout: float = 30.0, retries: int = 5,
                 backoff: float = 0.2, verify: Verify = True, server_name: Optional[str] = None):
        """``verify``: True (system CAs), False, a CA bundle path or PEM text, or an SSL context.
        ``server_name``: the name the certificate must carry when ``base_url`` is an address (a pod IP)."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # TCP_NODELAY: without it Nagle holds the request body behind the headers until the server's
        # delayed ACK (40 ms), which capped every call at ~20 per second.
        transport = httpx.HTTPTransport(verify=tls_context(verify),
                                        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self.retries, self.backoff = retries, backoff
        self._extensions = {"sni_hostname": server_name} if server_name else None

    def use_token(self, token: Optional[str]) -> None:
        """Present ``token`` from now on (requests already on their way keep the old one)."""
        self.token = token
        if token:
            self._client.headers["authorization"] = f"Bearer {token}"
        else:
            self._client.headers.pop("authorization", None)

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @property
    def closed(self) -> bool:
        """True once ``close`` was called."""
        return self._client.is_closed

    def request(self, method: str, path: str, *, json: Any = None, content: Optional[bytes] = None,
                params: Optional[dict] = None, timeout: Optional[float] = None, raw: bool = False) -> Any:
        """``json``: a body to encode; ``content``: a body already encoded as JSON."""
        attempt = 0
        while True:
            try:
                kwargs = {"json": json, "params": params, "extensions": self._extensions}
                if content is not None:
                    kwargs.update(content=content, headers=JSON_CONTENT)
                if timeout is not None:
                    kwargs["timeout"] = timeout
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):  # retrying cannot help
                    raise ConnectionError(f"the trainer at {self.base_url} presented a certificate that does not "
                                          f"verify: {exc}", {"url": self.base_url}) from None
                if attempt >= self.retries:
                    raise ConnectionError(
                        f"trainer at {self.base_url} unreachable after {attempt + 1} attempts: "
                        f"{type(exc).__name__}: {exc}", {"url": self.base_url}) from None
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    return self._decode(response, raw)
            attempt += 1
            time.sleep(self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))

    @staticmethod
    def _decode(response: httpx.Response, raw: bool) -> Any:
        if response.status_code < 400:
            return response.content if raw else response.json()
        try:
            payload = response.json().get("error")
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            raise error_from_wire(payload)
        if response.status_code == 401:
            raise AuthenticationError("the trainer refused the request's credentials")
        raise TGTinkerError(f"trainer answered HTTP {response.status_code}: {response.text[:300]}",
                            {"status_code": response.status_code})
