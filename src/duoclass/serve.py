"""The HTTP server: model folders behind a JSON API and a web page, with dynamic micro-batching.

    duoclass serve runs/xray/model reviews=runs/reviews/model --port 8000
    python -m duoclass.serve runs/xray/model --max-batch-size 1       # the same flags without the CLI
    curl -F file=@a.png http://127.0.0.1:8000/v1/models/xray/predict
    curl -d '{"texts": ["great", "awful"], "top_k": 2}' -H 'Content-Type: application/json' \\
         http://127.0.0.1:8000/v1/models/reviews/predict

In Python, `create_app(["runs/xray/model"], ServeSettings(max_batch_size=16))` returns the FastAPI
app (any ASGI server runs it) and `serve(model_dirs, settings)` runs it with uvicorn.

Endpoints (every one needs the token when one is set, except /healthz):

    POST /v1/models/{name}/predict     multipart `file` part(s), or JSON {"image": b64} {"images": [...]}
                                       {"text": "..."} {"texts": [...]}, optional top_k
    GET  /v1/models, /v1/models/{name} task, classes, test metrics, preprocessing, plot URLs
    GET  /v1/models/{name}/confusion_matrix.png, .../curves.png   the run folder's plots, read at start
    GET  /healthz  /readyz  /metrics (Prometheus text)  /docs  /openapi.json  /  (the web page)

How a prediction runs: the handler validates the request (pydantic, sizes, image magic bytes,
Unicode) and puts its items on the model's queue. One asyncio task per model takes items from many
requests, up to --max-batch-size items (and, for text, --max-tokens padded tokens, from the
preprocessor's encoded lengths) or until the oldest has waited --max-wait-ms, and hands the batch
to the model's own thread, which calls `predict.predict_items` once: the model never runs on the
event loop, and an input that fails gets its own error, so only its request is answered 4xx.
--max-batch-size 1 switches batching off, for comparison.

Limits, each a flag: body bytes, image bytes per part, files per multipart body, items per request,
characters per text, image pixels (decompression bombs; checked before decoding), items waiting per
model (past it: 429 with Retry-After) and requests in flight. Client mistakes get a 4xx JSON
{"error": "..."} that says what to change. The server binds 127.0.0.1 by default, loads only the
folders given at start, reads every file it serves at start (no endpoint takes a path) and, with
--token or $DUOCLASS_TOKEN, wants `Authorization: Bearer TOKEN` (the web page logs in once and
keeps an HttpOnly, SameSite=Strict cookie).

Importing this module imports neither FastAPI nor torch (the CLI builds its flags from
ServeSettings); `create_app` does.
"""
import argparse
import asyncio
import base64
import binascii
import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional, Sequence

from .errors import DuoclassError

log = logging.getLogger("duoclass")

TOKEN_ENV = "DUOCLASS_TOKEN"
COOKIE = "duoclass_session"
PLOTS = ("confusion_matrix", "curves")  # PNGs `duoclass train` writes into the run folder
MAX_PLOT_BYTES = 20 * 1024 * 1024
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
STATIC = Path(__file__).with_name("serve_static")
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The image formats training reads (data.sources.IMAGE_EXTS), by their first bytes. Anything else is
# refused before Pillow sees it, so no other decoder (and no external program) ever runs on an upload.
MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
         (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"P5", "PGM"), (b"P6", "PPM"),
         (b"P2", "PGM"), (b"P3", "PPM"))
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


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
    max_text_chars: int = _f(10_000, "most characters in one text")
    max_body_bytes: int = _f(16 * 1024 * 1024, "largest request body, in bytes")
    max_image_bytes: int = _f(8 * 1024 * 1024, "largest image (one multipart part, or one decoded base64 image), in bytes")
    max_files: int = _f(16, "most file parts in one multipart body")
    max_pixels: int = _f(40_000_000, "largest image in pixels (width x height), checked before decoding")
    timeout_s: float = _f(30.0, "longest a request waits for its prediction before a 503 with Retry-After")
    docs: bool = _f(True, "serve the OpenAPI page at /docs and the schema at /openapi.json")
    access_log: bool = _f(True, "log one line per request")

    def __post_init__(self) -> None:
        from .config import check_types

        check_types(self)

        def bad(name: str, msg: str) -> None:
            raise DuoclassError(f"--{name.replace('_', '-')}: {msg}")

        if not 0 <= self.port <= 65535:
            bad("port", f"got {self.port}; use 1 to 65535 (or 0 for any free port)")
        for name in ("max_batch_size", "max_tokens", "max_queue", "max_in_flight", "max_items", "max_text_chars",
                     "max_body_bytes", "max_image_bytes", "max_files", "max_pixels"):
            if getattr(self, name) < 1:
                bad(name, f"got {getattr(self, name)}; must be a positive integer")
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
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            bad("device", f"got {self.device!r}; choose one of: auto, cpu, cuda, cuda:N, mps")


