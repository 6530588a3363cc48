"""Masked-language-model pretraining on unlabelled text; writes a Hugging Face folder to fine-tune.

    duoclass pretrain corpus.txt --output runs/mlm --epochs 3            # from scratch (albert-scratch-tiny)
    duoclass pretrain data/train.csv --model path/to/hf-folder --output runs/mlm2   # continued
    duoclass train data/ --model runs/mlm --lr 5e-4                      # fine-tune (== --model hf:runs/mlm)

From scratch, a tokenizer is trained on the corpus (WordPiece, or characters for Chinese) and
an ALBERT of the albert-scratch-* size is built; continued pretraining loads an HF folder
(or a reachable hub id) with its tokenizer. Masking follows BERT: 15% of the non-special
tokens are predicted; of those 80% become [MASK], 10% a random token, 10% stay.

Pretraining runs through the same engine as classification (engine.fit, with a given model,
a masked-LM step and its own evaluation), so it has mixed precision, resume (--resume DIR),
DDP and validation: a share of the corpus is held out and the masked-LM loss on it is measured
every epoch. DIR is a run folder like `duoclass train`'s (config.yaml, metrics.csv, state.pt);
DIR/model/ is the Hugging Face folder (config.json, model.safetensors, the tokenizer files, and
pretrain.json with the settings and the loss per epoch) of the epoch with the lowest valid
loss, replaced atomically. `--model DIR` and `--model DIR/model` both fine-tune it.

CPU example:  duoclass pretrain ../shared/data/text/sms_spam/train.csv --output runs/mlm --max-steps 200
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duoclass.settings.config import PretrainConfig, TrainConfig
from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")


def read_corpus(path: str | Path, text_column: str = "text") -> list[str]:
    """Non-empty texts of a .txt (one per line), CSV/TSV/JSONL, or every split file of a text dataset folder."""
    from duoclass.data.tables import decode_text
    from duoclass.data.text_files import TEXT_EXTS, find_split_files, read_text_file

    p = Path(path)
    if p.is_dir():
        files = list(find_split_files(p).values())
        if not files:
            raise DuoclassError(f"{p}: no train/valid/test files in the folder; pass a .txt or CSV corpus")
    elif p.is_file():
        files = [p]
    else:
        raise DuoclassError(f"{p}: no such file or folder; pass a .txt (one text per line) or a CSV/TSV/JSONL corpus")
    texts: list[str] = []
    for f in files:
        if f.suffix.lower() in TEXT_EXTS:
            recs, _ = read_text_file(f, text_column, None)
            texts += [r.text for r in recs]
        else:
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise DuoclassError(f"{f}: cannot read ({e.strerror})") from None
            texts += [line for line in decode_text(f, raw)[0].splitlines() if line.strip()]
    if not texts:
        raise DuoclassError(f"{p}: the corpus has no non-empty text")
    return texts


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int, p: float,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking. ids, maskable: (B, L). Returns (inputs, labels) with labels -100 where nothing is predicted."""
    prob = torch.full(ids.shape, p) * maskable
    picked = torch.bernoulli(prob, generator=g).bool()
    if not picked.any():  # tiny batches: predict at least one token
        pos = maskable.nonzero()
        if len(pos):
            r, c = pos[torch.randint(len(pos), (1,), generator=g)][0]
            picked[r, c] = True
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    inputs = ids.clone()
    to_mask = picked & torch.bernoulli(torch.full(ids.shape, 0.8), generator=g).bool()
    inputs[to_mask] = mask_id
    to_random = picked & ~to_mask & torch.bernoulli(torch.full(ids.shape, 0.5), generator=g).bool()
    inputs[to_random] = torch.randint(vocab_size, ids.shape, generator=g)[to_random]
    return inputs, labels


class MaskedLM(nn.Module):
    """A transformers masked-LM behind the engine's dict contract: {"input_ids", "attention_mask"} -> logits (B, L, V)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class MaskingCollate:
    """Pad a batch of token ids and mask it (BERT masking); labels (B, L) are -100 where nothing is predicted.

    Training batches draw from torch's global generator (restored on --resume); `fixed_seed` makes every
    call mask the same way (validation)."""

    def __init__(self, pad_id: int, special: torch.Tensor, mask_id: int, vocab_size: int, p: float,
                 fixed_seed: int | None = None):
        self.pad_id, self.special, self.mask_id, self.vocab_size, self.p = pad_id, special, mask_id, vocab_size, p
        self.fixed_seed = fixed_seed

    def __call__(self, items: list[tuple[list[int], int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n = max(len(x) for x, _ in items)
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, (x, _) in enumerate(items):
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
        maskable = attn.bool() & ~torch.isin(ids, self.special)
        g = torch.Generator().manual_seed(self.fixed_seed + sum(map(len, (x for x, _ in items))))\
            if self.fixed_seed is not None else torch.default_generator
        inputs, labels = mask_tokens(ids, maskable, self.mask_id, self.vocab_size, self.p, g)
        return {"input_ids": inputs, "attention_mask": attn}, labels


def mlm_step(ctx: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The training step of masked-LM pretraining: cross-entropy over the masked positions only."""
    logits = ctx.forward(inputs)  # (B, L, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    ctx.backward(loss)
    return loss.detach()


