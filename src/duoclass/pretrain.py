"""Masked-language-model pretraining on unlabelled text; writes a Hugging Face folder to fine-tune.

    duoclass pretrain corpus.txt --output runs/mlm --epochs 3            # from scratch (albert-scratch-tiny)
    duoclass pretrain data/train.csv --model path/to/hf-folder --output runs/mlm2   # continued
    duoclass train data/ --model runs/mlm --lr 5e-4                      # fine-tune (== --model hf:runs/mlm)

From scratch, a tokenizer is trained on the corpus (WordPiece, or characters for Chinese) and
an ALBERT of the albert-scratch-* size is built; continued pretraining loads an HF folder
(or a reachable hub id) with its tokenizer. Masking follows BERT: 15% of the non-special
tokens are predicted; of those 80% become [MASK], 10% a random token, 10% stay.

The output folder holds config.json, model.safetensors, the tokenizer files, and
pretrain.json (settings and the loss per logged step). It is written next to DIR and
renamed into place when complete.

CPU example:  duoclass pretrain ../shared/data/text/sms_spam/train.csv --output runs/mlm --max-steps 200
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DuoclassError

log = logging.getLogger("duoclass")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PretrainConfig:
    """Settings for masked-language-model pretraining."""

    corpus: str = _f("", "unlabelled text: a .txt file (one text per line), a CSV/TSV/JSONL, or a text dataset folder",
                     positional=True)
    output: str = _f("runs/pretrain", "folder to write (Hugging Face format: config.json, model.safetensors, tokenizer)")
    model: str = _f("albert-scratch-tiny", "albert-scratch-tiny|small to start from scratch, or an HF folder / hf:<id> to continue")
    text_column: str = _f("text", "column holding the text (CSV/TSV/JSONL corpora)")
    epochs: int = _f(1, "passes over the corpus")
    max_steps: int = _f(0, "stop after this many optimizer steps; 0 = run all epochs")
    batch_size: int = _f(32, "texts per step")
    lr: float = _f(5e-4, "peak learning rate (linear warmup, then linear decay)")
    weight_decay: float = _f(0.01, "decoupled weight decay (AdamW)")
    warmup: float = _f(0.06, "warmup length as a fraction of all steps")
    max_length: int = _f(128, "maximum tokens per text")
    mlm_probability: float = _f(0.15, "share of tokens to predict")
    vocab_size: int = _f(8000, "vocabulary size of the tokenizer trained from scratch")
    lowercase: bool = _f(True, "lowercase text for the tokenizer trained from scratch")
    seed: int = _f(0, "random seed")
    device: str = _f("auto", "where to train: auto, cpu, cuda, mps")
    log_every: int = _f(50, "log the loss every N steps")

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise DuoclassError(f"--{name.replace('_', '-')}: {msg}")

        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"got {getattr(self, name)}; must be a positive integer")
        if self.max_steps < 0:
            bad("max_steps", f"got {self.max_steps}; must be >= 0 (0 = all epochs)")
        if not self.lr > 0:
            bad("lr", f"got {self.lr}; the learning rate must be > 0, e.g. --lr 5e-4")
        if self.weight_decay < 0:
            bad("weight_decay", f"got {self.weight_decay}; must be >= 0")
        if not 0 <= self.warmup < 1:
            bad("warmup", f"got {self.warmup}; a fraction in [0, 1), e.g. 0.06")
        if not 8 <= self.max_length <= 512:
            bad("max_length", f"got {self.max_length}; use 8 to 512")
        if not 0 < self.mlm_probability < 1:
            bad("mlm_probability", f"got {self.mlm_probability}; use a share in (0, 1), e.g. 0.15")
        if self.vocab_size < 100:
            bad("vocab_size", f"got {self.vocab_size}; use at least 100")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            bad("device", f"got {self.device!r}; choose one of: auto, cpu, cuda, mps")


def read_corpus(path: str | Path, text_column: str = "text") -> list[str]:
    """Non-empty texts of a .txt (one per line), CSV/TSV/JSONL, or every split file of a text dataset folder."""
    from .data.tables import decode_text
    from .text import TEXT_EXTS, find_split_files, read_text_file

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


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run MLM pretraining and write the HF folder `cfg.output`. Returns a summary."""
    from .engine import adam, pick_device
    from .models.text_models import ALBERT_SIZES, albert_config, is_hf_folder, transformers_module
    from .text import load_hf_tokenizer, train_tokenizer

    tf = transformers_module()
    start = time.time()
    torch.manual_seed(cfg.seed)
    texts = read_corpus(cfg.corpus, cfg.text_column)
    size = cfg.model[len("albert-scratch-"):] if cfg.model.startswith("albert-scratch-") else None
    if size is not None:
        if size not in ALBERT_SIZES:
            raise DuoclassError(f"--model {cfg.model}: unknown size; use {', '.join('albert-scratch-' + s for s in ALBERT_SIZES)}")
        tok, how = train_tokenizer(texts, cfg.vocab_size, cfg.lowercase)
        model = tf.AlbertForMaskedLM(albert_config(size, len(tok), tok.pad_token_id))
        source = f"{cfg.model} ({how} tokenizer, {len(tok)} tokens)"
    else:
        src = cfg.model[len("hf:"):] if cfg.model.startswith("hf:") else cfg.model
        if Path(src).exists() and not is_hf_folder(src):
            raise DuoclassError(f"{src}: not a Hugging Face model folder (no config.json with a model_type)")
        from .models.text_models import load_hf_config

        config = load_hf_config(src)
        tok = load_hf_tokenizer(src)
        try:
            model = tf.AutoModelForMaskedLM.from_pretrained(src, config=config)
        except (OSError, ValueError) as e:
            raise DuoclassError(f"{src}: cannot load it as a masked language model ({str(e).splitlines()[0]})") from None
        source = src
    if tok.mask_token_id is None:
        raise DuoclassError(f"{cfg.model}: the tokenizer has no mask token; masked-language-model pretraining needs one")
    limit = getattr(model.config, "max_position_embeddings", cfg.max_length)
    encoded = [x for x in tok(texts, truncation=True, max_length=min(cfg.max_length, limit))["input_ids"] if len(x) > 2]
    if not encoded:
        raise DuoclassError(f"{cfg.corpus}: every text is empty after tokenization")
    device = pick_device(cfg.device)
    model.to(device).train()
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps == 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    opt = adam(model, cfg.lr, cfg.weight_decay)
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    g = torch.Generator().manual_seed(cfg.seed)
    log.info("pretrain: %s, %d texts, %d steps, %s parameters, device %s", source, len(encoded), total,
             f"{sum(p.numel() for p in model.parameters()):,}", device)
    history, step, running = [], 0, 0.0
    while step < total:
        for idx in torch.randperm(len(encoded), generator=g).split(cfg.batch_size):
            batch = [encoded[i] for i in idx.tolist()]
            n = max(len(x) for x in batch)
            ids = torch.full((len(batch), n), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, x in enumerate(batch):
                ids[i, : len(x)] = torch.tensor(x)
                attn[i, : len(x)] = 1
            maskable = attn.bool() & ~torch.isin(ids, special)
            inputs, labels = mask_tokens(ids, maskable, tok.mask_token_id, len(tok), cfg.mlm_probability, g)
            out = model(input_ids=inputs.to(device), attention_mask=attn.to(device), labels=labels.to(device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running += out.loss.item()
            if step % cfg.log_every == 0 or step == total:
                k = step % cfg.log_every or cfg.log_every
                history.append({"step": step, "loss": round(running / k, 5), "lr": opt.param_groups[0]["lr"]})
                log.info("step %d/%d  mlm_loss %.4f", step, total, running / k)
                running = 0.0
            if step >= total:
                break
    summary = {"output": str(cfg.output), "source": source, "texts": len(encoded), "steps": step,
               "final_loss": history[-1]["loss"] if history else None, "seconds": round(time.time() - start, 1)}
    _write_folder(Path(cfg.output), model, tok, {"settings": asdict(cfg), "history": history, **summary})
    return summary


def _write_folder(out: Path, model: Any, tok: Any, info: dict[str, Any]) -> None:
    """save_pretrained into a temporary sibling, then swap it into place (no half-written folder at `out`)."""
    from .checkpoint import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / "pretrain.json").is_file() and any(out.iterdir()):
        raise DuoclassError(f"{out}: exists and was not written by `duoclass pretrain`; pass a new --output")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.cpu().save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", info)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