class RequestError(Exception):
    """A request the server will not answer with a prediction: HTTP status, one-line message, metrics kind."""

    def __init__(self, status: int, message: str, kind: str, headers: Mapping[str, str] | None = None,
                 items: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.headers = dict(headers or {})
        self.items = items

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.items is not None:
            out["items"] = self.items
        return out


# --- Prometheus metrics (text format 0.0.4, written by hand: no global registry) ---------------
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _label_value(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


class _Family:
    """One metric: a counter, gauge or histogram, one value per tuple of label values."""

    def __init__(self, name: str, kind: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()):
        self.name, self.kind, self.help, self.labels, self.buckets = name, kind, help, labels, buckets
        self.values: dict[tuple[str, ...], Any] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value

    def observe(self, *labels: str, value: float) -> None:
        h = self.values.get(labels)
        if h is None:  # [count per bucket (not cumulative), sum, count]
            h = self.values[labels] = [[0] * len(self.buckets), 0.0, 0]
        for i, b in enumerate(self.buckets):
            if value <= b:
                h[0][i] += 1
                break
        h[1] += value
        h[2] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

        def fmt(labels: tuple[str, ...], le: str | None = None) -> str:
            pairs = list(zip(self.labels, labels)) + ([("le", le)] if le is not None else [])
            return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in pairs) + "}" if pairs else ""

        for labels, v in sorted(self.values.items()):
            if self.kind != "histogram":
                out.append(f"{self.name}{fmt(labels)} {_number(v)}")
                continue
            running = 0
            for b, n in zip(self.buckets, v[0]):
                running += n
                out.append(f"{self.name}_bucket{fmt(labels, _number(b))} {running}")
            out.append(f"{self.name}_bucket{fmt(labels, '+Inf')} {v[2]}")
            out.append(f"{self.name}_sum{fmt(labels)} {_number(v[1])}")
            out.append(f"{self.name}_count{fmt(labels)} {v[2]}")
        return out


class Metrics:
    """The server's counters, gauges and histograms; `render()` is the body of GET /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        F = _Family
        self.requests = F("duoclass_http_requests_total", "counter", "HTTP requests by method, route and status",
                          ("method", "route", "status"))
        self.latency = F("duoclass_http_request_duration_seconds", "histogram", "HTTP request latency by route",
                         ("route",), LATENCY_BUCKETS)
        self.errors = F("duoclass_errors_total", "counter", "requests answered with an error, by kind", ("kind",))
        self.items = F("duoclass_predict_items_total", "counter", "items predicted, by model and outcome",
                       ("model", "outcome"))
        self.batch_size = F("duoclass_batch_size", "histogram", "items per model call", ("model",), BATCH_BUCKETS)
        self.batch_seconds = F("duoclass_batch_duration_seconds", "histogram", "seconds per model call (decoding included)",
                               ("model",), LATENCY_BUCKETS)
        self.queue_wait = F("duoclass_queue_wait_seconds", "histogram", "seconds an item waited in its model's queue",
                            ("model",), LATENCY_BUCKETS)
        self.queue_depth = F("duoclass_queue_depth", "gauge", "items waiting in each model's queue", ("model",))
        self.in_flight = F("duoclass_requests_in_flight", "gauge", "requests being handled now", ())
        self.info = F("duoclass_model_info", "gauge", "models served (value 1)", ("model", "task", "backend"))
        self.families = [self.requests, self.latency, self.errors, self.items, self.batch_size, self.batch_seconds,
                         self.queue_wait, self.queue_depth, self.in_flight, self.info]
        self.in_flight.set(value=0)

    def __call__(self, fn: Callable[..., None], *labels: str, **kw: float) -> None:
        """metrics(metrics.errors.inc, "bad_image"): one update under the lock."""
        with self._lock:
            fn(*labels, **kw)

    def render(self, depths: Mapping[str, int]) -> str:
        with self._lock:
            for name, d in depths.items():
                self.queue_depth.set(name, value=d)
            return "\n".join(line for f in self.families for line in f.render()) + "\n"


# --- model folders -----------------------------------------------------------------------------
def parse_model_args(model_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """{name: folder} from "DIR" or "NAME=DIR" arguments. A folder called `model` (what `duoclass train`
    writes inside its run folder) is named after the run folder; a duplicate name is an error."""
    pairs: list[tuple[str, Path, str]] = []
    if isinstance(model_dirs, Mapping):
        pairs = [(str(k), Path(v), f"{k}={v}") for k, v in model_dirs.items()]
    else:
        for arg in model_dirs:
            text = os.fspath(arg)
            name, eq, rest = text.partition("=")
            if eq and NAME.fullmatch(name) and not Path(text).exists():
                pairs.append((name, Path(rest), text))
            else:
                p = Path(text)
                q = p.resolve()
                auto = q.parent.name if q.name == "model" and q.parent.name else q.name
                pairs.append((auto, p, text))
    if not pairs:
        raise DuoclassError("serve: no MODEL_DIR given; pass one or more model folders, e.g. runs/x/model")
    out: dict[str, Path] = {}
    for name, folder, arg in pairs:
        if not NAME.fullmatch(name):
            raise DuoclassError(f"{arg}: {name!r} cannot be a model name (letters, digits, '.', '_', '-'; at most 64); "
                                f"name it with NAME=DIR, e.g. digits={folder}")
        if name in out:
            raise DuoclassError(f"{arg}: a second model named {name!r} (the first is {out[name]}); "
                                f"name them with NAME=DIR, e.g. {name}-2={folder}")
        if not (folder / "config.json").is_file():
            raise DuoclassError(f"{folder}: not a model folder (no config.json); pass RUN_DIR/model as `duoclass train` "
                                "writes it")
        out[name] = folder
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _scalars(split: Any) -> dict[str, float]:
    """The plain numbers of one split's metrics (accuracy, f1_macro, ...; not per_class or the matrix)."""
    if not isinstance(split, dict):
        return {}
    return {k: v for k, v in split.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def model_card(name: str, clf: Any, folder: Path, backend: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(what GET /v1/models/{name} answers, the plot PNGs). metrics.json comes from the model folder (hashed
    with the weights) or else the run folder; plots from the model folder or the run folder beside it."""
    cfg = clf.config_
    metrics = _read_json(folder / "metrics.json")
    run = folder.parent if (folder.parent / "metrics.json").is_file() else None
    if not isinstance(metrics, dict) and run is not None:
        metrics = _read_json(run / "metrics.json")
    metrics = metrics if isinstance(metrics, dict) else {}
    plots: dict[str, bytes] = {}
    for plot in PLOTS:
        for where in [folder] + ([run] if run is not None else []):
            p = where / f"{plot}.png"
            try:
                if p.is_file() and p.stat().st_size <= MAX_PLOT_BYTES:
                    data = p.read_bytes()
                    if data.startswith(b"\x89PNG\r\n\x1a\n"):
                        plots[plot] = data
                        break
            except OSError:
                pass
    card = {
        "name": name,
        "task": clf.task,
        "model": cfg.get("model", {}).get("name"),
        "classes": list(clf.classes_),
        "backend": backend,
        "preprocessing": cfg.get("preprocessing", {}),
        "evaluation": cfg.get("evaluation", {}),
        "metrics": {s: _scalars(metrics.get(s)) for s in ("valid", "test") if isinstance(metrics.get(s), dict)},
        "epoch": metrics.get("epoch", metrics.get("best_epoch")),
        "plots": {p: (f"/v1/models/{name}/{p}.png" if p in plots else None) for p in PLOTS},
        "predict": f"/v1/models/{name}/predict",
    }
    full = dict(card, per_class={s: metrics[s].get("per_class") for s in ("valid", "test")
                                 if isinstance(metrics.get(s), dict) and isinstance(metrics[s].get("per_class"), dict)})
    return full, plots


# --- micro-batching ---------------------------------------------------------------------------
@dataclass
class _Pending:
    item: Any  # bytes (an image) or str (a text): never a path
    name: str  # for messages: "item 0", "file 'a.png'"
    cost: int  # encoded length (text) or 1
    top_k: int
    future: asyncio.Future
    queued: float  # loop time


class InternalError(Exception):
    """The model failed on an item for a reason that is not the input's fault; the request gets a 500."""


class ModelWorker:
    """One model: its queue of items, the asyncio task that batches them, and the one thread that runs it."""

    def __init__(self, name: str, clf: Any, folder: Path, settings: ServeSettings, metrics: Metrics):
        self.name, self.clf, self.folder, self.settings, self.metrics = name, clf, folder, settings, metrics
        self.queue: collections.deque[_Pending] = collections.deque()
        self.token_budget = settings.max_tokens if clf.task == "text" else 0
        self._changed = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"duoclass-{name}")
        self._task: asyncio.Task | None = None
        self._batch_seconds = 0.01  # running mean, for Retry-After
        self.closed = False

    # the event-loop side -----------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"duoclass-batcher-{self.name}")

    async def stop(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self.queue:
            if not p.future.done():
                p.future.set_exception(RequestError(503, "the server is shutting down; retry on another instance",
                                                    "shutting_down", {"Retry-After": "5"}))
        self.queue.clear()
        self._thread.shutdown(wait=False, cancel_futures=True)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: batches ahead x mean seconds per batch."""
        batches = math.ceil(len(self.queue) / self.settings.max_batch_size)
        return max(1, min(60, math.ceil(batches * self._batch_seconds)))

    async def predict(self, items: Sequence[Any], names: Sequence[str], costs: Sequence[int], top_k: int) -> list[Any]:
        """One Prediction per item, in order, predicted alongside other requests' items."""
        if self.closed:
            raise RequestError(503, "the server is shutting down", "shutting_down", {"Retry-After": "5"})
        if len(self.queue) + len(items) > self.settings.max_queue:
            s = self.retry_after()
            raise RequestError(429, f"model {self.name!r} is busy: {len(self.queue)} items are waiting and this request "
                                    f"adds {len(items)} (--max-queue {self.settings.max_queue}); retry after {s} s",
                               "queue_full", {"Retry-After": str(s)})
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = [loop.create_future() for _ in items]
        for item, name, cost, fut in zip(items, names, costs, futures):
            self.queue.append(_Pending(item, name, cost, top_k, fut, now))
        self._changed.set()
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), self.settings.timeout_s)
        except asyncio.TimeoutError:  # gather's cancellation cancelled our futures; the batcher skips them
            raise RequestError(503, f"no prediction within {self.settings.timeout_s:g} s (--timeout-s): the server is "
                                    "overloaded; retry later", "timeout", {"Retry-After": str(self.retry_after())}) from None

    def _take(self, pop: bool) -> list[_Pending]:
        """The next batch: up to max_batch_size live items, and for text at most token_budget padded tokens
        (a text longer than the budget goes alone). With pop=False, only counts what it would take."""
        batch: list[_Pending] = []
        longest, i = 0, 0
        while i < len(self.queue) and len(batch) < self.settings.max_batch_size:
            p = self.queue[i]
            if p.future.done():  # its request timed out or went away
                if pop:
                    self.queue.popleft()
                else:
                    i += 1
                continue
            if self.token_budget and batch and (len(batch) + 1) * max(longest, p.cost) > self.token_budget:
                break
            batch.append(p)
            longest = max(longest, p.cost)
            if pop:
                self.queue.popleft()
            else:
                i += 1
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.settings.max_wait_ms / 1000
        while True:
            while not self.queue:
                self._changed.clear()
                await self._changed.wait()
            if self.settings.max_batch_size > 1 and max_wait > 0:
                # Wait for more items until the batch is full or the oldest item has waited max_wait.
                # Items that came while the model was busy have usually waited that long already.
                deadline = self.queue[0].queued + max_wait
                while (left := deadline - loop.time()) > 0:
                    live = self._take(pop=False)
                    if len(live) == self.settings.max_batch_size or len(live) < sum(not p.future.done() for p in self.queue):
                        break  # full (by count or, for text, by tokens)
                    self._changed.clear()
                    try:
                        await asyncio.wait_for(self._changed.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch = self._take(pop=True)
            if not batch:
                continue
            now = loop.time()
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._thread, self._run, batch)
            except Exception as e:  # noqa: BLE001  (the thread pool is gone: shutting down)
                log.exception("model %s: batch of %d failed", self.name, len(batch))
                results = [InternalError(f"{type(e).__name__}: {e}")] * len(batch)
            seconds = time.perf_counter() - t0
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            m = self.metrics
            with m._lock:
                m.batch_size.observe(self.name, value=len(batch))
                m.batch_seconds.observe(self.name, value=seconds)
                for p, r in zip(batch, results):
                    m.queue_wait.observe(self.name, value=now - p.queued)
                    ok = not isinstance(r, Exception) and r.error is None
                    m.items.inc(self.name, "ok" if ok else "error")
            for p, r in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(r, Exception):
                    p.future.set_exception(r)
                else:
                    r.top_k = r.top_k[: p.top_k]  # the batch ran with its largest top_k; a stable sort's prefix
                    p.future.set_result(r)

    # the model thread ---------------------------------------------------------------------
    def _run(self, batch: list[_Pending]) -> list[Any]:
        """predict_items once for the whole batch. Should it raise (a bug, not a bad input: those get their own
        error), each item is retried alone so that only the one that fails it gets an InternalError."""
        k = max(p.top_k for p in batch)
        try:
            return self._predict([p.item for p in batch], [p.name for p in batch], k)
        except Exception:  # noqa: BLE001
            log.exception("model %s: a batch of %d items failed; predicting them one by one", self.name, len(batch))
        out: list[Any] = []
        for p in batch:
            try:
                out += self._predict([p.item], [p.name], k)
            except Exception as e:  # noqa: BLE001
                log.exception("model %s: %s failed", self.name, p.name)
                out.append(InternalError(f"{type(e).__name__}: {e}"))
        return out

    def _predict(self, items: list[Any], names: list[str], top_k: int) -> list[Any]:
        from .predict import predict_items

        clf = self.clf
        return predict_items(clf.preprocessor, clf.backend, clf.classes_, items, len(items), top_k, clf.tta, names=names)

    def warm_up(self) -> None:
        """One prediction at start, so the first request does not pay for lazy initialisation."""
        if self.clf.task == "text":
            item: Any = "warm up"
        else:
            import io

            from PIL import Image

            buf = io.BytesIO()
            size = int(self.clf.preprocessor.image_size)
            Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
            item = buf.getvalue()
        self._predict([item], ["warm-up"], 1)


# --- request parsing --------------------------------------------------------------------------
def _sniff(data: bytes, what: str) -> None:
    if not data:
        raise RequestError(422, f"{what}: empty (0 bytes); send the image file's content", "bad_image")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return
    if not any(data.startswith(m) for m, _ in MAGIC):
        raise RequestError(422, f"{what}: not an image (unrecognised file content); send a PNG, JPEG, GIF, BMP, "
                                "TIFF, WebP or PPM/PGM file", "bad_image")


def _b64(s: str, what: str, limit: int) -> bytes:
    if s.startswith("data:"):  # a data URL, as a browser's FileReader makes
        head, _, s = s.partition(",")
        if ";base64" not in head:
            raise RequestError(422, f"{what}: a data URL must be base64 (data:image/png;base64,...)", "bad_image")
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{what}: not valid base64; encode the image file's bytes with standard base64",
                           "bad_image") from None
    if len(data) > limit:
        raise RequestError(413, f"{what}: {len(data):,} bytes; at most {limit:,} per image (--max-image-bytes)", "too_large")
    return data


