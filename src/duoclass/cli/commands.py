"""The `duoclass` command: thin shells over the Python API.

    duoclass train DATA --model msresnet --epochs 30 --output runs/x
    duoclass evaluate runs/x/model DATA --split test --json
    duoclass evaluate runs/x/model DATA --attack pgd,autoattack --eps 2/255,8/255 --max-examples 500
    duoclass certify runs/x/model DATA --sigma 0.25 --n 1000 --output certify.csv
    duoclass predict runs/x/model INPUT --output predictions.csv --top-k 3
    duoclass predict runs/x/model INPUT --output predictions.csv --engine ray --ray-workers 4   # the same CSV, on Ray
    duoclass explain runs/x/model INPUT --output explanations/ [--method auto|gradcam|gradcam++|occlusion|ig]
    duoclass export runs/x/model --format onnx           # then: duoclass predict runs/x/model INPUT --backend onnx
    duoclass quantize runs/x/model                         # int8, kept only if faster and no worse: --backend onnx-int8
    duoclass prune runs/x/model --amount 0.3 --finetune 3
    duoclass serve runs/x/model [NAME=DIR ...] --port 8000 [--backend onnx]
    duoclass clean DATA --quarantine quarantine/ --report clean_report
    duoclass tune DATA --trials 20 --epochs 5 --study-dir runs/tune   # then: duoclass train --config runs/tune/best.yaml
    duoclass pretrain corpus.txt --output runs/mlm        # then: duoclass train DATA --model runs/mlm
    duoclass models
    duoclass demo

Bad input ends with one line `error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from duoclass.errors import DuoclassError, one_line
from duoclass.settings.flags import add_config_flags

log = logging.getLogger("duoclass")


def config_from_args(ns: argparse.Namespace) -> Any:
    from duoclass.settings.config import TrainConfig

    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(ns, f.name)}
    if ns.config:
        cfg = TrainConfig.from_yaml(ns.config, **given)
    elif given.get("resume") and not given.get("data"):
        saved = Path(given["resume"]) / "config.yaml"
        if not saved.is_file():
            raise DuoclassError(f"{saved}: not found; --resume needs the folder of an earlier run (its --output)")
        cfg = TrainConfig.from_yaml(saved, **given)
    else:
        cfg = TrainConfig(**given)
    if cfg.resume:
        cfg.output = given.get("output", cfg.resume)
    if not cfg.data:
        raise DuoclassError("train: no DATA given; pass a dataset folder, zip or CSV, e.g. `duoclass train data/`")
    return cfg


# --- commands -------------------------------------------------------------------------------
def without_nproc(argv: list[str]) -> list[str]:
    """`argv` without its --nproc flag, written `--nproc N`, `--nproc=N` or as an abbreviation argparse accepts."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        key, eq, _ = argv[i].partition("=")
        if len(key) > len("--n") and "--nproc".startswith(key):  # "--n" alone could be a --no-... flag
            i += 1 if eq else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def cmd_train(ns: argparse.Namespace) -> int:
    if ns.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ns.nproc}",
               "-m", "duoclass", *without_nproc(ns.argv)]
        return subprocess.call(cmd)
    from duoclass import api

    cfg = config_from_args(ns)
    clf = api.train(config=cfg)
    if clf is not None and getattr(clf, "summary_", None) is not None:
        from duoclass.training.repeats import summary_table

        print(summary_table(clf.summary_))
        print(json.dumps({"summary": str(Path(cfg.output) / "summary.json"), "kept": clf.summary_["kept"]["run"],
                          "model_dir": clf.summary_["kept"]["model_dir"]}))
    elif clf is not None:
        res = clf.result_
        final = res.test or res.valid
        print(json.dumps({"model_dir": str(res.model_dir), "split": "test" if res.test else "valid",
                          "accuracy": round(final["accuracy"], 4), "f1_macro": round(final["f1_macro"], 4),
                          "skipped_files": res.skipped, "seconds": round(res.seconds, 1)}))
    return 0


def cmd_tune(ns: argparse.Namespace) -> int:
    import yaml

    from duoclass.settings.config import TrainConfig
    from duoclass.training.tune import tune

    cfg = config_from_args(ns)  # validates --config too
    fixed = {f.name for f in dataclasses.fields(TrainConfig) if hasattr(ns, f.name)}  # flags given are not searched
    if ns.config:
        fixed |= set(yaml.safe_load(Path(ns.config).read_text(encoding="utf-8")) or {})
    summary = tune(cfg, ns.trials, ns.study_dir, timeout=ns.timeout, fixed=fixed)
    print(json.dumps(summary))
    return 0


