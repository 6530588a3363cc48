"""Chinese text classification: TF-IDF + logistic regression vs duoclass tfidf-mlp, fasttext and an ALBERT pretrained here.

For each dataset (default thucnews_titles and chnsenticorp_htl; any folder of DATA_ROOT with
train/valid/test.csv works, e.g. the English sms_spam and trec6), in one run:

  tfidf-lr        char 1-2 and 1-3 gram TF-IDF + LogisticRegression; n-gram range and C picked on
                  valid accuracy, refit-free (the chosen model is the one trained on train)
  tfidf-mlp       `duoclass train DIR --model tfidf-mlp --seed S` with its default settings, for each
                  of --mlp-seeds (default 0 1 2): mean, std and every seed
  tfidf-mlp-accuracy  the same with `--select-metric accuracy --class-weights none`: the best
                  epoch is picked by the metric this benchmark scores, as the LR's grid is, and
                  the loss is not reweighted towards the smaller class
  fasttext        `duoclass train DIR --model fasttext --epochs E`
  albert-pretrain `duoclass pretrain DIR/train.csv --max-steps S` (MLM from scratch on the training
                  texts only: a character tokenizer + albert-scratch-tiny), then
                  `duoclass train DIR --model PRETRAIN_DIR --epochs E2` (lr 5e-4, the pretrain-folder default)

and reports test accuracy and wall time (process start to exit for the CLI runs, so the
~3 s import of torch/transformers is included). fasttext and ALBERT run one seed (0): a
first look, not a mean ± std claim. Run folders go to runs/bench/text_chinese/ (git-ignored).

Full run (about 40 minutes on 2 CPU cores):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/text_chinese.py

Quick check (a minute or two):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/text_chinese.py \
        --subsample 200 --epochs 1 --albert-epochs 1 --mlp-epochs 1 --mlp-seeds 0 --pretrain-steps 10 \
        --out benchmarks/results/text_chinese_tiny.json

Writes benchmarks/results/text_chinese.json (or --out).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench_common import (DEFAULT_DATA, RESULTS, RUNS, dataset_dir, each_dataset, environment, last_json, mean_std,
                          read_rows, run_cli, run_metrics, write_result)

C_GRID = [0.3, 1.0, 3.0, 10.0, 30.0]
NGRAMS = [(1, 2), (1, 3)]


def tfidf_lr(data: Path) -> dict[str, Any]:
    """Grid over char n-gram range x C on valid; test accuracy of the best pair. Time covers the whole grid."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.time()
    split = {s: read_rows(data / f"{s}.csv")[1] for s in ("train", "valid", "test")}
    x = {s: [r["text"] for r in rows] for s, rows in split.items()}
    y = {s: [r["label"] for r in rows] for s, rows in split.items()}
    grid, best = [], None
    for ngram in NGRAMS:
        vec = TfidfVectorizer(analyzer="char", ngram_range=ngram, sublinear_tf=True, min_df=1)
        xtr = vec.fit_transform(x["train"])
        xva, xte = vec.transform(x["valid"]), vec.transform(x["test"])
        for c in C_GRID:
            clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, y["train"])
            va = float((clf.predict(xva) == y["valid"]).mean())
            grid.append({"ngram": list(ngram), "C": c, "valid_accuracy": va})
            if best is None or va > best[0]:
                best = (va, ngram, c, float((clf.predict(xte) == y["test"]).mean()), xtr.shape[1])
    va, ngram, c, te, nfeat = best  # type: ignore[misc]
    return {"test_accuracy": te, "valid_accuracy": va, "ngram": list(ngram), "C": c, "features": nfeat,
            "seconds": round(time.time() - t0, 1), "grid": grid}


ACCURACY_ARGS = ["--select-metric", "accuracy", "--class-weights", "none"]


def tfidf_mlp(data: Path, runs: Path, seeds: list[int], epochs: int, method: str = "tfidf-mlp") -> dict[str, Any]:
    per_seed, wall = [], 0.0
    extra = ACCURACY_ARGS if method == "tfidf-mlp-accuracy" else []
    for seed in seeds:
        out = runs / f"{method}-seed{seed}"
        cmd = ["train", data, "--model", "tfidf-mlp", "--seed", seed, "--output", out, "--no-progress", "--no-tensorboard", *extra]
        w, _ = run_cli(cmd + (["--epochs", epochs] if epochs else []), runs / f"{method}-seed{seed}.log")
        per_seed.append({**run_metrics(out), "seed": seed, "seconds": round(w, 1)})
        wall += w
    acc = mean_std([r["test_accuracy"] for r in per_seed])
    return {"test_accuracy": acc["mean"], "test_accuracy_std": acc["std"],
            "seeds": per_seed, "epochs": epochs or "default (12)", "seconds": round(wall / len(seeds), 1),
            "seconds_note": "mean per seed"}


