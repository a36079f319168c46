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
  ``Content-Length``. Past ``max_body_bytes`` the answer is a 413 at once, and the connection
  stays open: uvicorn reads and drops the rest of the body (it never stores it), so a client that
  sends its whole body before it reads (httpx, requests) still gets its 413, not a reset.
- The body must arrive in full within ``body_timeout`` seconds of the headers, else a 408 and
  the connection closes (a client trickling its body a byte at a time holds nothing for long).

:class:`TimedH11Protocol` sets the deadlines the ASGI app cannot see: a connection must send its
request headers within ``header_timeout`` seconds (uvicorn's own keep-alive timeout is cancelled
by every byte that arrives, so a slow-header client never meets it), and the dropped rest of a
refused body must end within ``drain_timeout`` seconds of the answer; past either deadline the
connection is closed.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import ipaddress
import re
import struct
import termios
from urllib.parse import urlsplit

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from scalelab.errors import ScalelabError
from scalelab.serve.memory import LOCAL_USER, OWNER_SCOPE_KEY
from scalelab.serve.protocol import APIError

CALLER_SCOPE_KEY = "scalelab.caller"  # who the per-caller limits and fair scheduling count
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
USER_HEADER = b"x-scalelab-user"
_USER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
WILDCARD_BINDS = {"0.0.0.0", "::", ""}


class BodyTooLarge(APIError):
    def __init__(self, limit: int, close: bool = False):
        # no 'Connection: close': uvicorn then reads and drops the rest of the body (TimedH11Protocol bounds
        # how long), and the client reads this answer once it has sent it all; a close would reset it.
        # ``close``: a client waiting for '100 Continue' sends no body after this answer, so none can be
        # drained, and the connection cannot carry another request
        super().__init__(413, f"request body is larger than the server's limit of {limit} bytes", code="body_too_large",
                         headers={"Connection": "close"} if close else None)


class BodyTimeout(APIError):
    def __init__(self, seconds: float):
        # the rest of a trickled body is not worth reading: the connection closes after the answer
        super().__init__(408, f"the request body did not arrive in full within {seconds:g} s", code="body_timeout",
                         headers={"Connection": "close"})


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


class Guard:
    def __init__(self, app, api_keys: list[str], max_body_bytes: int, bind: str = "127.0.0.1",
                 allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None, on_reject=None,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S):
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
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
        limit = self.max_body_bytes
        err = self._check(scope, headers)
        length = headers.get(b"content-length", b"")
        if err is None and length.isdigit() and int(length) > limit:
            err = BodyTooLarge(limit, close=headers.get(b"expect", b"").lower() == b"100-continue")
        if err is not None:
            self.on_reject(err.code)
            await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
            return
        seen, body_done = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def counted_receive():
            nonlocal seen, body_done
            if body_done:  # after the body the app only listens for a disconnect, which may take any time
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                self.on_reject("body_timeout")
                raise BodyTimeout(self.body_timeout) from None
            if msg["type"] != "http.request":
                body_done = True
                return msg
            seen += len(msg.get("body", b""))
            body_done = not msg.get("more_body", False)
            if seen > limit:
                self.on_reject("body_too_large")
                raise BodyTooLarge(limit)
            return msg

        await self.app(scope, counted_receive, send)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two deadlines, each closing the connection when it passes:
    ``header_timeout`` seconds for a request's headers (from the connection's start, or from the
    end of its last exchange), and ``drain_timeout`` seconds for the rest of a body the server has
    answered already (a 413) and reads only to drop it."""

    header_timeout = DEFAULT_HEADER_TIMEOUT_S
    drain_timeout = DEFAULT_DRAIN_TIMEOUT_S
    _phase: str | None = None
    _timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._follow_phase()

    def handle_events(self) -> None:
        super().handle_events()
        self._follow_phase()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_phase()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _current_phase(self) -> str | None:
        if self.conn.their_state is h11.IDLE:
            return "headers"  # the next request's headers have not all arrived (or nothing has)
        if self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
            return "drain"  # answered before its body ended: uvicorn drops what still arrives
        return None  # a request being answered: the app's own limits apply

    def _follow_phase(self) -> None:
        phase = None if self.transport.is_closing() else self._current_phase()
        if phase == self._phase:
            return  # a deadline runs from the start of its phase, not from the last byte
        self._phase = phase
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if phase is not None:
            seconds = self.header_timeout if phase == "headers" else self.drain_timeout
            self._timer = self.loop.call_later(seconds, self._deadline, phase)

    def _deadline(self, phase: str) -> None:
        if self._current_phase() != phase or self.transport.is_closing():
            return
        if phase == "headers" and self._bytes_waiting():
            # the next request is here but not read yet (a busy loop): closing now would fail it mid-flight
            self._timer = self.loop.call_later(0.1, self._deadline, phase)
            return
        self.transport.close()

    def timeout_keep_alive_handler(self) -> None:
        # uvicorn's idle keep-alive close has the same race: a client reusing the connection just then
        # would see its request fail
        if self._bytes_waiting():
            self.timeout_keep_alive_task = self.loop.call_later(0.1, self.timeout_keep_alive_handler)
            return
        super().timeout_keep_alive_handler()

    def _bytes_waiting(self) -> int:
        """Bytes the client has sent that the event loop has not read yet."""
        try:
            sock = self.transport.get_extra_info("socket")
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except (AttributeError, OSError, ValueError):
            return 0


def timed_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                   drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S) -> type:
    """The protocol class to pass as uvicorn's ``http``, with these deadlines."""
    return type("TimedH11", (TimedH11Protocol,), {"header_timeout": header_timeout, "drain_timeout": drain_timeout})
