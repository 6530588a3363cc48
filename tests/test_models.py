"""Every registered model: builds, takes a dict, returns logits, round-trips through a model folder."""
from __future__ import annotations

import os
import time

import pytest
import torch

from duoclass.errors import DuoclassError
from duoclass.models.base import INPUT_KINDS
from duoclass.models import available, check_head, count_flops, count_params, create_model, get_spec, input_kind, model_heads
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

    from duoclass.training import optim as engine

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


# --- what each entry says about its model --------------------------------------------------------
EXPECTED_INPUT = {"fasttext": "ngram-hash", "tfidf-mlp": "ngram-vocab"}


@pytest.mark.parametrize("name", [s.name for s in available()])
def test_every_model_says_its_input_and_heads(name: str) -> None:
    spec = get_spec(name)
    assert spec.input in INPUT_KINDS and input_kind(name) == spec.input
    if spec.task == "image":
        assert spec.input == "image" and spec.heads == ()
    else:
        expected = EXPECTED_INPUT.get(name, "trained-tokenizer" if name.startswith("albert-scratch-") else None)
        assert spec.input == expected
        assert spec.heads and spec.heads[0] == "cls"
        for pooling in ("cls", "attention"):
            if pooling in spec.heads:
                check_head(name, pooling)
            else:
                with pytest.raises(DuoclassError, match=f"--pooling {pooling}: {name} has no"):
                    check_head(name, pooling)


def test_input_kind_of_any_name() -> None:
    assert input_kind("timm:resnet18") == "image" and input_kind("msresnet") == "image"
    assert input_kind("hf:bert-base-uncased") == "hf-tokenizer"
    with pytest.raises(DuoclassError, match="unknown model 'fastext'.*did you mean fasttext"):
        input_kind("fastext")
    assert [input_kind(n) for n in ("fasttext", "tfidf-mlp", "albert-scratch-tiny")] == [
        "ngram-hash", "ngram-vocab", "trained-tokenizer"]
    assert model_heads("hf:x") == ("cls", "attention") and model_heads("timm:resnet18") == ()


