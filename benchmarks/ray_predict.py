"""Batch prediction on Ray against local predict: the same CSV, and the throughput of each, on real data.

    python benchmarks/ray_predict.py --image-model runs/bench/robust/standard-seed0/model \\
        --text-model runs/bench/load_test/minilm/model --out benchmarks/results/ray_predict.json

For each model, the whole `duoclass predict` command, timed from process start to exit (Python start-up,
model load and, for Ray, starting a local Ray instance and its workers included):

  local   duoclass predict MODEL INPUT --output local.csv                 (torch's threads, 2 on 2 cores)
  ray     duoclass predict MODEL INPUT --engine ray --ray-workers W --output ray.csv   (W workers, 1 CPU each)

run --repeats times, alternating, then the two CSVs compared byte for byte. Images: the chest X-ray
train split (../shared/data/images/pneumoniamnist/train, 4,708 PNGs); text: SST-2 valid (6,735 rows).
Reported: median wall seconds, inputs per second, the ratio ray / local, and `identical`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"


def timed(args: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as f:
        r = subprocess.run([sys.executable, "-m", "duoclass", *args], stdout=f, stderr=f)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): duoclass {' '.join(args)}; see {log}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-model", help="an image model folder (chest X-rays)")
    p.add_argument("--text-model", help="a text model folder (SST-2)")
    p.add_argument("--image-input", default=str(DATA / "images" / "pneumoniamnist" / "train"))
    p.add_argument("--text-input", default=str(DATA / "text" / "sst2" / "valid.csv"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="torch")
    p.add_argument("--work", default=str(REPO / "runs" / "bench" / "ray_predict"))
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "ray_predict.json"))
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "workers": a.workers,
                 "repeats": a.repeats, "backend": a.backend, "cores": os.cpu_count(), "arms": {}}
    for kind, model, inp in (("image", a.image_model, a.image_input), ("text", a.text_model, a.text_input)):
        if not model:
            continue
        if not Path(inp).exists():
            print(f"skipped {kind}: {inp} is absent")
            continue
        common = ["predict", model, inp, "--backend", a.backend]
        local_csv, ray_csv, log = work / f"{kind}-local.csv", work / f"{kind}-ray.csv", work / f"{kind}.log"
        times: dict[str, list[float]] = {"local": [], "ray": []}
        for i in range(a.repeats):
            times["local"].append(timed([*common, "--output", str(local_csv)], log))
            times["ray"].append(timed([*common, "--engine", "ray", "--ray-workers", str(a.workers), "--output", str(ray_csv)],
                                      log))
            print(f"{kind} repeat {i}: local {times['local'][-1]:.1f} s, ray {times['ray'][-1]:.1f} s", flush=True)
        rows = len(local_csv.read_text(encoding="utf-8").splitlines()) - 1
        med = {k: statistics.median(v) for k, v in times.items()}
        out["arms"][kind] = {
            "model": model, "input": inp, "rows": rows, "seconds": times,
            "median_seconds": med, "inputs_per_second": {k: rows / v for k, v in med.items()},
            "ray_over_local": med["local"] / med["ray"],
            "identical": local_csv.read_bytes() == ray_csv.read_bytes()}
        print(json.dumps(out["arms"][kind]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    if not all(arm["identical"] for arm in out["arms"].values()):
        sys.exit("the Ray CSV differs from the local one")


if __name__ == "__main__":
    main()