def load_for_cli(ns: argparse.Namespace) -> Any:
    """The model folder of `evaluate` / `predict`, with --device, --backend and --threads (ONNX Runtime's
    threads for the onnx backends; torch's intra-op threads, torch.set_num_threads, for the torch backend)."""
    from duoclass import api

    if ns.threads is not None and ns.threads < 1:
        raise DuoclassError(f"--threads {ns.threads}: must be at least 1 (leave it out for one per core)")
    clf = api.load(ns.model_dir, device=ns.device, backend=ns.backend, threads=ns.threads)
    if ns.threads is not None and ns.backend == "torch":
        import torch

        torch.set_num_threads(ns.threads)
    return clf


def cmd_evaluate(ns: argparse.Namespace) -> int:
    if ns.backend != "torch" and ns.attack:
        raise DuoclassError(f"--attack needs gradients, which only --backend torch has (got --backend {ns.backend})")
    if ns.top_k is not None and ns.top_k < 1:
        raise DuoclassError(f"--top-k {ns.top_k}: the k of the top-k accuracy must be at least 1 "
                            "(leave it out for the k the training run used)")
    clf = load_for_cli(ns)
    robust = None
    attack_only = {"--eps": ns.eps, "--steps": ns.steps, "--max-examples": ns.max_examples, "--plot": ns.plot}
    if ns.attack:  # attacks first: an attack on a text model fails before the clean pass
        from duoclass.robust.evaluate import evaluate_attacks, plot_robustness

        if ns.eps is None:
            raise DuoclassError(f"--attack {ns.attack}: needs --eps, the perturbation budgets, e.g. --eps 2/255,4/255,8/255")
        robust = evaluate_attacks(clf, ns.data, ns.attack, ns.eps, ns.split, ns.steps, ns.max_examples, ns.batch_size,
                                  ns.seed or 0, ns.path_column, ns.label_column)
        if ns.plot:
            plot_robustness(robust, ns.plot, title=f"robust accuracy ({ns.split} split)")
    elif given := [f for f, v in attack_only.items() if v is not None]:
        raise DuoclassError(f"{given[0]}: only used with --attack; add e.g. --attack pgd, or drop {given[0]}")
    from duoclass.settings.augment import parse_rates

    m = clf.evaluate(
        ns.data, split=ns.split, batch_size=ns.batch_size, topk_accuracy_k=ns.top_k,
        text_column=ns.text_column, label_column=ns.label_column, path_column=ns.path_column,
        char_noise=parse_rates(ns.char_noise) if ns.char_noise else (), resamples=ns.bootstrap,
        seed=ns.seed or 0,
    )
    if robust is not None:  # one attack: its result; several: the list of them
        m["robust"] = robust[0] if len(robust) == 1 else robust
    if ns.json:
        print(json.dumps(m))
    else:
        print(f"{m.get('split', ns.split)}: n={m['n']}  accuracy {m['accuracy']:.4f}  precision_macro {m['precision_macro']:.4f}  "
              f"recall_macro {m['recall_macro']:.4f}  f1_macro {m['f1_macro']:.4f}  f1_weighted {m['f1_weighted']:.4f}")
        for c, s in m["per_class"].items():
            print(f"  {c:>20}  precision {s['precision']:.4f}  recall {s['recall']:.4f}  f1 {s['f1']:.4f}  n={s['support']}")
        print("\n".join(uncertainty_lines(m)))
        for row in m.get("char_noise", []):
            print(f"  char noise {row['rate']:g}: accuracy {row['accuracy']:.4f}  f1_macro {row['f1_macro']:.4f}")
        if m.get("skipped_files"):
            print(f"skipped {m['skipped_files']} unreadable files")
        if robust is not None:
            from duoclass.robust.evaluate import summary_lines

            print("\n".join(summary_lines(robust)))
        if ns.plot:
            print(f"robustness curve: {ns.plot}")
    return 0