def _tokenizer_and_model(cfg: PretrainConfig, texts: list[str], d: Any) -> tuple[Any, Any, str]:
    """(tokenizer, masked-LM model, description). A tokenizer trained here is trained once, on rank 0."""
    from duoclass.models.text_models import ALBERT_SIZES, albert_config, is_hf_folder, load_hf_config, transformers_module
    from duoclass.training.text_data import load_hf_tokenizer, train_tokenizer

    from duoclass.models import get_spec

    tf = transformers_module()
    spec = get_spec(cfg.model)
    trained = spec is not None and spec.input == "trained-tokenizer"  # a tokenizer trained here (albert-scratch-*)
    size = cfg.model.rsplit("-", 1)[-1] if trained else None
    if size is not None:
        if size not in ALBERT_SIZES:
            raise DuoclassError(f"--model {cfg.model}: unknown size; use {', '.join('albert-scratch-' + s for s in ALBERT_SIZES)}")
        tok, how = train_tokenizer(texts, cfg.vocab_size, cfg.lowercase) if d.main else (None, "")
        if d.world > 1:  # every process must hold rank 0's vocabulary
            from tokenizers import Tokenizer

            shared = d.broadcast((tok.backend_tokenizer.to_str(), how) if d.main else None)
            if not d.main:
                tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(shared[0]), unk_token="[UNK]",
                                                 pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
                how = shared[1]
        model = tf.AlbertForMaskedLM(albert_config(size, len(tok), tok.pad_token_id))
        return tok, model, f"{cfg.model} ({how} tokenizer, {len(tok)} tokens)"
    src = cfg.model[len("hf:"):] if cfg.model.startswith("hf:") else cfg.model
    if Path(src).exists() and not is_hf_folder(src):
        raise DuoclassError(f"{src}: not a Hugging Face model folder (no config.json with a model_type)")
    config = load_hf_config(src)
    tok = load_hf_tokenizer(src)
    try:
        model = tf.AutoModelForMaskedLM.from_pretrained(src, config=config)
    except (OSError, ValueError) as e:
        raise DuoclassError(f"{src}: cannot load it as a masked language model ({str(e).splitlines()[0]})") from None
    return tok, model, src


