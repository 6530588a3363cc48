"""The attacks found when the server was probed, each driven against a real server on loopback, bounded in
count and time, each failing on the server as it was before its fix. The crafted inputs and the raw-socket
clients come from benchmarks/serve_attacks.py, which reruns every attack at full size for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import duoclass  # noqa: E402
from duoclass.data.clean import BadImage, decode_cost, decode_image  # noqa: E402
from duoclass.preprocess.image import to_uint8  # noqa: E402
from duoclass.serve.auth import COOKIE, Sessions, _Guard  # noqa: E402
from duoclass.serve.metrics import Metrics  # noqa: E402
from duoclass.serve.requests import RequestError, bounded_json  # noqa: E402
from duoclass.serve.settings import ServeSettings  # noqa: E402

from .test_serve import AUTH, IMAGE, TEXT, TOKEN, Gate, Server, b64, predict_url  # noqa: E402
from .test_serve import image_clf, model_dirs, pngs, text_clf  # noqa: E402,F401  (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_attacks  # noqa: E402
from load_test import ServerProcess  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def trickle(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(head)
    return s


def read_status(s: socket.socket, timeout: float) -> int | None:
    """The status of the response on this socket, or None if nothing came within `timeout`."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except socket.timeout:
        return None
    return int(data.split(b" ")[1]) if data.startswith(b"HTTP/1.1 ") else None


# --- 1. lock-out through the log-in form ---------------------------------------------------------------
def test_trickling_logins_do_not_lock_the_api_out(model_dirs: list[str]) -> None:
    """40 log-ins trickling their bodies, on a server with --max-in-flight 8: log-ins have their own small
    limit (the ones past it get a 429 at once) and take no place among the requests in flight, so API requests
    with the token still get 200, even though the 8 log-ins held would fill every place."""
    with Server(model_dirs, token=TOKEN, max_in_flight=8) as s:
        socks = [trickle(s.port, b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-"
                                 b"urlencoded\r\nContent-Length: 4000\r\n\r\nt") for _ in range(40)]
        try:
            time.sleep(0.3)
            statuses = [httpx.get(s.url + "/v1/models", headers=AUTH, timeout=10).status_code for _ in range(5)]
            refused = [read_status(k, 0.5) for k in socks]
        finally:
            for k in socks:
                k.close()
    assert statuses == [200] * 5
    assert refused.count(429) == 40 - 8, refused  # 8 log-ins at once; the others were told to come back


