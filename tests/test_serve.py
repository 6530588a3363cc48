"""`duoclass serve` against a real uvicorn server on a loopback port, over real HTTP (httpx).

Answers equal Classifier.predict; every kind of bad input gets a 4xx JSON error that says what to change;
a bad item in a micro-batch fails only its own request; 429 with Retry-After past the queue limit; the token;
/metrics parses and counts; schemathesis finds no 5xx; a real Chromium drives the web page.

The models are msresnet-tiny at 16 px on scikit-learn's digits and tfidf-mlp on the toy texts, trained once per
session (test_robust_eval trains the same folders). Batching tests hold a model's thread on a gate, so the
requests sent meanwhile are queued, and then batched, for certain.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

import duoclass  # noqa: E402
from duoclass.errors import DuoclassError  # noqa: E402
from duoclass.serve.settings import ServeSettings, add_arguments, settings_from_args
from duoclass.serve.app import create_app
from duoclass.serve.connections import uvicorn_config
from duoclass.serve.cards import parse_model_args  # noqa: E402

from .test_robust_eval import trained  # noqa: E402
from .test_text import make_toy  # noqa: E402

pytestmark = pytest.mark.timeout(300)

TOKEN = "serve-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE, TEXT = "digits-msresnet-tiny", "toy"  # the image model's name comes from its run folder, the text one's from NAME=
TEXTS = ["a really lovely movie", "the plot was awful", "superb acting", "horrible dreadful film quite bad"]
LIMITS = dict(max_items=8, max_files=4, max_text_chars=500, max_image_bytes=100_000, max_body_bytes=400_000,
              max_pixels=1_000_000)


# --- the server -------------------------------------------------------------------------------
class Server:
    """uvicorn serving create_app(model_dirs, settings) in a thread, on a free loopback port."""

    def __init__(self, model_dirs: Any, **settings: Any):
        self.settings = ServeSettings(access_log=False, **settings)
        self.app = create_app(model_dirs, self.settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, self.settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def worker(self, name: str) -> Any:
        return self.app.state.workers[name]


class Gate:
    """Holds a model's thread inside its backend until opened, so that requests sent meanwhile queue up."""

    def __init__(self, worker: Any):
        self.worker, self.backend = worker, worker.clf.backend
        self.entered, self.opened = threading.Event(), threading.Event()
        self.run = self.backend.run

    def __enter__(self) -> "Gate":
        def held(inputs: Any) -> Any:
            self.entered.set()
            assert self.opened.wait(30), "the gate was never opened"
            return self.run(inputs)

        self.backend.run = held
        return self

    def __exit__(self, *exc: Any) -> None:
        self.opened.set()
        self.backend.run = self.run

    async def until_queued(self, n: int) -> None:
        """Wait until the model's thread is held and n items wait in its queue."""
        await asyncio.to_thread(self.entered.wait, 30)
        for _ in range(3000):
            if len(self.worker.queue) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.worker.queue)} items queued, expected {n}")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_clf(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    return trained(tmp_path_factory, "digits-msresnet-tiny", digits, model="msresnet-tiny", image_size=16, epochs=2,
                   augment="none")