# Long on purpose: the masked-LM task's own pieces (corpus, tokenizer, model, evaluate/save/finish) are
# closures over the same tokenizer and corpus, handed to the one training loop through TaskData.
def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run masked-LM pretraining through engine.fit; DIR/model is the HF folder of the best epoch. Returns a summary."""
    from duoclass.infer.torch_backend import pick_device
    from duoclass.data.splits import TaskData
    from duoclass.training.distributed import init_distributed
    from duoclass.training.loop import RunResult
    from duoclass.training.run import run
    from duoclass.training.text_data import TextDataset

    start = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.resume and not (Path(cfg.resume) / "state.pt").is_file():
        raise DuoclassError(f"{Path(cfg.resume) / 'state.pt'}: no training state to resume from; pass the --output of an earlier run")
    out = Path(cfg.output)
    if out.is_dir() and any(out.iterdir()) and not cfg.resume and not (out / "config.yaml").is_file():
        raise DuoclassError(f"{out}: exists and was not written by duoclass; pass a new --output")
    texts = read_corpus(cfg.corpus, cfg.text_column)
    d = init_distributed(pick_device(cfg.device))
    tok, net, source = _tokenizer_and_model(cfg, texts, d)
    if tok.mask_token_id is None:
        raise DuoclassError(f"{cfg.model}: the tokenizer has no mask token; masked-language-model pretraining needs one")
    limit = getattr(net.config, "max_position_embeddings", cfg.max_length)
    encoded = [x for x in tok(texts, truncation=True, max_length=min(cfg.max_length, limit))["input_ids"] if len(x) > 2]
    if not encoded:
        raise DuoclassError(f"{cfg.corpus}: every text is empty after tokenization")
    # hold out a seeded share of the corpus for validation (the whole corpus when it is tiny)
    order = list(range(len(encoded)))
    random.Random(cfg.seed).shuffle(order)
    n_valid = min(1000, round(len(encoded) * cfg.valid_fraction)) if len(encoded) >= 20 else 0
    held, kept = sorted(order[:n_valid]), sorted(order[n_valid:])
    train_ids = [encoded[i] for i in kept]
    valid_ids = [encoded[i] for i in held] if held else train_ids
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    collate = MaskingCollate(tok.pad_token_id, special, tok.mask_token_id, len(tok), cfg.mlm_probability)
    valid_collate = MaskingCollate(tok.pad_token_id, special, tok.mask_token_id, len(tok), cfg.mlm_probability, cfg.seed)
    spe = math.ceil(len(train_ids) / cfg.batch_size)
    total = spe * cfg.epochs if cfg.max_steps == 0 else min(cfg.max_steps, spe * cfg.epochs)
    tcfg = TrainConfig(
        data=str(cfg.corpus), task="text", model=cfg.model, epochs=cfg.epochs, max_steps=cfg.max_steps,
        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule="linear",
        warmup_epochs=cfg.warmup * total / spe, label_smoothing=0.0, class_weights="none", grad_clip=1.0,
        select_metric="loss", output=cfg.output, resume=cfg.resume, seed=cfg.seed, device=cfg.device, workers=0,
        amp=cfg.amp, tensorboard=cfg.tensorboard, progress=cfg.progress, dropout=0.1, length_buckets=False,
    )
    history: list[dict[str, Any]] = []
    device = pick_device(cfg.device)

    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        """Masked-LM loss and masked-token accuracy on the held-out texts (the same masking every epoch)."""
        from duoclass.infer.torch_backend import autocast

        model.eval()
        loss_sum, right, count = 0.0, 0, 0
        for i in range(0, len(valid_ids), cfg.batch_size):
            x, y = valid_collate([(t, 0) for t in valid_ids[i : i + cfg.batch_size]])
            with autocast(device, tcfg.amp):
                logits = model({k: v.to(device) for k, v in x.items()}).float()
            y = y.to(device)
            picked = y != -100
            loss_sum += float(F.cross_entropy(logits[picked], y[picked], reduction="sum"))
            right += int((logits[picked].argmax(-1) == y[picked]).sum())
            count += int(picked.sum())
        return {"loss": loss_sum / max(count, 1), "accuracy": right / max(count, 1)}

    def save(folder: Path, model: nn.Module, metrics: dict[str, Any]) -> None:
        history.append({"epoch": metrics["epoch"], **metrics["valid"]})
        _write_folder(folder, model.net, tok, {"settings": dataclasses.asdict(cfg), "source": source,
                                                "texts": len(train_ids), "best": metrics})

    def finish(tc: TrainConfig, data: Any, run_dir: Path, model_dir: Path, dev: Any, best_epoch: int,
               hist: list[dict], t0: float, dd: Any) -> RunResult | None:
        if not dd.main:
            return None
        from duoclass.artifacts.atomic import atomic_write_json

        last = hist[-1] if hist else {}
        summary = {"best_epoch": best_epoch, "history": hist, "seconds": round(time.time() - t0, 1)}
        atomic_write_json(run_dir / "metrics.json", summary)
        best = next((h for h in hist if h["epoch"] == best_epoch), last)
        valid = {"loss": best.get("valid_loss"), "accuracy": best.get("valid_accuracy")}
        return RunResult(run_dir, model_dir, best_epoch, valid, None, 0, time.time() - t0)

    data = TaskData(task="mlm", classes=["-"] * 2, train=TextDataset(train_ids, [0] * len(train_ids)),
                    valid=TextDataset(valid_ids, [0] * len(valid_ids)), test=None, collate=collate, preprocessor=None,
                    model_args={}, train_labels=[], model_name=cfg.model, evaluate=evaluate, save=save, finish=finish,
                    notes=[f"pretrain: {source}, {len(train_ids)} texts ({len(held) or 'no'} held out for validation), "
                           f"{total} steps"])
    result = run(tcfg, data=data, model=MaskedLM(net), step=mlm_step)
    if result is None:  # a non-zero rank under torchrun
        return {}
    return {"output": str(cfg.output), "model_dir": str(result.model_dir), "source": source, "texts": len(train_ids),
            "held_out": len(held), "steps": total, "best_epoch": result.best_epoch, "valid_loss": result.valid["loss"],
            "seconds": round(time.time() - start, 1)}


def _write_folder(out: Path, model: Any, tok: Any, info: dict[str, Any]) -> None:
    """save_pretrained into `.NAME.duoclass-new`, then swap it into place with artifacts.atomic's one folder
    replace (fsynced; a crash leaves the old folder or the new one, and the next save finishes an interrupted swap)."""
    from duoclass.artifacts.atomic import recover_folder, replace_folder_with

    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out, _complete)  # a save killed between its two renames: `out` is back before it is checked
    if out.exists() and not (out / "pretrain.json").is_file() and any(out.iterdir()):
        raise DuoclassError(f"{out}: exists and was not written by `duoclass pretrain`; pass a new --output")

    def write(new: Path) -> None:
        model.save_pretrained(new, safe_serialization=True)
        tok.save_pretrained(new)
        (new / "pretrain.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")  # last

    replace_folder_with(out, write, _complete)


def _complete(folder: Path) -> bool:
    """Whether a pretraining folder was written to the end (pretrain.json is its last file)."""
    return (folder / "pretrain.json").is_file()