def test_a_trickled_body_gets_408_after_the_body_timeout(model_dirs: list[str]) -> None:
    with Server(model_dirs, token=TOKEN, body_timeout_s=1.0) as s:
        k = trickle(s.port, b"POST /v1/models/toy/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                            + TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"te")
        t0 = time.monotonic()
        try:
            status = read_status(k, 5)
        finally:
            k.close()
        assert status == 408 and 0.9 < time.monotonic() - t0 < 4


def test_a_log_in_body_is_small(model_dirs: list[str]) -> None:
    with Server(model_dirs, token=TOKEN) as s:
        r = httpx.post(s.url + "/login", content=b"token=" + b"x" * 5000,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "4,096" in r.json()["error"]


# --- 2. small files that cost seconds and a gigabyte ------------------------------------------------------
@pytest.fixture(scope="module")
def attack_server(model_dirs: list[str]) -> Iterator[Server]:
    """Default limits (40 megapixels, 64 MiB to decode), a token, and only PNG and JPEG."""
    with Server(model_dirs, token=TOKEN, image_formats="png,jpeg") as s:
        yield s


@pytest.mark.parametrize("name", ["tiff_bomb", "png_1bit"])
def test_images_too_costly_to_decode_are_refused_before_decoding(name: str) -> None:
    data = getattr(serve_attacks, name)()
    im = Image.open(io.BytesIO(data))
    assert im.size[0] * im.size[1] < 40_000_000 and decode_cost(im.size, im.mode) > 64 * 2**20
    t0 = time.perf_counter()
    with pytest.raises(BadImage, match="too costly to decode"):
        decode_image(data, 40_000_000, size=16, max_bytes=64 * 2**20)
    assert time.perf_counter() - t0 < 0.05  # the header alone was read


def test_the_server_refuses_the_1_bit_png_at_once(attack_server: Server) -> None:
    t0 = time.perf_counter()
    r = httpx.post(attack_server.url + predict_url(IMAGE), headers=AUTH,
                   files={"file": ("black.png", serve_attacks.png_1bit(), "image/png")})
    assert r.status_code == 422 and "too costly to decode" in r.json()["error"], r.text
    assert time.perf_counter() - t0 < 1


def test_formats_the_server_does_not_take_get_415(attack_server: Server, pngs: list[bytes]) -> None:
    tiff, jpeg = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(pngs[1])).save(tiff, format="TIFF")
    Image.open(io.BytesIO(pngs[1])).convert("RGB").save(jpeg, format="JPEG")
    r = httpx.post(attack_server.url + predict_url(IMAGE), headers=AUTH, json={"image": b64(tiff.getvalue())})
    assert r.status_code == 415 and "TIFF" in r.json()["error"] and "--image-formats" in r.json()["error"]
    assert httpx.post(attack_server.url + predict_url(IMAGE), headers=AUTH,
                      json={"image": b64(jpeg.getvalue())}).status_code == 200


def test_a_request_past_its_decoding_budget_stops_decoding(model_dirs: list[str], pngs: list[bytes]) -> None:
    with Server(model_dirs, token=TOKEN, request_cpu_s=1e-6) as s:
        r = httpx.post(s.url + predict_url(IMAGE), headers=AUTH, json={"images": [b64(p) for p in pngs[:3]]})
    assert r.status_code == 422
    assert [e["index"] for e in r.json()["items"]] == [1, 2]
    assert "decoding budget" in r.json()["items"][0]["error"]


def test_grey_images_shrunk_before_they_become_rgb_keep_their_pixels() -> None:
    """decode_image(size=S) resizes 1-bit, 8-bit and 16-bit grey images while grey; every pixel equals the
    full-size RGB conversion resized afterwards (what training does), in PNG and TIFF."""
    import numpy as np

    rng = np.random.default_rng(0)
    for w, h in ((37, 53), (300, 200), (5, 700)):
        grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for im in (Image.fromarray(grey, "L"), Image.fromarray(grey, "L").convert("1"),
                   Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)),
                   Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")):
            for fmt in ("PNG", "TIFF"):
                buf = io.BytesIO()
                im.save(buf, format=fmt)
                for size in (16, 224):
                    full = to_uint8(decode_image(buf.getvalue()), size)
                    assert np.array_equal(to_uint8(decode_image(buf.getvalue(), size=size), size), full), (im.mode, fmt)


# --- 3. half-open connections ----------------------------------------------------------------------------
def test_half_open_connections_neither_lock_out_nor_exhaust_the_server(model_dirs: list[str], tmp_path: Path) -> None:
    """300 connections that send half a request, against a server whose file-descriptor limit is 256:
    /healthz answers throughout (the oldest idle connections are closed to make room), and every half-open
    connection is closed after --header-timeout-s."""
    models = {"img": Path(model_dirs[0]), "txt": Path(model_dirs[1].partition("=")[2])}
    with ServerProcess(models, ["--header-timeout-s", "1.5"], tmp_path / "server.log", nofile=256) as s:
        r = serve_attacks.half_open(s, 300, 2.5)
    assert r["held"], r
    assert r["closed_by_server"] == 300 and r["probes"] > 10, r


# --- 4. admission before tokenizing ----------------------------------------------------------------------
def test_a_full_queue_refuses_texts_before_tokenizing_them(model_dirs: list[str], text_clf: duoclass.Classifier) -> None:
    with Server(model_dirs, token=TOKEN, max_queue=8, max_items=8) as s:
        worker = s.worker(TEXT)
        pre = worker.clf.preprocessor
        encoded: list[Any] = []
        real = pre.load

        def counted(item: Any) -> Any:
            encoded.append(item)
            return real(item)

        async def flood() -> tuple[list[int], list[int]]:
            async with httpx.AsyncClient(base_url=s.url, headers=AUTH, timeout=60) as c:
                with Gate(worker) as gate:
                    held = asyncio.create_task(c.post(predict_url(TEXT), json={"text": "held"}))
                    await asyncio.to_thread(gate.entered.wait, 30)
                    full = asyncio.create_task(c.post(predict_url(TEXT), json={"texts": ["queued"] * 8}))
                    await gate.until_queued(8)
                    pre.load = counted
                    try:
                        refused = [(await c.post(predict_url(TEXT), json={"texts": [f"flood {i}"] * 4})).status_code
                                   for i in range(10)]
                    finally:
                        pre.load = real
                    gate.opened.set()
                    return refused, [(await held).status_code, (await full).status_code]

        refused, admitted = asyncio.run(flood())
    assert refused == [429] * 10 and admitted == [200, 200]
    assert encoded == []  # not one refused text was tokenized


