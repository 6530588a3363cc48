"""Per-model micro-batching: one asyncio task gathers items from many requests and runs each batch in the
model's own thread through the one predict path; a batch that raises is retried item by item. Explanations run
beside it, one request at a time per model in a thread of their own (ExplainWorker), never in its batches.
"""
import asyncio
import collections
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from duoclass.errors import DuoclassError
from duoclass.serve.metrics import Metrics
from duoclass.serve.requests import RequestError
from duoclass.serve.settings import ServeSettings

log = logging.getLogger("duoclass")
# A model call's fixed cost, in padded tokens: a text micro-batch is split where padding would cost more. 64 was
# best or near it for MiniLM on both backends (benchmarks/RESULTS.md, serving).
CALL_COST_TOKENS = 64


# --- micro-batching ---------------------------------------------------------------------------
def length_groups(lengths: Sequence[int], call_cost: int) -> list[range]:
    """Split texts sorted by length into consecutive groups, one model call each, at the least cost: a call costs
    `call_cost` tokens of fixed work plus its items x its longest length (what padding makes it compute).
    Dynamic programming over the split points; at most a few dozen texts, so O(n^2) is nothing."""
    n = len(lengths)
    best, cut = [0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + call_cost + (j - i) * lengths[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(range(cut[j], j))
        j = cut[j]
    return out[::-1]


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
        self.rule = clf.rule(settings.abstain_below)  # conformal sets, abstention; a class named "abstained" fails here
        self.queue: collections.deque[_Pending] = collections.deque()
        self.token_budget = settings.max_tokens if clf.task == "text" else 0
        self._changed = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"duoclass-{name}")
        self._task: asyncio.Task | None = None
        self._batch_seconds = 0.01  # running mean, for Retry-After
        self.reserved = 0  # queue places admitted requests hold while their items are decoded or tokenized
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
        batches = math.ceil((len(self.queue) + self.reserved) / self.settings.max_batch_size)
        return max(1, min(60, math.ceil(batches * self._batch_seconds)))

    def reserve(self, n: int) -> None:
        """Admission, before any decoding or tokenizing: a place in the queue for n items, or a 429 (a 503 when
        stopping). Places reserved count as waiting until `predict(..., reserved=n)` queues them or `release(n)`."""
        if self.closed:
            raise RequestError(503, "the server is shutting down", "shutting_down", {"Retry-After": "5"})
        waiting = len(self.queue) + self.reserved
        if waiting + n > self.settings.max_queue:
            s = self.retry_after()
            raise RequestError(429, f"model {self.name!r} is busy: {waiting} items are waiting and this request "
                                    f"adds {n} (--max-queue {self.settings.max_queue}); retry after {s} s",
                               "queue_full", {"Retry-After": str(s)})
        self.reserved += n

    def release(self, n: int) -> None:
        self.reserved -= n

    async def predict(self, items: Sequence[Any], names: Sequence[str], costs: Sequence[int], top_k: int,
                      reserved: int = 0) -> list[Any]:
        """One Prediction per item, in order, predicted alongside other requests' items. Items are raw inputs or
        `Encoded` ones; `reserved`: places this request took with `reserve` (else they are asked for here)."""
        if not reserved:
            self.reserve(len(items))
        self.release(reserved or len(items))
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
        (a text longer than the budget goes alone). With pop=False, only counts what it would take.

        Texts: of those items, only the group of similar lengths that holds the oldest one (`length_groups`:
        split where padding would cost more than a model call); the rest wait for the next call, with whatever
        arrives meanwhile. Smaller, fuller calls, and the answers of each go out while the next one runs."""
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
            i += 1
        if pop and batch:
            if self.token_budget and len(batch) > 1:
                order = sorted(range(len(batch)), key=lambda j: batch[j].cost)
                groups = length_groups([batch[j].cost for j in order], CALL_COST_TOKENS)
                batch = [batch[order[j]] for g in groups if any(order[j] == 0 for j in g) for j in g]
            taken = {id(p) for p in batch}
            self.queue = collections.deque(p for p in self.queue if id(p) not in taken and not p.future.done())
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
        from duoclass.infer.predict import predict_items

        clf = self.clf
        return predict_items(clf.preprocessor, clf.backend, clf.classes_, items, len(items), top_k, clf.tta, names=names,
                             rule=self.rule)

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


# --- explanations -------------------------------------------------------------------------------
class ExplainWorker:
    """One model's explanations, beside its predictions and never in their batches: an explanation costs tens to
    hundreds of forward passes, so it runs in a pool of one thread of its own. Admission before any work: one
    request is explained at a time, --explain-queue more may wait, and past that a 429 with Retry-After.

    A torch model is explained through its own copy (made at the first request): Grad-CAM and integrated gradients
    hook the model's layers, and a hook on the model the predictions use would fire in their forward passes too.
    ONNX Runtime sessions are shared (their `run` is thread-safe; occlusion is all they can explain)."""

    def __init__(self, name: str, clf: Any, settings: ServeSettings, metrics: Metrics):
        self.name, self.clf, self.settings, self.metrics = name, clf, settings, metrics
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"duoclass-explain-{name}")
        self._lock = threading.Lock()  # `jobs` drops in the pool's thread when a job ends
        self.jobs = 0  # admitted requests: being explained or waiting
        self._seconds = 1.0  # running mean seconds per request, for Retry-After
        self._own: Any = None
        self.closed = False
        self.methods: dict[str, str] = {}  # each method this model has -> what it runs (auto -> gradcam, ...)
        self.refused: dict[str, str] = {}  # each method it lacks -> why, in one line
        from duoclass.infer.explain import METHODS, resolve_method

        for m in METHODS:
            try:
                self.methods[m] = resolve_method(clf, m)
            except DuoclassError as e:
                self.refused[m] = str(e).replace("--method", "method")

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil(self.jobs * self._seconds)))

    def reserve(self) -> None:
        """A place for one request in the pool, or a 429 (a 503 when stopping)."""
        if self.closed:
            raise RequestError(503, "the server is shutting down", "shutting_down", {"Retry-After": "5"})
        with self._lock:
            if self.jobs >= 1 + self.settings.explain_queue:
                s = self.retry_after()
                raise RequestError(429, f"model {self.name!r} is busy explaining: {self.jobs} explain requests are "
                                        f"running or waiting (one at a time, --explain-queue "
                                        f"{self.settings.explain_queue}); retry after {s} s", "explain_busy",
                                   {"Retry-After": str(s)})
            self.jobs += 1

    def release(self, *_: Any) -> None:
        with self._lock:
            self.jobs -= 1

    async def explain(self, items: Sequence[Any], names: Sequence[str], method: str, target: str | None) -> list[bytes]:
        """Each item's answer as JSON bytes, in order, for a request that holds a place (`reserve`); the place is
        given back when its job ends. A job still waiting when its request gives up (--timeout-s, or the client
        went away) is dropped; one already running runs to its end, its place still taken, so the pool never
        holds more jobs than it admitted."""
        try:
            job = self._thread.submit(self._run, list(items), list(names), method, target)
        except RuntimeError:  # the pool is shut down: stopping
            self.release()
            raise RequestError(503, "the server is shutting down", "shutting_down", {"Retry-After": "5"}) from None
        job.add_done_callback(self.release)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job)), self.settings.timeout_s)
        except asyncio.TimeoutError:
            job.cancel()
            raise RequestError(503, f"no explanation within {self.settings.timeout_s:g} s (--timeout-s): the model's "
                                    "explanations are busy; retry later, or send fewer items", "timeout",
                               {"Retry-After": str(self.retry_after())}) from None
        except asyncio.CancelledError:
            job.cancel()
            raise
        except Exception as e:  # noqa: BLE001  (a bug, not a bad input: those get their own error)
            log.error("model %s: an explanation failed", self.name, exc_info=e)
            raise InternalError(f"{type(e).__name__}: {e}") from None

    def stop(self) -> None:
        self.closed = True
        self._thread.shutdown(wait=False, cancel_futures=True)

    # the pool's thread ---------------------------------------------------------------------
    def model(self) -> Any:
        """The classifier explanations run on: for the torch backend a copy with its own module."""
        if self._own is None:
            clf = self.clf
            if getattr(clf.backend, "name", "") == "torch" and getattr(clf.backend, "model", None) is not None:
                import copy

                backend = copy.copy(clf.backend)
                backend.model = copy.deepcopy(clf.backend.model)  # the predictions only read the original
                clf = copy.copy(clf)
                clf.backend = backend
            self._own = clf
        return self._own

    def _run(self, items: list[Any], names: list[str], method: str, target: str | None) -> list[bytes]:
        """Decode each item (within --request-cpu-s), explain the usable ones in one explain_items call, and
        render each answer. An item that cannot be read gets its own error; the others are explained."""
        from duoclass.infer.explain import Explanation, explain_items
        from duoclass.preprocess.load import Encoded, load_each

        t0 = time.perf_counter()
        clf = self.model()
        encoded, errors = load_each(clf.preprocessor, items, budget_s=self.settings.request_cpu_s)
        good = sorted(encoded)
        done = explain_items(clf, [Encoded(items[i], encoded[i]) for i in good], method, target,
                             names=[names[i] for i in good]) if good else []  # decoded once, here
        out = {i: e for i, e in zip(good, done)}
        for i, why in errors.items():
            out[i] = Explanation(names[i], method=method, error=why.removeprefix("image bytes: "))
        answers = [explanation_json(out[i], names[i]) for i in range(len(items))]
        with self.metrics._lock:
            for i in range(len(items)):
                self.metrics.explained.inc(self.name, "ok" if out[i].ok else "error")
        self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - t0)
        return answers


def explanation_json(e: Any, name: str) -> bytes:
    """One item's answer, JSON: label, target, score, method, error, and images' heatmap_png (base64 PNG of the
    colour map at the model's input size) and attributions (rows, 4 digits), or texts' tokens."""
    import base64
    import json

    import numpy as np

    out: dict[str, Any] = {"label": e.label, "target": e.target, "score": e.score, "method": e.method,
                           "error": e.error.removeprefix(f"{name}: ") if e.error else None}
    if e.ok and e.attributions is not None:
        from PIL import Image

        from duoclass.explain.render import heat_rgba, png_bytes

        e.attributions = np.nan_to_num(e.attributions.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        d = e.to_dict(digits=4)
        if e.spans is not None:
            out["tokens"] = d["tokens"]
        else:
            png = png_bytes(Image.fromarray(heat_rgba(e.attributions, e.signed), "RGBA"))
            out["heatmap_png"] = base64.b64encode(png).decode("ascii")
            out["attributions"] = d["attributions"]
    return json.dumps(out, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
