"""Adversarial attacks and adversarial training (attacks.py): the attacks' defining properties, agreement
with torchattacks and with reference implementations of the training recipes, training through the one
engine, the catastrophic-overfitting guard, and bad settings through the CLI."""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duoclass.training.run import prepare, resolve_settings
from duoclass.training.adversarial import AdversarialStep, check_adversarial, make_step
from duoclass.robust.attacks import fgsm, pgd
from duoclass.settings.budget import parse_eps
from duoclass.settings.config import TrainConfig
from duoclass.training.steps import StepContext, standard_step
from duoclass.training.loop import fit
from duoclass.errors import DuoclassError
from duoclass.models import available, create_model

from .conftest import run_cli

pytestmark = pytest.mark.timeout(300)

EPS = 8 / 255
TEXT_MODELS = [s.name for s in available("text")]


class TinyCNN(nn.Module):
    """conv -> ReLU -> max-pool -> linear on 8x8 images: no BatchNorm or dropout, so both modes compute the same."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(F.max_pool2d(F.relu(self.conv(batch["pixel_values"])), 2).flatten(1))


class TensorIn(nn.Module):
    """torchattacks calls model(x) with a tensor; duoclass models take a dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model({"pixel_values": x})


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)  # (1797, 3, 8, 8) in [0, 1]
    return x, torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """TinyCNN trained for a second on 1,500 digits; the other 297 to attack (clean accuracy about 0.93)."""
    x, y = _digits()
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        idx = torch.randint(0, 1500, (128,))
        loss = F.cross_entropy(model({"pixel_values": x[idx]}), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[1500:], y[1500:]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model({"pixel_values": x}).argmax(-1) == y).float().mean().item()


def _msresnet(classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return create_model("msresnet-tiny", num_classes=classes, image_size=16)


def _images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 16, 16, generator=g)
    x[:, :, :2] = 0.0  # pixels at both ends of [0, 1], so the clamp into the valid range matters
    x[:, :, -2:] = 1.0
    return x, torch.randint(0, 2, (n,), generator=g)


# --- epsilon -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.03", 0.03), (0.03, 0.03), (" 4 / 255 ", 4 / 255),
                                         ("0", 0.0), (1, 1.0)])
def test_parse_eps_reads_numbers_and_fractions(text, value) -> None:
    assert parse_eps(text) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("text", ["2", "1.01", "-0.1", "abc", "1/0", "nan", "8/", "inf", True])
def test_parse_eps_refuses_with_the_flag_named(text) -> None:
    with pytest.raises(DuoclassError, match=r"^--attack-eps: got"):
        parse_eps(text, flag="--attack-eps")


# --- attacks: defining properties ----------------------------------------------------------------
ATTACKS = {
    "fgsm": (lambda m, x, y: fgsm(m, x, y, EPS), "linf", EPS),
    "fgsm-random-start": (lambda m, x, y: fgsm(m, x, y, EPS, random_start=True), "linf", EPS),
    "pgd": (lambda m, x, y: pgd(m, x, y, EPS, steps=5), "linf", EPS),
    "pgd-from-x": (lambda m, x, y: pgd(m, x, y, EPS, steps=5, random_start=False), "linf", EPS),
    "pgd-l2": (lambda m, x, y: pgd(m, x, y, 0.5, steps=5, norm="l2"), "l2", 0.5),
    "pgd-l2-from-x": (lambda m, x, y: pgd(m, x, y, 0.5, steps=5, norm="l2", random_start=False), "l2", 0.5),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_stays_in_the_ball_and_in_range_and_raises_the_loss(name: str) -> None:
    attack, norm, eps = ATTACKS[name]
    model = _msresnet().eval()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)  # a mix of frozen and trainable parameters is given back as it was
    x, y = _images()
    x_adv = attack(model, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size
    assert size.max() > 0.5 * eps  # it moved
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model({"pixel_values": x_adv}), y) > F.cross_entropy(model({"pixel_values": x}), y)
    # the model is as it was: mode, requires_grad, and no gradient left on any parameter
    assert not model.training
    assert not frozen.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])
    assert all(p.grad is None for p in model.parameters())


def test_attack_keeps_training_mode() -> None:
    model = _msresnet().train()
    x, y = _images()
    pgd(model, x, y, EPS, steps=2)
    assert model.training and all(m.training for m in model.modules())