def _validation_message(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """(status, one line) for pydantic errors: 400 for a body that is not JSON, else 422 naming each field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        why = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return 400, f"the body is not valid JSON ({why}); send e.g. {{\"text\": \"...\"}} or {{\"image\": \"<base64>\"}}"
    limits = {"string_too_long": {"text": "--max-text-chars", "texts": "--max-text-chars", "image": "--max-image-bytes",
                                  "images": "--max-image-bytes"},
              "too_long": {"texts": "--max-items", "images": "--max-items"}}
    parts = []
    for e in errors[:5]:
        loc = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(e.get("loc", ())))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field; send one of text, texts, image, images (and optionally top_k)"
        flag = limits.get(e.get("type", ""), {}).get(str((e.get("loc") or ("",))[0]))
        if flag:
            msg += f" (the server's limit, {flag})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def _schemas(settings: ServeSettings) -> Any:
    """The pydantic models of the API (built per app: their limits are the app's settings)."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    b64_chars = math.ceil(settings.max_image_bytes / 3) * 4 + 256  # room for a data: URL prefix and line breaks
    text_field = Field(None, max_length=settings.max_text_chars, description="one text to classify")
    image_field = Field(None, max_length=b64_chars, description="one image file, base64 (or a data: URL)")

    class PredictRequest(BaseModel):
        """Exactly one of text, texts (text models) or image, images (image models)."""

        # The fields are typed without null (a JSON null is refused) and default to None, meaning "not sent";
        # the schema's oneOf says what the validator below checks.
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
            "oneOf": [{"required": [k]} for k in ("text", "texts", "image", "images")]})
        text: str = text_field  # type: ignore[assignment]
        texts: list[Annotated[str, Field(max_length=settings.max_text_chars)]] = Field(  # type: ignore[assignment]
            None, min_length=1, max_length=settings.max_items, description="several texts")
        image: str = image_field  # type: ignore[assignment]
        images: list[Annotated[str, Field(max_length=b64_chars)]] = Field(  # type: ignore[assignment]
            None, min_length=1, max_length=settings.max_items, description="several base64 images")
        top_k: int = Field(1, ge=1, le=1000, description="how many labels to return per item, best first")

        @model_validator(mode="after")
        def _one_input(self) -> "PredictRequest":
            given = [k for k in ("text", "texts", "image", "images") if getattr(self, k) is not None]
            if len(given) != 1:
                raise ValueError("send exactly one of text, texts, image, images" +
                                 (f" (got {', '.join(given)})" if given else ""))
            return self

    class Score(BaseModel):
        label: str
        score: float

    class ItemResult(BaseModel):
        label: str
        score: float = Field(description="the probability of `label`")
        top_k: list[Score] = Field(description="the top_k labels with their probabilities, best first")
        warning: Optional[str] = Field(None, description="why the label is only a guess (e.g. no known word), or null")

    class PredictResponse(BaseModel):
        model: str
        predictions: list[ItemResult] = Field(description="one per item, in request order")
        latency_ms: float = Field(description="time in the server, queueing and batching included")

    class ItemError(BaseModel):
        index: int
        error: str

    class ErrorBody(BaseModel):
        error: str = Field(description="what went wrong and how to fix it")
        items: Optional[list[ItemError]] = Field(None, description="the failing items of a prediction request")

    return types.SimpleNamespace(PredictRequest=PredictRequest, PredictResponse=PredictResponse, ErrorBody=ErrorBody)