def uncertainty_lines(m: dict[str, Any]) -> list[str]:
    """How good and how sure, in a few lines: AUC, intervals, calibration, conformal coverage, risk-coverage."""
    iv = m.get("intervals", {})

    def fig(key: str) -> str:
        v = m.get(key)
        if v is None:
            return f"{key} n/a"
        r = iv.get(key)
        return f"{key} {v:.4f}" + (f" [{r['low']:.4f}, {r['high']:.4f}]" if r else "")

    out = ["  ".join(fig(k) for k in ("accuracy", "balanced_accuracy", "roc_auc", "average_precision")
                     if k in m)]
    if "sensitivity" in m:
        out.append(f"positive class {m['positive_class']!r}: " + "  ".join(fig(k) for k in ("sensitivity", "specificity")))
    if iv.get("method"):
        mt = iv["method"]
        out.append(f"[intervals: {mt['level']:.0%} {mt['kind']}, {mt['resamples']} resamples, seed {mt['seed']}]")
    cal = m.get("calibration")
    if cal and cal.get("ece") is not None:
        out.append(f"calibration (temperature {m.get('temperature', 1.0):.3f}): ECE {cal['ece']:.4f}  MCE {cal['mce']:.4f}  "
                   f"Brier {cal['brier']:.4f}  NLL {cal['nll']:.4f}")
    if "conformal" in m:
        c = m["conformal"]
        out.append(f"conformal sets (alpha {c['alpha']}): coverage {c['coverage']:.4f} (promised {c['target_coverage']:.2f}), "
                   f"mean size {c['mean_size']:.2f}, empty {c['empty']:.3f}")
    rc = m.get("risk_coverage")
    if rc:
        out.append("abstain below: " + "  ".join(
            f"{r['abstain_below']:g} -> answers {r['coverage']:.1%}" + (f" err {r['risk']:.2%}" if r["risk"] is not None else "")
            for r in rc["curve"]))
    return out


def cmd_calibrate(ns: argparse.Namespace) -> int:
    from duoclass.compress.recalibrate import calibrate_model_folder

    r = calibrate_model_folder(ns.model_dir, ns.data, ns.split, backend=ns.backend, conformal=ns.conformal,
                               score=ns.conformal_score, seed=ns.seed, output=ns.output, batch_size=ns.batch_size,
                               device=ns.device, by_class=ns.conformal_by_class)
    if ns.json:
        print(json.dumps(r))
        return 0
    c = r["calibration"]
    print(f"{r['backend']}: temperature {c['previous_temperature']:.4f} -> {c['temperature']:.4f} on {r['examples']} "
          f"examples of {r['data']} ({r['split']}); NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f} (uncalibrated -> "
          f"calibrated), ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} (with the previous temperature "
          f"{c['ece_with_previous_temperature']:.4f})")
    if r["conformal"]:
        cp = r["conformal"]
        print(f"conformal sets: alpha {cp['alpha']}, {cp['score']}, threshold {cp['qhat']:.4f} from {cp['n']} examples")
    print(f"wrote {r['model_dir']}")
    return 0


def cmd_certify(ns: argparse.Namespace) -> int:
    from duoclass import api

    c = api.load(ns.model_dir, device=ns.device).certify(
        ns.data, split=ns.split, sigma=ns.sigma, n=ns.n, n0=ns.n0, alpha=ns.alpha, batch_size=ns.batch_size,
        max_examples=ns.max_examples, seed=ns.seed, output=ns.output, path_column=ns.path_column,
        label_column=ns.label_column,
    )
    from duoclass.artifacts.atomic import is_stdout

    out = sys.stderr if is_stdout(ns.output) else sys.stdout  # the CSV has standard output to itself
    if ns.json:
        print(json.dumps(c), file=out)
    else:
        from duoclass.robust.certify import summary_lines

        print("\n".join(summary_lines(c)), file=out)
        if ns.output:
            print(f"wrote {c['examples']} certificates to {ns.output}", file=out)
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    if ns.top_k < 1:
        raise DuoclassError(f"--top-k {ns.top_k}: the number of labels per row must be at least 1")
    workers_flag = "--ray-workers"
    if ns.workers is not None:  # the old name: --workers means DataLoader workers in `train`
        print("warning: predict --workers is deprecated; use --ray-workers (the number of Ray workers)", file=sys.stderr)
        if ns.ray_workers is not None and ns.ray_workers != ns.workers:
            raise DuoclassError(f"--workers {ns.workers} and --ray-workers {ns.ray_workers}: give only --ray-workers")
        ns.ray_workers, workers_flag = ns.workers, "--workers"
    if ns.engine == "ray":
        from duoclass.infer.ray import predict_to_csv_ray

        if ns.ray_workers is not None and ns.ray_workers < 1:
            raise DuoclassError(f"{workers_flag} {ns.ray_workers}: need at least 1 worker")
        if ns.threads is not None:
            raise DuoclassError("--threads: for --engine local; each Ray worker uses one thread per CPU it holds")
        n, failed = predict_to_csv_ray(ns.model_dir, ns.input, ns.output, workers=2 if ns.ray_workers is None else ns.ray_workers, top_k=ns.top_k,
                                       batch_size=ns.batch_size, text_column=ns.text_column, labels_only=ns.labels_only,
                                       backend=ns.backend, device="cpu" if ns.device == "auto" else ns.device,
                                       address=ns.ray_address, path_column=ns.path_column,
                                       abstain_below=ns.abstain_below)
    else:
        from duoclass.infer.csv import predict_to_csv

        if ns.ray_workers is not None or ns.ray_address:
            raise DuoclassError(f"{workers_flag} and --ray-address are for --engine ray; add --engine ray or leave them out")
        clf = load_for_cli(ns)
        n, failed = predict_to_csv(clf, ns.input, ns.output, top_k=ns.top_k, batch_size=ns.batch_size,
                                   text_column=ns.text_column, labels_only=ns.labels_only, path_column=ns.path_column,
                                   abstain_below=ns.abstain_below)
    if ns.output:
        from duoclass.artifacts.atomic import is_stdout

        print(f"wrote {n} predictions to {ns.output}" + (f" ({failed} input{'s' if failed != 1 else ''} could not be read: see the error column)" if failed else ""),
              file=sys.stderr if is_stdout(ns.output) else sys.stdout)
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    from duoclass.infer.explain import explain_to_folder

    clf = load_for_cli(ns)
    ex, written = explain_to_folder(clf, ns.input, ns.output, ns.method, ns.target, ns.steps, ns.batch_size,
                                    ns.text_column, ns.path_column)
    failed = sum(not e.ok for e in ex)
    print(f"explained {len(ex) - failed} of {len(ex)} inputs ({ex[0].method if ex else ns.method}) into {ns.output}"
          + (f"; {failed} could not be explained: see the error field of explanations.json" if failed else ""))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    if ns.format == "transformers":
        from duoclass.compress.transformers import export_transformers

        if not ns.output:
            raise DuoclassError("--format transformers: pass --output DIR, the folder to write")
        print(json.dumps(export_transformers(ns.model_dir, ns.output)))
        return 0
    from duoclass.compress.onnx import export_onnx

    r = export_onnx(ns.model_dir, output=ns.output, data=ns.data, examples=ns.examples)
    p = r["parity"]
    print(f"wrote {r['folder']}/{r['path']} ({r['exporter']}, opset {r['opset']}); parity on {p['examples']} inputs: "
          f"max |logit difference| {p['max_abs_logit_diff']:.2e}, label agreement {p['label_agreement']:.4f}")
    return 0


