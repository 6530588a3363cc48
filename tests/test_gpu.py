"""CUDA paths: training with mixed precision and the fused optimizer, resume, and a model folder
trained on the GPU that loads and predicts the same on the CPU. Run with `make test-gpu`;
skipped where no CUDA device is visible."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import duoclass

from .conftest import run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")]

IMAGE_ARGS = ["--model", "msresnet-tiny", "--image-size", "16", "--epochs", "4", "--lr", "0.003", "--batch-size", "64",
              "--device", "cuda", "--workers", "2", "--no-progress", "--no-tensorboard", "--seed", "0"]


def _test_images(digits: Path) -> list[Path]:
    return sorted((digits / "test").rglob("*.png"))


def test_image_training_on_cuda_with_amp_loads_on_cpu(digits: Path, tmp_path: Path) -> None:
    r = run_cli("train", str(digits), *IMAGE_ARGS, "--output", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device cuda" in r.stderr
    acc = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["accuracy"]
    assert acc > 0.8, acc  # 10 classes: chance is 0.1
    folder = tmp_path / "run" / "model"
    gpu, cpu = duoclass.load(folder), duoclass.load(folder, device="cpu")
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"  # "auto" picks the GPU
    images = _test_images(digits)
    pg, pc = gpu.predict_proba(images), cpu.predict_proba(images)
    # the folder holds float32 weights; inference on either device gives the same answers, up to
    # TF32 convolutions on the GPU
    assert np.abs(pg - pc).max() < 2e-2
    assert (pg.argmax(1) == pc.argmax(1)).mean() >= 0.99
    # the run's own test figure came from bf16 autocast on the GPU; float32 on the CPU agrees to a few images
    assert cpu.evaluate(digits, split="test")["accuracy"] == pytest.approx(acc, abs=0.02)


def training_dtypes(data: Path, out: Path, device: str, amp: bool) -> set[torch.dtype]:
    """dtypes of the classifier layer's output during the training steps of `engine.fit` (one epoch)."""
    from duoclass.training import loop as engine
    from duoclass.training.run import prepare, resolve_settings
    from duoclass.settings.config import TrainConfig
    from duoclass.models import create_model

    cfg = resolve_settings(TrainConfig(data=str(data), model="msresnet-tiny", image_size=16, epochs=1, batch_size=64,
                                       device=device, amp=amp, workers=0, progress=False, tensorboard=False,
                                       output=str(out)))
    data_ = prepare(cfg)
    args = {k: v for k, v in data_.model_args.items() if v is not None}
    model = create_model("msresnet-tiny", len(data_.classes), dropout=cfg.dropout, **args)
    seen: set[torch.dtype] = set()

    def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():  # a training step, not validation
            seen.add(output.dtype)

    model.backbone.fc.register_forward_hook(record)
    engine.fit(cfg, data_, model=model)
    return seen


def test_amp_really_runs_the_training_steps_in_half_precision(digits: Path, tmp_path: Path) -> None:
    """--amp (the default) puts the training forward pass under bf16 (or fp16) autocast; --no-amp keeps float32."""
    half = training_dtypes(digits, tmp_path / "amp", "cuda", amp=True)
    assert half and half <= {torch.bfloat16, torch.float16}, half
    assert training_dtypes(digits, tmp_path / "fp32", "cuda", amp=False) == {torch.float32}


def test_resume_on_cuda(digits: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [a if a != "4" else "2" for a in IMAGE_ARGS]
    assert run_cli("train", str(digits), *args, "--output", str(run)).returncode == 0
    r = run_cli("train", "--resume", str(run), "--epochs", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "after epoch 2" in r.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize("model", ["tfidf-mlp", "fasttext", "albert-scratch-tiny"])
def test_text_models_train_on_cuda(model: str, tmp_path: Path) -> None:
    from .test_text import make_toy

    data = make_toy(tmp_path / "toy", 320, 40)
    epochs = {"tfidf-mlp": 4, "fasttext": 8, "albert-scratch-tiny": 6}[model]
    clf = duoclass.train(data, model=model, epochs=epochs, lr=1e-3 if model != "fasttext" else None,
                         batch_size=16, device="cuda", output=str(tmp_path / "run"), progress=False, tensorboard=False)
    assert clf.device.type == "cuda"
    assert clf.result_.test["accuracy"] >= 0.8, clf.result_.test  # chance is 0.5
    cpu = duoclass.load(clf.result_.model_dir, device="cpu")
    texts = ["wonderful acting", "horrible movie", "the plot was quite a story"]
    assert np.abs(clf.predict_proba(texts) - cpu.predict_proba(texts)).max() < 2e-2


def test_optimizer_is_fused_on_cuda() -> None:
    from duoclass.training.optim import adam
    from duoclass.infer.torch_backend import autocast
    from duoclass.models import create_model

    model = create_model("msresnet-tiny", 3).cuda()
    opt = adam(model, 1e-3, 0.05)
    assert opt.defaults["fused"] is True
    x = torch.rand(4, 3, 16, 16, device="cuda")
    with autocast(torch.device("cuda"), True):
        loss = model({"pixel_values": x}).float().logsumexp(1).mean()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any((p - b).abs().max() > 0 for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["gradcam", "ig", "occlusion"])
def test_explanations_on_cuda_match_the_cpu(method: str, digits: Path, tmp_path: Path) -> None:
    duoclass.train(str(digits), model="msresnet-tiny", epochs=1, output=str(tmp_path / "run"), device="cuda", seed=0)
    images = [str(p) for p in _test_images(digits)[:4]]
    gpu = duoclass.load(tmp_path / "run" / "model", device="cuda").explain(images, method=method)
    cpu = duoclass.load(tmp_path / "run" / "model", device="cpu").explain(images, method=method)
    for a, b in zip(gpu, cpu):
        assert a.ok and b.ok and a.target == b.target
        np.testing.assert_allclose(a.attributions, b.attributions, atol=1e-2 * (np.abs(b.attributions).max() + 1e-6))
