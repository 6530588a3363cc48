"""The HTTP server: model folders behind a JSON API and a web page, with dynamic micro-batching.

    duoclass serve runs/xray/model reviews=runs/reviews/model --port 8000
    python -m duoclass.serve.app runs/xray/model --max-batch-size 1       # the same flags without the CLI
    curl -F file=@a.png http://127.0.0.1:8000/v1/models/xray/predict
    curl -d '{"texts": ["great", "awful"], "top_k": 2}' -H 'Content-Type: application/json' \\
         http://127.0.0.1:8000/v1/models/reviews/predict

In Python, `create_app(["runs/xray/model"], ServeSettings(max_batch_size=16))` returns the FastAPI
app (any ASGI server runs it) and `serve(model_dirs, settings)` runs it with uvicorn.

Endpoints (every one needs the token when one is set, except /healthz):

    POST /v1/models/{name}/predict     multipart `file` part(s), or JSON {"image": b64} {"images": [...]}
                                       {"text": "..."} {"texts": [...]}, optional top_k
    POST /v1/models/{name}/explain     the same bodies, optional method and target (instead of top_k): per item
                                       label, target, score, method, error, and heatmap_png + attributions
                                       (images) or tokens (texts); one request at a time per model, in its own
                                       thread, --explain-queue more waiting (past it 429), --max-explain-items
    GET  /v1/models, /v1/models/{name} task, classes, test metrics, preprocessing, plot URLs
    GET  /v1/models/{name}/confusion_matrix.png, curves.png, reliability.png, roc_pr.png   the run's plots
    GET  /healthz  /readyz  /metrics (Prometheus text)  /docs  /redoc  /openapi.json  /  (the web page)
    POST /login  /logout                the web page's session (with a token)
    HEAD on every GET route

How a prediction runs: the handler validates the request (pydantic, sizes, image magic bytes,
Unicode; a large JSON body is read in a thread, with work bounded by the limits), takes places in
the model's queue (a 429 when there are none: admission before any work), then decodes or tokenizes
each item once, in a small thread pool (a bad item is answered 422 at once), and queues the encoded
items. One asyncio task per model takes items from many requests, up to --max-batch-size items (and,
for text, --max-tokens padded tokens, and only the group of similar lengths that holds the oldest
item) or until the oldest has waited --max-wait-ms, and hands the batch to the model's own thread,
which calls `predict.predict_items` once: the model never runs on the event loop.
--max-batch-size 1 switches batching off, for comparison.

Below the app, `connections.py` bounds the connections (header time and size, their number) and
`auth.py`'s guard checks Host, the token or session, body size and time, and requests in flight.

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
import contextlib
import functools
import hmac
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from duoclass.errors import DuoclassError
from duoclass.serve.auth import COOKIE, LOGIN_CSP, LOGIN_PAGE, Sessions, _Guard, _html_escape, _is_loopback
from duoclass.serve.batcher import ExplainWorker, InternalError, ModelWorker
from duoclass.serve.cards import PLOTS, model_card, parse_model_args
from duoclass.serve.metrics import Metrics
from duoclass.serve.requests import (EXPLAIN_METHODS, MAX_TARGET_CHARS, SMALL_JSON, BodySpec, RequestError, _b64, _schemas, _sniff,
                                     _validation_message, b64_chars, bounded_json, parse_method, parse_target,
                                     parse_top_k)
from duoclass.serve.settings import ServeSettings, TOKEN_ENV, add_arguments, resolve_token, settings_from_args

log = logging.getLogger("duoclass")
STATIC = Path(__file__).with_name("static")
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
               "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png",
               "docs.js": "text/javascript; charset=utf-8"}
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
DOCS_MISSING = ("<!doctype html><title>duoclass API</title><p>The API page needs the package swagger-ui-bundle "
                "(<code>pip install duoclass[serve]</code>). The schema is at <a href=\"/openapi.json\">/openapi.json</a>.")
PAGES = ("/", "/docs", "/redoc")  # where the log-in form may send the browser back to
INLINE_TEXT_CHARS = 2000  # texts of a request shorter than this in all are tokenized on the event loop
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
# ReDoc styles itself with <style> elements it writes (styled-components) and renders in a blob: worker
DOCS_CSP = PAGE_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'") + "; worker-src blob:"


# --- the app ----------------------------------------------------------------------------------
@dataclass
class _State:
    """What every route reads: the settings, the metrics, each model's worker, card and plots, the page's files,
    the Swagger UI assets, and whether the app is ready."""

    settings: ServeSettings
    metrics: Metrics
    schemas: Any
    workers: dict[str, ModelWorker]
    explainers: dict[str, ExplainWorker]  # each model's explanations: a thread of their own, beside its batches
    cards: dict[str, dict[str, Any]]
    plots: dict[str, dict[str, bytes]]
    static: dict[str, bytes]
    swagger: dict[str, tuple[bytes, str]]
    state: dict[str, bool]
    sessions: Sessions
    encoder: ThreadPoolExecutor  # decodes images and tokenizes long texts, off the event loop and the model threads

    @property
    def err(self) -> dict[str, Any]:
        return {"model": self.schemas.ErrorBody}

    @property
    def common(self) -> dict[int, Any]:
        return {401: {**self.err, "description": "missing or wrong API token"},
                429: {**self.err, "description": "too many requests; see Retry-After"}}

    def worker_of(self, name: str) -> ModelWorker:
        w = self.workers.get(name)
        if w is None:
            raise RequestError(404, f"no model named {name[:80]!r}; this server has: {', '.join(self.workers)} "
                                    "(GET /v1/models)", "unknown_model")
        return w


def _load(model_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike], settings: ServeSettings) -> _State:
    """Load every model folder (a bad one fails here with a DuoclassError), its card and plots, and the page."""
    from duoclass.infer.classifier import Classifier

    folders = parse_model_args(model_dirs)
    metrics = Metrics()
    schemas = _schemas(settings)
    workers: dict[str, ModelWorker] = {}
    explainers: dict[str, ExplainWorker] = {}
    cards: dict[str, dict[str, Any]] = {}
    plots: dict[str, dict[str, bytes]] = {}
    for name, folder in folders.items():
        t0 = time.perf_counter()
        clf = Classifier.from_folder(folder, device=settings.device, backend=settings.backend, max_pixels=settings.max_pixels,
                                     max_decode_bytes=int(settings.max_decode_mb * 2**20))
        cards[name], plots[name] = model_card(name, clf, folder, settings.backend, settings.abstain_below)
        workers[name] = ModelWorker(name, clf, folder, settings, metrics)
        if settings.explain:
            explainers[name] = ExplainWorker(name, clf, settings, metrics)
        cards[name]["explain"] = settings.explain
        cards[name]["explain_methods"] = list(explainers[name].methods) if settings.explain else []
        metrics.info.set(name, clf.task, settings.backend, value=1)
        log.info("model %s: %s (%s, %d classes) from %s in %.1f s", name, cards[name]["model"], clf.task,
                 len(clf.classes_), folder, time.perf_counter() - t0)
    static = {}
    for fname in ["index.html", "docs.html", "redoc.html", *STATIC_FILES]:
        try:
            static[fname] = (STATIC / fname).read_bytes()
        except OSError as e:
            raise DuoclassError(f"{STATIC / fname}: cannot read the web page ({e.strerror}); reinstall duoclass") from None
    swagger: dict[str, tuple[bytes, str]] = {}
    if settings.docs:
        try:  # Swagger UI's and ReDoc's files from the package that ships them: /docs loads nothing from another host
            import fastapi_offline

            assets = Path(fastapi_offline.__file__).with_name("static")
            for fname, mime in DOCS_ASSETS.items():
                folder = STATIC if fname == "docs.js" else assets
                swagger[fname] = ((folder / fname).read_bytes(), mime)
        except (ImportError, OSError):
            swagger = {}
            log.info("/docs is off: it needs the package fastapi-offline (`pip install duoclass[serve]`); "
                     "the schema is at /openapi.json")
    state = {"ready": False}
    encoder = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="duoclass-encode")
    return _State(settings, metrics, schemas, workers, explainers, cards, plots, static, swagger, state, Sessions(settings),
                  encoder)


def create_app(model_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
               settings: ServeSettings | None = None) -> Any:
    """The FastAPI app serving these model folders ("DIR" or "NAME=DIR"). Loads every model now, so a bad
    folder fails here with a DuoclassError; each model's batcher starts with the app (its lifespan)."""
    try:  # every route module below imports from these
        import pydantic  # noqa: F401
        import starlette  # noqa: F401
        from fastapi import FastAPI
    except ImportError as e:
        raise DuoclassError(f"duoclass serve needs FastAPI ({e.name} is missing); install it with "
                            "`pip install duoclass[serve]`") from None

    from duoclass import __version__

    st = _load(model_dirs, settings or ServeSettings())
    settings, metrics, workers, state = st.settings, st.metrics, st.workers, st.state

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
            for x in st.explainers.values():
                x.stop()
            st.encoder.shutdown(wait=False, cancel_futures=True)

    description = ("Image and text classifiers. Send images as multipart field `file` or JSON base64, texts as JSON. "
                   "Errors are JSON `{\"error\": \"...\"}`." + (" Every endpoint but /healthz wants "
                                                               "`Authorization: Bearer TOKEN`." if settings.token else ""))
    app = FastAPI(title="duoclass", version=__version__, description=description, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if settings.docs else None)
    app.state.workers = workers
    app.state.explainers = st.explainers
    app.state.settings = settings
    app.state.metrics = metrics
    for add_routes in (_add_error_handlers, _add_model_routes, _add_predict_route, _add_page_routes, _add_login_routes,
                       _add_openapi):
        add_routes(app, st)
    app.add_middleware(_Guard, settings=settings, metrics=metrics, sessions=st.sessions)
    return app