def cmd_quantize(ns: argparse.Namespace) -> int:
    from duoclass.compress.quantize import quantize_model_folder

    r = quantize_model_folder(ns.model_dir, method=ns.method, output=ns.output, data=ns.data, split=ns.split,
                              max_accuracy_drop=ns.max_accuracy_drop, force=ns.force, calibration=ns.calibration,
                              batch_size=ns.batch_size)
    if ns.json:
        print(json.dumps(r))
        return 0
    a, b = r["fp32"], r["int8"]
    print(f"int8 ({r['settings']['method']}, {r['settings']['why']}) on {r['examples']} {r['split']} examples, "
          f"{r['threads']} threads:")
    print(f"  accuracy {a['accuracy']:.4f} -> {b['accuracy']:.4f}, macro F1 {a['f1_macro']:.4f} -> {b['f1_macro']:.4f}, "
          f"label agreement {r['label_agreement']:.4f}")
    print(f"  {a['items_per_s']:.1f} -> {b['items_per_s']:.1f} items/s at batch {a['batch']} ({r['speedup']:.2f}x); batch-1 "
          f"p50 {a['latency_ms_p50']:.2f} -> {b['latency_ms_p50']:.2f} ms, p99 {a['latency_ms_p99']:.2f} -> {b['latency_ms_p99']:.2f} ms")
    print(f"wrote {r['folder']}/variants/onnx-int8/model.onnx" + (" (forced: it did not pass)" if r["forced"] else ""))
    return 0


def cmd_prune(ns: argparse.Namespace) -> int:
    from duoclass.compress.prune import format_report, prune_model_folder

    r = prune_model_folder(ns.model_dir, amount=ns.amount, output=getattr(ns, "output", None), finetune_epochs=ns.finetune, data=ns.data,
                           device=ns.device)
    print(json.dumps(r) if ns.json else format_report(r))
    return 0


def cmd_pretrain(ns: argparse.Namespace) -> int:
    from duoclass.settings.config import PretrainConfig
    from duoclass.training.pretrain import pretrain

    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(PretrainConfig) if hasattr(ns, f.name)}
    if not given.get("corpus"):
        raise DuoclassError("pretrain: no CORPUS given; pass a .txt (one text per line) or a CSV/TSV/JSONL file")
    print(json.dumps(pretrain(PretrainConfig(**given))))
    return 0


