"""Text robustness: FGM adversarial training in embedding space against plain training, scored on typo-like noise.

For each dataset (default trec6, English questions, and chnsenticorp_htl, Chinese hotel reviews) and
each seed (default 0 1 2), two arms of the same model and recipe:

  plain  `duoclass train DATA --model M --seed S --output RUN --no-progress --no-tensorboard`
  fgm    the same plus `--adversarial fgm --eps E`: each step adds eps * g / ||g|| to the input
         embedding table (g the gradient of the clean loss; Miyato et al., 2017) and trains on
         the clean and the perturbed loss together (attacks.py)

then `duoclass evaluate RUN/model DATA --json --char-noise 0.05,0.1` on each model folder: clean test
accuracy, and test accuracy with every test text perturbed at 5% and 10% of its characters (random
deletions, swaps with the next character and insertions; text_augment.perturb_chars). The noise is
seeded (seed 0, duoclass's fixed evaluation seed, recorded from its output) and each rate starts a
fresh generator over the same test texts in the same order, so both arms, and every seed, are
scored on the very same perturbed texts.

The model is tfidf-mlp, duoclass's strong cheap text model (the best of its from-scratch models on
these sets, about a minute or two per run on a CPU core). FGM applies to it: it has input
embeddings, an EmbeddingBag of n-gram vectors summed with their TF-IDF weights, so perturbing that
table moves each text's hidden vector the way perturbing word embeddings does in a sequence model.
Note what that means for this test: character noise changes which n-grams a text has (a typo
drops the word's n-grams and adds unseen or rare ones), while FGM perturbs the vectors of the
n-grams a text does have; whether the one helps against the other is what this measures.
--model takes any text model with input embeddings (fasttext, albert-scratch-tiny, ...).
The recipe is duoclass's default for the model (12 epochs, the epoch with the best valid balanced
accuracy kept); --train-flags adds flags to both arms, --adv-flags to the FGM arm only.
E defaults to duoclass's text default (1.0, the L2 norm of the perturbation of the embedding table).

Reported per arm: mean ± std over the seeds of clean accuracy, accuracy at each noise rate, and
training time (metrics.json "seconds": duoclass's own training time, data reading and the final
test pass included, process start-up not); per dataset: the FGM minus plain difference paired by
seed, and the FGM arm's training time as a ratio of the plain arm's. The JSON also holds every run,
the flags, and the FGM settings as the model folder records them (mode, eps, norm, alpha, ratio).

Run folders go to runs/bench/robust_text/DATASET[-subN]/MODEL/{plain,fgm-epsE}-seedS (git-ignored).
A run whose metrics.json exists is reused, so an interrupted benchmark resumes where it stopped;
a run folder trained with other arguments is refused before any work (pass --runs DIR or delete
it). An unfinished run is trained again from scratch. The evaluation of each run is cached next
to it (char_noise.json).

Full run (trec6 and chnsenticorp_htl, 3 seeds, 2 arms: 12 trainings of 12 epochs, two at a time,
one thread each). Estimated from one epoch of each run: about 20 minutes on 2 otherwise idle
cores (35 with --jobs 1), up to twice that while other work shares the cores. An FGM run takes
2-3x a plain one (a clean and an adversarial forward and backward per step):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/robust_text.py --jobs 2

Smoke run (a minute or two; its own run folders, because --subsample is part of their path):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/robust_text.py --seeds 0 --epochs 1 \\
        --subsample 300 --out /tmp/robust_text_smoke.json

Writes benchmarks/results/robust_text.json (or --out) and prints a markdown table for
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_common import (DEFAULT_DATA, RESULTS, RUNS, dataset_dir, environment, last_json, mean_std, prepared_dataset,
                          read_rows, run_cli, run_metrics, write_result)

from duoclass.settings.budget import TEXT_EPS

ARMS = ("plain", "fgm")


def arm_flags(arm: str, a: argparse.Namespace) -> list[str]:
    """The recipe flags of an arm: the same for both, plus FGM for the fgm arm."""
    flags = ["--model", a.model, *(["--epochs", str(a.epochs)] if a.epochs else []), *shlex.split(a.train_flags)]
    if arm == "fgm":
        flags += ["--adversarial", "fgm", "--eps", a.eps, *shlex.split(a.adv_flags)]
    return flags


def run_name(arm: str, seed: int, a: argparse.Namespace) -> str:
    """plain-seedS, fgm-epsE-seedS: an eps sweep reuses the plain runs."""
    return f"{arm}-seed{seed}" if arm == "plain" else f"fgm-eps{a.eps.replace('/', '_')}-seed{seed}"


def train_args(data: Path, seed: int, arm: str, a: argparse.Namespace) -> list[str]:
    """The `duoclass train` arguments of one run, --output excepted (it is the run folder)."""
    return ["train", str(data), "--seed", str(seed), "--no-progress", "--no-tensorboard", *arm_flags(arm, a)]


def finished(run: Path, args: list[str]) -> bool:
    """Whether `run` holds a finished run of these arguments; exits when it holds one of other arguments."""
    if not (run / "metrics.json").is_file():
        return False
    stamp = run / "bench_args.json"
    saved = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else None
    if saved != args:
        raise SystemExit(f"error: {run} holds a run trained with other arguments\n  it:   {saved}\n  now:  {args}\n"
                         "pass --runs DIR for a fresh set of run folders, or delete that folder")
    return True


def train(run: Path, args: list[str]) -> float | None:
    """Train into `run` unless it already holds a finished run of the same arguments; the wall seconds (None: reused)."""
    if finished(run, args):
        print(f"  reusing {run}", flush=True)
        return None
    stamp = run / "bench_args.json"
    shutil.rmtree(run, ignore_errors=True)  # an unfinished run starts again
    run.mkdir(parents=True)
    stamp.write_text(json.dumps(args) + "\n", encoding="utf-8")
    wall, _ = run_cli([*args, "--output", str(run)], run.with_suffix(".train.log"))
    return round(wall, 1)


def char_noise_eval(run: Path, data: Path, rates: str) -> dict[str, Any]:
    """Clean and char-noise test metrics of the run's model folder, cached in RUN/char_noise.json."""
    cache = run / "char_noise.json"
    key = {"data": str(data), "rates": rates}
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["metrics"]
    wall, stdout = run_cli(["evaluate", str(run / "model"), str(data), "--json", "--char-noise", rates],
                           run.with_suffix(".eval.log"))
    m = last_json(stdout)
    out = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "n": m["n"], "seconds": round(wall, 1),
           "char_noise": m["char_noise"]}
    cache.write_text(json.dumps({"key": key, "metrics": out}, indent=1) + "\n", encoding="utf-8")
    return out