def fasttext(data: Path, runs: Path, epochs: int) -> dict[str, Any]:
    out = runs / "fasttext"
    wall, _ = run_cli(["train", data, "--model", "fasttext", "--epochs", epochs, "--seed", 0, "--output", out,
                       "--no-progress", "--no-tensorboard"], runs / "fasttext.log")
    return {**run_metrics(out), "epochs": epochs, "seconds": round(wall, 1)}


def albert_pretrained(data: Path, runs: Path, a: argparse.Namespace) -> dict[str, Any]:
    pre_dir, out = runs / "pretrain", runs / "albert"
    pre_wall, stdout = run_cli(["pretrain", data / "train.csv", "--output", pre_dir, "--model", a.pretrain_model,
                                "--text-column", "text", "--max-steps", a.pretrain_steps, "--epochs", 1000,
                                "--batch-size", a.pretrain_batch_size, "--max-length", a.max_length,
                                "--lr", a.pretrain_lr, "--seed", 0], runs / "pretrain.log")
    summary = last_json(stdout)
    ft_wall, _ = run_cli(["train", data, "--model", pre_dir, "--epochs", a.albert_epochs, "--max-length", a.max_length,
                          "--seed", 0, "--output", out, "--no-progress", "--no-tensorboard"], runs / "albert.log")
    return {**run_metrics(out), "epochs": a.albert_epochs, "pretrain_steps": summary["steps"],
            "pretrain_final_mlm_loss": summary["final_loss"], "pretrain_seconds": round(pre_wall, 1),
            "finetune_seconds": round(ft_wall, 1), "seconds": round(pre_wall + ft_wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["thucnews_titles", "chnsenticorp_htl"])
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding the dataset folders")
    p.add_argument("--subsample", type=int, default=0, help="use only N training rows (stratified, seed 0); 0 = all")
    p.add_argument("--epochs", type=int, default=5, help="fasttext epochs")
    p.add_argument("--mlp-seeds", type=int, nargs="+", default=[0, 1, 2], help="tfidf-mlp seeds")
    p.add_argument("--mlp-epochs", type=int, default=0, help="tfidf-mlp epochs; 0 = duoclass's default")
    p.add_argument("--albert-epochs", type=int, default=5, help="fine-tuning epochs of the pretrained ALBERT")
    p.add_argument("--pretrain-steps", type=int, default=1000, help="MLM optimizer steps per dataset")
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--pretrain-model", default="albert-scratch-tiny", choices=["albert-scratch-tiny", "albert-scratch-small"])
    p.add_argument("--max-length", type=int, default=64, help="tokens (characters) per text, pretraining and fine-tuning")
    methods = ["tfidf-lr", "tfidf-mlp", "tfidf-mlp-accuracy", "fasttext", "albert-pretrain"]
    p.add_argument("--methods", nargs="+", default=methods, choices=methods)
    p.add_argument("--out", default=str(RESULTS / "text_chinese.json"))
    a = p.parse_args()

    dirs = {name: dataset_dir(a.data_root, name) for name in a.datasets}  # fail before any work
    root = RUNS / "text_chinese"
    result: dict[str, Any] = {"benchmark": "text_chinese", "args": vars(a), "environment": environment(), "datasets": {}}
    t_all = time.time()
    for name, data, runs, n_train in each_dataset(dirs, root, a.subsample):
        res: dict[str, Any] = {"train_rows": n_train}
        for method in a.methods:
            if method == "tfidf-lr":
                res[method] = tfidf_lr(data)
            elif method in ("tfidf-mlp", "tfidf-mlp-accuracy"):
                res[method] = tfidf_mlp(data, runs, a.mlp_seeds, a.mlp_epochs, method)
            elif method == "fasttext":
                res[method] = fasttext(data, runs, a.epochs)
            else:
                res[method] = albert_pretrained(data, runs, a)
            print(f"  {method:<19} test accuracy {res[method]['test_accuracy']:.4f}  ({res[method]['seconds']:.1f} s)", flush=True)
        result["datasets"][name] = res
        write_result(Path(a.out), result)  # partial results survive an interrupted run
    result["total_seconds"] = round(time.time() - t_all, 1)

    print(f"\n{'dataset':<18} {'method':<19} {'test acc':>8} {'seconds':>8}")
    for name, res in result["datasets"].items():
        for method in a.methods:
            r = res[method]
            print(f"{name:<18} {method:<19} {r['test_accuracy']:>8.4f} {r['seconds']:>8.1f}")
    print(f"total {result['total_seconds']:.0f} s")
    write_result(Path(a.out), result)


if __name__ == "__main__":
    main()
