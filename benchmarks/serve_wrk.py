"""Serving throughput with a low-overhead load generator: `wrk` (Debian's package) against `duoclass serve` on
loopback, every backend (torch, onnx, onnx-int8) with and without micro-batching, beside the backend's own
`predict_proba` rate measured in the same run.

    apt-get install wrk
    python benchmarks/cpu_inference.py --parts text --prepare-only --train-subsample 2000 --valid-subsample 500
    python benchmarks/serve_wrk.py --model runs/bench/cpu_inference/text/minilm-sub2000-valid500-e1/model \\
        --texts ../shared/data/text/sst2/test.csv --out benchmarks/results/serve_wrk.json

Each arm starts its own server (`python -m duoclass.serve.app`, a free 127.0.0.1 port: nothing else is
addressed), warms it up for --warmup seconds, then runs `wrk -t1 -c CLIENTS -d SECONDS --latency` with a
Lua script that sends the texts of --texts one per request ({"text": ...}), in turn. "batched" is the
default micro-batching (--max-batch-size 32, --max-wait-ms 5), "unbatched" --max-batch-size 1.

Reported per arm, from the median of --runs wrk runs: valid (2xx) requests/s, wrk's p50/p90/p99 latency, non-2xx and socket errors, and the CPU
seconds per second used by wrk and by the server (from the kernel's accounting: wait4 for wrk, /proc for the
server). `predict_proba` is the backend's rate on the same texts in one process, batches of 64 (sorted by
length, as predict does), the median of --repeats passes; beside it the same process's rate one text at a time
(the first 200), so the gain batching can give this model at these lengths is known. With --profile, py-spy samples the server during each measured run and the functions with
the most samples (self time) are listed, to say what bounds the server.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LUA = """
local texts = {}
for line in io.lines("%s") do texts[#texts + 1] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i %% #texts + 1
  return wrk.format(nil, nil, nil, texts[i])
end
"""


def py_spy() -> str | None:
    sibling = Path(sys.executable).with_name("py-spy")  # installed into this virtual environment
    return str(sibling) if sibling.is_file() else shutil.which("py-spy")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_wrk(out: str) -> dict[str, Any]:
    def ms(v: str) -> float:
        num, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v).groups()  # type: ignore[union-attr]
        return float(num) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    lat = {f"p{q}": ms(v) for q, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", out, re.M)}
    total, seconds = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out).group(1, 2)  # type: ignore[union-attr]
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": int(total), "seconds": float(seconds), "non_2xx": non2xx,
            "socket_errors": sum(map(int, sock.groups())) if sock else 0, **lat}


def run_wrk(url: str, lua: Path, clients: int, seconds: float, profile_pid: int | None, profile_out: Path | None
            ) -> dict[str, Any]:
    spy = None
    if profile_pid is not None and profile_out is not None:
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(profile_pid), "--duration", str(int(seconds)),
                                "--rate", "200", "--format", "raw", "--output", str(profile_out), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    proc = subprocess.Popen(["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-s", str(lua), url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if spy is not None:
        spy.wait(60)
    if status != 0:
        raise RuntimeError(f"wrk failed: {out[-2000:]}")
    r = parse_wrk(out)
    r["generator_cpu_per_s"] = round((usage.ru_utime + usage.ru_stime) / wall, 3)
    return r


def top_functions(raw: Path, n: int = 12) -> list[tuple[str, float]]:
    """(function, share of samples) with the most self time, from py-spy's collapsed stacks."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        if not stack or not k.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] += int(k)
        total += int(k)
    return [(f, round(c / total, 3)) for f, c in counts.most_common(n)] if total else []


def backend_rate(model: Path, backend: str, texts: list[str], repeats: int) -> dict[str, Any]:
    """predict_proba texts/s in a fresh process (the server's threads: ONNX Runtime's default, torch's)."""
    code = f"""
import json, sys, time, duoclass
texts = json.load(open(sys.argv[1]))
clf = duoclass.load({str(model)!r}, backend={backend!r})
clf.predict_proba(texts[:64])
times, ones = [], []
for _ in range({repeats}):
    t0 = time.perf_counter(); clf.predict_proba(texts, batch_size=64); times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for t in texts[:200]:
        clf.predict_proba([t])
    ones.append(time.perf_counter() - t0)
print(json.dumps([times, ones]))
"""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    try:
        r = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    finally:
        os.unlink(f.name)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    times, ones = json.loads(r.stdout.strip().splitlines()[-1])
    return {"texts_per_s": round(len(texts) / statistics.median(times), 1), "seconds": times,
            "one_at_a_time_texts_per_s": round(min(200, len(texts)) / statistics.median(ones), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a text model folder with onnx and onnx-int8 variants")
    p.add_argument("--texts", default=str(REPO.parent / "shared/data/text/sst2/test.csv"))
    p.add_argument("--backends", nargs="+", default=["torch", "onnx", "onnx-int8"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--runs", type=int, default=3, help="measured wrk runs per arm; the median run is reported")
    p.add_argument("--repeats", type=int, default=3, help="predict_proba passes per backend")
    p.add_argument("--profile", action="store_true", help="py-spy the server during each measured run")
    p.add_argument("--out", default=str(REPO / "runs/bench/serve_wrk.json"))
    a = p.parse_args()
    if not shutil.which("wrk"):
        sys.exit("error: wrk is not installed; `apt-get install wrk`")
    if a.profile and not py_spy():
        sys.exit("error: --profile needs py-spy; `pip install py-spy`")
    with open(a.texts, encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    work = Path(tempfile.mkdtemp(prefix="serve_wrk-"))
    bodies = work / "bodies.txt"
    bodies.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    lua = work / "post.lua"
    lua.write_text(LUA % bodies)
    out: dict[str, Any] = {"command": " ".join(["python", "benchmarks/serve_wrk.py", *sys.argv[1:]]),
                           "model": a.model, "texts": a.texts, "n_texts": len(texts), "clients": a.clients,
                           "seconds": a.seconds, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "arms": {}, "predict_proba": {}}
    for backend in a.backends:
        out["predict_proba"][backend] = backend_rate(Path(a.model), backend, texts, a.repeats)
        print(f"{backend}: predict_proba {out['predict_proba'][backend]['texts_per_s']} texts/s", flush=True)
        for arm, flags in (("batched", []), ("unbatched", ["--max-batch-size", "1"])):
            name = f"{backend}-{arm}"
            with ServerProcess({"m": Path(a.model)}, ["--backend", backend, *flags], work / f"{name}.log") as s:
                url = s.url + "/v1/models/m/predict"
                run_wrk(url, lua, a.clients, a.warmup, None, None)
                runs = []
                for k in range(a.runs):
                    c0 = cpu_seconds(s.proc.pid)
                    prof = work / f"{name}-{k}.prof" if a.profile else None
                    t0 = time.monotonic()
                    one = run_wrk(url, lua, a.clients, a.seconds, s.proc.pid if a.profile else None, prof)
                    one["server_cpu_per_s"] = round((cpu_seconds(s.proc.pid) - c0) / (time.monotonic() - t0), 3)
                    one["valid_per_s"] = round((one["requests"] - one["non_2xx"]) / one["seconds"], 1)
                    runs.append(one)
                r = dict(sorted(runs, key=lambda x: x["valid_per_s"])[len(runs) // 2])  # the median run
                r["runs_valid_per_s"] = [x["valid_per_s"] for x in runs]
                r["server_rss_mb"] = s.rss_mb()
            if prof is not None and prof.is_file():
                r["profile_top_self"] = top_functions(prof)
            out["arms"][name] = r
            print(f"  {arm}: {r['valid_per_s']} valid req/s, p50 {r.get('p50')} ms, p99 {r.get('p99')} ms, "
                  f"wrk {r['generator_cpu_per_s']} CPU/s, server {r['server_cpu_per_s']} CPU/s", flush=True)
    for backend in a.backends:
        b, u = out["arms"].get(f"{backend}-batched"), out["arms"].get(f"{backend}-unbatched")
        if b and u:
            b["x_unbatched"] = round(b["valid_per_s"] / u["valid_per_s"], 2)
            b["share_of_predict_proba"] = round(b["valid_per_s"] / out["predict_proba"][backend]["texts_per_s"], 3)
    out["load_average_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, a.out)
    print(f"results: {a.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