# --- 5. /metrics stays bounded ------------------------------------------------------------------------------
def test_metrics_stay_the_same_size_under_odd_methods_and_paths(model_dirs: list[str], tmp_path: Path) -> None:
    models = {"img": Path(model_dirs[0]), "txt": Path(model_dirs[1].partition("=")[2])}
    with ServerProcess(models, ["--token", serve_attacks.TOKEN], tmp_path / "server.log") as s:
        r = serve_attacks.metrics_growth(s, 1500)
    assert r["held"] and r["metrics_bytes_after"] - r["metrics_bytes_before"] < 100, r
    assert r["statuses"].get("400", 0) > 100 and r["statuses"].get("404", 0) > 100  # both kinds were sent


def test_method_labels_are_only_https_methods() -> None:
    """A method the parser lets through but HTTP does not define (WebDAV's PROPFIND, say) counts as "other"."""
    metrics = Metrics()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = _Guard(app, ServeSettings(), metrics, Sessions(ServeSettings()))

    async def call(method: str) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            pass

        await guard({"type": "http", "method": method, "path": "/x", "headers": []}, receive, send)

    for m in ("PROPFIND", "MKCOL", "PURGE", "GET"):
        asyncio.run(call(m))
    assert {labels[0] for labels in metrics.requests.values} == {"other", "GET"}


# --- 6. large JSON bodies ----------------------------------------------------------------------------
def test_a_14_mb_json_body_does_not_stall_the_server(attack_server: Server) -> None:
    class S:  # what serve_attacks.json_stall needs of a server
        url, port = attack_server.url, attack_server.port

    r = serve_attacks.json_stall(S, TEXT, 14, TOKEN)  # type: ignore[arg-type]
    assert r["body_answer"]["status"] == 422 and "more than" in r["body_answer"]["error"], r
    assert r["healthz_probes"] >= 3 and r["healthz_ms_max"] < 250, r  # 50 ms on a quiet machine (RESULTS.md)


LIMITS = {"text": 20, "texts": 20, "image": 40, "images": 40}


@pytest.mark.parametrize("body, status, message", [
    (b'{"texts": [' + b'"a",' * 100 + b'"a"]}', 422, "more than 8 items"),
    (b'{"texts": ["a", 1]}', 422, "texts[1]: expected a string"),
    (b'{"text": "' + b"x" * 21 + b'"}', 422, "21 characters; at most 20"),
    (b'{"image": "' + b"A" * 50 + b'"}', 422, "50 characters; at most 40"),
    (b'{"text": "a", "extra": 1}', 422, "extra: unknown field"),
    (b'{"text": {"a": 1}}', 422, "text: expected a string"),
    (b'["a"]', 422, "must be a JSON object"),
    (b'{"text": "a"', 400, "not valid JSON"),
    (b'{"text": "a"} x', 400, "not valid JSON"),
    (b'{"text": "\\ud800"}', None, None),
    (b'\xff', 400, "not UTF-8"),
])
def test_bounded_json_refuses_early(body: bytes, status: int | None, message: str | None) -> None:
    if status is None:
        assert bounded_json(body, 8, LIMITS) == json.loads(body)
        return
    with pytest.raises(RequestError) as e:
        bounded_json(body, 8, LIMITS)
    assert e.value.status == status and message in e.value.message


