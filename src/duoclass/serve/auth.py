"""The guard in front of every route: Host allow-list, the optional token (Bearer header or log-in session),
log-in sessions and their rate limit, request counts and limits, HEAD on GET routes, and the login page.
"""
import asyncio
import collections
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from typing import Any, Callable

from duoclass.serve.metrics import Metrics
from duoclass.serve.requests import RequestError, _content_length
from duoclass.serve.settings import ServeSettings

log = logging.getLogger("duoclass")
COOKIE = "duoclass_session"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
LOGIN_PATHS = ("/login", "/logout")
LOGIN_BODY_BYTES = 4096  # the log-in form: a token and a page to go back to
LOGIN_IN_FLIGHT = 8  # log-ins handled at once; they never take a place among --max-in-flight
LOGIN_PAGES = ("/", "/docs", "/redoc")  # a browser asking for these without a session gets the log-in form


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a Host header, lower case, without port, brackets or a trailing dot."""
    h = header.strip().lower()
    if h.startswith("["):  # [::1]:8000
        return h[1:].partition("]")[0]
    name, colon, port = h.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        h = name
    return h.rstrip(".")


class HostCheck:
    """Which Host headers the server answers. An IP address is always answered: a DNS-rebinding page reaches the
    server through a name of its own, which its requests carry as Host, never through an address. Names must be
    loopback names, the name the server was bound to, or one given with --allowed-host (`*`: any)."""

    def __init__(self, settings: ServeSettings):
        extra = {h for h in settings.allowed_host.split(",") if h}
        self.any = "*" in extra
        self.names = LOOPBACK_NAMES | {host_name(h) for h in extra - {"*"}}
        bound = host_name(settings.host)
        if bound and not _is_ip(bound):
            self.names = self.names | {bound}

    def allowed(self, header: str | None) -> bool:
        if self.any or header is None:  # no Host at all: not a browser, so not a rebinding page
            return True
        h = host_name(header)
        return h in self.names or _is_ip(h)


class Sessions:
    """Log-in sessions of the web page. The cookie is `id.expiry.signature`, the signature an HMAC-SHA256 of
    `id.expiry` under a key drawn at random when the server starts (so a restart logs everyone out); it never
    holds or derives from the token. Log-out revokes the id until it would have expired. Failed log-ins are
    limited per client address (--login-attempts a minute); past it every attempt from there gets a 429."""

    MAX_TRACKED = 10_000  # client addresses and revoked ids kept at most (the oldest are forgotten)

    def __init__(self, settings: ServeSettings, clock: Callable[[], float] = time.time):
        self.key = secrets.token_bytes(32)
        self.seconds = int(settings.session_hours * 3600)
        self.attempts = settings.login_attempts
        self.clock = clock
        self.revoked: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _sign(self, body: str) -> str:
        return hmac.new(self.key, body.encode("ascii"), hashlib.sha256).hexdigest()

    def new(self) -> str:
        body = f"{secrets.token_hex(16)}.{int(self.clock()) + self.seconds}"
        return f"{body}.{self._sign(body)}"

    def _parse(self, value: str) -> tuple[str, float] | None:
        sid, _, rest = value.partition(".")
        expiry, _, sig = rest.partition(".")
        if not (sid and expiry.isdigit() and sig) or len(value) > 200:
            return None
        if not hmac.compare_digest(sig.encode("latin-1"), self._sign(f"{sid}.{expiry}").encode("ascii")):
            return None
        return sid, float(expiry)

    def valid(self, value: str) -> bool:
        parsed = self._parse(value)
        return parsed is not None and parsed[1] > self.clock() and parsed[0] not in self.revoked

    def revoke(self, value: str) -> None:
        parsed = self._parse(value)
        if parsed is None:
            return
        now = self.clock()
        self.revoked[parsed[0]] = parsed[1]
        while self.revoked and (len(self.revoked) > self.MAX_TRACKED or next(iter(self.revoked.values())) <= now):
            self.revoked.popitem(last=False)

    def blocked(self, client: str) -> int:
        """Seconds until this address may try again (0: now)."""
        now = self.clock()
        q = self.failures.get(client)
        while q and q[0] <= now - 60:
            q.popleft()
        if not q or len(q) < self.attempts:
            return 0
        return max(1, int(q[0] + 60 - now) + 1)

    def failed(self, client: str) -> None:
        q = self.failures.pop(client, None) or collections.deque()
        q.append(self.clock())
        self.failures[client] = q  # most recent last
        while len(self.failures) > self.MAX_TRACKED:
            self.failures.popitem(last=False)

    def cookie_of(self, headers: dict[str, str]) -> str | None:
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == COOKIE:
                return v
        return None


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
LOGIN_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class _Guard:
    """Outermost ASGI layer: Host check, API token, body size and time limits, in-flight limits, HEAD on GET
    routes, request counts and latency."""

    OPEN = ("/healthz",)  # no token needed
    UNCOUNTED = ("/healthz", "/metrics")  # not limited by max_in_flight: probes must get through under load

    def __init__(self, app: Any, settings: ServeSettings, metrics: Metrics, sessions: Sessions):
        self.app, self.settings, self.metrics, self.sessions = app, settings, metrics, sessions
        self.hosts = HostCheck(settings)
        self.in_flight = 0
        self.logins = 0
        self.token = settings.token.encode("utf-8") if settings.token else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket":  # no route takes one; the same Host and token rules all the same
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not self.hosts.allowed(headers.get("host")) or (self.token is not None and self._auth_problem(headers)):
                await send({"type": "websocket.close", "code": 1008})
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.responses import HTMLResponse, JSONResponse

        t0 = time.perf_counter()
        status = [0]
        path = scope.get("path", "")
        head = scope["method"] == "HEAD"

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            elif head and message["type"] == "http.response.body":  # HEAD: the GET answer's headers, no body
                message = {**message, "body": b""}
            await send(message)

        async def reject(status_code: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
            self.metrics(self.metrics.errors.inc, kind)
            await JSONResponse({"error": message}, status_code=status_code, headers=headers)(scope, receive, send_wrapped)

        login = path in LOGIN_PATHS and scope["method"] == "POST"
        counted = path not in self.UNCOUNTED and not login
        limit = LOGIN_BODY_BYTES if login else self.settings.max_body_bytes
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            refusal = self._refusal(path, headers, login, counted, limit)
            if refusal is not None:
                status_code, message, kind, extra = refusal
                if status_code == 401 and scope["method"] in ("GET", "HEAD") and path in LOGIN_PAGES and \
                        "text/html" in headers.get("accept", ""):  # a browser: the log-in form instead
                    self.metrics(self.metrics.errors.inc, kind)
                    page = LOGIN_PAGE.format(next=path, message="")
                    await HTMLResponse(page, status_code=401, headers={"Cache-Control": "no-store",
                                                                       "Content-Security-Policy": LOGIN_CSP})(
                        scope, receive, send_wrapped)
                else:
                    await reject(status_code, message, kind, extra)
                return
            inner = {**scope, "method": "GET"} if head else scope
            if counted:
                self.in_flight += 1
                self.metrics(self.metrics.in_flight.set, value=self.in_flight)
            self.logins += login
            try:
                await self.app(inner, self._limited(receive, limit), send_wrapped)
            finally:
                self.logins -= login
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

    def _refusal(self, path: str, headers: dict[str, str], login: bool, counted: bool, limit: int
                 ) -> tuple[int, str, str, dict[str, str] | None] | None:
        """Why this request is refused before the app sees it (status, message, kind, headers), or None."""
        if not self.hosts.allowed(headers.get("host")):
            shown = headers.get("host", "")[:100]
            return (400, f"Host {shown!r} is not a name this server answers to; use its address or a loopback name, "
                         "or start it with --allowed-host NAME", "bad_host", None)
        if self.token is not None and path not in self.OPEN and not login:
            problem = self._auth_problem(headers)
            if problem:
                return 401, problem, "unauthorized", {"WWW-Authenticate": "Bearer"}
        length = _content_length(headers.get("content-length"))
        if length is not None and length > limit:
            return (413, f"request body of {length:,} bytes; at most {limit:,}{'' if login else ' (--max-body-bytes)'}",
                    "too_large", None)
        if login and self.logins >= LOGIN_IN_FLIGHT:
            return 429, f"{self.logins} log-ins in progress; retry after 1 s", "too_many_requests", {"Retry-After": "1"}
        if counted and self.in_flight >= self.settings.max_in_flight:
            return (429, f"{self.in_flight} requests in flight (--max-in-flight {self.settings.max_in_flight}); retry "
                         "after 1 s", "too_many_requests", {"Retry-After": "1"})
        return None

    def _auth_problem(self, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return "the Authorization header must be `Bearer TOKEN`"
            if hmac.compare_digest(value.strip().encode("utf-8"), self.token):  # type: ignore[arg-type]
                return None
            return "wrong API token; send the server's --token (or $DUOCLASS_TOKEN) as `Authorization: Bearer TOKEN`"
        cookie = self.sessions.cookie_of(headers)
        if cookie is not None:
            if self.sessions.valid(cookie):
                return None
            return "the log-in session has expired or was logged out; log in again on the web page"
        return "missing API token: send `Authorization: Bearer TOKEN` (this server was started with --token or " \
               "$DUOCLASS_TOKEN)"

    def _limited(self, receive: Callable, limit: int) -> Callable:
        """receive() that stops a body past `limit` bytes (a body without Content-Length) or still arriving
        --body-timeout-s after the request began (a client trickling its body holds a place in flight)."""
        seen, done = [0], [False]
        deadline = asyncio.get_running_loop().time() + self.settings.body_timeout_s
        seconds = self.settings.body_timeout_s

        async def wrapped() -> dict:
            if done[0]:  # the body is in: what is left to receive is the disconnect, however late
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestError(408, f"the request body did not arrive within {seconds:g} s (--body-timeout-s)",
                                   "body_timeout") from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    flag = " (--max-body-bytes)" if limit == self.settings.max_body_bytes else ""
                    raise RequestError(413, f"request body over {limit:,} bytes{flag}", "too_large")
                done[0] = not message.get("more_body", False)
            else:
                done[0] = True
            return message

        return wrapped