def _content_length(content_length: Optional[str]) -> Optional[int]:
    if content_length is None:
        return None
    try:
        return int(content_length)
    except ValueError:
        return None


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


# --- the app ----------------------------------------------------------------------------------
def create_app(model_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
               settings: ServeSettings | None = None) -> Any:
    """The FastAPI app serving these model folders ("DIR" or "NAME=DIR"). Loads every model now, so a bad
    folder fails here with a DuoclassError; each model's batcher starts with the app (its lifespan)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.openapi.docs import get_swagger_ui_html
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
        from pydantic import ValidationError
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as e:
        raise DuoclassError(f"duoclass serve needs FastAPI ({e.name} is missing); install it with "
                            "`pip install duoclass[serve]`") from None
    import contextlib

    from . import __version__
    from .classifier import Classifier

    settings = settings or ServeSettings()
    folders = parse_model_args(model_dirs)
    metrics = Metrics()
    schemas = _schemas(settings)
    workers: dict[str, ModelWorker] = {}
    cards: dict[str, dict[str, Any]] = {}
    plots: dict[str, dict[str, bytes]] = {}
    for name, folder in folders.items():
        t0 = time.perf_counter()
        clf = Classifier.from_folder(folder, device=settings.device, backend=settings.backend)
        if clf.task == "image":
            clf.preprocessor.max_pixels = min(settings.max_pixels, clf.preprocessor.max_pixels)
        cards[name], plots[name] = model_card(name, clf, folder, settings.backend)
        workers[name] = ModelWorker(name, clf, folder, settings, metrics)
        metrics.info.set(name, clf.task, settings.backend, value=1)
        log.info("model %s: %s (%s, %d classes) from %s in %.1f s", name, cards[name]["model"], clf.task,
                 len(clf.classes_), folder, time.perf_counter() - t0)
    static = {}
    for fname in ["index.html", *STATIC_FILES]:
        try:
            static[fname] = (STATIC / fname).read_bytes()
        except OSError as e:
            raise DuoclassError(f"{STATIC / fname}: cannot read the web page ({e.strerror}); reinstall duoclass") from None
    swagger: dict[str, tuple[bytes, str]] = {}
    if settings.docs:
        try:  # Swagger UI's files from a package, so /docs works offline; else FastAPI's default (a CDN)
            from swagger_ui_bundle import swagger_ui_path

            for fname, mime in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"),
                                ("favicon-32x32.png", "image/png")):
                swagger[fname] = ((Path(str(swagger_ui_path)) / fname).read_bytes(), mime)
        except (ImportError, OSError):
            log.info("/docs loads Swagger UI from a CDN; `pip install swagger-ui-bundle-v2` serves it from here")
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        loop = asyncio.get_running_loop()
        for w in workers.values():
            t0 = time.perf_counter()
            await loop.run_in_executor(w._thread, w.warm_up)
            w.start()
            log.info("model %s: ready (warm-up %.2f s; batches of up to %d, waiting up to %g ms)", w.name,
                     time.perf_counter() - t0, settings.max_batch_size, settings.max_wait_ms)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for w in workers.values():
                await w.stop()

    description = ("Image and text classifiers. Send images as multipart field `file` or JSON base64, texts as JSON. "
                   "Errors are JSON `{\"error\": \"...\"}`." + (" Every endpoint but /healthz wants "
                                                               "`Authorization: Bearer TOKEN`." if settings.token else ""))
    app = FastAPI(title="duoclass", version=__version__, description=description, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if settings.docs else None)
    app.state.workers = workers
    app.state.settings = settings
    app.state.metrics = metrics
    err = {"model": schemas.ErrorBody}
    common = {401: {**err, "description": "missing or wrong API token"},
              429: {**err, "description": "too many requests; see Retry-After"}}

    def worker_of(name: str) -> ModelWorker:
        w = workers.get(name)
        if w is None:
            raise RequestError(404, f"no model named {name[:80]!r}; this server has: {', '.join(workers)} "
                                    "(GET /v1/models)", "unknown_model")
        return w

    # --- errors ---------------------------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> Response:
        metrics(metrics.errors.inc, e.kind)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        kinds = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}
        kind = kinds.get(e.status_code, f"http_{e.status_code}")
        where = f"{request.method} {request.url.path[:200]}"
        message = {404: f"no such endpoint: {where}; see /docs for the API",
                   405: f"{where}: method not allowed; see /docs for the API"}.get(e.status_code, str(e.detail))
        metrics(metrics.errors.inc, kind)
        return JSONResponse({"error": message}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> Response:
        status, message = _validation_message(list(e.errors()))
        metrics(metrics.errors.inc, "invalid_request")
        return JSONResponse({"error": message}, status_code=status)

    # --- health, metrics, models --------------------------------------------------------------------
    @app.get("/healthz", summary="liveness: the process answers (no token needed)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: models loaded and warmed up",
             responses={**common, 503: {**err, "description": "not ready"}})
    async def readyz() -> Response:
        if not state["ready"]:
            return JSONResponse({"error": "not ready: models are loading or the server is stopping"}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "models": list(workers)})

    @app.get("/metrics", summary="Prometheus metrics (text format 0.0.4)", response_class=PlainTextResponse,
             responses=common)
    async def metrics_endpoint() -> Response:
        body = metrics.render({n: len(w.queue) for n, w in workers.items()})
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", summary="the models served: task, classes, test metrics, preprocessing", responses=common)
    async def list_models() -> dict[str, Any]:
        return {"models": [{k: v for k, v in c.items() if k != "per_class"} for c in cards.values()]}

    @app.get("/v1/models/{name}", summary="one model's card, per-class metrics included",
             responses={**common, 404: {**err, "description": "no such model"}})
    async def get_model(name: str) -> dict[str, Any]:
        worker_of(name)
        return cards[name]

    def plot_route(plot: str) -> None:
        async def get_plot(name: str) -> Response:
            worker_of(name)
            data = plots[name].get(plot)
            if data is None:
                raise RequestError(404, f"model {name!r}: its run folder has no {plot}.png", "not_found")
            return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})

        app.get(f"/v1/models/{{name}}/{plot}.png", summary=f"the training run's {plot.replace('_', ' ')} (PNG)",
                response_class=Response, name=f"get_{plot}",
                responses={**common, 200: {"content": {"image/png": {}}, "description": "PNG"},
                           404: {**err, "description": "no such model or plot"}})(get_plot)

    for plot in PLOTS:
        plot_route(plot)

    # --- prediction -------------------------------------------------------------------------------
    async def read_items(request: Request, w: ModelWorker) -> tuple[list[Any], list[str], int]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        task = w.clf.task
        if ctype == "multipart/form-data":
            if task != "image":
                raise RequestError(422, f"model {w.name!r} is a text model; send JSON {{\"text\": \"...\"}} or "
                                        "{\"texts\": [...]}", "wrong_task")
            try:
                form = await request.form(max_files=settings.max_files, max_fields=16, max_part_size=64 * 1024)
            except StarletteHTTPException as e:
                status = 413 if "Too many" in str(e.detail) or "exceeded" in str(e.detail) else 400
                raise RequestError(status, f"multipart body: {e.detail} (limits: --max-files {settings.max_files}, "
                                           "64 KB per non-file field)", "too_large" if status == 413 else "bad_request") from None
            try:
                files, top_k = [], 1
                for key, value in form.multi_items():
                    if key == "file" and not isinstance(value, str):
                        files.append(value)
                    elif key == "top_k" and isinstance(value, str):
                        try:
                            top_k = int(value)
                        except ValueError:
                            raise RequestError(422, f"top_k: got {value[:20]!r}; send a whole number >= 1",
                                               "invalid_request") from None
                        if top_k < 1:
                            raise RequestError(422, f"top_k: got {top_k}; send a whole number >= 1", "invalid_request")
                    else:
                        raise RequestError(422, f"multipart field {key[:40]!r}: unexpected; send the image(s) as "
                                                "file part(s) named `file` and optionally a `top_k` field", "invalid_request")
                if not files:
                    raise RequestError(422, "no file part named `file`; send the image as multipart field `file` "
                                            "(curl -F file=@image.png)", "invalid_request")
                if len(files) > settings.max_items:
                    raise RequestError(422, f"{len(files)} images; at most {settings.max_items} per request (--max-items)",
                                       "invalid_request")
                items, names = [], []
                for i, f in enumerate(files):
                    what = f"file {(f.filename or str(i))[:80]!r}"
                    data = await f.read(settings.max_image_bytes + 1)
                    if len(data) > settings.max_image_bytes:
                        raise RequestError(413, f"{what}: larger than {settings.max_image_bytes:,} bytes (--max-image-bytes)",
                                           "too_large")
                    _sniff(data, what)
                    items.append(bytes(data))
                    names.append(what)
                return items, names, top_k
            finally:
                await form.close()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise RequestError(415, f"content type {ctype[:60] or '(none)'!r}: send application/json "
                                    "({\"text\": ...} / {\"image\": base64}) or multipart/form-data with a `file` part",
                               "unsupported_media_type")
        body = await request.body()
        try:
            req = schemas.PredictRequest.model_validate_json(body)
        except ValidationError as e:
            status, message = _validation_message(e.errors(include_url=False))
            raise RequestError(status, message, "invalid_request") from None
        if req.text is not None or req.texts is not None:
            if task != "text":
                raise RequestError(422, f"model {w.name!r} is an image model; send an image (multipart field `file`, "
                                        "or JSON {\"image\": base64})", "wrong_task")
            texts = [req.text] if req.text is not None else list(req.texts or [])
            names = ["text"] if req.text is not None else [f"texts[{i}]" for i in range(len(texts))]
            for t, n in zip(texts, names):  # an empty text is predicted, its answer flagged as a guess in `warning`
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(422, f"{n}: not valid Unicode (a lone surrogate); send UTF-8 text", "bad_text") from None
            return texts, names, req.top_k
        if task != "image":
            raise RequestError(422, f"model {w.name!r} is a text model; send JSON {{\"text\": \"...\"}} or "
                                    "{\"texts\": [...]}", "wrong_task")
        raw = [req.image] if req.image is not None else list(req.images or [])
        names = ["image"] if req.image is not None else [f"images[{i}]" for i in range(len(raw))]
        items = []
        for s, n in zip(raw, names):
            data = _b64(s, n, settings.max_image_bytes)  # type: ignore[arg-type]
            _sniff(data, n)
            items.append(data)
        return items, names, req.top_k

    predict_body = {"required": True, "content": {
        "application/json": {"schema": schemas.PredictRequest.model_json_schema()},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "additionalProperties": False,
            "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                                    "maxItems": settings.max_files, "description": "image file(s)"},
                           "top_k": {"type": "integer", "minimum": 1, "default": 1}}}}}}

    @app.post("/v1/models/{name}/predict", summary="predict images or texts", response_model=schemas.PredictResponse,
              openapi_extra={"requestBody": predict_body},
              responses={**common, 400: {**err, "description": "malformed body"},
                         404: {**err, "description": "no such model"},
                         413: {**err, "description": "body, image or part too large"},
                         415: {**err, "description": "neither JSON nor multipart"},
                         422: {**err, "description": "invalid request or an unusable item (see `items`)"},
                         503: {**err, "description": "overloaded: no prediction within --timeout-s"}})
    async def predict(name: str, request: Request) -> Response:
        t0 = time.perf_counter()
        w = worker_of(name)
        items, names, top_k = await read_items(request, w)
        if w.clf.task == "text":  # encoded lengths, for the batcher's token budget (tokenizing is off the loop)
            costs = [max(1, len(ids)) for ids in await asyncio.to_thread(w.clf.preprocessor.encode, items)]
        else:
            costs = [1] * len(items)
        try:
            results = await w.predict(items, names, costs, top_k)
        except InternalError as e:
            metrics(metrics.errors.inc, "internal")
            return JSONResponse({"error": f"internal error while predicting ({e}); see the server log"}, status_code=500)
        failed = [{"index": i, "error": str(r.error).removeprefix("image bytes: ")} for i, r in enumerate(results) if r.error]
        if failed:
            first = failed[0]
            more = f" (and {len(failed) - 1} more items)" if len(failed) > 1 else ""
            raise RequestError(422, f"{names[first['index']]}: {first['error']}{more}",
                               "bad_image" if w.clf.task == "image" else "bad_text", items=failed)
        out = [{"label": r.label, "score": r.score, "top_k": [{"label": c, "score": p} for c, p in r.top_k],
                "warning": r.warning} for r in results]
        return JSONResponse({"model": name, "predictions": out,
                             "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})

    # --- the web page, log-in, docs -------------------------------------------------------------
    def page_headers() -> dict[str, str]:
        return {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return HTMLResponse(static["index.html"], headers=page_headers())

    def static_route(fname: str, mime: str) -> None:
        async def get_static() -> Response:
            return Response(static[fname], media_type=mime, headers=page_headers())

        app.get(f"/static/{fname}", include_in_schema=False, name=f"static_{fname}")(get_static)

    for fname, mime in STATIC_FILES.items():
        static_route(fname, mime)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        from urllib.parse import parse_qs

        fields = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        nxt = fields.get("next", ["/"])[0]
        nxt = nxt if nxt in ("/", "/docs") else "/"
        if settings.token is None:
            return RedirectResponse(nxt, status_code=303)
        given = fields.get("token", [""])[0]
        if not hmac.compare_digest(given.encode("utf-8"), settings.token.encode("utf-8")):
            metrics(metrics.errors.inc, "unauthorized")
            return HTMLResponse(LOGIN_PAGE.format(next=_html_escape(nxt), message="Wrong token."), status_code=401)
        r = RedirectResponse(nxt, status_code=303)
        r.set_cookie(COOKIE, _session_value(settings.token), httponly=True, samesite="strict", path="/")
        return r

    if settings.docs:
        @app.get("/docs", include_in_schema=False)
        async def docs() -> Response:
            if swagger:
                return get_swagger_ui_html(openapi_url="/openapi.json", title="duoclass API",
                                           swagger_js_url="/docs/swagger-ui-bundle.js",
                                           swagger_css_url="/docs/swagger-ui.css",
                                           swagger_favicon_url="/docs/favicon-32x32.png")
            return get_swagger_ui_html(openapi_url="/openapi.json", title="duoclass API")

        def swagger_route(fname: str) -> None:
            async def get_asset() -> Response:
                data, mime = swagger[fname]
                return Response(data, media_type=mime, headers={"Cache-Control": "max-age=86400"})

            app.get(f"/docs/{fname}", include_in_schema=False, name=f"docs_{fname}")(get_asset)

        for fname in swagger:
            swagger_route(fname)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the model names as the {name} parameter's choices and the token scheme."""
        if app.openapi_schema is None:
            schema = base_openapi()
            for path, item in schema["paths"].items():
                for op in item.values():
                    for param in op.get("parameters", []):
                        if param.get("name") == "name" and param.get("in") == "path":
                            param["schema"] = {**param.get("schema", {}), "enum": list(workers)}
            if settings.token:
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                schema["paths"].get("/healthz", {}).get("get", {})["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(_Guard, settings=settings, metrics=metrics)
    return app


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
                self.metrics.requests.inc(scope.get("method", "?"), route, str(status[0] or 500))
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


# --- running it -------------------------------------------------------------------------------
def resolve_token(settings: ServeSettings) -> ServeSettings:
    """The settings with the token from $DUOCLASS_TOKEN when none was given."""
    if settings.token is None and os.environ.get(TOKEN_ENV, "").strip():
        return dataclasses.replace(settings, token=os.environ[TOKEN_ENV].strip())
    return settings


def serve(model_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
          settings: ServeSettings | None = None) -> None:
    """Load the models and serve them with uvicorn until interrupted (what `duoclass serve` runs)."""
    try:
        import uvicorn
    except ImportError:
        raise DuoclassError("duoclass serve needs uvicorn; install it with `pip install duoclass[serve]`") from None
    settings = resolve_token(settings or ServeSettings())
    if not _is_loopback(settings.host) and not settings.token:
        log.warning("serving on %s without a token: anyone who can reach this port can use the models; "
                    "set $%s (or --token)", settings.host, TOKEN_ENV)
    app = create_app(model_dirs, settings)
    log.info("serving %s on http://%s:%d/ (API docs at /docs)%s", ", ".join(app.state.workers), settings.host,
             settings.port, "; token required" if settings.token else "")
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=settings.access_log, server_header=False,
                log_level="warning" if log.getEffectiveLevel() > logging.INFO else "info",
                timeout_graceful_shutdown=10)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `duoclass serve`: MODEL_DIR... and one per ServeSettings field."""
    from .cli import add_config_flags

    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                   help="model folders to serve, each DIR or NAME=DIR (default name: the folder's, or its run "
                        "folder's when it is called `model`)")
    add_config_flags(p, ServeSettings)


def settings_from_args(ns: argparse.Namespace) -> ServeSettings:
    return ServeSettings(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServeSettings) if hasattr(ns, f.name)})


def cmd_serve(ns: argparse.Namespace) -> int:
    serve(ns.model_dirs, settings_from_args(ns))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m duoclass.serve MODEL_DIR ... [flags]`, the same as `duoclass serve`."""
    from .cli import one_line

    p = argparse.ArgumentParser(prog="duoclass serve", description="Serve model folders over HTTP with micro-batching.")
    try:
        add_arguments(p)
        ns = p.parse_args(argv)
    except DuoclassError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return cmd_serve(ns)
    except DuoclassError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
