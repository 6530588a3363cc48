"""Adversarial robustness on real chest X-rays: standard against adversarial training, checked with PGD and AutoAttack;
and certified accuracy of a noise-trained model by randomized smoothing.

Every arm is `duoclass train` with the default chest X-ray recipe (msresnet, 28 px, 12 epochs) plus the arm's
flags; every figure is `duoclass evaluate --attack ...` or `duoclass certify` on the saved model folder.

    python benchmarks/robust_xray.py --seeds 0 1 2 --out benchmarks/results/robust_xray.json
    python benchmarks/robust_xray.py --parts certify --out benchmarks/results/certify_xray.json

`--reuse-standard DIR` takes the standard arm's run folders DIR/pneumoniamnist-seedN from an earlier
`benchmarks/train_seeds.py --runs DIR` run of the same recipe instead of training them again.
CPU smoke run: --subset-epochs 1 --seeds 0 --autoattack-examples 8 --certify-examples 4 --certify-n 50.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "images" / "pneumoniamnist"


def duoclass(*args: str) -> tuple[dict | None, float]:
    """Run `python -m duoclass ARGS`; (the JSON it printed last, or None; wall seconds)."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "duoclass", *args], capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"failed: duoclass {' '.join(args)}\n{r.stderr[-3000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), wall


def train(run: Path, seed: int, flags: list[str], epochs: int | None) -> float:
    if not (run / "metrics.json").is_file() and (run / "state.pt").is_file():  # interrupted: resume it
        print(f"  resuming {run}", flush=True)
        duoclass("train", "--resume", str(run), "--no-progress")
    if (run / "metrics.json").is_file():
        print(f"  reusing {run}", flush=True)
        return json.loads((run / "metrics.json").read_text())["seconds"]
    extra = ["--epochs", str(epochs)] if epochs else []
    _, wall = duoclass("train", str(DATA), "--model", "msresnet", "--seed", str(seed), "--output", str(run),
                       "--no-progress", "--no-tensorboard", *extra, *flags)
    return wall


def attack(model: Path, name: str, eps: str, steps: int, max_examples: int | None) -> dict:
    """One `duoclass evaluate --attack` of a model folder; cached beside the run, so a rerun resumes."""
    cache = model.parent / f"attack-{name}-{eps.replace('/', '_').replace(',', '+')}-s{steps}-n{max_examples or 'all'}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    out = _attack(model, name, eps, steps, max_examples)
    cache.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _attack(model: Path, name: str, eps: str, steps: int, max_examples: int | None) -> dict:
    args = ["evaluate", str(model), str(DATA), "--attack", name, "--eps", eps, "--json"]
    if name == "pgd":
        args += ["--steps", str(steps)]
    if max_examples:
        args += ["--max-examples", str(max_examples)]
    m, wall = duoclass(*args)
    assert m is not None
    return {"clean_accuracy": m["accuracy"], "robust": m["robust"], "seconds": round(wall, 1)}


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parts", nargs="+", default=["adversarial"], choices=["adversarial", "certify"])
    p.add_argument("--arms", nargs="+", default=["standard", "adversarial"], choices=["standard", "adversarial"],
                   help="the arms to run (two processes can share --runs, one arm each; a last run with both "
                        "arms reuses every trained run and cached evaluation and writes the whole JSON)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench" / "robust"))
    p.add_argument("--reuse-standard", default=None, help="folder of earlier standard runs (pneumoniamnist-seedN)")
    p.add_argument("--adv-flags", default="--adversarial fgsm --eps 4/255",
                   help="flags of the adversarial arm (default: FGSM with random start at 4/255)")
    p.add_argument("--eps", default="2/255,4/255", help="PGD-10 budgets to report")
    p.add_argument("--autoattack-eps", default="2/255")
    p.add_argument("--autoattack-seed", type=int, default=None,
                   help="the seed whose runs AutoAttack checks (default: the first of --seeds; -1: none)")
    p.add_argument("--autoattack-examples", type=int, default=0, help="0 = the whole test split")
    p.add_argument("--autoattack-examples-adversarial", type=int, default=None,
                   help="AutoAttack examples for the adversarial arm (default: --autoattack-examples); AutoAttack's "
                        "Square attack spends 5000 queries on every example still standing, so a robust model costs more")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--certify-examples", type=int, default=200)
    p.add_argument("--certify-n", type=int, default=1000)
    p.add_argument("--subset-epochs", type=int, default=None, help="train this many epochs (a smoke run)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    runs = Path(a.runs)
    out: dict = {"data": str(DATA), "commands": " ".join(sys.argv)}
    if "adversarial" in a.parts:
        arms = {"standard": [], "adversarial": a.adv_flags.split()}
        for arm, flags in arms.items():
            if arm not in a.arms:
                continue
            rows = []
            for seed in a.seeds:
                if arm == "standard" and a.reuse_standard:
                    run = Path(a.reuse_standard) / f"pneumoniamnist-seed{seed}"
                else:
                    run = runs / f"{arm}-seed{seed}"
                print(f"{arm} seed {seed}: {run}", flush=True)
                wall = train(run, seed, flags, a.subset_epochs)
                pgd = attack(run / "model", "pgd", a.eps, 10, None)
                row = {"seed": seed, "train_seconds": round(wall, 1), "clean_accuracy": pgd["clean_accuracy"],
                       "pgd10": {r["eps_text"]: r["accuracy"] for r in pgd["robust"]["results"]},
                       "pgd_seconds": pgd["seconds"]}
                if seed == (a.seeds[0] if a.autoattack_seed is None else a.autoattack_seed):
                    n_aa = a.autoattack_examples
                    if arm == "adversarial" and a.autoattack_examples_adversarial is not None:
                        n_aa = a.autoattack_examples_adversarial
                    aa = attack(run / "model", "autoattack", a.autoattack_eps, 10, n_aa or None)
                    row["autoattack"] = {"eps": a.autoattack_eps, "examples": aa["robust"]["examples"],
                                         "accuracy": aa["robust"]["results"][0]["accuracy"], "seconds": aa["seconds"]}
                    pgd_same = attack(run / "model", "pgd", a.autoattack_eps, 10, n_aa or None)
                    row["autoattack"]["pgd10_same_examples"] = pgd_same["robust"]["results"][0]["accuracy"]
                print(json.dumps(row), flush=True)
                rows.append(row)
            out[arm] = {"flags": flags, "runs": rows,
                        "clean_accuracy": mean_std([r["clean_accuracy"] for r in rows]),
                        "pgd10": {e: mean_std([r["pgd10"][e] for r in rows]) for e in rows[0]["pgd10"]},
                        "train_seconds_median": statistics.median(r["train_seconds"] for r in rows)}
    if "certify" in a.parts:
        run = runs / f"noise{a.sigma:g}-seed{a.seeds[0]}"
        wall = train(run, a.seeds[0], ["--noise-augment", str(a.sigma)], a.subset_epochs)
        cache = run / f"certify-sigma{a.sigma:g}-n{a.certify_n}-ex{a.certify_examples}.json"
        if cache.is_file():  # cached beside the run, like the attacks, so a rerun resumes
            m, cert_wall = (c := json.loads(cache.read_text()))["result"], c["seconds"]
        else:
            args = ["certify", str(run / "model"), str(DATA), "--sigma", str(a.sigma), "--n", str(a.certify_n),
                    "--max-examples", str(a.certify_examples), "--json"]
            m, cert_wall = duoclass(*args)
            cache.write_text(json.dumps({"result": m, "seconds": round(cert_wall, 1)}) + "\n")
        out["certify"] = {"train_seconds": round(wall, 1), "certify_seconds": round(cert_wall, 1), "result": m}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "commands"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