def one_run(name: str, data: Path, runs: Path, arm: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    run = runs / run_name(arm, seed, a)
    wall = train(run, train_args(data, seed, arm, a))
    ev = char_noise_eval(run, data, a.char_noise)
    how = json.loads((run / "model" / "config.json").read_text(encoding="utf-8"))["training"]
    tm = run_metrics(run)
    row = {"dataset": name, "arm": arm, "seed": seed, "clean_accuracy": ev["accuracy"],
           "char_noise": {f"{r['rate']:g}": r["accuracy"] for r in ev["char_noise"]},
           "noise_seed": ev["char_noise"][0]["seed"], "test_n": ev["n"],
           "train_seconds": tm["train_seconds"], "train_wall_seconds": wall, "best_epoch": tm["best_epoch"],
           "valid_accuracy": tm["valid_accuracy"], "training": how, "run": str(run)}
    noisy = "  ".join(f"{k}: {v:.4f}" for k, v in row["char_noise"].items())
    print(f"  {name} {arm} seed {seed}: clean {row['clean_accuracy']:.4f}  char noise {noisy}  "
          f"({row['train_seconds']:.1f} s training)\n", end="", flush=True)  # one write: --jobs runs print at once
    return row


def summarise(rows: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per arm mean ± std; FGM - plain paired by seed; the training-time ratio."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    rates = list(rows[0]["char_noise"])

    def metrics(r: dict[str, Any]) -> dict[str, float]:
        return {"clean": r["clean_accuracy"], **{f"char_noise_{k}": v for k, v in r["char_noise"].items()}}

    arms: dict[str, Any] = {}
    for arm in ARMS:
        runs = [by[arm, s] for s in seeds]
        arms[arm] = {name: mean_std([metrics(r)[name] for r in runs]) for name in metrics(runs[0])}
        arms[arm]["drop"] = {k: mean_std([r["clean_accuracy"] - r["char_noise"][k] for r in runs]) for k in rates}
        arms[arm]["train_seconds"] = mean_std([r["train_seconds"] for r in runs])
    diff = {name: mean_std([metrics(by["fgm", s])[name] - metrics(by["plain", s])[name] for s in seeds])
            for name in metrics(rows[0])}
    ratio = arms["fgm"]["train_seconds"]["mean"] / arms["plain"]["train_seconds"]["mean"]
    return {"arms": arms, "fgm_minus_plain": diff, "train_time_ratio_fgm_over_plain": round(ratio, 2)}


def pm(s: dict[str, float], digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    rates = result["args"]["char_noise"].split(",")
    head = ["dataset", "arm", "clean test acc", *(f"{float(r) * 100:g}% chars perturbed" for r in rates), "training s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in result["datasets"].items():
        s = d["summary"]
        for arm in ARMS:
            m = s["arms"][arm]
            lines.append(f"| {name} | {arm} | {pm(m['clean'])} | "
                         + " | ".join(pm(m[f'char_noise_{float(r):g}']) for r in rates)
                         + f" | {pm(m['train_seconds'], 1)} |")
        dd = s["fgm_minus_plain"]
        lines.append(f"| {name} | fgm − plain (by seed) | {pm(dd['clean'])} | "
                     + " | ".join(pm(dd[f'char_noise_{float(r):g}']) for r in rates)
                     + f" | × {s['train_time_ratio_fgm_over_plain']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["trec6", "chnsenticorp_htl"])
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding the dataset folders")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="tfidf-mlp", help="a duoclass text model with input embeddings")
    p.add_argument("--eps", default=f"{TEXT_EPS:g}", help="FGM eps: L2 norm of the perturbation of the embedding table")
    p.add_argument("--adv-flags", default="", help="more train flags for the FGM arm only, e.g. '--adv-ratio 0.5'")
    p.add_argument("--train-flags", default="", help="more train flags for both arms, e.g. '--select-metric accuracy'")
    p.add_argument("--epochs", type=int, default=0, help="training epochs; 0 = the model's default")
    p.add_argument("--char-noise", default="0.05,0.1", help="character perturbation rates of the test texts")
    p.add_argument("--subsample", type=int, default=0, help="use only N training rows (stratified, seed 0); 0 = all")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one process each; set OMP_NUM_THREADS=1)")
    p.add_argument("--runs", default=str(RUNS / "robust_text"), help="root of the run folders")
    p.add_argument("--out", default=str(RESULTS / "robust_text.json"))
    a = p.parse_args()

    dirs = {name: dataset_dir(a.data_root, name) for name in a.datasets}  # fail before any work
    root = Path(a.runs)
    result: dict[str, Any] = {"benchmark": "robust_text", "args": vars(a), "environment": environment(), "datasets": {}}
    jobs = []
    for name, src in dirs.items():
        data = prepared_dataset(src, root / "data", a.subsample)
        runs = root / (f"{name}-sub{a.subsample}" if a.subsample else name) / a.model.replace("/", "_").replace(":", "_")
        result["datasets"][name] = {"data": str(data), "train_rows": len(read_rows(data / "train.csv")[1]),
                                    "runs_folder": str(runs)}
        jobs += [(name, data, runs, arm, seed) for arm in ARMS for seed in a.seeds]
    for name, data, runs, arm, seed in jobs:  # a run folder of other arguments stops the benchmark before any work
        finished(runs / run_name(arm, seed, a), train_args(data, seed, arm, a))
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each job runs child processes; its thread only waits
        futures = [pool.submit(one_run, *j, a) for j in jobs]
        try:
            rows = [f.result() for f in futures]
        except BaseException:  # a failed run: start no more
            pool.shutdown(cancel_futures=True)
            raise
    result["total_seconds"] = round(time.time() - t0, 1)

    for name, d in result["datasets"].items():
        mine = [r for r in rows if r["dataset"] == name]
        fgm = {k: v for k, v in next(r for r in mine if r["arm"] == "fgm")["training"].items() if k not in ("data", "seed")}
        d["arms"] = {"plain": {"flags": arm_flags("plain", a)}, "fgm": {"flags": arm_flags("fgm", a), "fgm_settings": fgm}}
        d["runs"] = mine
        d["summary"] = summarise(mine, a.seeds)
    result["table"] = table(result)
    write_result(Path(a.out), result)
    print(f"\n{a.model}, seeds {' '.join(map(str, a.seeds))}; FGM eps {a.eps} {a.adv_flags}".rstrip()
          + f"; noise seed {rows[0]['noise_seed']}; {result['total_seconds']:.0f} s in all\n")
    print(result["table"])


if __name__ == "__main__":
    main()
