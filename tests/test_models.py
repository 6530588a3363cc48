"""Every registered model: builds, takes a dict, returns logits, round-trips through a model folder."""
from __future__ import annotations

import pytest
import torch

from duoclass.errors import DuoclassError
from duoclass.models import available, count_flops, count_params, create_model
from duoclass.models.msresnet import MultiScaleBlock

from .conftest import run_cli

IMAGE_MODELS = [s.name for s in available("image")]


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("size", [28, 64, 224])
def test_forward_shapes(name: str, size: int) -> None:
    m = create_model(name, num_classes=5, image_size=size).eval()
    x = torch.rand(2, 3, size, size)
    out = m({"pixel_values": x})
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_normalisation_lives_inside(name: str) -> None:
    m = create_model(name, num_classes=3, image_size=32, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5])
    sd = m.state_dict()
    assert torch.allclose(sd["normalize.mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(sd["normalize.std"].flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_msresnet_structure() -> None:
    m = create_model("msresnet", num_classes=2, image_size=224)
    blocks = [b for b in m.modules() if isinstance(b, MultiScaleBlock)]
    assert blocks, "msresnet must be built from multi-scale blocks"
    b = blocks[0]
    assert b.branch3[0].kernel_size == (3, 3) and b.branch5[0].kernel_size == (5, 5)
    assert isinstance(b.branch3[1], torch.nn.BatchNorm2d) and isinstance(b.branch3[2], torch.nn.ReLU)
    pools = [x for x in m.modules() if isinstance(x, torch.nn.MaxPool2d)]
    assert len(pools) >= 3  # stem + between stages
    # multi-scale fusion: the classifier sees pooled features of every stage
    widths = [s[-1].fuse[0].out_channels for s in m.backbone.stages]
    assert m.backbone.fc.in_features == sum(widths)


def test_sizes_grow() -> None:
    p = [count_params(create_model(f"msresnet-{s}", num_classes=10)) for s in ("tiny", "small", "base")]
    f = [count_flops(create_model(f"msresnet-{s}", num_classes=10), 224) for s in ("tiny", "small", "base")]
    assert p[0] < p[1] < p[2] and f[0] < f[1] < f[2]


def test_timm_model_forward() -> None:
    m = create_model("timm:resnet18", num_classes=4, image_size=32).eval()
    assert m({"pixel_values": torch.rand(1, 3, 32, 32)}).shape == (1, 4)


def test_unknown_names() -> None:
    with pytest.raises(DuoclassError, match="duoclass models"):
        create_model("msresnett", num_classes=2)
    with pytest.raises(DuoclassError, match="resnet18"):
        create_model("timm:resnet1", num_classes=2)


def test_timm_hub_weights_offline_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-duoclass-hub")
    with pytest.raises(DuoclassError, match="--pretrained"):
        create_model("timm:resnet18", num_classes=2, pretrained="hub")


def test_models_command_lists_every_model() -> None:
    r = run_cli("models")
    assert r.returncode == 0, r.stderr
    for name in IMAGE_MODELS:
        line = next(line for line in r.stdout.splitlines() if line.startswith(name + " "))
        params = int(line.split()[2].replace(",", ""))
        assert params == count_params(create_model(name, num_classes=1000))
    assert "msresnet" in r.stdout and "timm:" in r.stdout


def test_optimizer_is_fused_and_matches_the_loop(monkeypatch) -> None:
    """The engine's AdamW uses the fused kernel on a CPU and takes the same steps as PyTorch's default loop."""
    import copy

    from duoclass import engine

    torch.manual_seed(0)
    base = create_model("tfidf-mlp", 3, vocab_size=500, hidden=16)
    fused_model, loop_model = copy.deepcopy(base), copy.deepcopy(base)
    fused = engine.adam(fused_model, 1e-2, 0.05)
    monkeypatch.setattr(engine, "FUSED", False)
    loop = engine.adam(loop_model, 1e-2, 0.05)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]  # no decay on biases
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in base.parameters()]
        for m, opt in ((fused_model, fused), (loop_model, loop)):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    moved = max((a - b).abs().max().item() for a, b in zip(fused_model.parameters(), base.parameters()))
    assert moved > 1e-3  # the steps did something
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