def cmd_clean(ns: argparse.Namespace) -> int:
    from duoclass.data.clean import clean

    rep = clean(ns.data, quarantine=ns.quarantine, report=ns.report, max_pixels=ns.max_pixels)
    order = {"bad": 0, "duplicate": 1, "ignored": 2, "converted": 3}
    shown = [f for f in rep.findings if f.status != "ok" and (ns.list_converted or f.status != "converted")]
    if not ns.quiet:  # the problems first, one line each; conversions are counted below (--list-converted lists them)
        for f in sorted(shown, key=lambda f: order.get(f.status, 9)):
            print(f"{f.status:>9}  {f.path}: {f.reason}" + (f" [{f.action}]" if f.action else ""))
        kinds: dict[str, int] = {}
        for f in rep.findings:
            if f.status == "converted":
                kinds[f.reason] = kinds.get(f.reason, 0) + 1
        if kinds and not ns.list_converted:
            print("converted on load (usable as they are; --list-converted names them): "
                  + "; ".join(f"{why} ({n:,})" for why, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(rep.summary())
    if ns.report:
        print(f"report: {Path(ns.report).with_suffix('.json')} and {Path(ns.report).with_suffix('.csv')}")
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from duoclass.models import available, count_flops, count_params, create_model
    from duoclass.models.base import ALIASES

    if ns.timm is not None:
        import timm

        # a plain word matches anywhere in the name: `--timm resnet1` lists resnet10t, resnet18, ...
        pattern = ns.timm if any(c in ns.timm for c in "*?[") else f"*{ns.timm}*"
        names = timm.list_models(pattern)
        if not names:
            raise DuoclassError(f"--timm {ns.timm}: no timm model name matches {pattern!r}; try a shorter part of the "
                                "name, e.g. `duoclass models --timm resnet`, or `--timm` alone for all of them")
        for name in names:
            print(f"timm:{name}")
        return 0
    rows = []
    for spec in available():
        row = {"name": spec.name, "task": spec.task, "description": spec.description}
        if spec.task == "image":
            m = create_model(spec.name, num_classes=1000, image_size=224)
            row["params"] = count_params(m)
            row["gflops_224"] = round(count_flops(m, 224) / 1e9, 3)
        else:  # at the builder's default vocabulary / bucket count, 2 classes
            row["params"] = count_params(create_model(spec.name, num_classes=2))
        rows.append(row)
    if ns.json:
        print(json.dumps({"models": rows, "aliases": ALIASES}))
        return 0
    print(f"{'name':<20} {'task':<6} {'params':>12} {'GFLOPs@224':>11}  description")
    for r in rows:
        params = f"{r['params']:,}" if "params" in r else "-"
        flops = f"{r['gflops_224']:.3f}" if "gflops_224" in r else "-"
        print(f"{r['name']:<20} {r['task']:<6} {params:>12} {flops:>11}  {r['description']}")
    for a, t in ALIASES.items():
        print(f"{a:<20} alias of {t}")
    print("timm:<name>          any timm image model (list them with `duoclass models --timm 'resnet*'`); params at 1000 classes")
    print("hf:<id-or-folder>    any Hugging Face text model (AutoModelForSequenceClassification); a local HF folder "
          "works as --model DIR; the text default is hf:albert-base-v2")
    print("image params at 1000 classes; text params at 2 classes and the default vocabulary (8,000 tokens; 50,000 n-grams for tfidf-mlp) or hash buckets")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from duoclass.cli.demo import run_demo

    run_demo(ns.output, epochs=ns.epochs)
    return 0


# Long on purpose: one declaration per command, in the order `duoclass --help` lists them, so this function
# reads as the command line's reference; each command's work is in its cmd_* function above.
def build_parser() -> argparse.ArgumentParser:
    from duoclass import __version__

    p = argparse.ArgumentParser(prog="duoclass", description="Train, evaluate and serve image and text classifiers.")
    p.add_argument("--version", action="version", version=f"duoclass {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a classifier", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(t)
    t.add_argument("--config", help="YAML file of settings (flags given on the command line win)")
    t.add_argument("--nproc", type=int, default=1, help="train with N processes (torchrun, DDP)")
    t.set_defaults(func=cmd_train)

    tu = sub.add_parser("tune", help="search learning rate, batch size, ... with Optuna; writes STUDY_DIR/best.yaml",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tu.add_argument("--trials", type=int, required=True, help="trials to run (added to the study when it exists)")
    tu.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    tu.add_argument("--study-dir", default="runs/tune", help="study.db, trial-N/ runs, best.yaml and summary.json")
    tu.add_argument("--config", help="YAML file of settings (flags given on the command line win); its settings are fixed")
    add_config_flags(tu, skip=("output", "resume"))  # trials write to STUDY_DIR/trial-N
    tu.set_defaults(func=cmd_tune)

    e = sub.add_parser("evaluate", help="metrics of a model folder on a labelled split")
    e.add_argument("model_dir", help="a model folder (RUN_DIR/model)")
    e.add_argument("data", help="labelled data: a dataset folder, zip, manifest CSV or text file(s)")
    e.add_argument("--split", default="test")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="the k of the top-k accuracy (default: the k the training run used, recorded in config.json; "
                        "another k is noted in the output)")
    e.add_argument("--device", default="auto")
    e.add_argument("--backend", default="torch", metavar="NAME",
                   help="what runs the model: torch, onnx or onnx-int8 (after `duoclass export` / `duoclass quantize`)")
    e.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads: ONNX Runtime's for the onnx backends (default: DUOCLASS_ONNX_THREADS, else one "
                        "per core), torch's for --backend torch")
    e.add_argument("--text-column", default=None, help="text models: column holding the text (default: the training one)")
    e.add_argument("--label-column", default=None, help="column holding the label (default: the training one)")
    e.add_argument("--path-column", default=None,
                   help="image CSV manifests: column holding the image path (default: the training one)")
    e.add_argument("--attack", default=None, metavar="NAME[,NAME]",
                   help="image models: also robust accuracy under L-inf attacks in [0, 1] pixel space: fgsm, pgd, "
                        "autoattack (the check that PGD is not fooled by masked gradients), or a comma list")
    e.add_argument("--eps", default=None, metavar="EPS[,EPS]",
                   help="with --attack: perturbation budgets, comma-separated, e.g. 2/255,4/255,8/255")
    e.add_argument("--steps", type=int, default=None, help="with --attack pgd: iterations, step 2.5*eps/steps (default: 10)")
    e.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="with --attack: attack N examples spread over the split (AutoAttack is slow on CPUs)")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of the bootstrap resamples and, with --attack, of the random starts (default: 0)")
    e.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the stratified bootstrap behind the 95%% intervals (0: none)")
    e.add_argument("--plot", default=None, metavar="FILE.png", help="with --attack: write accuracy against eps as a PNG")
    e.add_argument("--char-noise", default=None, metavar="RATE[,RATE]",
                   help="text models: also accuracy with every test text perturbed at these character rates "
                        "(random deletions, swaps and insertions), e.g. 0.05,0.1")
    e.set_defaults(func=cmd_evaluate)

    ce = sub.add_parser("certify", help="image models: certified L2 robustness by randomized smoothing (Cohen et al. 2019)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ce.add_argument("model_dir", help="an image model folder, trained with --noise-augment SIGMA")
    ce.add_argument("data", help="labelled images: a dataset folder, zip or manifest CSV")
    ce.add_argument("--sigma", type=float, required=True,
                    help="Gaussian noise level in [0, 1] pixel units; the model should be trained with it (--noise-augment)")
    ce.add_argument("--n", type=int, default=1000, help="noisy samples per image for the estimate")
    ce.add_argument("--n0", type=int, default=100, help="noisy samples per image to choose the top class")
    ce.add_argument("--alpha", type=float, default=0.001, help="chance that a certificate is wrong")
    ce.add_argument("--batch-size", type=int, default=200, help="noisy copies per forward pass")
    ce.add_argument("--max-examples", type=int, default=None, metavar="N", help="certify N images spread over the split")
    ce.add_argument("--split", default="test")
    ce.add_argument("--seed", type=int, default=0, help="seed of the noise")
    ce.add_argument("--output", default=None, metavar="FILE.csv", help="write one row per image to this CSV")
    ce.add_argument("--json", action="store_true", help="print the results (per image too) as JSON on stdout")
    ce.add_argument("--device", default="auto")
    ce.add_argument("--label-column", default=None, help="column holding the label (default: the training one)")
    ce.add_argument("--path-column", default=None,
                    help="image CSV manifests: column holding the image path (default: the training one)")
    ce.set_defaults(func=cmd_certify)

    pr = sub.add_parser("predict", help="predict a file, folder, zip or CSV of inputs into a CSV")
    pr.add_argument("model_dir", help="a model folder (RUN_DIR/model)")
    pr.add_argument("input", help="an image, a folder, a zip or a CSV of paths; for text a CSV/TSV/JSONL/.txt, or a folder with testa.csv")
    pr.add_argument("--output", help="CSV to write (default, or -: standard output); a symlink is written through")
    pr.add_argument("--top-k", type=int, default=1, metavar="K", help="labels per row; K > 1 adds a top_k column")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--text-column", default=None, help="text models: column holding the text (default: the training one)")
    pr.add_argument("--path-column", default=None,
                    help="image models, a CSV of paths: column holding the image path (default: the training one, else path)")
    pr.add_argument("--labels-only", action="store_true", help="write only the first two columns (path or id, label)")
    pr.add_argument("--backend", default="torch", metavar="NAME",
                    help="what runs the model: torch, onnx or onnx-int8 (after `duoclass export` / `duoclass quantize`; "
                         "these need only onnxruntime, not torch)")
    pr.add_argument("--threads", type=int, default=None, metavar="N",
                    help="CPU threads: ONNX Runtime's for the onnx backends (default: DUOCLASS_ONNX_THREADS, else one "
                         "per core), torch's for --backend torch")
    pr.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="local: this process; ray: Ray workers that each load the model once (the same CSV)")
    pr.add_argument("--ray-workers", type=int, default=None, metavar="N",
                    help="--engine ray: the number of Ray workers, one CPU each (default 2)")
    pr.add_argument("--workers", type=int, default=None, metavar="N",
                    help="deprecated name of --ray-workers (in `train`, --workers means DataLoader workers)")
    pr.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="--engine ray: a running Ray cluster (e.g. ray://head:10001 or auto; default: RAY_ADDRESS, "
                         "else a new local instance)")
    pr.add_argument("--abstain-below", type=float, default=None, metavar="P",
                    help="inputs whose calibrated top probability is under P get the label 'abstained' (and "
                         "abstained=true) instead of a class")
    pr.set_defaults(func=cmd_predict)

    xp = sub.add_parser("explain", help="why each input got its label: heatmap overlays (PNG), highlighted texts (HTML), JSON")
    xp.add_argument("model_dir", help="a model folder (RUN_DIR/model)")
    xp.add_argument("input", help="what predict reads (an image, a folder, a zip, a CSV); for a text model also a text")
    xp.add_argument("--output", default="explanations", help="folder for NNNN-NAME.png / .html and explanations.json")
    xp.add_argument("--method", default="auto", choices=["auto", "gradcam", "gradcam++", "occlusion", "ig"],
                    help="auto: Grad-CAM for CNN image models, integrated gradients for transformer text models, "
                         "occlusion otherwise and on the onnx backends")
    xp.add_argument("--target", default=None, metavar="LABEL", help="the class to explain (default: the predicted one)")
    xp.add_argument("--steps", type=int, default=32, metavar="N",
                    help="integrated gradients: the first step count (doubled until the attributions sum to "
                         "f(x) - f(baseline) within 5%%)")
    xp.add_argument("--batch-size", type=int, default=64, help="occlusion: variants per forward pass")
    xp.add_argument("--device", default="auto")
    xp.add_argument("--backend", default="torch", metavar="NAME",
                    help="torch, onnx or onnx-int8 (the onnx backends have occlusion only, and need no torch)")
    xp.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads, as in predict")
    xp.add_argument("--text-column", default=None, help="text models: column holding the text (default: the training one)")
    xp.add_argument("--path-column", default=None, help="image CSV manifests: column holding the image path")
    xp.set_defaults(func=cmd_explain)

    ca = sub.add_parser("calibrate", help="refit a model folder's temperature (and conformal sets) on labelled held-out data",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ca.add_argument("model_dir", help="a model folder (RUN_DIR/model)")
    ca.add_argument("data", nargs="?", default=None,
                    help="labelled data (default: the training data config.json records)")
    ca.add_argument("--split", default="valid", help="the held-out split to fit on (never the test split you report)")
    ca.add_argument("--backend", default="torch", metavar="NAME",
                    help="torch: the weights' temperature; onnx or onnx-int8: that variant's own")
    ca.add_argument("--conformal", type=float, default=None, metavar="ALPHA",
                    help="also fit conformal prediction sets with coverage 1 - ALPHA (the split is halved)")
    ca.add_argument("--conformal-score", default="aps", choices=["aps", "raps"])
    ca.add_argument("--conformal-by-class", action="store_true",
                    help="one threshold per class: coverage for every class, whatever the class mix predicted")
    ca.add_argument("--seed", type=int, default=None, help="seed of the halving (default: the training run's)")
    ca.add_argument("--output", default=None, metavar="DIR", help="write a copy of the folder there instead")
    ca.add_argument("--batch-size", type=int, default=64)
    ca.add_argument("--device", default="auto")
    ca.add_argument("--json", action="store_true", help="print the report as JSON")
    ca.set_defaults(func=cmd_calibrate)

    ex = sub.add_parser("export", help="write the model as ONNX (checked against torch) or as a transformers folder",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("model_dir", help="a model folder (RUN_DIR/model)")
    ex.add_argument("--format", default="onnx", choices=["onnx", "transformers"],
                    help="onnx: added to the model folder as variants/onnx (or to a copy at --output); transformers: "
                         "a folder transformers' Auto classes and pipeline() load (needs --output)")
    ex.add_argument("--output", default=None, metavar="DIR", help="write there instead of into MODEL_DIR")
    ex.add_argument("--data", default=None, metavar="DIR",
                    help="inputs for the parity check (default: the training data config.json records)")
    ex.add_argument("--examples", type=int, default=256, help="inputs in the parity check")
    ex.set_defaults(func=cmd_export)

    q = sub.add_parser("quantize", help="int8 with ONNX Runtime, written only when measured faster and no worse",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("model_dir", help="a model folder (RUN_DIR/model)")
    q.add_argument("--method", default=None, choices=["dynamic", "static"],
                   help="dynamic (text default) or static QDQ calibrated on training data (image default)")
    q.add_argument("--output", default=None, metavar="DIR", help="write a copy of the folder there instead of into MODEL_DIR")
    q.add_argument("--data", default=None, metavar="DIR", help="labelled data (default: the training data config.json records)")
    q.add_argument("--split", default="test", help="split the int8 model is measured on")
    q.add_argument("--max-accuracy-drop", type=float, default=0.5, metavar="POINTS",
                   help="refuse an int8 model that loses more accuracy than this (in points)")
    q.add_argument("--calibration", type=int, default=256, metavar="N", help="static: training inputs to calibrate on")
    q.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput measurement")
    q.add_argument("--force", action="store_true", help="write the int8 model even when it is slower or loses too much")
    q.add_argument("--json", action="store_true", help="print the whole report as JSON")
    q.set_defaults(func=cmd_quantize)

    pn = sub.add_parser("prune", help="msresnet: structured channel pruning (fewer FLOPs), optionally fine-tuned",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pn.add_argument("model_dir", help="an msresnet model folder (RUN_DIR/model)")
    pn.add_argument("--amount", type=float, default=0.3, help="share of each convolution's channels to remove")
    pn.add_argument("--finetune", type=int, default=0, metavar="EPOCHS", help="fine-tune this many epochs after pruning")
    pn.add_argument("--output", default=argparse.SUPPRESS, metavar="DIR", help="where to write (default: MODEL_DIR-pruned)")
    pn.add_argument("--data", default=None, metavar="DIR", help="training data (default: the one config.json records)")
    pn.add_argument("--device", default="auto")
    pn.add_argument("--json", action="store_true", help="print the report as JSON")
    pn.set_defaults(func=cmd_prune)

    from duoclass.serve.settings import add_arguments as add_serve_flags
    from duoclass.serve.app import cmd_serve

    sv = sub.add_parser("serve", help="serve model folders over HTTP: JSON API, web page, micro-batching",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_flags(sv)
    sv.set_defaults(func=cmd_serve)

    pt = sub.add_parser("pretrain", help="masked-language-model pretraining on unlabelled text (writes an HF folder)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from duoclass.settings.config import PretrainConfig

    add_config_flags(pt, PretrainConfig)
    pt.set_defaults(func=cmd_pretrain)

    c = sub.add_parser("clean", help="decode every image; report (and quarantine) bad files and duplicates")
    c.add_argument("data", help="an image dataset: a folder, zip or manifest CSV")
    c.add_argument("--quarantine", help="move bad files and duplicates here (never deleted)")
    c.add_argument("--report", help="write the report to FILE.json and FILE.csv")
    c.add_argument("--max-pixels", type=int, default=None, help="pixel limit (default: Pillow's decompression-bomb limit)")
    c.add_argument("--list-converted", action="store_true", help="also list every file converted on load (grayscale, "
                   "palette, 16-bit, CMYK to RGB), one line each, instead of a count per kind")
    c.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print only the summary line (same as `duoclass -q clean`)")
    c.set_defaults(func=cmd_clean)

    m = sub.add_parser("models", help="list model names with parameters and FLOPs")
    m.add_argument("--timm", nargs="?", const="*", default=None, metavar="PATTERN",
                   help="list timm model names instead: a shell-style pattern ('resnet*'), or a part of the name")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("demo", help="train, evaluate and predict on scikit-learn's bundled handwritten digits")
    d.add_argument("--output", default="runs/demo")
    d.add_argument("--epochs", type=int, default=12)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(argv)  # flag values are converted by the settings, which may raise
    except DuoclassError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    ns.argv = argv
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if (ns.quiet or rank != 0) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("duoclass").setLevel(level)
    try:
        if getattr(ns, "max_pixels", 0) is None:
            from duoclass.data.clean import DEFAULT_MAX_PIXELS

            ns.max_pixels = DEFAULT_MAX_PIXELS
        return ns.func(ns)
    except DuoclassError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; resume training with --resume RUN_DIR", file=sys.stderr)
        return 130
