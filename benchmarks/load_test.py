"""Load test of `duoclass serve`: throughput and p50/p99 latency with and without micro-batching, a zero-5xx
check under mixed valid and invalid traffic, and the server's memory (RSS) after 1,000 and 10,000 requests.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/load_test.py          # trains two tiny models first (~30 s)
    .venv/bin/python benchmarks/load_test.py --image-model runs/x/model --text-model runs/y/model
    .venv/bin/python benchmarks/load_test.py --requests 60 --soak 1000 --max-seconds 20   # a smoke run

Each arm (image or text, batched or not) starts its own server (`python -m duoclass.serve`, a subprocess
on a free 127.0.0.1 port: nothing else is ever addressed) and sends it --requests requests from --clients
concurrent clients; a share --invalid of them is malformed (truncated or non-image files, an empty list of texts,
wrong JSON types, unknown models, bad base64) and must get a 4xx. "batched" runs the defaults
(--max-batch-size 32, --max-wait-ms 5), "unbatched" --max-batch-size 1. Then one batched server serving both
models takes a soak of --soak mixed requests and its RSS is read from /proc after 1,000 and 10,000 of them.
Every phase stops after --max-seconds whatever it has sent. The ratio batched / unbatched is measured in
the same run, on the same machine.

Writes runs/bench/load_test.json (or --out): per arm the status counts, 5xx count, valid requests per
second, p50/p99 latency of valid requests (client side, ms); the soak's RSS checkpoints; and `zero_5xx`.
The exit status is 1 when any 5xx was seen.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "runs" / "bench"
HOST = "127.0.0.1"  # loopback only
log = logging.getLogger("load_test")

TEXTS = ["a really lovely movie with superb acting", "the plot was awful and the acting poor",
         "good", "horrible dreadful film, quite a bad story really", "the film was wonderful",
         "excellent story " * 20, "terrible " * 5 + "acting in a movie that was really quite bad"]


# --- models -----------------------------------------------------------------------------------
def toy_texts(path: Path, n: int, seed: int) -> None:
    """A two-class toy text file: filler words plus one sentiment word."""
    rng = random.Random(seed)
    pos, neg = "good great excellent lovely superb".split(), "bad awful terrible poor horrible".split()
    filler = "the movie was film plot acting really quite a story".split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            y = i % 2
            words = [rng.choice(filler) for _ in range(6)] + [rng.choice(pos if y == 0 else neg)]
            rng.shuffle(words)
            w.writerow([" ".join(words), "pos" if y == 0 else "neg"])


def tiny_models(root: Path) -> tuple[Path, Path]:
    """msresnet-tiny at 16 px on scikit-learn's digits and tfidf-mlp on toy texts, trained once into root."""
    import duoclass
    from duoclass.cli.demo import write_digits

    image, text = root / "digits" / "model", root / "toy-text" / "model"
    common = dict(progress=False, tensorboard=False, device="cpu", seed=0)
    if not (image / "config.json").is_file():
        log.info("training msresnet-tiny on digits (16 px, 1 epoch) into %s", image.parent)
        duoclass.train(write_digits(root / "digits-data"), output=str(image.parent), model="msresnet-tiny",
                       image_size=16, epochs=1, augment="none", **common)
    if not (text / "config.json").is_file():
        log.info("training tfidf-mlp on toy texts into %s", text.parent)
        for split, n, seed in (("train", 200, 0), ("valid", 40, 1), ("test", 40, 2)):
            toy_texts(root / "toy-data" / f"{split}.csv", n, seed)
        duoclass.train(root / "toy-data", output=str(text.parent), model="tfidf-mlp", epochs=2, batch_size=16, **common)
    return image, text


