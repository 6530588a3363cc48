"""Fast adversarial training on CIFAR-10 with the one duoclass engine: FGSM from a random start (Wong et al.,
2020, "Fast is better than free"), L-inf eps 8/255, step 10/255, PreActResNet-18, one-cycle learning rate,
mixed precision; then clean and PGD-20 accuracy (step 2/255, optional restarts) on the 10,000 test images.

    python benchmarks/cifar10_adversarial.py                                    # a GPU run (15 epochs)
    python benchmarks/cifar10_adversarial.py --subset 512 --epochs 1 --device cpu   # a CPU smoke run

Training is `engine.fit` with `attacks.make_step` as the step (the same code as `duoclass train
--adversarial fgsm`); only the batches differ: the training set lives on the device as one uint8
tensor and each epoch's random crops (4 px zero padding) and flips are done there in batches.
The model is the PreActResNet-18 of Wong et al. (timm has none), defined here and registered as
"preact-resnet18", so the model folder it writes loads with duoclass.load in this process.
The optimizer is the engine's AdamW (Wong et al. use SGD with momentum): peak lr 2e-3, decoupled
weight decay 0.05. The data is ../shared/data/images/cifar10-jpg.zip, read in place: its images
were JPEG-compressed, so accuracies are a little lower than on the original PNGs.

Prints one JSON line: clean and pgd20 test accuracy, train_seconds (the whole `fit`: training,
per-epoch validation, the final evaluation of the model folder), prepare and eval seconds.
Target on one H100/H200: pgd20 >= 0.45 at clean >= 0.80 with train_seconds <= 360.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "images" / "cifar10-jpg.zip"


# --- the model ----------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut (a 1x1 conv where the shape changes) starts after the first BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet18(nn.Module):
    """He et al. 2016 (identity mappings), CIFAR layout: 3x3 stem, 4 stages of 2 blocks (64-512), 32 -> 4 px."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.blocks(self.stem(x))))  # (B, 512, 4, 4)
        return self.fc(h.mean(dim=(2, 3)))


def register_model() -> None:
    from duoclass.models import get_spec
    from duoclass.models.base import ImageModel, register

    if get_spec("preact-resnet18") is not None:
        return

    @register("preact-resnet18", "image", "PreActResNet-18 for 32 px inputs (Wong et al. 2020's adversarial-training model)")
    def build(num_classes: int, image_size: int = 32, dropout: float = 0.0, mean: list[float] | None = None,
              std: list[float] | None = None) -> ImageModel:
        return ImageModel(PreActResNet18(num_classes), mean or [0.5, 0.5, 0.5], std or [0.25, 0.25, 0.25])