def test_bounded_json_reads_what_json_reads() -> None:
    """Generated predict bodies: bounded_json gives what json.loads gives, whenever it gives anything."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    texts = st.text(max_size=20)
    value = st.one_of(texts, st.lists(texts, max_size=8), st.integers(-5, 2000), st.booleans(), st.none())
    body = st.dictionaries(st.sampled_from(["text", "texts", "image", "images", "top_k"]), value, max_size=4)

    @settings(max_examples=300, deadline=None, database=None)
    @given(body, st.booleans())
    def check(d: dict, ascii_only: bool) -> None:
        raw = json.dumps(d, ensure_ascii=ascii_only, indent=1 if ascii_only else None).encode()
        try:
            got = bounded_json(raw, 8, LIMITS)
        except RequestError as e:
            assert e.status == 422  # a valid JSON document is never called malformed
            return
        assert got == d

    check()


# --- 8. Host check ---------------------------------------------------------------------------------------------
def test_foreign_host_names_are_refused(model_dirs: list[str]) -> None:
    with Server(model_dirs, allowed_host="duoclass.internal") as s:
        def get(host: str, path: str = "/v1/models") -> int:
            return httpx.get(s.url + path, headers={"Host": host}).status_code

        assert get("rebind.example") == 400 and get("rebind.example:80", "/metrics") == 400
        assert get("localhost:1234") == 200 and get(f"127.0.0.1:{s.port}") == 200 and get("[::1]") == 200
        assert get("10.1.2.3") == 200 and get("duoclass.internal") == 200 and get("Duoclass.Internal.:8000") == 200
        assert "--allowed-host" in httpx.get(s.url + "/v1/models", headers={"Host": "evil"}).json()["error"]


# --- 9. /docs from the package ----------------------------------------------------------------------------
def test_docs_load_nothing_from_another_host(attack_server: Server) -> None:
    for page in ("/docs", "/redoc"):
        r = httpx.get(attack_server.url + page, headers=AUTH)
        assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
        refs = re.findall(r'(?:src|href|spec-url)="([^"]+)"', r.text)
        assert refs and all(u.startswith("/") for u in refs), refs
        for u in refs:
            assert httpx.get(attack_server.url + u, headers=AUTH).status_code == 200, u


# --- 10. HEAD and the schema ---------------------------------------------------------------------------
def test_head_answers_every_get_route(attack_server: Server) -> None:
    for path in ("/healthz", "/readyz", "/v1/models", f"/v1/models/{IMAGE}", "/metrics", "/", "/openapi.json", "/docs"):
        get = httpx.get(attack_server.url + path, headers=AUTH)
        head = httpx.head(attack_server.url + path, headers=AUTH)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
    assert httpx.head(attack_server.url + predict_url(IMAGE), headers=AUTH).status_code == 405


def test_the_schema_documents_json_errors(attack_server: Server) -> None:
    spec = httpx.get(attack_server.url + "/openapi.json", headers=AUTH).json()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert list(resp.get("content", {})) == ["application/json"], (path, method, status)


# --- 11. sessions ----------------------------------------------------------------------------------------------
def test_the_session_cookie_is_signed_expires_and_logs_out(model_dirs: list[str]) -> None:
    with Server(model_dirs, token=TOKEN) as s, httpx.Client(base_url=s.url) as c:
        r = c.post("/login", data={"token": TOKEN, "next": "/"})
        assert r.status_code == 303
        value = c.cookies[COOKIE]
        assert value.count(".") == 2 and TOKEN not in value
        assert value != hashlib.sha256(("duoclass-session:" + TOKEN).encode()).hexdigest()
        assert "Max-Age=43200" in r.headers["set-cookie"]
        assert c.get("/v1/models").status_code == 200
        sid, expiry, sig = value.split(".")
        for forged in (f"{sid}.{int(expiry) + 10**6}.{sig}", f"{sid}x.{expiry}.{sig}", f"{sid}.{expiry}.{'0' * 64}"):
            assert httpx.get(s.url + "/v1/models", cookies={COOKIE: forged}).status_code == 401
        assert c.post("/logout").status_code == 303
        assert httpx.get(s.url + "/v1/models", cookies={COOKIE: value}).status_code == 401  # revoked, not just forgotten


def test_sessions_expire() -> None:
    now = [1_000_000.0]
    sessions = Sessions(ServeSettings(session_hours=1), clock=lambda: now[0])
    value = sessions.new()
    assert sessions.valid(value)
    now[0] += 3599
    assert sessions.valid(value)
    now[0] += 2
    assert not sessions.valid(value)


def test_failed_log_ins_are_rate_limited(model_dirs: list[str]) -> None:
    with Server(model_dirs, token=TOKEN, login_attempts=3) as s:
        statuses = [httpx.post(s.url + "/login", data={"token": "wrong"}).status_code for _ in range(3)]
        r = httpx.post(s.url + "/login", data={"token": TOKEN})  # even the right token, from this address, for now
    assert statuses == [401] * 3 and r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 61


@pytest.mark.parametrize("with_token", [False, True])
def test_websocket_requests_need_the_token(with_token: bool) -> None:
    """No route takes a WebSocket, but the guard checks them as it checks HTTP: without the token the
    handshake is refused (close 1008) and the app never sees it."""
    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        await send({"type": "websocket.accept"})

    settings = ServeSettings(token=TOKEN)
    guard = _Guard(app, settings, Metrics(), Sessions(settings))
    sent: list[dict] = []

    async def go() -> None:
        headers = [(b"host", b"127.0.0.1")] + ([(b"authorization", f"Bearer {TOKEN}".encode())] if with_token else [])

        async def receive() -> dict:
            return {"type": "websocket.connect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await guard({"type": "websocket", "path": "/ws", "headers": headers}, receive, send)

    asyncio.run(go())
    if with_token:
        assert seen == ["websocket"] and sent == [{"type": "websocket.accept"}]
    else:
        assert seen == [] and sent == [{"type": "websocket.close", "code": 1008}]


def test_head_strips_the_body_in_the_guard_itself() -> None:
    """At the ASGI level, whatever server runs the app: HEAD reaches the route as GET and its body is dropped."""
    import asyncio

    from duoclass.serve.auth import Sessions, _Guard
    from duoclass.serve.metrics import Metrics

    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    settings = ServeSettings()
    guard = _Guard(app, settings, Metrics(), Sessions(settings))
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "HEAD", "path": "/healthz", "headers": [(b"host", b"127.0.0.1")]}
    asyncio.run(guard(scope, receive, send))
    assert seen == ["GET"] and sent[0]["status"] == 200
    assert [m["body"] for m in sent if m["type"] == "http.response.body"] == [b""]


def test_a_32_bit_image_counts_the_float_copy_its_conversion_makes() -> None:
    """A 4000 x 2000 float TIFF holds 32 MiB of pixels, under the 64 MiB limit, but turning it into 8-bit RGB goes
    through a float64 copy: about 99 MiB at its peak, so it is refused before decoding."""
    buf = io.BytesIO()
    Image.new("F", (4000, 2000)).save(buf, format="TIFF", compression="tiff_deflate")
    data = buf.getvalue()
    assert len(data) < 1_000_000
    assert decode_cost((4000, 2000), "F") > 64 * 2**20 > 4000 * 2000 * 4
    with pytest.raises(BadImage, match="too costly to decode"):
        decode_image(data, 40_000_000, size=16, max_bytes=64 * 2**20)
    decode_image(data, 40_000_000, size=16, max_bytes=128 * 2**20)  # under a larger limit it decodes


def test_places_reserved_for_items_being_decoded_count_as_waiting(text_clf: duoclass.Classifier) -> None:
    """Admission counts the places of requests still tokenizing or decoding, not only the queued items: two
    requests admitted at once can never hold more than --max-queue places between them."""
    import asyncio

    from duoclass.serve.batcher import ModelWorker
    from duoclass.serve.metrics import Metrics
    from duoclass.serve.requests import RequestError

    async def admit() -> None:
        w = ModelWorker("t", text_clf, Path(text_clf.folder), ServeSettings(max_queue=4, max_items=4), Metrics())
        w.reserve(3)  # a request whose 3 texts are being tokenized, none queued yet
        with pytest.raises(RequestError) as e:
            w.reserve(2)
        assert e.value.status == 429 and "3 items are waiting" in e.value.message
        w.reserve(1)  # exactly the limit is fine
        w.release(4)
        w.reserve(4)

    asyncio.run(admit())