def _add_error_handlers(app: Any, st: "_State") -> None:
    """Client mistakes and unknown paths become a JSON {"error": ...} with the right status, counted."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = st.metrics

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


def _add_model_routes(app: Any, st: "_State") -> None:
    """/healthz, /readyz, /metrics and the models with their cards and plots."""
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    metrics, workers, cards, plots, state = st.metrics, st.workers, st.cards, st.plots, st.state
    err, common, worker_of = st.err, st.common, st.worker_of

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
        return {"models": [{k: v for k, v in c.items() if k != "per_class"} for c in cards.values()],
                "token_required": st.settings.token is not None}

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


# Long on purpose: the predict route and its one body parser (read_items, for multipart and JSON alike) stay
# together, so their limits and errors read side by side.
def _add_predict_route(app: Any, st: "_State") -> None:
    """POST /v1/models/{name}/predict: parse and check the items, queue them, answer each."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from duoclass.preprocess.load import Encoded, load_each

    settings, metrics, schemas = st.settings, st.metrics, st.schemas
    err, common, worker_of = st.err, st.common, st.worker_of
    max_chars = {"text": settings.max_text_chars, "texts": settings.max_text_chars,
                 "image": b64_chars(settings), "images": b64_chars(settings), "method": 20, "target": MAX_TARGET_CHARS}
    PREDICT = BodySpec(schemas.PredictRequest, {"top_k": parse_top_k}, settings.max_items, "--max-items")

    # --- prediction -------------------------------------------------------------------------------
    # Long for now: one parser for both bodies (multipart and JSON), and for both routes (predict and explain: `spec`
    # says what else their body holds), so their limits and errors stay alike.
    async def read_items(request: Request, w: ModelWorker, spec: BodySpec = PREDICT
                         ) -> tuple[list[Any], list[str], dict[str, Any]]:
        """(items, their names, the body's options: top_k, or method and target)."""
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
                files: list[Any] = []
                options = {k: spec.model.model_fields[k].default for k in spec.options}
                for key, value in form.multi_items():
                    if key == "file" and not isinstance(value, str):
                        files.append(value)
                    elif key in spec.options and isinstance(value, str):
                        options[key] = spec.options[key](value)
                    else:
                        raise RequestError(422, f"multipart field {key[:40]!r}: unexpected; send the image(s) as "
                                                f"file part(s) named `file` and optionally {spec.hint()} fields",
                                           "invalid_request")
                if not files:
                    raise RequestError(422, "no file part named `file`; send the image as multipart field `file` "
                                            "(curl -F file=@image.png)", "invalid_request")
                if len(files) > spec.max_items:
                    raise RequestError(422, f"{len(files)} images; at most {spec.max_items} per request ({spec.flag})",
                                       "invalid_request")
                items, names = [], []
                for i, f in enumerate(files):
                    what = f"file {(f.filename or str(i))[:80]!r}"
                    data = await f.read(settings.max_image_bytes + 1)
                    if len(data) > settings.max_image_bytes:
                        raise RequestError(413, f"{what}: larger than {settings.max_image_bytes:,} bytes (--max-image-bytes)",
                                           "too_large")
                    with _item(i, what):
                        _sniff(data, what, settings.image_formats)
                    items.append(bytes(data))
                    names.append(what)
                return items, names, options
            finally:
                await form.close()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise RequestError(415, f"content type {ctype[:60] or '(none)'!r}: send application/json "
                                    "({\"text\": ...} / {\"image\": base64}) or multipart/form-data with a `file` part",
                               "unsupported_media_type")
        body = await request.body()
        if len(body) <= SMALL_JSON:
            return json_items(body, w, spec)
        return await asyncio.to_thread(json_items, body, w, spec)  # bounded work, and the event loop keeps answering

    def json_items(body: bytes, w: ModelWorker, spec: BodySpec) -> tuple[list[Any], list[str], dict[str, Any]]:
        """A JSON body -> (items, their names, its options): texts as str, images as bytes."""
        task = w.clf.task
        try:
            if len(body) <= SMALL_JSON:
                req = spec.model.model_validate_json(body)
            else:
                req = spec.model.model_validate(bounded_json(body, spec.max_items, max_chars, spec.fields, spec.flag),
                                                strict=True)
        except ValidationError as e:
            status, message = _validation_message(e.errors(include_url=False), spec.hint(), spec.flag)
            raise RequestError(status, message, "invalid_request") from None
        options = {k: getattr(req, k) for k in spec.options}
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
            return texts, names, options
        if task != "image":
            raise RequestError(422, f"model {w.name!r} is a text model; send JSON {{\"text\": \"...\"}} or "
                                    "{\"texts\": [...]}", "wrong_task")
        raw = [req.image] if req.image is not None else list(req.images or [])
        names = ["image"] if req.image is not None else [f"images[{i}]" for i in range(len(raw))]
        items = []
        for s, n in zip(raw, names):
            with _item(len(items), n):
                data = _b64(s, n, settings.max_image_bytes)  # type: ignore[arg-type]
                _sniff(data, n, settings.image_formats)
            items.append(data)
        return items, names, options

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
        items, names, options = await read_items(request, w)
        top_k, n = options["top_k"], len(items)
        w.reserve(n)  # admission (a 429 when the queue is full) before any decoding or tokenizing
        try:
            if w.clf.task == "text" and sum(len(t) for t in items) <= INLINE_TEXT_CHARS:
                encoded, errors = load_each(w.clf.preprocessor, items)  # a few short texts: cheaper than a thread
            else:
                encoded, errors = await asyncio.get_running_loop().run_in_executor(
                    st.encoder, functools.partial(load_each, w.clf.preprocessor, items, budget_s=settings.request_cpu_s))
        except BaseException:
            w.release(n)
            raise
        if errors:
            w.release(n)
            failed = [{"index": i, "error": errors[i].removeprefix("image bytes: ")} for i in sorted(errors)]
            first = failed[0]
            more = f" (and {len(failed) - 1} more items)" if len(failed) > 1 else ""
            raise RequestError(422, f"{names[first['index']]}: {first['error']}{more}",
                               "bad_image" if w.clf.task == "image" else "bad_text", items=failed)
        costs = [max(1, len(encoded[i])) if w.clf.task == "text" else 1 for i in range(n)]
        try:
            results = await w.predict([Encoded(x, encoded[i]) for i, x in enumerate(items)], names, costs, top_k,
                                      reserved=n)
        except InternalError as e:
            metrics(metrics.errors.inc, "internal")
            return JSONResponse({"error": f"internal error while predicting ({e}); see the server log"}, status_code=500)
        failed = [{"index": i, "error": str(r.error)} for i, r in enumerate(results) if r.error]
        if failed:  # encoded inputs do not fail in the model thread; this is a guard, not a path
            raise RequestError(422, f"{names[failed[0]['index']]}: {failed[0]['error']}",
                               "bad_image" if w.clf.task == "image" else "bad_text", items=failed)
        out = [{k: v for k, v in r.to_dict().items() if k in ("label", "score", "top_k", "set", "abstained", "warning")}
               for r in results]
        return JSONResponse({"model": name, "predictions": out,
                             "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})

    if st.settings.explain:
        _add_explain_route(app, st, read_items)


def _add_explain_route(app: Any, st: "_State", read_items: Any) -> None:
    """POST /v1/models/{name}/explain: predict's body parser (with method and target for top_k), its token and
    limits; then admission to the model's explanation pool (a 429 when it is busy), never to its batches."""
    import json

    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    settings, schemas, explainers = st.settings, st.schemas, st.explainers
    err, common, worker_of = st.err, st.common, st.worker_of
    EXPLAIN = BodySpec(schemas.ExplainRequest, {"method": parse_method, "target": parse_target},
                       settings.max_explain_items, "--max-explain-items")
    explain_body = {"required": True, "content": {
        "application/json": {"schema": schemas.ExplainRequest.model_json_schema()},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "additionalProperties": False,
            "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                                    "maxItems": min(settings.max_files, settings.max_explain_items),
                                    "description": "image file(s)"},
                           "method": {"type": "string", "enum": list(EXPLAIN_METHODS), "default": "auto"},
                           "target": {"type": "string", "minLength": 1, "maxLength": MAX_TARGET_CHARS,
                                      "description": "the class to explain (default: the predicted label)"}}}}}}

    @app.post("/v1/models/{name}/explain", summary="explain the predictions of images or texts",
              response_model=schemas.ExplainResponse, openapi_extra={"requestBody": explain_body},
              responses={**common, 400: {**err, "description": "malformed body"},
                         404: {**err, "description": "no such model"},
                         413: {**err, "description": "body, image or part too large"},
                         415: {**err, "description": "neither JSON nor multipart"},
                         422: {**err, "description": "invalid request, a method the model lacks, a target that is "
                                                     "no class, or an item that is no image (see `items`)"},
                         503: {**err, "description": "overloaded: no explanation within --timeout-s"}})
    async def explain(name: str, request: Request) -> Response:
        t0 = time.perf_counter()
        w = worker_of(name)
        x = explainers[name]
        items, names, options = await read_items(request, w, EXPLAIN)
        method, target = options["method"], options["target"]
        if method in x.refused:
            raise RequestError(422, x.refused[method], "explain_method")
        if target is not None and target not in w.clf.classes_.tolist():
            classes = w.clf.classes_.tolist()
            raise RequestError(422, f"target {target[:80]!r}: not a class of model {name!r} (its classes: "
                                    f"{', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})",
                               "invalid_request")
        x.reserve()  # admission (a 429 when the pool is busy) before any decoding
        try:
            parts = await x.explain(items, names, x.methods[method], target)
        except InternalError as e:
            st.metrics(st.metrics.errors.inc, "internal")
            return JSONResponse({"error": f"internal error while explaining ({e}); see the server log"}, status_code=500)
        latency = round((time.perf_counter() - t0) * 1000, 3)
        body = b'{"model":%s,"explanations":[%s],"latency_ms":%s}' % (json.dumps(name).encode(), b",".join(parts),
                                                                       json.dumps(latency).encode())
        return Response(body, media_type="application/json")