def test_pgd_refuses_zero_steps_and_unknown_norm() -> None:
    model, (x, y) = _msresnet().eval(), _images()
    with pytest.raises(DuoclassError, match="at least one step"):
        pgd(model, x, y, EPS, steps=0)
    with pytest.raises(DuoclassError, match="linf or l2"):
        pgd(model, x, y, EPS, norm="l1")


# --- attacks: the same as torchattacks -----------------------------------------------------------
def _torchattacks_cases():
    import torchattacks

    return {
        "fgsm": (lambda m, x, y: fgsm(m, x, y, EPS), lambda t: torchattacks.FGSM(t, eps=EPS)),
        "pgd": (lambda m, x, y: pgd(m, x, y, EPS, steps=5, alpha=2 / 255, random_start=False),
                lambda t: torchattacks.PGD(t, eps=EPS, alpha=2 / 255, steps=5, random_start=False)),
        "pgd-default-alpha": (lambda m, x, y: pgd(m, x, y, EPS, steps=4, random_start=False),
                              lambda t: torchattacks.PGD(t, eps=EPS, alpha=2.5 * EPS / 4, steps=4, random_start=False)),
        # the same random start too: both draw uniform noise of the input's shape
        "pgd-random-start": (lambda m, x, y: pgd(m, x, y, EPS, steps=5, alpha=2 / 255),
                             lambda t: torchattacks.PGD(t, eps=EPS, alpha=2 / 255, steps=5, random_start=True)),
        "pgd-l2": (lambda m, x, y: pgd(m, x, y, 0.5, steps=5, alpha=0.2, norm="l2", random_start=False),
                   lambda t: torchattacks.PGDL2(t, eps=0.5, alpha=0.2, steps=5, random_start=False)),
    }


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd-default-alpha", "pgd-random-start", "pgd-l2"])
def test_attacks_match_torchattacks(name: str) -> None:
    ours, theirs = _torchattacks_cases()[name]
    model = _msresnet().eval()
    x, y = _images(16)
    torch.manual_seed(5)
    a = ours(model, x, y)
    torch.manual_seed(5)
    b = theirs(TensorIn(model).eval())(x, y)  # eval: torchattacks puts the wrapper's mode back on the model after
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert (a - x).abs().max() > 0  # not trivially equal


def test_pgd_succeeds_at_least_as_often_as_fgsm(trained) -> None:
    model, x, y = trained
    clean = _accuracy(model, x, y)
    assert clean > 0.85
    eps = 0.1
    acc_fgsm = _accuracy(model, fgsm(model, x, y, eps), y)
    acc_pgd = _accuracy(model, pgd(model, x, y, eps, steps=10), y)
    assert acc_fgsm < clean - 0.1  # FGSM does something
    assert acc_pgd <= acc_fgsm  # and PGD at least as much (about 0.53 against 0.59)


# --- the adversarial training step against reference implementations ------------------------------
def _ctx(model: nn.Module) -> StepContext:
    return StepContext(model, nn.CrossEntropyLoss(), torch.device("cpu"))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("mode, ratio", [("fgsm", 1.0), ("fgsm", 0.5), ("pgd", 1.0), ("pgd", 0.25)])
def test_image_step_matches_the_recipe(mode: str, ratio: float) -> None:
    """The step's gradients are those of the cross-entropy on [attack(x[:n]), x[n:]], the attack run in training mode
    (BatchNorm statistics included); nothing the attack computed is left in the gradients."""
    model = _msresnet(classes=2).train()
    ref = copy.deepcopy(model)
    x, y = _images(8)
    n = round(ratio * 8)
    step = AdversarialStep(mode, EPS, steps=3, ratio=ratio)
    torch.manual_seed(3)
    loss = step(_ctx(model), {"pixel_values": x}, y)

    torch.manual_seed(3)
    if mode == "fgsm":  # Wong et al. 2020: uniform start, one step of 1.25 eps
        x_adv = fgsm(ref, x[:n], y[:n], EPS, random_start=True, alpha=1.25 * EPS)
    else:  # Madry et al.: random start, step 2.5 eps / k
        x_adv = pgd(ref, x[:n], y[:n], EPS, steps=3, alpha=2.5 * EPS / 3)
    ref_loss = F.cross_entropy(ref({"pixel_values": torch.cat([x_adv, x[n:]])}), y)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for g, r in zip(_grads(model), _grads(ref)):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)
    for b, r in zip(model.buffers(), ref.buffers()):  # BatchNorm saw the same batches
        assert torch.equal(b, r)


