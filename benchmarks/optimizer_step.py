"""duoclass's fused AdamW step against PyTorch's default per-tensor loop, side by side on the CPU.

Part 1 (step): for real duoclass models (tfidf-mlp with a 55,522-n-gram vocabulary, the size it
builds on chnsenticorp_htl; fasttext; albert-scratch-tiny; msresnet), it times optimizer.step()
with the same random gradients, --steps times per arm, the two arms alternating, and reports
the median per arm and the ratio loop / fused. It also runs 5 steps of each arm from the same
start and reports the largest parameter difference (the two compute the same update, so
it should be at float32 rounding level).

Part 2 (train, needs ../shared/data/text): `duoclass.train` of tfidf-mlp on chnsenticorp_htl,
--epochs epochs, seed 0, once with the fused step (duoclass's default) and once with the
loop; reports the median epoch seconds (training plus validation) and the test accuracy of each.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/optimizer_step.py

Writes benchmarks/results/optimizer_step.json (or --out).
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import duoclass
from duoclass.training import optim as engine
from duoclass.models import count_params, create_model

from bench_common import DEFAULT_DATA, RESULTS, RUNS, dataset_dir, environment, write_result

MODELS: dict[str, dict[str, Any]] = {
    "tfidf-mlp": {"vocab_size": 55_522},
    "fasttext": {},
    "albert-scratch-tiny": {"vocab_size": 8000},
    "msresnet": {},
}


def optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    engine.FUSED = fused
    try:
        return engine.adam(model, 1e-3, 0.05)
    finally:
        engine.FUSED = True


def step_part(steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        base = create_model(name, 2, **kwargs)
        models = {arm: copy.deepcopy(base) for arm in ("loop", "fused")}
        opts = {arm: optimizer(m, arm == "fused") for arm, m in models.items()}
        for arm, m in models.items():
            g = torch.Generator().manual_seed(1)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 1e-2
        for _ in range(5):  # same start, same gradients: the arms must agree
            for o in opts.values():
                o.step()
        diff = max((a - b).abs().max().item() for a, b in zip(models["loop"].parameters(), models["fused"].parameters()))
        times: dict[str, list[float]] = {"loop": [], "fused": []}
        for _ in range(steps):
            for arm, o in opts.items():
                t0 = time.perf_counter()
                o.step()
                times[arm].append(time.perf_counter() - t0)
        med = {arm: statistics.median(t) for arm, t in times.items()}
        out[name] = {"parameters": count_params(base), "loop_ms": round(med["loop"] * 1e3, 2),
                     "fused_ms": round(med["fused"] * 1e3, 2), "ratio_loop_over_fused": round(med["loop"] / med["fused"], 2),
                     "max_param_diff_after_5_steps": diff, "steps_timed": steps}
        print(name, out[name], flush=True)
    return out


def train_part(data: Path, epochs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ("fused", "loop"):
        run = RUNS / f"optimizer_step_{arm}"
        engine.FUSED = arm == "fused"
        try:
            clf = duoclass.train(data, model="tfidf-mlp", epochs=epochs, seed=0, output=str(run),
                                 progress=False, tensorboard=False)
        finally:
            engine.FUSED = True
        with open(run / "metrics.csv", encoding="utf-8") as f:
            secs = [float(r["seconds"]) for r in csv.DictReader(f)]
        out[arm] = {"epoch_seconds": secs, "median_epoch_seconds": statistics.median(secs),
                    "test_accuracy": clf.result_.test["accuracy"]}
        print(arm, out[arm], flush=True)
    out["ratio_loop_over_fused"] = round(out["loop"]["median_epoch_seconds"] / out["fused"]["median_epoch_seconds"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["step", "train"], choices=["step", "train"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm and model")
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding the dataset folders")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "optimizer_step.json"))
    a = p.parse_args()
    data = dataset_dir(a.data_root, "chnsenticorp_htl") if "train" in a.parts else None
    result: dict[str, Any] = {"benchmark": "optimizer_step", "args": vars(a), "environment": environment()}
    if "step" in a.parts:
        result["step"] = step_part(a.steps)
    if data is not None:
        result["train"] = train_part(data, a.epochs)
    write_result(Path(a.out), result)


if __name__ == "__main__":
    main()