@pytest.fixture(scope="module")
def text_clf(tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    toy = make_toy(tmp_path_factory.getbasetemp() / "robust-models" / "toy-text", 60, 20)
    return trained(tmp_path_factory, "toy-tfidf-mlp", toy, model="tfidf-mlp", epochs=1, batch_size=16)


@pytest.fixture(scope="module")
def model_dirs(image_clf: duoclass.Classifier, text_clf: duoclass.Classifier) -> list[str]:
    return [str(image_clf.folder), f"{TEXT}={text_clf.folder}"]


@pytest.fixture(scope="module")
def server(model_dirs: list[str]) -> Iterator[Server]:
    with Server(model_dirs, token=TOKEN, **LIMITS) as s:
        yield s


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def pngs(digits: Path) -> list[bytes]:
    """One test image of each digit, as PNG bytes."""
    return [sorted((digits / "test" / str(d)).iterdir())[0].read_bytes() for d in range(10)]


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def header_bomb(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def predict_url(name: str) -> str:
    return f"/v1/models/{name}/predict"


def explain_url(name: str) -> str:
    return f"/v1/models/{name}/explain"


def assert_same(api: dict, expected: duoclass.Prediction, k: int) -> None:
    assert api["label"] == expected.label
    assert api["score"] == pytest.approx(expected.score, abs=1e-5)
    assert [t["label"] for t in api["top_k"]] == [c for c, _ in expected.top_k[:k]]
    assert [t["score"] for t in api["top_k"]] == pytest.approx([p for _, p in expected.top_k[:k]], abs=1e-5)
    assert api["warning"] == expected.warning


# --- answers ----------------------------------------------------------------------------------
def test_image_answers_equal_classifier_predict(client: httpx.Client, image_clf: duoclass.Classifier,
                                                pngs: list[bytes]) -> None:
    expected = image_clf.predict_results(pngs, top_k=3)
    for data, exp in zip(pngs[:4], expected):  # one multipart file per request
        r = client.post(predict_url(IMAGE), files={"file": ("digit.png", data, "image/png")}, data={"top_k": "3"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == IMAGE and body["latency_ms"] > 0
        assert_same(body["predictions"][0], exp, 3)
    r = client.post(predict_url(IMAGE), files=[("file", (f"{i}.png", d, "image/png")) for i, d in enumerate(pngs[:4])])
    assert r.status_code == 200, r.text
    for got, exp in zip(r.json()["predictions"], expected):  # several files; top_k defaults to 1
        assert_same(got, exp, 1)
    r = client.post(predict_url(IMAGE), json={"image": b64(pngs[5]), "top_k": 3})
    assert_same(r.json()["predictions"][0], expected[5], 3)
    r = client.post(predict_url(IMAGE), json={"image": "data:image/png;base64," + b64(pngs[6]), "top_k": 2})
    assert_same(r.json()["predictions"][0], expected[6], 2)
    r = client.post(predict_url(IMAGE), json={"images": [b64(d) for d in pngs[6:]], "top_k": 10})
    assert r.status_code == 200, r.text
    for got, exp in zip(r.json()["predictions"], image_clf.predict_results(pngs[6:], top_k=10)):
        assert_same(got, exp, 10)


def test_text_answers_equal_classifier_predict(client: httpx.Client, text_clf: duoclass.Classifier) -> None:
    expected = text_clf.predict_results(TEXTS, top_k=2)
    r = client.post(predict_url(TEXT), json={"text": TEXTS[0], "top_k": 2})
    assert r.status_code == 200, r.text
    assert_same(r.json()["predictions"][0], expected[0], 2)
    r = client.post(predict_url(TEXT), json={"texts": TEXTS, "top_k": 2})
    assert [p["label"] for p in r.json()["predictions"]] == text_clf.predict(TEXTS)
    for got, exp in zip(r.json()["predictions"], expected):
        assert_same(got, exp, 2)
    r = client.post(predict_url(TEXT), json={"text": "zzzz qqqq"})  # no known n-gram: a label, flagged as a guess
    assert r.status_code == 200 and "guess" in r.json()["predictions"][0]["warning"]


def test_empty_texts_get_a_label_and_a_warning(client: httpx.Client, text_clf: duoclass.Classifier) -> None:
    """No item is lost: empty and blank texts are answered in their place, each flagged as a guess."""
    texts = ["hi there", "", "   ", "see you at 5"]
    r = client.post(predict_url(TEXT), json={"texts": texts})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert len(got) == 4 and all(p["label"] in text_clf.classes_ for p in got)
    assert [("empty text" in (p["warning"] or "")) for p in got] == [False, True, True, False]
    r = client.post(predict_url(TEXT), json={"text": ""})
    assert r.status_code == 200 and "empty text" in r.json()["predictions"][0]["warning"]


# --- bad input --------------------------------------------------------------------------------
def _noise(side: int) -> bytes:
    return png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)))


def _bad_cases(pngs: list[bytes]) -> list[tuple[str, str, dict, int, str]]:
    """(id, model, httpx.post keyword arguments, status, a fragment of the error)."""
    good = pngs[0]
    f = lambda data, name="x.png": {"files": {"file": (name, data, "image/png")}}  # noqa: E731
    return [
        ("truncated-image", IMAGE, f(good[: len(good) // 2]), 422, "truncated"),
        ("non-image", IMAGE, f(b"this is a text file, not a picture"), 422, "not an image"),
        ("empty-file", IMAGE, f(b""), 422, "empty"),
        ("oversized-image", IMAGE, f(_noise(250)), 413, "--max-image-bytes"),
        ("decompression-bomb", IMAGE, f(png(Image.new("L", (2000, 2000)))), 422, "pixel limit"),
        ("declared-bomb", IMAGE, f(header_bomb(100_000, 100_000)), 422, "pixel limit"),
        ("bomb-base64", IMAGE, {"json": {"image": b64(png(Image.new("1", (1500, 1500))))}}, 422, "pixel limit"),
        ("bad-base64", IMAGE, {"json": {"image": "not base64 at all!"}}, 422, "base64"),
        ("base64-not-image", IMAGE, {"json": {"image": b64(b"/etc/passwd")}}, 422, "not an image"),
        ("too-many-files", IMAGE, {"files": [("file", (f"{i}.png", good, "image/png")) for i in range(5)]}, 413,
         "--max-files"),
        ("no-file-field", IMAGE, {"files": {"other": ("x.png", good, "image/png")}}, 422, "unexpected"),
        ("multipart-top-k-text", IMAGE, {**f(good), "data": {"top_k": "many"}}, 422, "top_k"),
        ("text-to-image-model", IMAGE, {"json": {"text": "hello"}}, 422, "image model"),
        ("image-to-text-model", TEXT, {"json": {"image": b64(good)}}, 422, "text model"),
        ("multipart-to-text-model", TEXT, f(good), 422, "text model"),
        ("text-not-string", TEXT, {"json": {"text": 5}}, 422, "text: Input should be a valid string"),
        ("texts-not-list", TEXT, {"json": {"texts": "abc"}}, 422, "texts: Input should be a valid"),
        ("texts-item-not-string", TEXT, {"json": {"texts": ["ok", 3]}}, 422, "texts[1]"),
        ("top-k-string", TEXT, {"json": {"text": "good", "top_k": "3"}}, 422, "top_k"),
        ("top-k-zero", TEXT, {"json": {"text": "good", "top_k": 0}}, 422, "top_k"),
        ("two-inputs", TEXT, {"json": {"text": "a", "texts": ["b"]}}, 422, "exactly one of"),
        ("no-input", TEXT, {"json": {}}, 422, "exactly one of"),
        ("unknown-field", TEXT, {"json": {"text": "a", "txt": "b"}}, 422, "unknown field"),
        ("body-not-object", TEXT, {"json": ["a", "b"]}, 422, "object"),
        ("empty-texts", TEXT, {"json": {"texts": []}}, 422, "texts"),
        ("too-many-items", TEXT, {"json": {"texts": ["good"] * 9}}, 422, "--max-items"),
        ("text-too-long", TEXT, {"json": {"text": "good " * 101}}, 422, "--max-text-chars"),
        ("invalid-json", TEXT, {"content": b'{"text": ', "headers": {"Content-Type": "application/json"}}, 400,
         "not valid JSON"),
        ("lone-surrogate", TEXT, {"content": b'{"text": "\\ud800"}', "headers": {"Content-Type": "application/json"}},
         0, ""),
        ("wrong-content-type", TEXT, {"content": b"good movie", "headers": {"Content-Type": "text/plain"}}, 415,
         "application/json"),
        ("body-too-large", TEXT, {"json": {"text": "x" * 500_000}}, 413, "--max-body-bytes"),
        ("unknown-model", "no-such-model", {"json": {"text": "good"}}, 404, "no model named 'no-such-model'"),
    ]


@pytest.fixture(scope="module")
def bad_cases(pngs: list[bytes]) -> dict[str, tuple]:
    return {c[0]: c[1:] for c in _bad_cases(pngs)}


BAD_IDS = [c[0] for c in _bad_cases([png(Image.new("L", (8, 8)))])]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_request_gets_clear_4xx(client: httpx.Client, bad_cases: dict, case: str) -> None:
    model, kwargs, status, fragment = bad_cases[case]
    r = client.post(predict_url(model), **kwargs)
    body = r.json()
    assert set(body) <= {"error", "items"} and isinstance(body["error"], str) and body["error"], body
    if status:
        assert r.status_code == status, body
        assert fragment in body["error"], body
    else:  # a lone surrogate: refused as JSON or as text, never a 5xx
        assert r.status_code in (400, 422), body


def test_chunked_body_over_the_limit(client: httpx.Client) -> None:
    """A body without Content-Length is counted as it arrives."""
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(50):
            yield b"x" * 10_000
        yield b'"}'

    r = client.post(predict_url(TEXT), content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]


def test_multi_item_request_names_the_bad_item(client: httpx.Client, pngs: list[bytes]) -> None:
    files = [("file", ("good.png", pngs[1], "image/png")), ("file", ("cut.png", pngs[2][: len(pngs[2]) // 2], "image/png"))]
    r = client.post(predict_url(IMAGE), files=files)
    assert r.status_code == 422
    body = r.json()
    assert [i["index"] for i in body["items"]] == [1] and body["error"].startswith("file 'cut.png': truncated")


def test_errors_are_json_everywhere(client: httpx.Client) -> None:
    for method, path, status in [("GET", "/nope", 404), ("DELETE", "/v1/models", 405), ("GET", f"{predict_url(TEXT)}", 405),
                                 ("GET", "/v1/models/nope", 404), ("GET", "/v1/models/nope/curves.png", 404),
                                 ("GET", "/v1/models/..%2F..%2Fetc/curves.png", 404),
                                 ("GET", "/static/../serve.py", 404), ("GET", "/static/index.html%00.js", 404)]:
        r = client.request(method, path)
        assert r.status_code == status and "error" in r.json(), (method, path, r.text)


# --- the token --------------------------------------------------------------------------------
def test_token_is_checked_everywhere_but_healthz(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
        for path in ["/readyz", "/metrics", "/v1/models", f"/v1/models/{IMAGE}", f"/v1/models/{IMAGE}/curves.png",
                     "/openapi.json", "/docs", "/", "/static/app.js", "/nope"]:
            r = anon.get(path)
            assert r.status_code == 401 and "missing API token" in r.json()["error"], path
            assert r.headers["WWW-Authenticate"] == "Bearer"
        r = anon.post(predict_url(TEXT), json={"text": "good"})
        assert r.status_code == 401
        r = anon.post(predict_url(TEXT), json={"text": "good"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong API token" in r.json()["error"]
        r = anon.get("/v1/models", headers={"Authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401 and "Bearer TOKEN" in r.json()["error"]
        # a browser gets the log-in form, and after it a cookie that the page's own requests carry
        r = anon.get("/", headers={"Accept": "text/html"})
        assert r.status_code == 401 and '<form method="post" action="/login">' in r.text
        assert anon.post("/login", data={"token": "wrong"}).status_code == 401
        r = anon.post("/login", data={"token": TOKEN, "next": "https://elsewhere.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        assert anon.get("/").status_code == 200  # the client kept the cookie
        assert anon.post(predict_url(TEXT), json={"text": "good"}).status_code == 200


# --- model cards ------------------------------------------------------------------------------
def test_models_and_cards(client: httpx.Client, image_clf: duoclass.Classifier, text_clf: duoclass.Classifier) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert list(models) == [IMAGE, TEXT]
    img = models[IMAGE]
    assert img["task"] == "image" and img["classes"] == image_clf.classes_.tolist() and img["preprocessing"]["image_size"] == 16
    saved = json.loads((image_clf.folder / "metrics.json").read_text())
    assert img["metrics"]["test"]["accuracy"] == saved["test"]["accuracy"]
    assert models[TEXT]["task"] == "text" and models[TEXT]["preprocessing"]["tokenizer"] == "ngram-vocab"
    for name in (IMAGE, TEXT):
        for plot, url in models[name]["plots"].items():
            assert url == f"/v1/models/{name}/{plot}.png"
            r = client.get(url)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.content == (Path(image_clf.folder if name == IMAGE else text_clf.folder).parent / f"{plot}.png").read_bytes()
    card = client.get(f"/v1/models/{IMAGE}").json()
    assert set(card["per_class"]["test"]) == set(image_clf.classes_)
    assert client.get("/readyz").json() == {"status": "ready", "models": [IMAGE, TEXT]}


def test_model_names_and_settings(tmp_path: Path, image_clf: duoclass.Classifier) -> None:
    folder = image_clf.folder
    assert parse_model_args([str(folder)]) == {IMAGE: folder}
    assert parse_model_args([f"digits={folder}"]) == {"digits": folder}
    with pytest.raises(DuoclassError, match="a second model named"):
        parse_model_args([str(folder), str(folder)])
    with pytest.raises(DuoclassError, match="not a model folder"):
        parse_model_args([str(tmp_path)])
    (tmp_path / "has space").mkdir()
    with pytest.raises(DuoclassError, match="cannot be a model name"):
        parse_model_args([str(tmp_path / "has space")])
    with pytest.raises(DuoclassError, match="--backend onnx"):  # a clear error at start, before any request
        create_app([str(folder)], ServeSettings(backend="onnx"))
    with pytest.raises(DuoclassError, match="--max-items"):
        ServeSettings(max_items=500, max_queue=100)
    with pytest.raises(DuoclassError, match="--max-batch-size"):
        ServeSettings(max_batch_size=0)
    with pytest.raises(DuoclassError, match="--token"):
        ServeSettings(token=" ")
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    s = settings_from_args(p.parse_args([str(folder), "--max-batch-size", "1", "--max-wait-ms", "2.5", "--no-docs",
                                         "--token", "t0ken-t0ken"]))
    assert (s.max_batch_size, s.max_wait_ms, s.docs, s.token, s.host) == (1, 2.5, False, "t0ken-t0ken", "127.0.0.1")
    with pytest.raises(DuoclassError, match="--max-queue"):
        p.parse_args([str(folder), "--max-queue", "lots"])


def test_import_stays_light() -> None:
    """`import duoclass` loads no server code, and the serve module (the CLI's flags) loads no FastAPI or torch."""
    code = ("import sys, duoclass; assert 'duoclass.serve.app' not in sys.modules and 'fastapi' not in sys.modules; "
            "import duoclass.serve.app; bad = [m for m in ('fastapi', 'torch', 'uvicorn', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --- micro-batching ---------------------------------------------------------------------------
def test_bad_items_in_a_batch_fail_only_their_requests(server: Server, image_clf: duoclass.Classifier,
                                                       pngs: list[bytes]) -> None:
    """While the model is held, good and bad requests arrive together: each bad one gets its own 422 at once,
    decoded before it could take a place in the queue; the good ones queue up, are then predicted in one
    batch, and each gets exactly Classifier.predict's answer."""
    truncated, bomb = pngs[3][: len(pngs[3]) // 2], png(Image.new("L", (1200, 1200)))
    sends = [("good", d) for d in pngs] + [("truncated", truncated), ("bomb", bomb)]
    expected = image_clf.predict_results(pngs, top_k=3)
    before = server.worker(IMAGE).metrics.render({})

    async def burst() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            with Gate(server.worker(IMAGE)) as gate:
                blocker = asyncio.create_task(c.post(predict_url(IMAGE), files={"file": ("b.png", pngs[0], "image/png")}))
                await asyncio.to_thread(gate.entered.wait, 30)
                tasks = [asyncio.create_task(c.post(predict_url(IMAGE), files={"file": (f"{kind}.png", d, "image/png")},
                                                    data={"top_k": "3"})) for kind, d in sends]
                await gate.until_queued(len(pngs))
                for task, (kind, _) in zip(tasks, sends):  # answered while the model is still held
                    if kind != "good":
                        await asyncio.wait_for(task, 30)
                gate.opened.set()
                return list(await asyncio.gather(*tasks)), await blocker

    responses, blocked = asyncio.run(burst())
    assert blocked.status_code == 200
    for (kind, _), r in zip(sends, responses):
        if kind == "good":
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 422 and ("truncated" if kind == "truncated" else "pixel limit") in r.json()["error"]
    for r, exp in zip(responses, expected):
        assert_same(r.json()["predictions"][0], exp, 3)
    after = server.worker(IMAGE).metrics.render({})
    batches = metric(after, "duoclass_batch_size_count", model=IMAGE) - metric(before, "duoclass_batch_size_count", model=IMAGE)
    items = metric(after, "duoclass_batch_size_sum", model=IMAGE) - metric(before, "duoclass_batch_size_sum", model=IMAGE)
    assert items == len(pngs) + 1 and batches == 2  # the held request, then all the good queued ones at once


@pytest.fixture(scope="module")
def tight(model_dirs: list[str]) -> Iterator[Server]:
    """No micro-batching, and room for 4 queued items."""
    with Server(model_dirs, max_batch_size=1, max_queue=4, max_items=2) as s:
        yield s


def test_queue_limit_answers_429_with_retry_after(tight: Server) -> None:
    async def go() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=tight.url, timeout=60) as c:
            with Gate(tight.worker(TEXT)) as gate:
                blocker = asyncio.create_task(c.post(predict_url(TEXT), json={"text": "good"}))
                await asyncio.to_thread(gate.entered.wait, 30)
                queued = [asyncio.create_task(c.post(predict_url(TEXT), json={"texts": TEXTS[i:i + 2]})) for i in (0, 2)]
                await gate.until_queued(4)
                over = await c.post(predict_url(TEXT), json={"text": "one more"})
                metrics = await c.get("/metrics")
                gate.opened.set()
                return list(await asyncio.gather(*queued)), over, metrics

    queued, over, metrics = asyncio.run(go())
    assert over.status_code == 429
    assert int(over.headers["Retry-After"]) >= 1 and "--max-queue 4" in over.json()["error"]
    assert [r.status_code for r in queued] == [200, 200]
    assert metric(metrics.text, "duoclass_queue_depth", model=TEXT) == 4
    assert metric(metrics.text, "duoclass_errors_total", kind="queue_full") >= 1
    text = httpx.get(tight.url + "/metrics").text  # batch size 1: every batch held one item
    assert metric(text, "duoclass_batch_size_sum", model=TEXT) == metric(text, "duoclass_batch_size_count", model=TEXT) >= 5


def test_text_batches_keep_the_token_budget(model_dirs: list[str], text_clf: duoclass.Classifier) -> None:
    texts = ["good movie really quite lovely"] * 6
    length = len(text_clf.preprocessor.encode(texts[:1])[0])
    with Server(model_dirs[1:], max_batch_size=8, max_tokens=2 * length, max_wait_ms=50) as s:
        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                with Gate(s.worker(TEXT)) as gate:
                    blocker = asyncio.create_task(c.post(predict_url(TEXT), json={"text": "bad"}))
                    await asyncio.to_thread(gate.entered.wait, 30)
                    tasks = [asyncio.create_task(c.post(predict_url(TEXT), json={"text": t})) for t in texts]
                    await gate.until_queued(len(texts))
                    gate.opened.set()
                    return list(await asyncio.gather(blocker, *tasks))

        assert all(r.status_code == 200 for r in asyncio.run(go()))
        text = httpx.get(s.url + "/metrics").text
    # 8 would fit by count; 2 fit by tokens: the held text, then 3 batches of 2
    assert metric(text, "duoclass_batch_size_count", model=TEXT) == 4
    assert metric(text, "duoclass_batch_size_sum", model=TEXT) == 7


def test_text_batches_group_similar_lengths(model_dirs: list[str], text_clf: duoclass.Classifier) -> None:
    """Queued: one long text, six short ones, five more long ones. Padding the short ones to the long ones' length
    would cost more than a second model call, so the batcher takes the long group first (it holds the oldest
    item), then the short group: never one call that mixes them."""
    long_text = " ".join(f"word{i} movie{i} plot{i}" for i in range(60))
    sends = [long_text] + ["good"] * 6 + [long_text] * 5
    lengths = [len(x) for x in text_clf.preprocessor.encode([long_text, "good"])]
    assert lengths[0] > 20 * lengths[1]
    with Server(model_dirs[1:], max_batch_size=32, max_wait_ms=50) as s:
        worker = s.worker(TEXT)
        calls: list[list[int]] = []  # the items' encoded lengths, per model call

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                with Gate(worker) as gate:
                    held = gate.run
                    gate.run = lambda inputs: (calls.append(_lengths(inputs)), held(inputs))[1]
                    blocker = asyncio.create_task(c.post(predict_url(TEXT), json={"text": "held"}))
                    await asyncio.to_thread(gate.entered.wait, 30)
                    tasks = []
                    for t in sends:  # one at a time, so the queue keeps this order
                        tasks.append(asyncio.create_task(c.post(predict_url(TEXT), json={"text": t})))
                        await gate.until_queued(len(tasks))
                    gate.opened.set()
                    return list(await asyncio.gather(blocker, *tasks))

        assert all(r.status_code == 200 for r in asyncio.run(go()))
    assert [len(c) for c in calls] == [1, 6, 6], calls
    assert min(calls[1]) > max(calls[2]), calls  # the long ones first, then the short ones


def _lengths(inputs: dict) -> list[int]:
    """Each item's length in a text model's batch: its count of non-padding entries."""
    return [int(row.sum()) for row in np.asarray(inputs["attention_mask"])]


def test_metrics_parse_and_count(client: httpx.Client, pngs: list[bytes]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    before = client.get("/metrics").text
    for _ in range(3):
        assert client.post(predict_url(TEXT), json={"text": "good"}).status_code == 200
    assert client.post(predict_url(IMAGE), files={"file": ("x.png", b"GIF89a-broken", "image/gif")}).status_code == 422
    lone = client.post(predict_url(TEXT), content=b'{"text": "\\ud800"}', headers={"Content-Type": "application/json"})
    assert lone.status_code == 400 and "not valid JSON" in lone.json()["error"], lone.text
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: the format is valid
    assert {"duoclass_http_requests", "duoclass_http_request_duration_seconds", "duoclass_batch_size",
            "duoclass_queue_depth", "duoclass_errors", "duoclass_predict_items", "duoclass_model_info"} <= set(families)
    route = "/v1/models/{name}/predict"

    def delta(name: str, **labels: str) -> float:
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert delta("duoclass_http_requests_total", method="POST", route=route, status="200") == 3
    assert delta("duoclass_http_requests_total", method="POST", route=route, status="422") == 1
    assert delta("duoclass_http_requests_total", method="POST", route=route, status="400") == 1
    assert delta("duoclass_errors_total", kind="bad_image") == 1 and delta("duoclass_errors_total", kind="invalid_request") == 1
    assert delta("duoclass_predict_items_total", model=TEXT, outcome="ok") == 3
    assert delta("duoclass_http_request_duration_seconds_count", route=route) == 5
    assert metric(text, "duoclass_model_info", model=IMAGE, task="image", backend="torch") == 1


# --- the schema -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzzing_finds_no_5xx(server: Server, mode: str) -> None:
    """Requests generated from /openapi.json, fitting it (positive) and breaking it (negative), for every
    operation, 20 examples each: none gets a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     positive_data_acceptance, response_headers_conformance,
                                     response_schema_conformance, status_code_conformance)
    from schemathesis.generation import GenerationMode

    conformance = [not_a_server_error, status_code_conformance, content_type_conformance,
                   response_schema_conformance, response_headers_conformance]
    CHECKS = {"positive": [*conformance, positive_data_acceptance], "negative": [*conformance, negative_data_rejection]}
    failures: list[str] = []

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        f"POST /v1/models/{IMAGE}/predict", f"POST /v1/models/{TEXT}/predict", "GET /v1/models", "GET /v1/models/{name}",
        "GET /metrics", "GET /healthz", f"POST /v1/models/{IMAGE}/explain", f"POST /v1/models/{TEXT}/explain"}
    calls: list[int] = []
    fuzzed = set()
    for op in operations:
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case: Any) -> None:
            response = case.call(base_url=server.url, headers=AUTH, timeout=30)
            calls.append(response.status_code)
            checks = CHECKS[mode]
            if response.status_code == 422 and "items" in (response.json() or {}):
                # the bytes were no image: a schema cannot say what an image is, so this is no mismatch
                checks = conformance
            if mode == "negative" and response.status_code == 413:  # refused for its size: a rejection all the
                checks = conformance                                # same (schemathesis's list lacks 413)
            try:
                case.validate_response(response, checks=checks)
            except Exception as e:  # noqa: BLE001  (collect them all, to say every mismatch at once)
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{str(e).strip().splitlines()[0][:300]}")

        try:
            check()
            fuzzed.add(op.path)
        except Unsatisfiable:  # negative mode: an operation without parameters or body has nothing to break
            assert mode == "negative", op.path
    assert not failures, "\n".join(sorted(set(failures)))
    assert {predict_url(IMAGE), predict_url(TEXT), explain_url(IMAGE), explain_url(TEXT)} <= fuzzed
    assert calls and max(calls) < 500


def test_openapi_documents_the_api(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"][predict_url(IMAGE)]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"200", "401", "404", "413", "415", "422", "429"} <= set(op["responses"])
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    op = spec["paths"][explain_url(IMAGE)]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"200", "401", "404", "413", "415", "422", "429", "503"} <= set(op["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# --- the web page -----------------------------------------------------------------------------
def chromium() -> str | None:
    for name in (os.environ.get("DUOCLASS_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def test_web_page_in_a_real_browser(server: Server, client: httpx.Client, pngs: list[bytes], tmp_path: Path) -> None:
    """Log in, upload an image (file picker, then drag and drop), type a text: the page shows the API's labels;
    Explain lays the heatmap over the image (a switch hides it) and colours the text's words by their scores."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set DUOCLASS_CHROMIUM); Playwright's own "
                    "browser download does not work offline")
    shots = Path(os.environ.get("DUOCLASS_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    image_file = tmp_path / "seven.png"
    image_file.write_bytes(pngs[7])
    want_image = client.post(predict_url(IMAGE), json={"image": b64(pngs[7]), "top_k": 5}).json()["predictions"][0]
    text = "the acting was superb and lovely"
    want_text = client.post(predict_url(TEXT), json={"text": text, "top_k": 5}).json()["predictions"][0]

    def shown(page: Any) -> list[tuple[str, float]]:
        page.wait_for_selector("#results .result")
        labels = page.locator("#results .result-label").all_inner_texts()
        scores = [float(s) for s in page.locator("#results .result-score").evaluate_all(
            "els => els.map(e => e.dataset.score)")]
        return list(zip(labels, scores))

    def expected(p: dict) -> list[tuple[str, float]]:
        return [(t["label"], t["score"]) for t in p["top_k"]]

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url))
            fetched: list[str] = []
            page.on("response", lambda r: fetched.append(r.url))
            page.goto(server.url + "/")
            page.fill("#token", TOKEN)  # the log-in form of a server with a token
            page.click("#login")
            page.wait_for_selector("#model-select option", state="attached")
            assert page.locator("#card-name").inner_text() == IMAGE
            page.wait_for_function("document.querySelector('#card-confusion img').complete")
            assert not page.locator("#preview").is_visible()  # no broken-image icon before an upload
            page.set_viewport_size({"width": 400, "height": 800})  # a phone: nothing wider than the screen
            assert page.evaluate("document.documentElement.scrollWidth") <= 400
            page.set_viewport_size({"width": 1200, "height": 900})
            page.set_input_files("#file-input", str(image_file))
            got = shown(page)
            assert [g[0] for g in got] == [e[0] for e in expected(want_image)]
            assert [g[1] for g in got] == pytest.approx([e[1] for e in expected(want_image)], abs=1e-6)
            assert "latency" in page.locator("#latency").inner_text()
            page.screenshot(path=str(shots / "serve-image.png"), full_page=True)

            assert not page.locator("#explain-heatmap").is_visible()
            page.click("#explain-button")  # the heatmap stacked on the image, the same size on the screen
            page.wait_for_selector("#explain-heatmap", state="visible")
            assert page.locator("#explain-heatmap").get_attribute("src").startswith("data:image/png;base64,i")
            assert page.wait_for_function("document.querySelector('#explain-heatmap').naturalWidth") is not None
            heat, base = (page.locator(s).bounding_box() for s in ("#explain-heatmap", "#explain-base"))
            assert heat == base and heat["width"] > 100
            assert page.locator("#explain-base").get_attribute("src").startswith("blob:")
            assert "gradcam: why" in page.locator("#explain-legend").inner_text()
            page.screenshot(path=str(shots / "serve-explain-image.png"), full_page=True)
            page.uncheck("#heatmap-toggle")
            assert not page.locator("#explain-heatmap").is_visible() and page.locator("#explain-base").is_visible()
            page.check("#heatmap-toggle")
            assert page.locator("#explain-heatmap").is_visible()

            page.evaluate("() => document.querySelector('#results').replaceChildren()")
            page.evaluate("""async (b64) => {  // drag and drop: a DataTransfer holding the file, dropped on the zone
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                document.querySelector('#drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
            }""", b64(pngs[7]))
            assert [g[0] for g in shown(page)] == [e[0] for e in expected(want_image)]

            page.select_option("#model-select", TEXT)
            page.fill("#text", text)
            page.click("#predict-text")
            got = shown(page)
            assert [g[0] for g in got] == [e[0] for e in expected(want_text)]
            assert [g[1] for g in got] == pytest.approx([e[1] for e in expected(want_text)], abs=1e-6)
            page.screenshot(path=str(shots / "serve-text.png"), full_page=True)
            assert not page.locator("#explain-image").is_visible()  # the image's explanation went with its model
            page.click("#explain-button")
            page.wait_for_selector("#explain-text .token")
            want_tokens = client.post(explain_url(TEXT), json={"text": text}).json()["explanations"][0]["tokens"]
            assert page.locator("#explain-text").inner_text() == text
            assert page.locator("#explain-text .token").all_inner_texts() == [t["text"] for t in want_tokens]
            colours = page.locator("#explain-text .token").evaluate_all("els => els.map(e => e.style.backgroundColor)")
            for t, colour in zip(want_tokens, colours):  # red for, blue against; the strongest word fully opaque
                assert ("220, 40, 40" if t["score"] >= 0 else "40, 90, 220") in colour, (t, colour)
            strongest = max(range(len(want_tokens)), key=lambda i: abs(want_tokens[i]["score"]))
            assert colours[strongest].startswith("rgb("), colours
            page.screenshot(path=str(shots / "serve-explain-text.png"), full_page=True)
            # the methods this model has, auto first; another one is sent with the request
            methods = page.locator("#explain-method option").all_inner_texts()
            assert methods[0] == "auto" and "occlusion" in methods and "gradcam" not in methods  # a text model
            page.select_option("#explain-method", "occlusion")
            page.click("#explain-button")
            page.wait_for_function("document.querySelector('#explain-legend').textContent.startsWith('occlusion: why')")
            words = client.post(explain_url(TEXT), json={"text": text, "method": "occlusion"}).json()
            assert page.locator("#explain-text .token").all_inner_texts() == [
                t["text"] for t in words["explanations"][0]["tokens"]]
            assert not errors, errors
            assert not [u for u in asked if u.endswith("/favicon.ico")], asked  # the page names its own icon

            # the API pages: Swagger UI and ReDoc from this server alone, under its Content-Security-Policy
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server.url + "/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            shown_paths = page.locator(".opblock-summary-path").all_inner_texts()
            assert predict_url(IMAGE) in shown_paths and predict_url(TEXT) in shown_paths
            page.screenshot(path=str(shots / "serve-docs.png"))
            page.goto(server.url + "/redoc")
            page.wait_for_selector(f"text=predict with {TEXT}", timeout=30_000)
            page.screenshot(path=str(shots / "serve-redoc.png"))
            # ReDoc's footer names its logo on redocly's CDN: the policy blocks it, and that is all it blocks
            assert not [e for e in errors if "cdn.redoc.ly" not in e], errors
            foreign = [u for u in fetched if not u.startswith((server.url, "data:", "blob:"))]
            assert not foreign, foreign  # asked for (ReDoc's logo), blocked by the policy, never fetched

            page.goto(server.url + "/")  # log out: the cookie no longer opens the page
            page.click("#logout-button")
            page.wait_for_selector("#token")
            assert page.goto(server.url + "/").status == 401 and page.locator("#token").is_visible()
        finally:
            browser.close()


# --- load (slow) ------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_test_sees_no_5xx(image_clf: duoclass.Classifier, text_clf: duoclass.Classifier, tmp_path: Path) -> None:
    """benchmarks/load_test.py, bounded: 400 requests per arm, a 1,000-request soak, 60 s per phase at most."""
    out = tmp_path / "load_test.json"
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"),
                        "--image-model", str(image_clf.folder), "--text-model", str(text_clf.folder),
                        "--requests", "400", "--soak", "1000", "--clients", "16", "--max-seconds", "60",
                        "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["zero_5xx"] and result["unexpected_statuses"] == 0
    assert set(result["arms"]) == {"text-batched", "text-unbatched", "image-batched", "image-unbatched"}
    assert result["soak"]["rss_mb"]["after_1000"] is not None


def test_onnx_backend_serves_the_same_answers(text_clf: duoclass.Classifier, tmp_path: Path) -> None:
    """--backend onnx serves the folder's ONNX variant, with the torch backend's labels and scores."""
    import shutil

    from duoclass.compress.onnx import export_onnx

    folder = tmp_path / "model"
    shutil.copytree(text_clf.folder, folder)
    export_onnx(folder)
    expected = text_clf.predict_results(TEXTS, top_k=2)
    with Server([f"{TEXT}={folder}"], backend="onnx") as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert type(s.worker(TEXT).clf.backend).__name__ == "OnnxBackend"
        r = c.post(predict_url(TEXT), json={"texts": TEXTS, "top_k": 2})
        assert r.status_code == 200, r.text
        for got, exp in zip(r.json()["predictions"], expected):
            assert_same(got, exp, 2)


def test_a_batch_that_raises_is_retried_item_by_item(server: Server, text_clf: duoclass.Classifier) -> None:
    """Holds: when the model raises for a whole micro-batch (a bug, not a bad input), the worker retries each item
    alone, so every request of that batch is still answered 200 with Classifier.predict's labels.

    The backend raises once, on the first call with more than one item; the call log shows the failed batch of
    all the queued texts, then one call per text."""
    worker = server.worker(TEXT)
    backend = worker.clf.backend
    real = backend.run
    calls: list[int] = []  # batch size of every backend call, in order
    raised = threading.Event()

    def flaky(inputs: Any) -> Any:
        size = len(inputs["input_ids"])
        calls.append(size)
        if size > 1 and not raised.is_set():
            raised.set()
            raise RuntimeError("injected failure of the whole batch")
        return real(inputs)

    expected = text_clf.predict_results(TEXTS, top_k=2)

    async def burst() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            with Gate(worker) as gate:  # Gate calls flaky once the gate opens
                blocker = asyncio.create_task(c.post(predict_url(TEXT), json={"text": "held"}))
                await asyncio.to_thread(gate.entered.wait, 30)
                tasks = [asyncio.create_task(c.post(predict_url(TEXT), json={"text": t, "top_k": 2})) for t in TEXTS]
                await gate.until_queued(len(TEXTS))
                gate.opened.set()
                return list(await asyncio.gather(*tasks)), await blocker

    backend.run = flaky
    try:
        responses, blocked = asyncio.run(burst())
    finally:
        backend.run = real
    assert blocked.status_code == 200, blocked.text
    assert [r.status_code for r in responses] == [200] * len(TEXTS), [r.text for r in responses]
    for r, exp in zip(responses, expected):
        (got,) = r.json()["predictions"]
        assert_same(got, exp, 2)
    assert raised.is_set()
    # the held text alone, the whole queued batch (which raised), then each queued text alone
    assert calls == [1, len(TEXTS)] + [1] * len(TEXTS), calls


def test_login_with_extra_fields_is_a_400_not_a_500(server: Server) -> None:
    r = httpx.post(server.url + "/login", content=b"a=1&b=2&c=3&d=4&e=5&token=x",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "two fields" in r.json()["error"], r.text


def test_metrics_do_not_grow_with_invented_methods(server: Server) -> None:
    """Invented methods are refused by the HTTP parser (a 400) and never reach a label; the method label of the
    methods HTTP has is bounded too (tested without the parser in test_serve_attacks)."""
    def samples() -> list[str]:  # the sample names and labels, without their values
        text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        return [line.rpartition(" ")[0] for line in text.splitlines()]

    httpx.request("ZZ0", server.url + "/healthz")
    samples()
    before = samples()
    for i in range(1, 30):
        assert httpx.request(f"ZZ{i}", server.url + "/healthz").status_code == 400
    after = samples()
    assert not [s for s in after if "ZZ" in s] and after == before