def _trades_reference(model, x_natural, y, step_size, epsilon, perturb_steps, beta):
    """TRADES as its authors wrote it (trades.py of yaodongyu/TRADES), on the whole batch."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x_natural)) * criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
    return loss_natural + beta * loss_robust


def test_trades_step_matches_the_authors_code() -> None:
    torch.manual_seed(0)
    model = TinyCNN().train()
    ref = copy.deepcopy(model)
    x, y = _digits()
    x, y = x[:32].clamp(0.05, 0.95), y[:32]  # away from the ends of [0, 1]: the authors clamp only after a step
    step = AdversarialStep("trades", EPS, steps=4, trades_beta=6.0)
    torch.manual_seed(1)
    loss = step(_ctx(model), {"pixel_values": x}, y)
    torch.manual_seed(1)
    ref_loss = _trades_reference(TensorIn(ref), x, y, 2.5 * EPS / 4, EPS, 4, 6.0)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    for g, r in zip(_grads(model), _grads(ref)):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-3)
    assert model.training


def test_eps_warmup_ramps_linearly_to_eps() -> None:
    step = AdversarialStep("fgsm", EPS, eps_warmup=2.0, steps_per_epoch=10)
    ramp = [step.eps_at(s) for s in range(40)]
    assert ramp[0] == pytest.approx(EPS / 20)
    assert ramp[9] == pytest.approx(EPS / 2)  # after one of two warmup epochs
    assert all(a <= b for a, b in zip(ramp, ramp[1:])) and ramp[19] == ramp[-1] == EPS
    assert AdversarialStep("fgsm", EPS).eps_at(0) == EPS


# --- text: perturbed input embeddings ----------------------------------------------------------------
def _text_model(name: str) -> nn.Module:
    args = {"vocab_size": 120} if name.startswith(("albert", "tfidf")) else {"buckets": 1000}
    torch.manual_seed(0)
    return create_model(name, num_classes=3, dropout=0.0, **args)


def _text_batch(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 120, (6, 7), generator=g)
    ids[3:, 5:] = 0  # padding
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if name == "tfidf-mlp":
        batch["weights"] = torch.rand(6, 7, generator=g) * (ids != 0)
    return batch, torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_every_text_model_exposes_its_input_embeddings(name: str) -> None:
    model = _text_model(name).eval()
    emb = model.input_embeddings()
    assert isinstance(emb, (nn.Embedding, nn.EmbeddingBag))
    assert any(p is emb.weight for p in model.parameters())
    batch, _ = _text_batch(name)
    with torch.no_grad():
        before = model(batch)
        emb.weight.add_(0.5 * torch.randn_like(emb.weight))
        assert not torch.allclose(before, model(batch), atol=1e-4)  # the logits do go through that table


def _reference_text(model: nn.Module, batch, y, eps: float, steps: int, alpha: float) -> torch.Tensor:
    """FGM (steps=1, alpha=eps) or embedding PGD: clean backward; K steps alpha*g/||g|| projected onto the
    eps ball (gradients of the adversarial loss only for the next direction); adversarial backward; restore."""
    w = model.input_embeddings().weight
    clean = F.cross_entropy(model(batch), y)
    clean.backward()
    g = w.grad.clone()
    w0 = w.detach().clone()
    for k in range(steps):
        with torch.no_grad():
            w += alpha * g / g.norm()
            d = w - w0
            if d.norm() > eps:
                w.copy_(w0 + d * eps / d.norm())
        if k < steps - 1:
            g = torch.autograd.grad(F.cross_entropy(model(batch), y), w)[0]
    adv = F.cross_entropy(model(batch), y)
    adv.backward()
    with torch.no_grad():
        w.copy_(w0)
    return clean + adv


@pytest.mark.parametrize("mode", ["fgm", "pgd"])
@pytest.mark.parametrize("name", TEXT_MODELS)
def test_text_step_matches_the_recipe(name: str, mode: str) -> None:
    model = _text_model(name).eval()  # eval: no dropout in the transformers, so both sides compute the same
    ref = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    batch, y = _text_batch(name)
    steps = 1 if mode == "fgm" else 3
    alpha = 1.0 if mode == "fgm" else 2.5 / 3
    loss = AdversarialStep(mode, 1.0, task="text", steps=3)(_ctx(model), batch, y)
    ref_loss = _reference_text(ref, batch, y, 1.0, steps, alpha)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for g, r in zip(_grads(model), _grads(ref)):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the embedding weights are restored


def test_text_fgm_through_fit_changes_the_gradients(tmp_path: Path) -> None:
    from .test_text import make_toy

    toy = make_toy(tmp_path / "toy", 64, 16)
    cfg = resolve_settings(TrainConfig(data=str(toy), output=str(tmp_path / "std"), model="fasttext", epochs=1,
                                       max_steps=1, batch_size=16, dropout=0.0, progress=False, tensorboard=False,
                                       workers=0, device="cpu", deterministic=True))
    data = prepare(cfg)
    grads: dict[str, torch.Tensor] = {}

    class Recording:
        """Wraps a step; keeps the gradients it left, and passes describe() on to the model folder."""

        def __init__(self, name, step):
            self.name, self.step = name, step

        def __call__(self, ctx, inputs, labels):
            loss = self.step(ctx, inputs, labels)
            grads[self.name] = torch.cat([p.grad.flatten() for p in ctx.model.parameters()])
            return loss

        def describe(self):
            return self.step.describe() if hasattr(self.step, "describe") else {"step": "standard"}

    fit(cfg, data, step=Recording("standard", standard_step))
    adv_cfg = dataclasses.replace(cfg, adversarial="fgm", output=str(tmp_path / "fgm"))
    step = make_step(adv_cfg, data)
    assert isinstance(step, AdversarialStep) and step.eps == 1.0  # the text default
    fit(adv_cfg, data, step=Recording("fgm", step))
    # the same model, batch and clean loss: the FGM step adds the adversarial loss's gradients to the clean ones
    std, adv = grads["standard"], grads["fgm"]
    assert not torch.allclose(adv, std, atol=1e-6)
    assert not torch.allclose(adv, 2 * std, atol=1e-6)  # the perturbation changed the second gradient
    training = json.loads((tmp_path / "fgm" / "model" / "config.json").read_text())["training"]
    assert training["step"] == "adversarial" and training["mode"] == "fgm" and training["eps"] == 1.0
    assert training["space"] == "input embeddings"


# --- images: through engine.fit ------------------------------------------------------------------------
def test_adversarial_training_through_fit_records_how(digits: Path, tmp_path: Path) -> None:
    cfg = resolve_settings(TrainConfig(
        data=str(digits), output=str(tmp_path / "run"), model="msresnet-tiny", image_size=16, batch_size=64, lr=3e-3,
        augment="none", progress=False, tensorboard=False, workers=0, device="cpu", deterministic=True, epochs=2,
        adversarial="fgsm", eps="8/255", adv_ratio=0.5))
    data = prepare(cfg)
    step = make_step(cfg, data)
    assert step is not None and step.guard is not None
    result = fit(cfg, data, step=step)
    assert result.test["accuracy"] > 0.3  # chance is 0.1
    training = json.loads((result.model_dir / "config.json").read_text())["training"]
    assert training["step"] == "adversarial" and training["mode"] == "fgsm"
    assert training["eps"] == pytest.approx(8 / 255) and training["eps_setting"] == "8/255"
    assert training["ratio"] == 0.5 and training["alpha"] == pytest.approx(1.25 * 8 / 255)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 2 and all(0 <= float(r["valid_pgd_accuracy"]) <= float(r["valid_pgd_clean_accuracy"]) for r in rows)
    assert make_step(dataclasses.replace(cfg, adversarial="none", adv_ratio=1.0), data) is None


def test_train_api_passes_the_adversarial_step(digits: Path, tmp_path: Path) -> None:
    import duoclass

    clf = duoclass.train(digits, model="msresnet-tiny", image_size=16, epochs=1, max_steps=2, augment="none",
                         progress=False, tensorboard=False, workers=0, device="cpu", output=str(tmp_path / "run"),
                         adversarial="pgd", adv_steps=2, eps="4/255")
    training = json.loads((Path(clf.result_.model_dir) / "config.json").read_text())["training"]
    assert (training["mode"], training["steps"], training["eps_setting"]) == ("pgd", 2, "4/255")
    assert "valid_pgd_accuracy" in (tmp_path / "run" / "metrics.csv").read_text()


# --- the catastrophic-overfitting guard --------------------------------------------------------------------
class MeanPixel(nn.Module):
    """Two classes by mean brightness (dark 0.3, bright 0.7): eps = 8/255 cannot move the mean across 0.5.
    fragile: plus a large weight on the difference of two pixels that are equal in the data, which eps can flip."""

    def __init__(self, fragile: bool):
        super().__init__()
        self.fragile = fragile
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["pixel_values"]
        s = self.scale * (x.mean(dim=(1, 2, 3)) - 0.5)
        if self.fragile:
            s = s + 1000 * (x[:, 0, 0, 0] - x[:, 0, 0, 1])
        return torch.stack([-s, s], dim=1)


def test_guard_stops_when_pgd_accuracy_collapses() -> None:
    y = torch.arange(64) % 2
    x = (0.3 + 0.4 * y.float()).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    step = AdversarialStep("fgsm", EPS, guard=({"pixel_values": x}, y))
    robust, fragile = MeanPixel(False).train(), MeanPixel(True)
    first = step.after_epoch(robust, 0)
    assert first["metrics"] == {"pgd_accuracy": 1.0, "pgd_clean_accuracy": 1.0} and "stop" not in first
    assert robust.training  # the guard gives the mode back
    assert "stop" not in step.after_epoch(robust, 1)
    collapsed = step.after_epoch(fragile, 2)  # right on clean data, wrong under PGD
    assert collapsed["metrics"]["pgd_clean_accuracy"] == 1.0 and collapsed["metrics"]["pgd_accuracy"] < 0.1
    assert collapsed["stop"].startswith("catastrophic overfitting: PGD accuracy on a fixed valid batch fell from 1.000 to")


def test_guard_does_not_stop_when_clean_accuracy_falls_too() -> None:
    step = AdversarialStep("fgsm", EPS)
    assert "stop" not in step.judge(0.5, 0.9)
    assert "stop" not in step.judge(0.05, 0.3)  # everything got worse: not catastrophic overfitting
    assert "stop" in step.judge(0.05, 0.9)
    low = AdversarialStep("fgsm", EPS)
    assert "stop" not in low.judge(0.15, 0.9) and "stop" not in low.judge(0.0, 0.9)  # never above 0.2


# --- settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, needle", [
    (dict(adversarial="pgd", adv_steps=0), "--adv-steps: got 0"),
    (dict(adversarial="pgd", adv_ratio=0.0), "--adv-ratio: got 0.0"),
    (dict(adversarial="pgd", eps_warmup=-1), "--eps-warmup: got -1"),
    (dict(adversarial="pgd", eps="abc"), "--eps: got 'abc'"),
    (dict(adversarial="pgd", eps="2", task="image"), "--eps: got '2'; images are attacked in [0, 1]"),
    (dict(eps="4/255"), "--eps: applies only to adversarial training"),
    (dict(adversarial="pgd", trades_beta=3.0), "--trades-beta: applies only to --adversarial trades"),
    (dict(adversarial="fgsm", adv_steps=3), "--adv-steps: --adversarial fgsm takes a single step"),
])
def test_bad_robustness_settings_name_the_flag(settings, needle) -> None:
    with pytest.raises(DuoclassError) as e:
        TrainConfig(data="x", **settings)
    assert str(e.value).startswith(needle), str(e.value)


@pytest.mark.parametrize("mode, task, needle", [
    ("fgsm", "text", "use --adversarial fgm or --adversarial pgd"),
    ("trades", "text", "use --adversarial fgm or --adversarial pgd"),
    ("fgm", "image", "use --adversarial fgsm, pgd or trades"),
])
def test_modes_are_checked_against_the_task(mode: str, task: str, needle: str) -> None:
    with pytest.raises(DuoclassError, match=needle):
        check_adversarial(TrainConfig(data="x", adversarial=mode), task)
    assert check_adversarial(TrainConfig(data="x", adversarial="pgd", eps="2"), "text") == 2.0  # an L2 norm, not pixels


def _one_error_line(r) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_cli_refuses_bad_adversarial_settings(digits: Path, tmp_path: Path) -> None:
    from .test_text import make_toy

    out = ["--output", str(tmp_path / "run"), "--device", "cpu"]
    line = _one_error_line(run_cli("train", str(digits), "--adversarial", "pgd", "--adv-steps", "0", *out))
    assert line.startswith("error: --adv-steps: got 0") and "--adv-steps 7" in line
    line = _one_error_line(run_cli("train", str(digits), "--adversarial", "pgd", "--eps", "2", *out))
    assert line.startswith("error: --eps: got '2'") and "[0, 1]" in line
    toy = make_toy(tmp_path / "toy", 8, 4)
    line = _one_error_line(run_cli("train", str(toy), "--model", "fasttext", "--adversarial", "fgsm", *out))
    assert line.startswith("error: --adversarial fgsm:") and "fgm" in line and "pgd" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written