# --- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m duoclass.serve` on a free loopback port, until the `with` block ends."""

    def __init__(self, models: dict[str, Path], flags: list[str], log_file: Path, nofile: int | None = None,
                 src: Path | None = None):
        self.nofile = nofile  # the server's file-descriptor limit
        self.src = src or REPO / "src"  # another checkout's src/, to measure an earlier duoclass
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = [sys.executable, "-m", "duoclass.serve.app", *(f"{k}={v}" for k, v in models.items()),
                    "--host", HOST, "--port", str(self.port), "--no-access-log", *flags]
        self.log_file = log_file

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "w")
        env = dict(os.environ, PYTHONPATH=str(self.src) + os.pathsep + os.environ.get("PYTHONPATH", ""))

        def limits() -> None:
            if self.nofile:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=limits)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_file}")
            try:
                token = self.cmd[self.cmd.index("--token") + 1] if "--token" in self.cmd else None
                auth = {"Authorization": f"Bearer {token}"} if token else {}
                if httpx.get(self.url + "/readyz", timeout=2, headers=auth).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server was not ready within 120 s; see {self.log_file}")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def rss_mb(self) -> float | None:
        """Resident memory of the server process (Linux /proc), in MiB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None


# --- requests -----------------------------------------------------------------------------------
def sample_images(image_size: int, n: int = 16) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        side = int(rng.integers(max(8, image_size // 2), image_size * 2 + 1))
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_requests(kind: str, n: int, invalid: float, images: list[bytes], names: dict[str, str],
                   seed: int) -> list[tuple[bool, str, dict[str, Any]]]:
    """n (valid?, path, httpx request kwargs), `invalid` of them malformed, in a seeded shuffled order."""
    rng = random.Random(seed)
    img, txt = f"/v1/models/{names['image']}/predict", f"/v1/models/{names['text']}/predict"
    bad = [
        (img, {"files": {"file": ("cut.png", images[0][: len(images[0]) // 2], "image/png")}}),
        (img, {"files": {"file": ("notes.txt", b"not an image at all", "text/plain")}}),
        (img, {"json": {"image": "%%% not base64 %%%"}}),
        (txt, {"json": {"texts": []}}),  # an empty text is not malformed: it gets a label flagged as a guess
        (txt, {"json": {"texts": "not a list"}}),
        (txt, {"json": {"text": 42}}),
        ("/v1/models/no-such-model/predict", {"json": {"text": "good"}}),
        (txt, {"content": b'{"text": ', "headers": {"Content-Type": "application/json"}}),
    ]
    out = []
    for i in range(n):
        if rng.random() < invalid:
            path, kw = rng.choice(bad)
            out.append((False, path, kw))
        elif kind == "image" or (kind == "mixed" and i % 2 == 0):
            if rng.random() < 0.5:
                out.append((True, img, {"files": {"file": ("x.png", rng.choice(images), "image/png")}, "data": {"top_k": "3"}}))
            else:
                out.append((True, img, {"json": {"image": base64.b64encode(rng.choice(images)).decode(), "top_k": 3}}))
        else:
            out.append((True, txt, {"json": {"text": rng.choice(TEXTS), "top_k": 2}}))
    return out


async def drive(url: str, reqs: list[tuple[bool, str, dict[str, Any]]], clients: int, max_seconds: float,
                on_count: Any = None) -> dict[str, Any]:
    """Send the requests from `clients` concurrent clients; statuses, 5xx, throughput and latency percentiles."""
    import httpx

    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    unexpected: list[str] = []
    next_i = 0
    done = 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def client() -> None:
            nonlocal next_i, done
            while next_i < len(reqs) and time.monotonic() < deadline:
                valid, path, kw = reqs[next_i]
                next_i += 1
                t0 = time.perf_counter()
                try:
                    r = await c.post(path, **kw)
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = 0
                    unexpected.append(f"{path}: {type(e).__name__}: {e}")
                ms = (time.perf_counter() - t0) * 1000
                statuses[str(status)] += 1
                if valid and status == 200:
                    latencies.append(ms)
                elif valid and status != 429 or not valid and not 400 <= status < 500:
                    if len(unexpected) < 20:
                        unexpected.append(f"{'valid' if valid else 'invalid'} {path}: {status}")
                done += 1
                if on_count is not None:
                    on_count(done)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - t0

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        xs = sorted(latencies)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)

    fives = sum(v for k, v in statuses.items() if k.startswith("5"))
    return {"sent": done, "seconds": round(seconds, 2), "statuses": dict(sorted(statuses.items())), "5xx": fives,
            "valid_ok": len(latencies), "valid_per_second": round(len(latencies) / seconds, 1) if seconds else None,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None,
            "stopped_by_time": done < len(reqs), "unexpected": unexpected}


# --- main ---------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image-model", default=None, help="an image model folder (default: train a tiny one)")
    p.add_argument("--text-model", default=None, help="a text model folder (default: train a tiny one)")
    p.add_argument("--requests", type=int, default=2000, help="requests per arm")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--invalid", type=float, default=0.2, help="share of malformed requests")
    p.add_argument("--soak", type=int, default=10_000, help="requests of the memory soak (RSS read at 1,000 and 10,000)")
    p.add_argument("--max-seconds", type=float, default=120, help="time limit of each phase")
    p.add_argument("--batch-size", type=int, default=32, help="--max-batch-size of the batched arms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="torch", help="the servers' --backend: torch, onnx or onnx-int8")
    p.add_argument("--work", default=str(RUNS / "load_test"), help="models and server logs")
    p.add_argument("--out", default=str(RUNS / "load_test.json"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    if a.requests < 1 or a.clients < 1 or a.soak < 0 or not 0 <= a.invalid < 1 or a.max_seconds <= 0:
        p.error("--requests and --clients must be >= 1, --soak >= 0, --invalid in [0, 1), --max-seconds > 0")
    work = Path(a.work)
    if a.image_model and a.text_model:
        image_dir, text_dir = Path(a.image_model), Path(a.text_model)
    else:
        trained_image, trained_text = tiny_models(work / "models")
        image_dir, text_dir = Path(a.image_model or trained_image), Path(a.text_model or trained_text)
    names = {"image": "img", "text": "txt"}
    models = {names["image"]: image_dir, names["text"]: text_dir}
    queue = str(max(1024, a.clients * 8))
    arms = {"batched": ["--max-batch-size", str(a.batch_size), "--max-wait-ms", "5", "--max-queue", queue,
                        "--backend", a.backend],
            "unbatched": ["--max-batch-size", "1", "--max-queue", queue, "--backend", a.backend]}
    result: dict[str, Any] = {"benchmark": "load_test", "args": vars(a), "python": sys.version.split()[0],
                              "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "arms": {}}
    image_size = json.loads((image_dir / "config.json").read_text())["preprocessing"]["image_size"]
    images = sample_images(int(image_size))
    for kind in ("text", "image"):
        for arm, flags in arms.items():
            with ServerProcess(models, flags, work / f"server-{kind}-{arm}.log") as server:
                reqs = build_requests(kind, a.requests, a.invalid, images, names, a.seed)
                warm = build_requests(kind, min(50, a.requests), 0.0, images, names, a.seed + 1)
                asyncio.run(drive(server.url, warm, min(a.clients, 8), a.max_seconds))  # first-request costs
                r = asyncio.run(drive(server.url, reqs, a.clients, a.max_seconds))
                r["rss_mb"] = server.rss_mb()
            result["arms"][f"{kind}-{arm}"] = r
            log.info("%-16s %6d sent in %6.1f s  %8.1f valid/s  p50 %7s ms  p99 %7s ms  5xx %d  statuses %s",
                     f"{kind}-{arm}", r["sent"], r["seconds"], r["valid_per_second"] or 0, r["p50_ms"], r["p99_ms"],
                     r["5xx"], r["statuses"])
    for kind in ("text", "image"):
        b, u = result["arms"][f"{kind}-batched"], result["arms"][f"{kind}-unbatched"]
        if b["valid_per_second"] and u["valid_per_second"]:
            result[f"{kind}_throughput_ratio_batched_over_unbatched"] = round(b["valid_per_second"] / u["valid_per_second"], 2)

    if a.soak:
        checkpoints = [c for c in (1_000, 10_000) if c <= a.soak]
        with ServerProcess(models, arms["batched"], work / "server-soak.log") as server:
            rss: dict[str, float | None] = {"start": server.rss_mb()}

            def on_count(n: int) -> None:
                if n in checkpoints:
                    rss[f"after_{n}"] = server.rss_mb()

            reqs = build_requests("mixed", a.soak, a.invalid, images, names, a.seed + 2)
            r = asyncio.run(drive(server.url, reqs, a.clients, a.max_seconds, on_count))
            rss["end"] = server.rss_mb()
        r["rss_mb"] = rss
        if rss.get("after_1000") and rss.get("after_10000"):  # the acceptance: within 10% of its value at 1,000
            r["rss_growth_1k_to_10k"] = round(rss["after_10000"] / rss["after_1000"] - 1, 4)
            r["rss_within_10pct"] = abs(r["rss_growth_1k_to_10k"]) <= 0.10
        result["soak"] = r
        log.info("soak: %d sent in %.1f s, 5xx %d, RSS (MiB) %s", r["sent"], r["seconds"], r["5xx"], rss)

    phases = list(result["arms"].values()) + ([result["soak"]] if "soak" in result else [])
    result["zero_5xx"] = all(ph["5xx"] == 0 for ph in phases)
    result["unexpected_statuses"] = sum(len(ph["unexpected"]) for ph in phases)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    ratios = {k: v for k, v in result.items() if k.endswith("_ratio_batched_over_unbatched")}
    print(f"zero 5xx: {result['zero_5xx']}; throughput batched / unbatched: {ratios}; results: {out}")
    return 0 if result["zero_5xx"] else 1


if __name__ == "__main__":
    sys.exit(main())