@contextlib.contextmanager
def _item(index: int, name: str) -> Any:
    """A RequestError about one item's content (not base64, not an image) names that item in `items`, as an item
    that fails to decode does."""
    try:
        yield
    except RequestError as e:
        if e.items is None and e.status == 422:
            e.items = [{"index": index, "error": e.message.removeprefix(f"{name}: ")}]
        raise


def _add_page_routes(app: Any, st: "_State") -> None:
    """The web page and its files, /docs and /redoc."""
    from fastapi.responses import HTMLResponse, Response

    settings, static, swagger = st.settings, st.static, st.swagger

    # --- the web page, log-in, docs -------------------------------------------------------------
    def page_headers(csp: str = PAGE_CSP) -> dict[str, str]:
        return {"Content-Security-Policy": csp, "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return HTMLResponse(static["index.html"], headers=page_headers())

    def static_route(fname: str, mime: str) -> None:
        async def get_static() -> Response:
            return Response(static[fname], media_type=mime, headers=page_headers())

        app.get(f"/static/{fname}", include_in_schema=False, name=f"static_{fname}")(get_static)

    for fname, mime in STATIC_FILES.items():
        static_route(fname, mime)

    if settings.docs:
        @app.get("/docs", include_in_schema=False)
        async def docs() -> Response:
            if not swagger:
                return HTMLResponse(DOCS_MISSING, status_code=404, headers=page_headers())
            return HTMLResponse(static["docs.html"], headers=page_headers())

        @app.get("/redoc", include_in_schema=False)
        async def redoc() -> Response:
            if not swagger:
                return HTMLResponse(DOCS_MISSING, status_code=404, headers=page_headers())
            return HTMLResponse(static["redoc.html"], headers=page_headers(DOCS_CSP))

        def swagger_route(fname: str) -> None:
            async def get_asset() -> Response:
                data, mime = swagger[fname]
                return Response(data, media_type=mime, headers={**page_headers(), "Cache-Control": "max-age=86400"})

            app.get(f"/docs/{fname}", include_in_schema=False, name=f"docs_{fname}")(get_asset)

        for fname in swagger:
            swagger_route(fname)


def _add_login_routes(app: Any, st: "_State") -> None:
    """POST /login (the page's form: a session cookie for the right token, a 429 past --login-attempts) and
    POST /logout (the session revoked)."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, RedirectResponse, Response

    settings, metrics, sessions = st.settings, st.metrics, st.sessions

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        from urllib.parse import parse_qs

        client = request.client.host if request.client else "?"
        wait = sessions.blocked(client)
        if wait:
            raise RequestError(429, f"too many failed log-ins from {client}; retry after {wait} s", "too_many_logins",
                               {"Retry-After": str(wait)})
        try:
            fields = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        except ValueError:  # more fields than the form has
            raise RequestError(400, "the log-in form has two fields, token and next; send no others",
                               "bad_request") from None
        nxt = fields.get("next", ["/"])[0]
        nxt = nxt if nxt in PAGES else "/"
        if settings.token is None:
            return RedirectResponse(nxt, status_code=303)
        given = fields.get("token", [""])[0]
        if not hmac.compare_digest(given.encode("utf-8"), settings.token.encode("utf-8")):
            sessions.failed(client)
            metrics(metrics.errors.inc, "unauthorized")
            return HTMLResponse(LOGIN_PAGE.format(next=_html_escape(nxt), message="Wrong token."), status_code=401,
                                headers={"Cache-Control": "no-store", "Content-Security-Policy": LOGIN_CSP})
        r = RedirectResponse(nxt, status_code=303)
        r.set_cookie(COOKIE, sessions.new(), max_age=sessions.seconds, httponly=True, samesite="strict", path="/")
        return r

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        cookie = sessions.cookie_of({"cookie": request.headers.get("cookie", "")})
        if cookie:
            sessions.revoke(cookie)
        r = RedirectResponse("/", status_code=303)
        r.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return r


def _add_openapi(app: Any, st: "_State") -> None:
    """The schema: FastAPI's, plus the model names as {name}'s choices and the token scheme."""
    settings, workers = st.settings, st.workers

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the model names as the {name} parameter's choices and the token scheme."""
        if app.openapi_schema is None:
            schema = base_openapi()
            for path, item in schema["paths"].items():
                for op in item.values():
                    for status, resp in op.get("responses", {}).items():  # errors are JSON whatever the route's type
                        content = resp.get("content", {})
                        if status[0] in "45" and set(content) - {"application/json"}:
                            schema_ = next((c["schema"] for c in content.values() if "schema" in c), None)
                            resp["content"] = {"application/json": {"schema": schema_} if schema_ else {}}
                    for param in op.get("parameters", []):
                        if param.get("name") == "name" and param.get("in") == "path":
                            param["schema"] = {**param.get("schema", {}), "enum": list(workers)}
            _per_model(schema, st)
            if settings.token:
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                schema["paths"].get("/healthz", {}).get("get", {})["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]



def _per_model(schema: dict[str, Any], st: "_State") -> None:
    """One predict and one explain path per model, with the body its task takes: the schema then allows only
    requests the server accepts (a text model's path documents texts, an image model's images; an explain path
    the methods that model has and its classes as targets), where one path for every model would allow sending
    an image to a text model. The routes themselves stay one each."""
    import copy

    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for route, options in (("predict", ("top_k",)), ("explain", ("method", "target")))[: 2 if st.explainers else 1]:
        generic = schema["paths"].pop(f"/v1/models/{{name}}/{route}")["post"]
        model = getattr(st.schemas, f"{route.capitalize()}Request")
        full = components.pop(model.__name__, None) or model.model_json_schema()
        for task, keep in (("text", ("text", "texts")), ("image", ("image", "images"))):
            props = {k: v for k, v in full["properties"].items() if k in (*keep, *options)}
            title = f"{task.capitalize()}{route.capitalize()}Request"
            components[title] = {
                "title": title, "type": "object", "properties": props, "additionalProperties": False,
                "oneOf": [{"required": [k]} for k in keep],
                "description": f"Exactly one of {' or '.join(keep)}, and optionally {' and '.join(options)}."}
        for name, w in st.workers.items():
            task = w.clf.task
            op = copy.deepcopy(generic)
            op["operationId"] = f"{route}_{name}"
            op["summary"] = f"{route} with {name} ({task} model)"
            op["parameters"] = [p for p in op.get("parameters", []) if p.get("name") != "name"]
            content = op["requestBody"]["content"]
            ref = {"$ref": f"#/components/schemas/{task.capitalize()}{route.capitalize()}Request"}
            if route == "explain":  # this model's methods and classes; the body otherwise as its task's
                ref = copy.deepcopy(components[ref["$ref"].rsplit("/", 1)[1]])
                mine = {"method": {**ref["properties"]["method"], "enum": list(st.explainers[name].methods)},
                        "target": {**ref["properties"]["target"], "enum": w.clf.classes_.tolist()}}
                ref["properties"].update(mine)
                form = content["multipart/form-data"]["schema"]["properties"]
                form.update({k: {**form[k], **{"enum": v["enum"]}} for k, v in mine.items()})
            content["application/json"] = {"schema": ref}
            if task == "text":
                content.pop("multipart/form-data", None)
            schema["paths"][f"/v1/models/{name}/{route}"] = {"post": op}


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
    from duoclass.serve.connections import uvicorn_config

    uvicorn.Server(uvicorn_config(app, settings, log_level="warning" if log.getEffectiveLevel() > logging.INFO
                                  else "info")).run()


def cmd_serve(ns: argparse.Namespace) -> int:
    serve(ns.model_dirs, settings_from_args(ns))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m duoclass.serve MODEL_DIR ... [flags]`, the same as `duoclass serve`."""
    from duoclass.errors import one_line

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
