"""msresnet: the multi-scale residual CNN of the founding document.

    stem -> [stage: multi-scale residual blocks] -> maxpool -> ... -> fusion head

Each block runs a 3x3 and a 5x5 convolution branch in parallel (each conv -> BN ->
ReLU), concatenates them, fuses the scales with a 1x1 conv + BN, adds an identity or
projection shortcut and applies ReLU. Max pooling halves the resolution between
stages. The head global-average-pools the output of every stage and concatenates
them (multi-scale feature fusion) before dropout and the fully connected classifier.
Softmax is applied at prediction time by the caller.

The stem adapts to the input size: 224-px inputs are reduced 4x (strided conv + max
pool), small images (<= 64 px, e.g. 28-px X-rays) keep full resolution.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ImageModel, alias, register


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MultiScaleBlock(nn.Module):
    """Parallel 3x3 / 5x5 branches, 1x1 fusion, residual shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half = cout // 2
        self.branch3 = conv_bn_relu(cin, half, 3)
        self.branch5 = conv_bn_relu(cin, cout - half, 5)
        self.fuse = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.fuse[1].weight)  # each block starts as the identity: stable from-scratch training
        self.shortcut = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.branch3(x), self.branch5(x)], dim=1)  # (B, cout, H, W): two receptive fields
        return self.act(self.fuse(y) + self.shortcut(x))


class MSResNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        image_size: int = 224,
        dropout: float = 0.1,
    ):
        super().__init__()
        w0 = widths[0]
        if image_size >= 96:  # 224 -> 56
            self.stem = nn.Sequential(conv_bn_relu(3, w0, 3, stride=2), conv_bn_relu(w0, w0, 3), nn.MaxPool2d(3, 2, 1))
        elif image_size >= 48:  # 64 -> 32
            self.stem = nn.Sequential(conv_bn_relu(3, w0, 3, stride=2), conv_bn_relu(w0, w0, 3))
        else:  # small images keep full resolution
            self.stem = nn.Sequential(conv_bn_relu(3, w0, 3), conv_bn_relu(w0, w0, 3))
        stages = []
        cin = w0
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [nn.MaxPool2d(2, ceil_mode=True)] if i > 0 else []
            for _ in range(d):
                blocks.append(MultiScaleBlock(cin, w))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(sum(widths), num_classes)  # fused: pooled features of every stage
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        pooled = []
        for stage in self.stages:
            x = stage(x)
            pooled.append(self.pool(x).flatten(1))  # (B, width_i)
        return self.fc(self.dropout(torch.cat(pooled, dim=1)))


SIZES = {
    "tiny": dict(widths=(24, 48, 96), depths=(1, 1, 1)),
    "small": dict(widths=(32, 64, 128, 256), depths=(1, 2, 2, 1)),
    "base": dict(widths=(64, 128, 256, 512), depths=(2, 2, 3, 2)),
}


def _builder(size: str):
    def build(
        num_classes: int,
        image_size: int = 224,
        dropout: float = 0.1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> ImageModel:
        net = MSResNet(num_classes, image_size=image_size, dropout=dropout, **SIZES[size])
        return ImageModel(net, mean or [0.5, 0.5, 0.5], std or [0.25, 0.25, 0.25])

    return build


for _size, _cfg in SIZES.items():
    register(
        f"msresnet-{_size}",
        "image",
        f"multi-scale (3x3+5x5) residual CNN with stage fusion; widths {_cfg['widths']}, blocks {_cfg['depths']}",
    )(_builder(_size))
alias("msresnet", "msresnet-small")
