"""Structured pruning of msresnet: whole output channels are removed, so the network itself gets smaller.

    from duoclass.prune import format_report, prune_model_folder
    report = prune_model_folder("runs/xray/model", amount=0.3)                    # -> runs/xray/model-pruned
    report = prune_model_folder("runs/xray/model", amount=0.5, finetune_epochs=3)  # -> runs/xray/model-pruned/model
    print(format_report(report))

CPU example:  duoclass prune runs/demo/run/model --amount 0.3 --finetune 1

What is removed: in every channel group below, `amount` of the channels (rounded, at least one kept)
whose filters have the smallest L1 norm (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
The share is the same in every group (per layer; no global ranking), so a conv whose input and output
are both pruned keeps about (1 - amount)^2 of its weights and FLOPs, and the first conv (RGB in) 1 - amount.

Channel groups, the channels that must go together:

    stem.0                  the first stem conv and its BN; readers: the second stem conv's input
    stages.I.J.branch3/5    a block's branch conv and BN; reader: its slice of the fuse conv's input
                            (the branches are concatenated: branch3's channels, then branch5's)
    stream(...)             a residual stream: every conv whose output is added into it shares one channel
                            set: the conv that opens it (the second stem conv, or a projection shortcut),
                            then each block's fuse conv behind an identity shortcut, all with their BNs.
                            Readers: the branch convs and projection shortcuts that take it as input, and
                            the classifier's columns for that stage (the head concatenates every stage's
                            pooled output)

A stream channel's score is the sum over its writers of the filter's L1 norm over that conv's mean
filter L1 norm, so each writer counts equally. BN parameters and statistics and the classifier are
sliced with the channels they belong to. The result is a dense msresnet with an explicit channel plan
(`channels` in model.args, see models/msresnet.py): `duoclass.load` rebuilds it from config.json like
any other model.

Removing a channel shifts the mean and variance of everything downstream, so the BN running statistics
no longer fit: on msresnet-tiny / digits (97% test accuracy), removing 10% of the channels leaves 24%
test accuracy with the old statistics and 93% once they are re-estimated (30% removed: 10% and 64%).
So when the training data is at hand the running statistics are re-estimated on a seeded sample of
training images (`calibrate`, 512 by default; "adaptive BN", Li et al. 2020, EagleEye); no weight
changes. Fine-tuning goes through engine.fit with the pruned model given.

This module imports torch only inside its functions.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duoclass.artifacts.folder import recorded_training
from duoclass.errors import DuoclassError
from duoclass.preprocess.load import load_each

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("duoclass")

METHOD = "l1-filter-norm, per layer"
THROUGHPUT_BATCH = 32
# Settings that the model folder or prune's own arguments decide: name -> how to set it instead.
FIXED_SETTINGS = {
    "data": "pass data=",
    "output": "pass output=",
    "epochs": "pass finetune_epochs=",
    "device": "pass device=",
    "model": "the model folder decides it",
    "pretrained": "the pruned weights are the starting point",
    "image_size": "the model folder decides it",
    "task": "the model folder decides it",
    "resume": "start a new fine-tuning run instead",
}


# --- channel groups ---------------------------------------------------------------------------
@dataclass(eq=False)
class ChannelGroup:
    """Channels that are kept or removed together: the convs (and BNs) that write them, the layers that read them.

    readers: (conv or linear, offset of the group's channels in that layer's input).
    keep: the kept channel indices, ascending, once `select_channels` has run.
    """

    name: str
    size: int
    writers: list[tuple["nn.Conv2d", "nn.BatchNorm2d"]] = field(default_factory=list)
    readers: list[tuple["nn.Module", int]] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)


def channel_groups(net: "nn.Module") -> list[ChannelGroup]:
    """The channel groups of an MSResNet backbone (see the module docstring), in network order."""
    from torch import nn

    from duoclass.models.msresnet import MultiScaleBlock

    groups: list[ChannelGroup] = []

    def group(name: str, conv: "nn.Conv2d", bn: "nn.BatchNorm2d") -> ChannelGroup:
        g = ChannelGroup(name, conv.out_channels, writers=[(conv, bn)])
        groups.append(g)
        return g

    first, second = net.stem[0], net.stem[1]  # conv_bn_relu Sequentials: (conv, bn, relu)
    group("stem.0", first[0], first[1]).readers.append((second[0], 0))
    stream = group("stream(stem.1)", second[0], second[1])
    fc_offset = 0
    for i, stage in enumerate(net.stages):
        blocks = [b for b in stage if isinstance(b, MultiScaleBlock)]
        for j, b in enumerate(blocks):
            where = f"stages.{i}.{j}"
            g3 = group(f"{where}.branch3", b.branch3[0], b.branch3[1])
            g5 = group(f"{where}.branch5", b.branch5[0], b.branch5[1])
            g3.readers.append((b.fuse[0], 0))
            g5.readers.append((b.fuse[0], g3.size))  # torch.cat([branch3, branch5], dim=1)
            stream.readers += [(b.branch3[0], 0), (b.branch5[0], 0)]
            if isinstance(b.shortcut, nn.Identity):
                stream.writers.append((b.fuse[0], b.fuse[1]))  # fuse(y) + x: the same channels as the input
            else:
                stream.readers.append((b.shortcut[0], 0))
                stream = group(f"stream({where}.shortcut)", b.shortcut[0], b.shortcut[1])
                stream.writers.append((b.fuse[0], b.fuse[1]))  # fuse(y) + shortcut(x)
        stream.readers.append((net.fc, fc_offset))  # the head pools this stage's output
        fc_offset += stream.size
    return groups


def kept_count(size: int, amount: float) -> int:
    """Channels left of `size` when `amount` of them are removed (rounded to nearest, at least one)."""
    return max(1, size - math.floor(size * amount + 0.5))


def select_channels(groups: list[ChannelGroup], amount: float) -> None:
    """Fill each group's `keep`: the channels with the largest filter L1 norms (summed, normalised, over its writers)."""
    import torch

    for g in groups:
        score = torch.zeros(g.size, dtype=torch.float64)
        for conv, _ in g.writers:
            l1 = conv.weight.detach().double().abs().sum(dim=(1, 2, 3))  # (out_channels,)
            score += l1 / l1.mean().clamp_min(1e-12)
        order = torch.argsort(score, descending=True, stable=True)[: kept_count(g.size, amount)]
        g.keep = sorted(order.tolist())


