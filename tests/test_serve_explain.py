"""POST /v1/models/{name}/explain against a real uvicorn server on loopback: the explanations of an image and a
text model (labels as predict gives them, a heatmap PNG at the model's input size, tokens with their offsets), a
bad image failing only its own item, and each gate driven to its refusal: the token, --max-explain-items (JSON,
large JSON and multipart), a method the backend lacks (gradcam on --backend onnx), a target that is no class, a
busy explanation pool (429, while predictions still pass), --timeout-s (a running job keeps its place, a waiting
one is dropped), a bug in the pool (a JSON 500) and a stopped pool (503).

The explanation pool is held the way test_serve's Gate holds a model: its job waits on an event.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import duoclass  # noqa: E402
from duoclass.errors import DuoclassError  # noqa: E402
from duoclass.serve.requests import RequestError  # noqa: E402
from duoclass.serve.settings import ServeSettings  # noqa: E402

from .test_serve import AUTH, IMAGE, LIMITS, TEXT, TEXTS, TOKEN, Server, b64, metric, predict_url  # noqa: E402
from .test_serve import image_clf, model_dirs, pngs, text_clf  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


def explain_url(name: str) -> str:
    return f"/v1/models/{name}/explain"


@pytest.fixture(scope="module")
def server(model_dirs: list[str]) -> Iterator[Server]:
    """A token, two items per explain request (fewer than --max-files, so multipart reaches the limit too), and
    no room to wait in the explanation pool."""
    with Server(model_dirs, token=TOKEN, max_explain_items=2, explain_queue=0, **LIMITS) as s:
        yield s


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


class Hold:
    """Holds a model's explanation pool inside its job until opened."""

    def __init__(self, server: Server, name: str):
        self.explainer = server.app.state.explainers[name]
        self.entered, self.opened = threading.Event(), threading.Event()
        self.run = self.explainer._run

    def __enter__(self) -> "Hold":
        def held(*args: Any) -> Any:
            self.entered.set()
            assert self.opened.wait(30), "the hold was never opened"
            return self.run(*args)

        self.explainer._run = held
        return self

    def __exit__(self, *exc: Any) -> None:
        self.opened.set()
        del self.explainer._run  # the class's method again

    def until_free(self) -> None:
        for _ in range(3000):
            if self.explainer.jobs == 0:
                return
            time.sleep(0.01)
        raise AssertionError(f"{self.explainer.jobs} explain jobs still hold places")


def heatmap(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["heatmap_png"])))


