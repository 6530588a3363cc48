"""Server settings (`duoclass serve --help`): limits, batching, token; the flags are generated from them.
"""
import argparse
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")

TOKEN_ENV = "DUOCLASS_TOKEN"
IMAGE_FORMATS = ("png", "jpeg", "gif", "bmp", "tiff", "webp", "ppm")  # what training reads; ppm covers PGM too


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServeSettings:
    """Settings of `duoclass serve`. Each field is a flag (`max_batch_size` -> --max-batch-size)."""

    host: str = _f("127.0.0.1", "address to bind; the default serves this machine only (use 0.0.0.0 with --token)")
    port: int = _f(8000, "TCP port (0 picks a free one)")
    backend: str = _f("torch", "what runs the models: torch, onnx or onnx-int8 (those the model folders hold)")
    device: str = _f("auto", "where the torch backend runs: auto, cpu, cuda, mps")
    token: Optional[str] = _f(None, f"API token wanted as `Authorization: Bearer TOKEN` on every endpoint but /healthz; "
                                    f"without it, ${TOKEN_ENV} is used (prefer the variable: a flag shows in `ps`)")
    max_batch_size: int = _f(32, "most items one model call takes from the queue; 1 switches micro-batching off")
    max_wait_ms: float = _f(5.0, "how long the oldest queued item waits for more to fill a batch")
    max_tokens: int = _f(16384, "text models: most padded tokens in one batch (items x longest encoded length)")
    max_queue: int = _f(256, "most items waiting per model; past it requests get 429 with Retry-After")
    max_in_flight: int = _f(512, "most requests handled at once (all endpoints but /healthz and /metrics); past it 429")
    max_items: int = _f(64, "most images or texts in one request")
    max_explain_items: int = _f(8, "most images or texts in one explain request (each costs tens to hundreds of "
                                   "forward passes)")
    explain_queue: int = _f(2, "explain requests that may wait per model while one is explained (one at a time, in "
                               "a thread beside the predictions); past it 429 with Retry-After")
    max_text_chars: int = _f(10_000, "most characters in one text")
    max_body_bytes: int = _f(16 * 1024 * 1024, "largest request body, in bytes")
    max_image_bytes: int = _f(8 * 1024 * 1024, "largest image (one multipart part, or one decoded base64 image), in bytes")
    max_files: int = _f(16, "most file parts in one multipart body")
    max_pixels: int = _f(40_000_000, "largest image in pixels (width x height), checked before decoding")
    timeout_s: float = _f(30.0, "longest a request waits for its prediction before a 503 with Retry-After")
    max_decode_mb: float = _f(64.0, "largest memory one image may take to decode, in MiB, estimated from its declared "
                                    "size and pixel format before decoding (bigger images are refused with a 413)")
    request_cpu_s: float = _f(2.0, "most seconds of decoding one request may cost; items past it are refused")
    image_formats: str = _f("png,jpeg,gif,bmp,tiff,webp,ppm", "comma-separated image formats accepted (by their first "
                                                               "bytes); others get a 415")
    max_connections: int = _f(0, "most open connections; past it the oldest idle one is closed (0: the process's "
                                 "file-descriptor limit less 64)")
    header_timeout_s: float = _f(10.0, "longest a client may take to send a request's headers before the connection "
                                       "is closed")
    body_timeout_s: float = _f(30.0, "longest a client may take to send a request's body before a 408")
    keep_alive_s: float = _f(5.0, "how long an idle keep-alive connection stays open")
    allowed_host: str = _f("", "comma-separated Host names (and IPs) to answer besides loopback names and the bound "
                               "address; `*` answers any (a DNS-rebinding page can then reach a server without a token)")
    session_hours: float = _f(12.0, "how long a web page log-in lasts")
    login_attempts: int = _f(10, "failed log-ins allowed per client address per minute; past it 429")
    abstain_below: Optional[float] = _f(None, "answer 'abstained' (abstained: true) instead of a class for items whose "
                                              "calibrated top probability is under this, e.g. 0.9")
    docs: bool = _f(True, "serve the OpenAPI page at /docs and the schema at /openapi.json")
    explain: bool = _f(True, "answer POST /v1/models/NAME/explain and show the page's Explain button (--no-explain: "
                             "no explanations, no route, no copy of a torch model for them)")
    access_log: bool = _f(True, "log one line per request")

    def __post_init__(self) -> None:
        from duoclass.settings.config import check_types

        check_types(self)

        def bad(name: str, msg: str) -> None:
            raise DuoclassError(f"--{name.replace('_', '-')}: {msg}")

        if not 0 <= self.port <= 65535:
            bad("port", f"got {self.port}; use 1 to 65535 (or 0 for any free port)")
        for name in ("max_batch_size", "max_tokens", "max_queue", "max_in_flight", "max_items", "max_explain_items",
                     "max_text_chars", "max_body_bytes", "max_image_bytes", "max_files", "max_pixels", "login_attempts"):
            if getattr(self, name) < 1:
                bad(name, f"got {getattr(self, name)}; must be a positive integer")
        if self.explain_queue < 0:
            bad("explain_queue", f"got {self.explain_queue}; use 0 (only the one being explained) or more")
        if self.max_connections < 0 or 0 < self.max_connections < 8:
            bad("max_connections", f"got {self.max_connections}; use 0 (from the file-descriptor limit) or at least 8")
        for name in ("max_decode_mb", "request_cpu_s", "header_timeout_s", "body_timeout_s", "keep_alive_s",
                     "session_hours"):
            if not 0 < getattr(self, name) <= 1e6:
                bad(name, f"got {getattr(self, name)}; must be a positive number")
        formats = [f.strip().lower() for f in self.image_formats.split(",") if f.strip()]
        unknown = sorted(set(formats) - set(IMAGE_FORMATS))
        if unknown or not formats:
            bad("image_formats", f"got {self.image_formats!r}; use a comma-separated list of: {', '.join(IMAGE_FORMATS)}")
        self.image_formats = ",".join(dict.fromkeys(formats))
        hosts = [h.strip().lower() for h in self.allowed_host.split(",") if h.strip()]
        for h in hosts:
            if h != "*" and not re.fullmatch(r"[a-z0-9._:\[\]-]{1,253}", h):
                bad("allowed_host", f"got {h!r}; give host names or IP addresses without a port (or *)")
        self.allowed_host = ",".join(hosts)
        if not 0 <= self.max_wait_ms <= 10_000:
            bad("max_wait_ms", f"got {self.max_wait_ms}; use 0 to 10000 milliseconds, e.g. 5")
        if not self.timeout_s > 0:
            bad("timeout_s", f"got {self.timeout_s}; must be > 0 seconds, e.g. 30")
        if self.max_items > self.max_queue:
            bad("max_items", f"got {self.max_items}, more than --max-queue {self.max_queue}; a request that large "
                             "could never be queued: lower --max-items or raise --max-queue")
        if self.token is not None and not self.token.strip():
            bad("token", "is empty; pass a long random string (e.g. from `python -c \"import secrets; "
                         "print(secrets.token_urlsafe(32))\"`) or leave it out")
        if self.abstain_below is not None and not 0 < self.abstain_below <= 1:
            bad("abstain_below", f"got {self.abstain_below}; a probability in (0, 1], e.g. 0.9")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            bad("device", f"got {self.device!r}; choose one of: auto, cpu, cuda, cuda:N, mps")


# --- running it -------------------------------------------------------------------------------
def resolve_token(settings: ServeSettings) -> ServeSettings:
    """The settings with the token from $DUOCLASS_TOKEN when none was given."""
    if settings.token is None and os.environ.get(TOKEN_ENV, "").strip():
        return dataclasses.replace(settings, token=os.environ[TOKEN_ENV].strip())
    return settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `duoclass serve`: MODEL_DIR... and one per ServeSettings field."""
    from duoclass.settings.flags import add_config_flags

    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                   help="model folders to serve, each DIR or NAME=DIR (default name: the folder's, or its run "
                        "folder's when it is called `model`)")
    add_config_flags(p, ServeSettings)


def settings_from_args(ns: argparse.Namespace) -> ServeSettings:
    return ServeSettings(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServeSettings) if hasattr(ns, f.name)})
