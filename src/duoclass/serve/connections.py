"""Connections, below the ASGI app: a time limit on a request's headers, a cap on their size, and a cap on open
connections that closes the oldest idle one first. uvicorn has none of the three: a client that opens many
connections and sends half a request on each would otherwise hold them, and the server's file descriptors, forever.

`uvicorn_config(app, settings)` is the uvicorn configuration `duoclass serve` runs (tests start theirs with it too).
"""
import logging
import resource
from typing import Any

from duoclass.errors import DuoclassError
from duoclass.serve.settings import ServeSettings

log = logging.getLogger("duoclass")
MAX_HEADER_BYTES = 64 * 1024  # a request line and headers larger than this get a 431


def connection_limit(settings: ServeSettings) -> int:
    """--max-connections, or the soft file-descriptor limit less 64 (for model files, logs and threads)."""
    if settings.max_connections:
        return settings.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(8, min(soft - 64, 65536))


def bounded_protocol(base: type, limit: int, header_timeout: float) -> type:
    """uvicorn's httptools protocol with the three limits. `live` holds the open connections, oldest first."""
    live: dict[Any, None] = {}

    class Bounded(base):  # type: ignore[misc, valid-type]
        _timer: Any = None
        _head_bytes = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            live[self] = None
            self._arm()
            if len(live) > limit:
                self._shed()

        def connection_lost(self, exc: Exception | None) -> None:
            live.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            reading_head = self._timer is not None
            super().data_received(data)
            if reading_head and self._timer is not None:  # the headers are still not complete
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEADER_BYTES:
                    self._disarm()
                    self._close_with(431, b"request headers over 64 KiB")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # a keep-alive connection's next request: its headers have the same time

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        # the limits ---------------------------------------------------------------------------
        def _arm(self) -> None:
            if self._timer is None:
                self._head_bytes = 0
                self._timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _headers_too_slow(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self._close_with(408, b"request headers not received in time")

        def _close_with(self, status: int, message: bytes) -> None:
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, reason[status], len(message), message))
            self.transport.close()
            live.pop(self, None)

        def _shed(self) -> None:
            """Over the limit: close the oldest connection that has no request in progress (waiting for headers,
            or idle between requests); if every other one is busy, this new one."""
            for conn in list(live):
                if conn is not self and conn._idle():
                    live.pop(conn, None)
                    conn._disarm()
                    conn.transport.close()
                    return
            self._disarm()
            self._close_with(503, b"too many connections; retry later")

    Bounded.__name__ = Bounded.__qualname__ = f"Bounded{base.__name__}"
    return Bounded


def uvicorn_config(app: Any, settings: ServeSettings, **kw: Any) -> Any:
    """The uvicorn.Config of `duoclass serve`: httptools with the connection limits above, uvloop when installed,
    the keep-alive time, no Server header."""
    import uvicorn

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        raise DuoclassError("duoclass serve needs httptools; install it with `pip install duoclass[serve]`") from None
    limit = connection_limit(settings)
    protocol = bounded_protocol(HttpToolsProtocol, limit, settings.header_timeout_s)
    kw = {"host": settings.host, "port": settings.port, "access_log": settings.access_log, "server_header": False,
          "timeout_keep_alive": settings.keep_alive_s, "timeout_graceful_shutdown": 10, "backlog": 1024, **kw}
    return uvicorn.Config(app, http=protocol, **kw)
