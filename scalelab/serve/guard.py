"""What every HTTP request passes before a route sees it, and the connection-level limits.

:class:`Guard` (ASGI middleware), in order:

- ``Host`` must name this server: the bound address, ``localhost`` on a loopback bind, any IP
  literal on a wildcard bind (``0.0.0.0``/``::``), or a name given with ``allowed_hosts``. A DNS
  rebinding page reaches the server under its own domain name, and is refused here.
- A browser's ``Origin`` must be this server's own, or one of ``cors_origins``: any other web
  page is refused, whatever it sends.
- Under ``/v1/``, a valid API key when keys are set. The key is the caller, for limits and
  memories alike. Without keys, limits go by client address and memories by the
  ``X-Scalelab-User`` header (a client may name any user, so it cannot dodge limits with it).
- A request with a body under ``/v1/`` must say it is JSON: an HTML form or a ``text/plain``
  ``fetch`` (the kinds a browser sends cross-site without asking) is refused.
- The body is counted as it arrives, for every route, whether or not it gave a
  ``Content-Length``. Past ``max_body_bytes`` the rest is read and dropped, up to
  ``DRAIN_FACTOR`` times the limit, before the 413: a client still sending gets its answer,
  not a connection reset.

:class:`HeaderTimeoutH11Protocol` closes connections that do not finish their request headers
in time (uvicorn's own timeout only covers idle keep-alive connections).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from urllib.parse import urlsplit

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from scalelab.errors import ScalelabError
from scalelab.serve.memory import LOCAL_USER, OWNER_SCOPE_KEY

CALLER_SCOPE_KEY = "scalelab.caller"  # who the per-caller limits and fair scheduling count
from scalelab.serve.protocol import APIError

DEFAULT_MAX_BODY_BYTES = 1 << 20
DRAIN_FACTOR = 8
DEFAULT_HEADER_TIMEOUT_S = 10.0
USER_HEADER = b"x-scalelab-user"
_USER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
WILDCARD_BINDS = {"0.0.0.0", "::", ""}


class BodyTooLarge(APIError):
    def __init__(self, limit: int, unread: bool = False):
        # a body still coming in past the drain cap: the connection closes after the answer, or the server
        # would go on reading (and dropping) whatever the client sends
        super().__init__(413, f"request body is larger than the server's limit of {limit} bytes", code="body_too_large",
                         headers={"Connection": "close"} if unread else None)


def check_api_keys(keys: list[str]) -> list[str]:
    """Keys as HTTP carries them: printable ASCII (a header cannot hold other text portably)."""
    for k in keys:
        if not k or not k.isascii() or not k.isprintable() or k != k.strip():
            raise ScalelabError("an API key must be non-empty printable ASCII without surrounding spaces "
                                "(HTTP headers carry nothing else)")
    return keys


def key_owner(key: str) -> str:
    # memories are filed under a digest: the key itself never lands in the database
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _host_name(host: str) -> str:
    """'Host' or bind address without port or IPv6 brackets, lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def trusted_hosts(bind: str, extra: list[str] | None = None) -> tuple[set[str], bool]:
    """(names a Host header may carry, whether any IP literal is also fine) for a server bound at ``bind``."""
    names = {_host_name(h) for h in (extra or [])}
    bind = _host_name(bind)
    if bind in WILDCARD_BINDS:
        return names | {"localhost"}, True
    names.add(bind)
    if bind == "localhost" or (_is_ip(bind) and ipaddress.ip_address(bind).is_loopback):
        names |= {"localhost", "127.0.0.1", "::1"}
    return names, False


async def drain(receive, more: bool, seen: int, cap: int) -> bool:
    """Read and drop what is left of a body, up to ``cap`` bytes in all; whether some is left unread."""
    while more and seen <= cap:
        msg = await receive()
        if msg["type"] != "http.request":
            return False
        seen += len(msg.get("body", b""))
        more = msg.get("more_body", False)
    return more


class Guard:
    def __init__(self, app, api_keys: list[str], max_body_bytes: int, bind: str = "127.0.0.1",
                 allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None, on_reject=None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.keys = [(f"Bearer {k}".encode(), key_owner(k)) for k in check_api_keys(list(api_keys))]
        self.hosts, self.any_ip = trusted_hosts(bind, allowed_hosts)
        self.cors_origins = {o.rstrip("/").lower() for o in (cors_origins or [])}
        self.on_reject = on_reject or (lambda reason: None)

    def _check(self, scope, headers: dict) -> APIError | None:
        host = headers.get(b"host", b"").decode("latin-1")
        name = _host_name(host)
        if not host or not (name in self.hosts or (self.any_ip and _is_ip(name))):
            return APIError(421, f"this server does not answer to the host {host!r} (see --allowed-host)",
                            code="untrusted_host")
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        if origin and origin not in self.cors_origins and urlsplit(origin).netloc != host.lower():
            return APIError(403, f"requests from the web origin {origin!r} are not allowed (see --cors-origin)",
                            code="cross_origin")
        if not scope["path"].startswith("/v1/"):
            return None
        given = headers.get(b"authorization", b"")
        if self.keys:
            owner = None
            for expected, who in self.keys:  # every key compared: the time taken says nothing of which matched
                if hmac.compare_digest(given, expected):
                    owner = who
            if owner is None:
                return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        else:
            user = headers.get(USER_HEADER, b"").decode("latin-1")
            if user and not _USER_ID.fullmatch(user):
                return APIError(400, "X-Scalelab-User must be 1-64 letters, digits or _.@-", code="invalid_user")
            owner = user or LOCAL_USER
        scope[OWNER_SCOPE_KEY] = owner
        scope[CALLER_SCOPE_KEY] = owner if self.keys else "client-" + (scope.get("client") or ("?",))[0]
        if scope["method"] in _BODY_METHODS:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, "send the request body as JSON, with 'Content-Type: application/json'",
                                code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit, cap = self.max_body_bytes, self.max_body_bytes * DRAIN_FACTOR
        err = self._check(scope, headers)
        length = headers.get(b"content-length", b"")
        if err is None and length.isdigit() and int(length) > limit:
            unread = int(length) > cap or await drain(receive, True, 0, cap)
            err = BodyTooLarge(limit, unread)
        if err is not None:
            self.on_reject(err.code)
            await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    unread = await drain(receive, msg.get("more_body", False), seen, cap)
                    self.on_reject("body_too_large")
                    raise BodyTooLarge(limit, unread)
            return msg

        await self.app(scope, counted_receive, send)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    ``header_timeout`` seconds after it opened or after its last response (slow-header clients)."""

    header_timeout = DEFAULT_HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        old = getattr(self, "_header_timer", None)
        if old is not None:
            old.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _header_deadline(self) -> None:
        # IDLE on their side: the next request's headers have not all arrived (or nothing has)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type:
    return type("HeaderTimeoutH11", (HeaderTimeoutH11Protocol,), {"header_timeout": seconds})