# --- the batches: the training set on the device --------------------------------------------------
class DeviceBatches:
    """engine.BatchSource over uint8 images (N, 3, 32, 32) kept on the device: a seeded permutation per epoch,
    then per batch a random crop from the image zero-padded by 4 px and a horizontal flip with probability 0.5."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, channels_last: bool):
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.channels_last = channels_last

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        dev = self.images.device
        g = torch.Generator(device=dev).manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.labels), device=dev, generator=g)
        ar = torch.arange(32, device=dev)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            b = len(idx)
            x = F.pad(self.images[idx].float().div_(255), (4, 4, 4, 4))  # (B, 3, 40, 40)
            dy, dx = (torch.randint(0, 9, (2, b), device=dev, generator=g))
            rows = (dy[:, None] + ar)[:, None, :, None]  # (B, 1, 32, 1)
            cols = (dx[:, None] + ar)[:, None, None, :]  # (B, 1, 1, 32)
            x = x[torch.arange(b, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None], rows, cols]
            flip = torch.rand(b, device=dev, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield {"pixel_values": x}, self.labels[idx]


# --- evaluation ------------------------------------------------------------------------------------
def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int,
                    batch: int, device: torch.device) -> tuple[float, float]:
    """(clean, PGD) accuracy in fp32, model in eval mode: an example is robust if no restart fools it."""
    from duoclass.robust.attacks import pgd

    model.eval()
    clean = robust = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch].to(device).float().div(255), y[i : i + batch].to(device)
        with torch.no_grad():
            ok = model({"pixel_values": xb}).argmax(-1) == yb
        clean += int(ok.sum())
        for _ in range(restarts):
            x_adv = pgd(model, xb, yb, eps, steps=steps, alpha=2 / 255, random_start=True)
            with torch.no_grad():
                ok &= model({"pixel_values": x_adv}).argmax(-1) == yb
        robust += int(ok.sum())
    return clean / len(y), robust / len(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="the CIFAR-10 zip (default: ../shared/data/images/cifar10-jpg.zip)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--subset", type=int, default=0, help="train on this many images (validate and test on an eighth as many); 0 = all")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts at evaluation (Wong et al. report 10)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(REPO / "runs" / "bench" / "cifar10_adversarial"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not Path(a.data).is_file():
        sys.exit(f"error: {a.data}: not found; pass --data PATH to the CIFAR-10 zip (train/<class>/*.jpg, test/<class>/*.jpg)")

    import duoclass
    from duoclass.training.run import prepare, resolve_settings
    from duoclass.training.adversarial import make_step
    from duoclass.settings.budget import parse_eps
    from duoclass.infer.torch_backend import pick_device
    from duoclass.settings.config import TrainConfig
    from duoclass.training.loop import fit
    from duoclass.models import create_model

    register_model()
    device = pick_device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = resolve_settings(TrainConfig(
        data=a.data, output=a.output, model="preact-resnet18", image_size=32, valid_fraction=0.02, augment="none",
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, schedule="onecycle",
        label_smoothing=0.0, grad_clip=0.0, class_weights="none", amp=True, device=device.type, seed=a.seed,
        progress=False, tensorboard=False, workers=0, adversarial="fgsm", eps=a.eps,
    ))
    t0 = time.time()
    data = prepare(cfg)  # reads the zip in place; the decoded uint8 images are cached in memory
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(a.seed)).tolist()
    keep = sorted(order[: a.subset]) if a.subset else list(range(len(data.train)))
    if a.subset:  # a smoke run: fewer images everywhere
        n_eval = max(32, a.subset // 8)  # spread over each split, which is ordered by class
        data.train, data.train_labels = Subset(data.train, keep), [data.train_labels[i] for i in keep]
        data.valid = Subset(data.valid, range(0, len(data.valid), max(1, len(data.valid) // n_eval))[:n_eval])
        data.test = Subset(data.test, range(0, len(data.test), max(1, len(data.test) // n_eval))[:n_eval])
    full_train = data.train.dataset if isinstance(data.train, Subset) else data.train
    images = torch.stack([full_train.cache[i] for i in keep]).to(device)  # (N, 3, 32, 32) uint8
    labels = torch.tensor([full_train.labels[i] for i in keep], device=device)
    channels_last = device.type == "cuda"
    data.batches = DeviceBatches(images, labels, a.batch_size, a.seed, channels_last)
    data.augment = None
    prepare_seconds = time.time() - t0

    model = create_model("preact-resnet18", len(data.classes), **data.model_args)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = make_step(cfg, data)  # FGSM from a random start, step 1.25 eps = 10/255
    t1 = time.time()
    result = fit(cfg, data, model=model, step=step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - t1

    # the model folder (what a user gets), attacked on the test set
    t2 = time.time()
    best = duoclass.load(result.model_dir, device=str(device)).model
    test = data.test
    base = test.dataset if isinstance(test, Subset) else test
    idx = list(test.indices) if isinstance(test, Subset) else list(range(len(test)))
    x = torch.stack([base.cache[i] for i in idx])
    y = torch.tensor([base.labels[i] for i in idx])
    clean, robust = robust_accuracy(best, x, y, parse_eps(a.eps), a.pgd_steps, a.restarts, 500, device)
    eval_seconds = time.time() - t2
    print(json.dumps({
        "clean": round(clean, 4), f"pgd{a.pgd_steps}": round(robust, 4), "train_seconds": round(train_seconds, 1),
        "prepare_seconds": round(prepare_seconds, 1), "eval_seconds": round(eval_seconds, 1), "restarts": a.restarts,
        "epochs": a.epochs, "best_epoch": result.best_epoch, "train_images": len(keep), "test_images": len(y),
        "eps": a.eps, "model": "preact-resnet18", "step": step.describe(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }))


if __name__ == "__main__":
    main()