def _sliced_state(model: "nn.Module", groups: list[ChannelGroup]) -> dict[str, "torch.Tensor"]:
    """The model's state dict with every conv, BN and the classifier cut down to the kept channels."""
    import torch
    from torch import nn

    out_idx: dict[int, list[int]] = {}
    in_pieces: dict[int, list[tuple[int, list[int]]]] = {}
    for g in groups:
        for conv, bn in g.writers:
            out_idx[id(conv)] = out_idx[id(bn)] = g.keep
        for reader, offset in g.readers:
            in_pieces.setdefault(id(reader), []).append((offset, [offset + k for k in g.keep]))
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        ins = in_pieces.get(id(m))
        cols = torch.tensor([k for _, ks in sorted(ins) for k in ks]) if ins else None
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach()[torch.tensor(out_idx[id(m)])]
            state[p + "weight"] = w[:, cols] if cols is not None else w  # (out, in, k, k); the stem's RGB input stays
        elif isinstance(m, nn.BatchNorm2d):
            rows = torch.tensor(out_idx[id(m)])
            for key in ("weight", "bias", "running_mean", "running_var"):
                state[p + key] = state[p + key][rows]
        elif isinstance(m, nn.Linear) and cols is not None:
            state[p + "weight"] = m.weight.detach()[:, cols]  # (classes, pooled features of every stage)
    return {k: v.clone() for k, v in state.items()}


def prune_msresnet(model: "nn.Module", amount: float, name: str, args: dict[str, Any]) -> tuple["nn.Module", list[ChannelGroup]]:
    """(the pruned model, its channel groups with `keep` filled) for an msresnet ImageModel built as
    create_model(name, ..., **args). The pruned model is built from the registry with the new channel plan."""
    from duoclass.models import create_model
    from duoclass.models.msresnet import MultiScaleBlock, channel_plan

    check_amount(amount)
    net = model.backbone
    groups = channel_groups(net)
    select_channels(groups, amount)
    width = {id(conv): len(g.keep) for g in groups for conv, _ in g.writers}
    plan = channel_plan(net)
    stem_convs = [net.stem[0][0], net.stem[1][0]]
    plan["stem"] = [width[id(c)] for c in stem_convs]
    for stage_plan, stage in zip(plan["stages"], net.stages):
        blocks = [b for b in stage if isinstance(b, MultiScaleBlock)]
        for bp, b in zip(stage_plan, blocks):
            bp.update(branch3=width[id(b.branch3[0])], branch5=width[id(b.branch5[0])], out=width[id(b.fuse[0])])
    pruned = create_model(name, net.fc.out_features, **{**args, "channels": plan})
    pruned.load_state_dict(_sliced_state(model, groups), strict=True)  # every shape must fit the plan
    return pruned.eval(), groups


