"""The optional token: Bearer header or session cookie, and the login page.
"""
import hashlib
import hmac
import ipaddress
import logging
import time
from typing import Any, Callable

from duoclass.serve.metrics import Metrics
from duoclass.serve.requests import RequestError, _content_length
from duoclass.serve.settings import ServeSettings

log = logging.getLogger("duoclass")
COOKIE = "duoclass_session"


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})

def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _session_value(token: str) -> str:
    """The cookie the web page gets after logging in: a digest of the token, not the token itself."""
    return hashlib.sha256(("duoclass-session:" + token).encode("utf-8")).hexdigest()


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>duoclass: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 28rem; margin: 4rem auto">
<h1>duoclass</h1>
<p>This server wants its API token (the value of <code>--token</code> or <code>$DUOCLASS_TOKEN</code>).</p>
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label>Token <input id="token" name="token" type="password" autocomplete="current-password" required autofocus></label>
<button id="login" type="submit">Log in</button>
</form>
<p style="color: #b00020">{message}</p>
</body></html>
"""


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class _Guard:
    """Outermost ASGI layer: request body limit, API token, in-flight limit, request counts and latency."""

    OPEN = ("/healthz",)  # no token needed
    UNCOUNTED = ("/healthz", "/metrics")  # not limited by max_in_flight: probes must get through under load

    def __init__(self, app: Any, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.in_flight = 0
        self.token = settings.token.encode("utf-8") if settings.token else None
        self.session = _session_value(settings.token).encode() if settings.token else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.responses import HTMLResponse, JSONResponse

        t0 = time.perf_counter()
        status = [0]
        path = scope.get("path", "")

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        async def reject(status_code: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
            self.metrics(self.metrics.errors.inc, kind)
            await JSONResponse({"error": message}, status_code=status_code, headers=headers)(scope, receive, send_wrapped)

        counted = path not in self.UNCOUNTED
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if self.token is not None and path not in self.OPEN and not (path == "/login" and scope["method"] == "POST"):
                problem = self._auth_problem(headers)
                if problem:
                    if scope["method"] == "GET" and "text/html" in headers.get("accept", "") and path in ("/", "/docs"):
                        self.metrics(self.metrics.errors.inc, "unauthorized")
                        page = LOGIN_PAGE.format(next=path, message="")
                        await HTMLResponse(page, status_code=401, headers={"Cache-Control": "no-store"})(
                            scope, receive, send_wrapped)
                    else:
                        await reject(401, problem, "unauthorized", {"WWW-Authenticate": "Bearer"})
                    return
            length = _content_length(headers.get("content-length"))
            if length is not None and length > self.settings.max_body_bytes:
                await reject(413, f"request body of {length:,} bytes; at most {self.settings.max_body_bytes:,} "
                                  "(--max-body-bytes)", "too_large")
                return
            if counted and self.in_flight >= self.settings.max_in_flight:
                await reject(429, f"{self.in_flight} requests in flight (--max-in-flight {self.settings.max_in_flight}); "
                                  "retry after 1 s", "too_many_requests", {"Retry-After": "1"})
                return
            if counted:
                self.in_flight += 1
                self.metrics(self.metrics.in_flight.set, value=self.in_flight)
            try:
                await self.app(scope, self._limited(receive), send_wrapped)
            finally:
                if counted:
                    self.in_flight -= 1
                    self.metrics(self.metrics.in_flight.set, value=self.in_flight)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            seconds = time.perf_counter() - t0
            with self.metrics._lock:
                method = scope.get("method", "?")  # the client names it: a label only for the methods HTTP has
                method = method if method in KNOWN_METHODS else "other"
                self.metrics.requests.inc(method, route, str(status[0] or 500))
                self.metrics.latency.observe(route, value=seconds)

    def _auth_problem(self, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return "the Authorization header must be `Bearer TOKEN`"
            if hmac.compare_digest(value.strip().encode("utf-8"), self.token):  # type: ignore[arg-type]
                return None
            return "wrong API token; send the server's --token (or $DUOCLASS_TOKEN) as `Authorization: Bearer TOKEN`"
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == COOKIE and hmac.compare_digest(v.encode("latin-1"), self.session):  # type: ignore[arg-type]
                return None
        return "missing API token: send `Authorization: Bearer TOKEN` (this server was started with --token or " \
               "$DUOCLASS_TOKEN)"

    def _limited(self, receive: Callable) -> Callable:
        """receive() that counts body bytes and stops past max_body_bytes (a body without Content-Length)."""
        limit, seen = self.settings.max_body_bytes, [0]

        async def wrapped() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise RequestError(413, f"request body over {limit:,} bytes (--max-body-bytes)", "too_large")
            return message

        return wrapped
