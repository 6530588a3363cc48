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

Every size is a channel plan (`default_plan`); `channels=` gives one explicitly, with a width
per convolution, so a structurally pruned model (prune.py) rebuilds from config.json alone:

    {"stem": [16, 16],                                    # the two stem convolutions
     "stages": [[{"branch3": 8, "branch5": 8, "out": 16, "project": false}, ...], ...]}

`out` is the block's output (the residual stream); `project` says whether the shortcut is a
1x1 conv + BN (true) or the identity, which needs the block's input width to equal `out`.
The plan must have the size's stages and blocks per stage; only the widths are free.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from duoclass.errors import DuoclassError
from duoclass.models.base import ImageModel, alias, register


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MultiScaleBlock(nn.Module):
    """Parallel 3x3 / 5x5 branches, 1x1 fusion, residual shortcut."""

    def __init__(self, cin: int, cout: int, branch3: int | None = None, branch5: int | None = None,
                 project: bool | None = None):
        super().__init__()
        b3 = cout // 2 if branch3 is None else branch3  # default: half the output width each
        b5 = cout - cout // 2 if branch5 is None else branch5
        self.branch3 = conv_bn_relu(cin, b3, 3)
        self.branch5 = conv_bn_relu(cin, b5, 5)
        self.fuse = nn.Sequential(nn.Conv2d(b3 + b5, cout, 1, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.fuse[1].weight)  # each block starts as the identity: stable from-scratch training
        project = cin != cout if project is None else project
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if project else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.branch3(x), self.branch5(x)], dim=1)  # (B, branch3 + branch5, H, W): two receptive fields
        return self.act(self.fuse(y) + self.shortcut(x))


class MSResNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        image_size: int = 224,
        dropout: float = 0.1,
        channels: dict[str, Any] | None = None,
    ):
        super().__init__()
        plan = default_plan(widths, depths) if channels is None else channels
        s0, s1 = plan["stem"]
        if image_size >= 96:  # 224 -> 56
            self.stem = nn.Sequential(conv_bn_relu(3, s0, 3, stride=2), conv_bn_relu(s0, s1, 3), nn.MaxPool2d(3, 2, 1))
        elif image_size >= 48:  # 64 -> 32
            self.stem = nn.Sequential(conv_bn_relu(3, s0, 3, stride=2), conv_bn_relu(s0, s1, 3))
        else:  # small images keep full resolution
            self.stem = nn.Sequential(conv_bn_relu(3, s0, 3), conv_bn_relu(s0, s1, 3))
        stages = []
        cin = s1
        for i, stage in enumerate(plan["stages"]):
            blocks: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if i > 0 else []
            for b in stage:
                blocks.append(MultiScaleBlock(cin, b["out"], b["branch3"], b["branch5"], b["project"]))
                cin = b["out"]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(sum(stage[-1]["out"] for stage in plan["stages"]), num_classes)  # fused: every stage's pooled features
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


def default_plan(widths: tuple[int, ...], depths: tuple[int, ...]) -> dict[str, Any]:
    """The channel plan of a size: both stem convs at widths[0], each block's branches half its width,
    a projection shortcut wherever the width changes."""
    stages, cin = [], widths[0]
    for w, d in zip(widths, depths):
        blocks = []
        for _ in range(d):
            blocks.append({"branch3": w // 2, "branch5": w - w // 2, "out": w, "project": cin != w})
            cin = w
        stages.append(blocks)
    return {"stem": [widths[0], widths[0]], "stages": stages}


def channel_plan(net: MSResNet) -> dict[str, Any]:
    """The channel plan of a built network, read from its layers (what `channels=` rebuilds it from)."""
    stem = [m.out_channels for m in net.stem.modules() if isinstance(m, nn.Conv2d)]
    stages = [[{"branch3": b.branch3[0].out_channels, "branch5": b.branch5[0].out_channels,
                "out": b.fuse[0].out_channels, "project": not isinstance(b.shortcut, nn.Identity)}
               for b in stage if isinstance(b, MultiScaleBlock)] for stage in net.stages]
    return {"stem": stem, "stages": stages}


def check_plan(name: str, channels: Any, depths: tuple[int, ...]) -> dict[str, Any]:
    """`channels` as a valid plan for a size with these depths, or a DuoclassError naming the bad value."""
    def width(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    where = f"model {name}: channels"
    if not isinstance(channels, dict) or set(channels) != {"stem", "stages"}:
        raise DuoclassError(f"{where} should be {{\"stem\": [w, w], \"stages\": [[block, ...], ...]}}, not {channels!r}")
    stem, stages = channels["stem"], channels["stages"]
    if not isinstance(stem, list) or len(stem) != 2 or not all(width(v) for v in stem):
        raise DuoclassError(f"{where}.stem should be two positive widths, not {stem!r}")
    shape = [len(s) if isinstance(s, list) else None for s in stages] if isinstance(stages, list) else None
    if shape != list(depths):
        raise DuoclassError(f"{where}.stages has blocks per stage {shape}; {name} has {list(depths)}")
    cin = stem[1]
    for i, stage in enumerate(stages):
        for j, b in enumerate(stage):
            at = f"{where}.stages[{i}][{j}]"
            if not isinstance(b, dict) or set(b) != {"branch3", "branch5", "out", "project"}:
                raise DuoclassError(f"{at} should have exactly branch3, branch5, out and project, not {b!r}")
            if not all(width(b[k]) for k in ("branch3", "branch5", "out")) or not isinstance(b["project"], bool):
                raise DuoclassError(f"{at}: widths should be positive integers and project true or false, not {b!r}")
            if not b["project"] and b["out"] != cin:
                raise DuoclassError(f"{at}: an identity shortcut needs out == the block's input width {cin}, "
                                    f"not {b['out']}; set project to true or out to {cin}")
            cin = b["out"]
    return channels


def _builder(size: str):
    def build(
        num_classes: int,
        image_size: int = 224,
        dropout: float = 0.1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        channels: dict[str, Any] | None = None,
    ) -> ImageModel:
        """channels: an explicit channel plan (see the module docstring); default: the size's own."""
        if channels is not None:
            channels = check_plan(f"msresnet-{size}", channels, SIZES[size]["depths"])
        net = MSResNet(num_classes, image_size=image_size, dropout=dropout, channels=channels, **SIZES[size])
        return ImageModel(net, mean or [0.5, 0.5, 0.5], std or [0.25, 0.25, 0.25])

    return build


for _size, _cfg in SIZES.items():
    register(
        f"msresnet-{_size}",
        "image",
        f"multi-scale (3x3+5x5) residual CNN with stage fusion; widths {_cfg['widths']}, blocks {_cfg['depths']}",
    )(_builder(_size))
alias("msresnet", "msresnet-small")