def recalibrate_bn(model: "nn.Module", batches: Any, device: Any = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over `batches`
    (dicts of input tensors); nothing else changes and the model comes back in eval mode. Returns the image count."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches, not an exponential one
        bn.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model({k: torch.as_tensor(v).to(device) for k, v in batch.items()})
                seen += len(next(iter(batch.values())))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.eval()
    return seen


def calibration_batches(data: Path, preprocessor: Any, n: int, seed: int = 0, batch: int = 64) -> Any:
    """Batches of up to `n` training images of `data`, a seeded sample; unusable images are skipped."""
    import random

    from duoclass.data.sources import read_image_dataset

    refs = [r for r, _ in read_image_dataset(data).splits["train"]]
    refs = random.Random(seed).sample(refs, min(n, len(refs)))
    images = list(load_each(preprocessor, refs)[0].values())
    for i in range(0, len(images), batch):
        yield preprocessor.collate(images[i : i + batch])


# --- measurements -------------------------------------------------------------------------------
def cpu_throughput(model: "nn.Module", image_size: int, batch: int = THROUGHPUT_BATCH, runs: int = 5,
                   budget_s: float = 3.0) -> float:
    """Images per second of `model` on the CPU at `batch`: the median of up to `runs` timed forward passes
    after one warm-up (at least 3, fewer than `runs` once `budget_s` is spent). A quick figure, not a benchmark."""
    import copy

    import torch

    m = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it is, in its mode
    x = {"pixel_values": torch.rand(batch, 3, image_size, image_size)}
    times: list[float] = []
    with torch.inference_mode():
        m(x)
        start = time.perf_counter()
        while len(times) < runs and (len(times) < 3 or time.perf_counter() - start < budget_s):
            t = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def measure(model: "nn.Module", image_size: int, weights_file: Path) -> dict[str, Any]:
    """Parameters, FLOPs for one image, weights file size and CPU throughput of a model (on any device)."""
    import copy

    from duoclass.models import count_flops, count_params

    cpu = copy.deepcopy(model).cpu()
    return {"params": count_params(cpu), "flops": count_flops(cpu, image_size), "file_bytes": weights_file.stat().st_size,
            "images_per_second": round(cpu_throughput(cpu, image_size), 1)}


# --- checks ---------------------------------------------------------------------------------------
def check_amount(amount: Any) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise DuoclassError(f"--amount {amount!r}: the share of channels to remove must be between 0 and 1 "
                            "(exclusive), e.g. --amount 0.3")
    return float(amount)


def _check_output(source: Path, out: Path, out_model: Path) -> None:
    src, target = source.resolve(), out_model.resolve()
    if target == src or target in src.parents or src in target.parents:
        raise DuoclassError(f"--output {out}: would overwrite or nest inside the source model folder {source}; "
                            "pass another folder")
    if target.exists() and not (target / "config.json").is_file() and (not target.is_dir() or any(target.iterdir())):
        raise DuoclassError(f"--output {out}: {target} exists and is not a model folder (it would be replaced); "
                            "pass a new folder")


def _check_settings(overrides: dict[str, Any], finetune_epochs: int) -> None:
    from duoclass.settings.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in overrides:
        if k not in known:
            raise DuoclassError(f"prune: unknown setting {k!r}; fine-tuning takes `duoclass train` settings "
                                "(see `duoclass train --help`)")
        if k in FIXED_SETTINGS:
            raise DuoclassError(f"prune: setting {k!r} cannot be changed here; {FIXED_SETTINGS[k]}")
    if overrides and not finetune_epochs:
        raise DuoclassError(f"prune: {', '.join(sorted(overrides))} only apply to fine-tuning; "
                            "pass finetune_epochs > 0 (--finetune EPOCHS) or drop them")


def _test_split(data: Path | None) -> str | None:
    """Why test accuracy cannot be measured on `data` (None when it can)."""
    from duoclass.data.sources import read_image_dataset

    if data is None:
        return "no training data recorded in config.json; pass data= for test accuracy"
    if not data.exists():
        return f"{data}: not found; pass data= for test accuracy"
    if "test" not in read_image_dataset(data).splits:
        return f"{data}: no test split"
    return None


# --- the command ------------------------------------------------------------------------------------
# Long on purpose: the steps of the report it prints (check, prune, re-estimate BN, measure, fine-tune,
# measure again, write), in that order; the pruning itself and each measurement are functions of their own.
def prune_model_folder(model_dir: str | Path, amount: float = 0.3, output: str | Path | None = None,
                       finetune_epochs: int = 0, data: str | Path | None = None, device: str = "auto",
                       calibrate: int = 512, **overrides: Any) -> dict[str, Any]:
    """Prune `amount` of the output channels of every conv of an msresnet model folder; write the smaller model.

    output: without fine-tuning, the pruned model folder (default MODEL_DIR-pruned beside the source);
    with `finetune_epochs` > 0, a run folder (same default) holding OUTPUT/model, trained with engine.fit
    from the pruned weights on `data` (default: config.json's training.data) with the original run's
    settings (RUN/config.yaml beside the model folder, when it is there) and learning rate, without
    warmup (on digits, 2 epochs at the original rate recover 95% where a tenth of it reaches 88%);
    `overrides` are other `duoclass train` settings for that run (lr=..., batch_size=...).
    device: where BN statistics are re-estimated, test accuracy is measured and fine-tuning runs
    (throughput is always measured on the CPU). calibrate: training images to re-estimate the BN
    statistics on (0: keep the old ones); skipped, with a warning, when the data is not at hand.

    Returns the report (`format_report` prints it): "before" / "after" with params, flops (at the
    model's image size), file_bytes, images_per_second (CPU, batch 32) and test_accuracy (None with
    "accuracy_note" when the data or its test split is missing), "ratios", the channel "plan" and paths.
    """
    from duoclass.infer.torch_backend import torch_backend_from_folder
    from duoclass.artifacts.folder import WEIGHTS, model_folder_config, read_model_folder, save_model_folder, update_model_folder_metrics
    from duoclass.infer.classifier import Classifier
    from duoclass.models import resolve_name
    from duoclass.models.msresnet import channel_plan

    amount = check_amount(amount)
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise DuoclassError(f"--finetune {finetune_epochs!r}: the number of fine-tuning epochs must be a whole "
                            "number >= 0 (0: no fine-tuning)")
    if isinstance(calibrate, bool) or not isinstance(calibrate, int) or calibrate < 0:
        raise DuoclassError(f"--calibrate {calibrate!r}: the number of training images for the BN statistics must be "
                            "a whole number >= 0 (0: keep the old statistics)")
    _check_settings(overrides, finetune_epochs)
    source = Path(model_dir)
    cfg, state = read_model_folder(source)
    name = resolve_name(cfg["model"]["name"])
    if not name.startswith("msresnet-"):
        raise DuoclassError(f"structured pruning supports msresnet; {source} holds {name} (a {cfg['task']} model); "
                            "prune a folder trained with --model msresnet-tiny, msresnet-small or msresnet-base")
    out = Path(output) if output is not None else source.with_name(f"{source.name}-pruned")
    out_model = out / "model" if finetune_epochs else out
    _check_output(source, out, out_model)
    recorded = recorded_training(cfg)["data"]
    data_path = Path(data) if data is not None else (Path(recorded) if recorded else None)
    if data is not None and not data_path.exists():
        raise DuoclassError(f"--data {data}: no such file or folder; pass the dataset the model was trained on")
    if finetune_epochs and (data_path is None or not data_path.exists()):
        where = f"{data_path} (config.json's training.data)" if data_path is not None else "no training.data in config.json"
        raise DuoclassError(f"--finetune {finetune_epochs}: training data not found: {where}; pass --data DIR")
    note = _test_split(data_path)
    image_size = int(cfg["preprocessing"]["image_size"])
    args = dict(cfg["model"].get("args", {}))

    original = torch_backend_from_folder(cfg, state, source, "cpu").model
    before = measure(original, image_size, source / WEIGHTS)
    pruned, groups = prune_msresnet(original, amount, name, args)
    plan = channel_plan(pruned.backbone)
    calibrated = 0
    if calibrate and data_path is not None and data_path.exists():
        from duoclass.infer.torch_backend import pick_device
        from duoclass.preprocess.load import preprocessor_from_config

        dev = pick_device(device)
        pre = preprocessor_from_config(cfg["task"], cfg["preprocessing"], source)
        calibrated = recalibrate_bn(pruned.to(dev), calibration_batches(data_path, pre, calibrate,
                                                                          recorded_training(cfg)["seed"]), dev)
        pruned.cpu()
    elif calibrate:
        log.warning("BN statistics not re-estimated: no training data at hand; pass data= (--data DIR)")
    record = {"amount": amount, "method": METHOD, "source": str(source),
              "source_config_sha256": cfg.get("config_sha256"), "bn_calibration_images": calibrated,
              "finetune_epochs": finetune_epochs}
    log.info("pruned %s: %d -> %d parameters in %d channel groups", name, before["params"],
             sum(p.numel() for p in pruned.parameters()), len(groups))

    if finetune_epochs:
        settings_from, run = _finetune(cfg, name, {**args, "channels": plan}, pruned, record, out, data_path,
                                       finetune_epochs, device, source, overrides)
        model_folder = run.model_dir
    else:
        settings_from = None
        folder_cfg = model_folder_config(
            cfg["task"], name, {**args, "channels": plan}, cfg["classes"], cfg["preprocessing"],
            evaluation=cfg.get("evaluation"), inputs=cfg.get("inputs"), training={**cfg.get("training", {}), "pruning": record})  # the record, copied
        save_model_folder(out, pruned.state_dict(), folder_cfg)
        model_folder = out
    calibration = None
    if not finetune_epochs and cfg.get("calibration", {}).get("method", "none") != "none":
        # pruning changes the logits: the pruned folder gets a temperature of its own (fine-tuning fits one as
        # any training run does)
        from duoclass.compress.recalibrate import calibrate_model_folder

        try:
            calibration = calibrate_model_folder(model_folder, data_path, "valid", device=device,
                                                 previous_temperature=cfg["calibration"]["temperature"])["calibration"]
        except DuoclassError as e:
            log.warning("%s: not calibrated (its predictions use raw softmax): %s", model_folder, e)
    clf = Classifier.from_folder(model_folder, device=device)  # the pruned model as users load it
    after = measure(clf.model, image_size, Path(model_folder) / WEIGHTS)
    before["test_accuracy"] = after["test_accuracy"] = None
    if note is None:
        before_metrics = Classifier.from_folder(source, device=device).evaluate(data_path, split="test")
        after_metrics = clf.evaluate(data_path, split="test")
        before["test_accuracy"], after["test_accuracy"] = before_metrics["accuracy"], after_metrics["accuracy"]
        if not finetune_epochs:  # metrics.json describes these weights
            update_model_folder_metrics(model_folder, {"epoch": None, "valid": None, "test": after_metrics})
    else:
        log.warning("test accuracy not measured: %s", note)
    ratios = {k: round(after[k] / before[k], 4) for k in ("params", "flops", "file_bytes", "images_per_second")}
    return {"source": str(source), "output": str(out), "model_dir": str(model_folder), "model": name,
            "amount": amount, "method": METHOD, "finetune_epochs": finetune_epochs, "image_size": image_size,
            "data": str(data_path) if data_path is not None else None, "accuracy_note": note,
            "bn_calibration_images": calibrated, "settings_from": settings_from, "before": before, "after": after,
            "calibration": calibration,
            "ratios": ratios, "plan": plan}


class PrunedStep:
    """The run's training step with the pruning added to what it records in the model folder."""

    def __init__(self, step: Any, record: dict[str, Any]):
        from duoclass.training.steps import standard_step

        self.step = step or standard_step
        self.record = record

    def __call__(self, ctx: Any, inputs: Any, labels: Any) -> Any:
        return self.step(ctx, inputs, labels)

    def describe(self) -> dict[str, Any]:
        how = self.step.describe() if hasattr(self.step, "describe") else {"step": "standard"}
        return {**how, "pruning": self.record}

    def __getattr__(self, name: str) -> Any:  # after_epoch, when the wrapped step has one
        if name in ("step", "record"):
            raise AttributeError(name)
        return getattr(self.step, name)


def _finetune(cfg: dict[str, Any], name: str, args: dict[str, Any], model: "nn.Module", record: dict[str, Any],
              out: Path, data: Path, epochs: int, device: str, source: Path, overrides: dict[str, Any]) -> tuple[str | None, Any]:
    """Train the pruned model for `epochs` through engine.fit (the model= seam); (settings file used, RunResult)."""
    from duoclass.training.run import prepare, resolve, run
    from duoclass.settings.config import TrainConfig
    from duoclass.training.distributed import prepare_once
    from duoclass.models import default_lr, resolve_name

    values, settings_from = {"seed": recorded_training(cfg)["seed"]}, None
    run_yaml = source.parent / "config.yaml"  # written by the run that produced the folder
    if run_yaml.is_file():
        try:
            base = TrainConfig.from_yaml(run_yaml)
        except (DuoclassError, TypeError, ValueError) as e:
            log.warning("%s: not used for fine-tuning (%s); using the defaults", run_yaml, str(e).splitlines()[0])
        else:
            if resolve_name(base.model) == name:
                values, settings_from = base.to_dict(), str(run_yaml)
    lr = values.get("lr") or default_lr(name)  # the rate the original run used
    values.update(data=str(data), model=name, pretrained=None, task="image", image_size=int(cfg["preprocessing"]["image_size"]),
                  output=str(out), overwrite=True, resume=None, epochs=epochs, max_steps=0, device=device, lr=lr,
                  warmup_epochs=0.0, dropout=args.get("dropout", values.get("dropout")))
    values.update(overrides)
    settings = resolve(TrainConfig(**values))
    model.backbone.dropout.p = settings.dropout
    task_data = prepare_once(settings, prepare)
    if task_data.classes != cfg["classes"]:
        raise DuoclassError(f"--data {data}: classes {task_data.classes} differ from the model's {cfg['classes']}; "
                            "fine-tune on the dataset the model was trained on")
    # the folder fit writes must rebuild the pruned architecture: its channel plan and the model's own normalisation
    task_data.model_args = {**args, "dropout": settings.dropout}
    task_data.model_name = name
    log.info("fine-tuning the pruned model for %d epoch(s) at lr %.3g (%s)", epochs, settings.lr,
             f"settings of {settings_from}" if settings_from else "default settings")
    return settings_from, run(settings, data=task_data, model=model, wrap_step=lambda step: PrunedStep(step, record))


# --- the report -----------------------------------------------------------------------------------------
def format_report(r: dict[str, Any]) -> str:
    """The report of `prune_model_folder` as a small table for a terminal."""
    b, a = r["before"], r["after"]

    def size(n: int) -> str:
        return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    tuned = f", BN statistics from {r['bn_calibration_images']} training images" if r["bn_calibration_images"] else ""
    tuned += f", fine-tuned {r['finetune_epochs']} epoch(s)" if r["finetune_epochs"] else ""
    rows = [
        ("parameters", f"{b['params']:,}", f"{a['params']:,}", f"{r['ratios']['params']:.2f}x"),
        (f"FLOPs at {r['image_size']} px", f"{b['flops'] / 1e6:,.1f} M", f"{a['flops'] / 1e6:,.1f} M", f"{r['ratios']['flops']:.2f}x"),
        ("model file", size(b["file_bytes"]), size(a["file_bytes"]), f"{r['ratios']['file_bytes']:.2f}x"),
        (f"CPU images/s (batch {THROUGHPUT_BATCH})", f"{b['images_per_second']:,.0f}", f"{a['images_per_second']:,.0f}",
         f"{r['ratios']['images_per_second']:.2f}x"),
        ("test accuracy", acc(b["test_accuracy"]), acc(a["test_accuracy"]),
         "-" if a["test_accuracy"] is None else f"{a['test_accuracy'] - b['test_accuracy']:+.4f}"),
    ]
    w = max(len(row[0]) for row in rows)
    lines = [f"{r['model']}: removed {r['amount']:.0%} of every conv's output channels ({r['method']}){tuned}",
             f"{'':{w}}  {'before':>12}  {'after':>12}  {'change':>8}"]
    lines += [f"{n:{w}}  {x:>12}  {y:>12}  {z:>8}" for n, x, y, z in rows]
    if r["accuracy_note"]:
        lines.append(f"test accuracy not measured: {r['accuracy_note']}")
    lines.append(f"pruned model: {r['model_dir']}")
    return "\n".join(lines)