# --- builders take explicit arguments --------------------------------------------------------------
ALL_NAMES = [s.name for s in available()] + ["timm:test_resnet", "hf:tiny-bert"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_unknown_model_argument_is_an_error(name: str) -> None:
    args = {"hf_config": TINY_BERT} if name.startswith("hf:") else {}
    with pytest.raises(DuoclassError) as e:
        create_model(name, num_classes=3, colour_space="lab", **args)
    msg = str(e.value)
    assert msg.startswith(f"model {name}: unknown argument 'colour_space' (accepted: ")
    assert "dropout" in msg.split("accepted: ")[1]


def test_pretrained_for_a_model_without_weights_says_so() -> None:
    with pytest.raises(DuoclassError, match="unknown argument 'pretrained'.*drop --pretrained"):
        create_model("msresnet-tiny", num_classes=2, pretrained="hub")


# --- one training step reaches every parameter -----------------------------------------------------
TINY_BERT = {"model_type": "bert", "vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}
TINY_ARGS = {"albert-scratch": {"vocab_size": 60}, "fasttext": {"buckets": 200}, "tfidf-mlp": {"vocab_size": 60, "hidden": 8},
             "hf:": {"hf_config": TINY_BERT}}


def _grad_cases() -> list:
    cases = []
    for spec in available():
        for pooling in spec.heads or (None,):
            cases.append(pytest.param(spec.name, pooling, id=f"{spec.name}-{pooling or 'image'}"))
    cases.append(pytest.param("timm:test_resnet", None, id="timm:test_resnet"))
    cases += [pytest.param("hf:tiny-bert", p, id=f"hf:tiny-bert-{p}") for p in ("cls", "attention")]
    return cases


@pytest.mark.parametrize("name, pooling", _grad_cases())
def test_backward_reaches_every_parameter(name: str, pooling: str | None) -> None:
    """A parameter without a gradient is dead weight, and DistributedDataParallel fails on it
    (the unused pooler of a transformer under attention pooling did)."""
    torch.manual_seed(0)
    if pooling is None:  # image model
        model = create_model(name, num_classes=3, image_size=16)
        batch = {"pixel_values": torch.rand(4, 3, 16, 16)}
    else:
        args = next(v for k, v in TINY_ARGS.items() if name.startswith(k))
        model = create_model(name, num_classes=3, pooling=pooling, **args)
        ids = torch.tensor([[2, 17, 18, 19, 3, 5], [2, 20, 3, 0, 0, 0], [2, 7, 8, 9, 10, 3], [2, 11, 3, 0, 0, 0]])
        batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
        if name == "tfidf-mlp":
            batch["weights"] = (ids != 0).float() * 0.4
    model.train()
    loss = torch.nn.functional.cross_entropy(model(batch), torch.tensor([0, 1, 2, 1]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name} ({pooling}): no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["albert-scratch-tiny", "hf:tiny-bert"])
def test_attention_model_folders_saved_with_a_pooler_still_load(name: str) -> None:
    """Earlier versions built the attention-pooled encoder with its (unused) pooler; their weights load."""
    from duoclass.models.text_models import HFTextModel, transformers_module

    args = next(v for k, v in TINY_ARGS.items() if name.startswith(k))
    new = create_model(name, num_classes=3, pooling="attention", **args).eval()
    assert not any(".pooler." in k for k in new.state_dict())
    tf = transformers_module()
    old = HFTextModel(tf.AutoModel.from_config(new.net.config), "attention", 3, 0.1).eval()  # with the pooler
    old_state = old.state_dict()
    assert any(k.startswith("net.pooler.") for k in old_state)
    new.load_state_dict(old_state, strict=True)
    ids = torch.tensor([[2, 17, 18, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.testing.assert_close(new(batch), old(batch))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # other stray tensors are still refused
        new.load_state_dict({**old_state, "net.extra.weight": torch.zeros(1)}, strict=True)


# --- --pretrained hub without network ------------------------------------------------------------
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://hub.duoclass-offline.invalid"}


@pytest.mark.parametrize("env", [OFFLINE, {"HF_ENDPOINT": OFFLINE["HF_ENDPOINT"], "HF_HUB_OFFLINE": "0"}],
                         ids=["HF_HUB_OFFLINE", "unresolvable-host"])
@pytest.mark.slow  # two offline settings, ~6 s each: run with `make test-slow`; the local-cache case runs by default
def test_timm_hub_weights_offline_fail_at_once(tmp_path, env: dict) -> None:
    from .test_errors import make_dataset

    data = make_dataset(tmp_path / "data", n=4, test=0)
    t = time.perf_counter()
    r = run_cli("train", str(data), "--model", "timm:resnet18", "--pretrained", "hub", "--epochs", "1",
                "--image-size", "16", "--device", "cpu", "--no-progress", "--no-tensorboard",
                "--output", str(tmp_path / "run"), env={**env, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}, timeout=120)
    seconds = time.perf_counter() - t
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: timm:resnet18: --pretrained hub needs the weights") and "not in the local cache" in last
    assert "Traceback" not in r.stderr and "Retrying" not in r.stderr
    assert seconds < 30, seconds  # the hub client alone retries for about 50 s


def test_timm_hub_weights_offline_come_from_the_local_cache(tmp_path) -> None:
    """Offline, weights already in the hub cache are used, and nothing is downloaded."""
    import subprocess
    import sys

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model("test_resnet").state_dict()  # random weights, as if downloaded earlier
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    weights = repo / "snapshots" / ("0" * 40) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(weights))
    code = (
        "from safetensors.torch import load_file\n"
        "import torch\n"
        "from duoclass.models import create_model\n"
        "sd = create_model('timm:test_resnet', num_classes=3, pretrained='hub').backbone.state_dict()\n"
        f"ref = load_file({str(weights)!r})\n"
        "print(all(torch.equal(sd[k], v) for k, v in ref.items() if not k.startswith('fc.')), sd['fc.weight'].shape[0])\n"
    )
    env = dict(os.environ, **OFFLINE, HF_HUB_CACHE=str(tmp_path / "hub"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "3"]  # the cached backbone, a new 3-class head