# --- answers ----------------------------------------------------------------------------------
def test_image_explanations(client: httpx.Client, image_clf: duoclass.Classifier, pngs: list[bytes]) -> None:
    """Multipart, auto: Grad-CAM of each image's predicted label, a heatmap PNG and the map at the model's input
    size. A truncated image between two good ones gets its own error; the two are explained."""
    size = image_clf.preprocessor.image_size
    expected = image_clf.predict_results(pngs[:2])
    files = [("file", ("a.png", pngs[0], "image/png")), ("file", ("cut.png", pngs[1][:60], "image/png"))]
    r = client.post(explain_url(IMAGE), files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == IMAGE and body["latency_ms"] > 0 and len(body["explanations"]) == 2
    good, bad = body["explanations"]
    assert good["method"] == "gradcam" and good["error"] is None
    assert good["label"] == expected[0].label == good["target"] and good["score"] == pytest.approx(expected[0].score, abs=1e-5)
    im = heatmap(good)
    assert im.format == "PNG" and im.mode == "RGBA" and im.size == (size, size)
    a = np.asarray(good["attributions"])
    assert a.shape == (size, size) and np.all(a >= 0) and a.max() > 0  # Grad-CAM: non-negative
    assert all(v == round(v, 4) for v in a.ravel())
    assert bad == {"label": None, "target": None, "score": None, "method": "gradcam",
                   "error": "truncated or corrupt image data (image file is truncated)"}

    r = client.post(explain_url(IMAGE), json={"images": [b64(pngs[2]), b64(pngs[3])], "method": "occlusion",
                                              "target": "5"})
    assert r.status_code == 200, r.text
    for item, exp in zip(r.json()["explanations"], image_clf.predict_results(pngs[2:4])):
        assert item["method"] == "occlusion" and item["target"] == "5" and item["label"] == exp.label
        assert item["score"] == pytest.approx(exp.probs[5], abs=1e-5)  # the target's probability
        assert heatmap(item).size == (size, size)
    r = client.post(explain_url(IMAGE), files={"file": ("x.png", pngs[4], "image/png")},
                    data={"method": "gradcam++", "target": "4"})
    assert r.status_code == 200 and r.json()["explanations"][0]["target"] == "4", r.text


def test_text_explanations(client: httpx.Client, text_clf: duoclass.Classifier) -> None:
    text = "a really lovely movie, très bien"
    r = client.post(explain_url(TEXT), json={"texts": [text, ""], "target": "pos"})
    assert r.status_code == 200, r.text
    one, empty = r.json()["explanations"]
    assert one["method"] == "occlusion" and one["target"] == "pos" and one["label"] == text_clf.predict([text])[0]
    assert [t["text"] for t in one["tokens"]] == ["a", "really", "lovely", "movie", ",", "très", "bien"]
    assert all(text[t["start"]:t["end"]] == t["text"] for t in one["tokens"])
    assert "heatmap_png" not in one and any(t["score"] != 0 for t in one["tokens"])
    assert empty["tokens"] == [] and empty["error"] is None  # an empty text: labelled, nothing to attribute
    r = client.post(explain_url(TEXT), json={"text": text, "method": "occlusion"})
    assert r.json()["explanations"][0]["target"] == r.json()["explanations"][0]["label"]


def test_explained_items_are_counted(client: httpx.Client, pngs: list[bytes]) -> None:
    before = client.get("/metrics").text
    client.post(explain_url(IMAGE), json={"images": [b64(pngs[0]), b64(pngs[1][:60])]})
    after = client.get("/metrics").text
    for outcome in ("ok", "error"):
        n = metric(after, "duoclass_explain_items_total", model=IMAGE, outcome=outcome)
        assert n == metric(before, "duoclass_explain_items_total", model=IMAGE, outcome=outcome) + 1


# --- refusals ---------------------------------------------------------------------------------
def test_explain_needs_the_token(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        r = anon.post(explain_url(TEXT), json={"text": "good"})
        assert r.status_code == 401 and "missing API token" in r.json()["error"]
        r = anon.post(explain_url(TEXT), json={"text": "good"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong API token" in r.json()["error"]


def test_too_many_items_are_refused(client: httpx.Client, pngs: list[bytes]) -> None:
    """--max-explain-items 2, whichever way the items come: JSON, JSON large enough to be read by the bounded
    reader, multipart (--max-files is 4). Predict still takes its --max-items 8."""
    big = b64(pngs[0]) + " " * 40_000  # white space is allowed in base64; > 64 KB in all: the bounded reader
    for kwargs in ({"json": {"texts": TEXTS[:3]}}, {"json": {"images": [b64(p) for p in pngs[:3]]}},
                   {"content": json.dumps({"images": [big] * 3}), "headers": {"Content-Type": "application/json"}},
                   {"files": [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs[:3])]}):
        r = client.post(explain_url(TEXT if "texts" in kwargs.get("json", {}) else IMAGE), **kwargs)
        assert r.status_code == 422 and "--max-explain-items" in r.json()["error"], r.text
    assert client.post(predict_url(TEXT), json={"texts": TEXTS[:3]}).status_code == 200
    r = client.post(explain_url(IMAGE), content=json.dumps({"images": [big] * 2}),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and [x["error"] for x in r.json()["explanations"]] == [None, None], r.text


@pytest.mark.parametrize("kwargs, status, fragment", [
    ({"json": {"text": "x", "method": "gradcam"}}, 422, "Grad-CAM is for image models"),
    ({"json": {"text": "x", "method": "ig"}}, 422, "tfidf-mlp is a bag of n-grams"),
    ({"json": {"text": "x", "method": "shap"}}, 422, "method: Input should be"),
    ({"json": {"text": "x", "target": "nope"}}, 422, "target 'nope': not a class of model 'toy' (its classes: neg, pos)"),
    ({"json": {"text": "x", "target": ""}}, 422, "target"),
    ({"json": {"text": "x", "top_k": 2}}, 422, "(and optionally method and target)"),
    ({"json": {"image": "aGVsbG8="}}, 422, "is a text model"),
])
def test_bad_explain_requests_get_one_line_4xx(client: httpx.Client, kwargs: dict, status: int, fragment: str) -> None:
    r = client.post(explain_url(TEXT), **kwargs)
    assert r.status_code == status and fragment in r.json()["error"], r.text
    assert "\n" not in r.json()["error"]


def test_bad_multipart_fields_and_non_images(client: httpx.Client, pngs: list[bytes]) -> None:
    f = {"file": ("a.png", pngs[0], "image/png")}
    for data, fragment in (({"method": "shap"}, "method: got 'shap'"), ({"target": "11"}, "target '11': not a class"),
                           ({"top_k": "2"}, "optionally method and target fields")):
        r = client.post(explain_url(IMAGE), files=f, data=data)
        assert r.status_code == 422 and fragment in r.json()["error"], r.text
    files = [("file", ("a.png", pngs[0], "image/png")), ("file", ("notes.txt", b"not a picture", "text/plain"))]
    r = client.post(explain_url(IMAGE), files=files)  # no image at all: refused by the parser predict uses
    assert r.status_code == 422 and [i["index"] for i in r.json()["items"]] == [1], r.text


def test_gradcam_on_the_onnx_backend_is_a_422(image_clf: duoclass.Classifier, tmp_path: Path,
                                              pngs: list[bytes]) -> None:
    """--backend onnx explains by occlusion only (auto picks it, on the shared session); gradcam and ig are a 422
    that says so, and the schema offers only what the backend has."""
    from duoclass.compress.onnx import export_onnx

    folder = tmp_path / "model"
    shutil.copytree(image_clf.folder, folder)
    export_onnx(folder, examples=16)
    with Server([f"{IMAGE}={folder}"], backend="onnx") as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for method in ("gradcam", "gradcam++", "ig"):
            r = c.post(explain_url(IMAGE), files={"file": ("a.png", pngs[0], "image/png")}, data={"method": method})
            assert r.status_code == 422 and "only --backend torch has" in r.json()["error"], r.text
        r = c.post(explain_url(IMAGE), json={"image": b64(pngs[0])})
        assert r.status_code == 200 and r.json()["explanations"][0]["method"] == "occlusion", r.text
        assert s.app.state.explainers[IMAGE].model() is s.worker(IMAGE).clf  # the session is shared
        op = c.get("/openapi.json").json()["paths"][explain_url(IMAGE)]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["properties"]["method"]["enum"] == \
            ["auto", "occlusion"]


# --- the pool ---------------------------------------------------------------------------------
def test_a_busy_pool_answers_429_and_predictions_go_on(server: Server, pngs: list[bytes]) -> None:
    """--explain-queue 0: while one explanation runs, a second request gets a 429 with Retry-After before any
    work, and predictions of the same model are answered meanwhile."""
    x = server.app.state.explainers[IMAGE]
    assert x.model().model is not server.worker(IMAGE).clf.model  # gradients hook a copy, never the served model

    async def go() -> tuple[httpx.Response, ...]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            with Hold(server, IMAGE) as hold:
                first = asyncio.create_task(c.post(explain_url(IMAGE), json={"image": b64(pngs[0])}))
                await asyncio.to_thread(hold.entered.wait, 30)
                busy = await c.post(explain_url(IMAGE), json={"image": b64(pngs[1])})
                other = await c.post(explain_url(TEXT), json={"text": "lovely"})  # another model's pool is free
                predicted = await c.post(predict_url(IMAGE), json={"image": b64(pngs[1])})
                hold.opened.set()
                return await first, busy, other, predicted

    first, busy, other, predicted = asyncio.run(go())
    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1, busy.text
    assert "busy explaining" in busy.json()["error"] and "--explain-queue 0" in busy.json()["error"]
    assert other.status_code == 200 and predicted.status_code == 200 and first.status_code == 200
    assert x.jobs == 0


def test_timeouts_free_waiting_places_and_keep_running_ones(model_dirs: list[str], text_clf: duoclass.Classifier
                                                            ) -> None:
    """--timeout-s 0.5, --explain-queue 1: a request whose explanation is running gets a 503 and its job keeps its
    place until it ends (the thread cannot be stopped); a request still waiting gets a 503 and its job is dropped."""
    with Server([f"{TEXT}={text_clf.folder}"], timeout_s=0.5, explain_queue=1) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c, Hold(s, TEXT) as hold:
        running = c.post(explain_url(TEXT), json={"text": "lovely"})
        assert running.status_code == 503 and "--timeout-s" in running.json()["error"] and hold.entered.is_set()
        waiting = c.post(explain_url(TEXT), json={"text": "awful"})
        assert waiting.status_code == 503 and "Retry-After" in waiting.headers
        assert hold.explainer.jobs == 1  # the running one
        hold.opened.set()
        hold.until_free()
        r = c.post(explain_url(TEXT), json={"text": "lovely"})
        assert r.status_code == 200, r.text


def test_a_bug_in_the_pool_is_a_json_500(server: Server) -> None:
    x = server.app.state.explainers[TEXT]

    def broken(*args: Any) -> Any:
        raise ValueError("a bug")

    x._run = broken
    try:
        r = httpx.post(server.url + explain_url(TEXT), json={"text": "x"}, headers=AUTH, timeout=30)
    finally:
        del x._run
    assert r.status_code == 500 and "internal error while explaining (ValueError: a bug)" in r.json()["error"]
    assert x.jobs == 0


def test_a_stopped_pool_answers_503(text_clf: duoclass.Classifier) -> None:
    from duoclass.serve.batcher import ExplainWorker
    from duoclass.serve.metrics import Metrics

    x = ExplainWorker(TEXT, text_clf, ServeSettings(), Metrics())
    x.reserve()
    x.stop()
    with pytest.raises(RequestError, match="shutting down") as e:  # admitted before the stop: its job cannot start
        asyncio.run(x.explain(["good"], ["text"], "occlusion", None))
    assert e.value.status == 503 and x.jobs == 0
    with pytest.raises(RequestError, match="shutting down"):
        x.reserve()


def test_explain_settings_are_checked() -> None:
    with pytest.raises(DuoclassError, match="--max-explain-items"):
        ServeSettings(max_explain_items=0)
    with pytest.raises(DuoclassError, match="--explain-queue"):
        ServeSettings(explain_queue=-1)
    assert ServeSettings(explain_queue=0).explain_queue == 0


def test_the_schema_has_one_explain_path_per_model(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    text = spec["paths"][explain_url(TEXT)]["post"]
    image = spec["paths"][explain_url(IMAGE)]["post"]
    assert set(text["requestBody"]["content"]) == {"application/json"}
    assert set(image["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    props = text["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert props["method"]["enum"] == ["auto", "occlusion"] and props["target"]["enum"] == ["neg", "pos"]
    assert props["texts"]["maxItems"] == 2 and "top_k" not in props
    form = image["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["file"]["maxItems"] == 2 and form["method"]["enum"] == ["auto", "gradcam", "gradcam++", "occlusion", "ig"]
    assert {"200", "401", "404", "413", "415", "422", "429", "503"} <= set(image["responses"])
    assert "/v1/models/{name}/explain" not in spec["paths"]


def test_no_explain_turns_the_route_off(model_dirs: list[str], server: Server) -> None:
    """--no-explain: no route (404), no explain path in the schema, and the card tells the page to hide its button;
    the default server has all three."""
    with Server(model_dirs, explain=False, **LIMITS) as off, httpx.Client(base_url=off.url, timeout=60) as c:
        r = c.post(explain_url(TEXT), json={"text": "a text"})
        assert r.status_code == 404 and "error" in r.json()
        assert not [p for p in c.get("/openapi.json").json()["paths"] if p.endswith("/explain")]
        assert [m["explain"] for m in c.get("/v1/models").json()["models"]] == [False, False]
        assert [m["explain_methods"] for m in c.get("/v1/models").json()["models"]] == [[], []]
        assert c.post(predict_url(TEXT), json={"text": "a text"}).status_code == 200  # predictions still answer
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        cards = c.get("/v1/models").json()["models"]
        assert [m["explain"] for m in cards] == [True, True]
        assert cards[0]["explain_methods"] == ["auto", "gradcam", "gradcam++", "occlusion", "ig"]  # the image model
        assert cards[1]["explain_methods"] == ["auto", "occlusion"]  # the text model: a bag of n-grams, no ig
        assert [p for p in c.get("/openapi.json").json()["paths"] if p.endswith("/explain")]
