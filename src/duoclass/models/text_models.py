"""Text models: small ALBERTs trained from scratch, a fastText-style baseline, and any Hugging Face checkpoint.

Every model takes `{"input_ids": (B, L) long, "attention_mask": (B, L) long}` and returns
logits (B, C); tfidf-mlp also takes `"weights": (B, L) float`, the TF-IDF weight of each
n-gram id (its preprocessor adds them). Two heads over the token states, chosen with `pooling`:

    cls        the model's own pooled [CLS] head (mean of the n-gram embeddings for fasttext)
    attention  a learned weighted sum of the token states (masked softmax), then the classifier

    create_model("albert-scratch-tiny", num_classes=2, vocab_size=8000)
    create_model("fasttext", num_classes=6, buckets=131072)
    create_model("hf:path/to/folder", num_classes=2, pretrained="path/to/folder")   # fine-tuning

`hf:<id-or-folder>` models store the Hugging Face config dict in the model args
(config.json["model"]["args"]["hf_config"]), so a model folder rebuilds the architecture
offline with `from_config` and then loads its own weights; nothing is downloaded.
transformers is imported inside the functions that need it (`pip install duoclass[text]`).
"""
from __future__ import annotations

import inspect
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from duoclass.errors import DuoclassError
from duoclass.models.base import register

ALBERT_SIZES: dict[str, dict[str, int]] = {
    # Sized to train in minutes on 2 CPU cores.
    "tiny": dict(embedding_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "small": dict(embedding_size=128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}
MAX_POSITIONS = 512
DEFAULT_VOCAB = 8000  # only for listing parameter counts; training sizes the vocabulary from the tokenizer
DEFAULT_BUCKETS = 65_536
DEFAULT_NGRAM_VOCAB = 50_000  # only for listing parameter counts; training sizes it from the data


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise DuoclassError("text models need the transformers package; install it with `pip install duoclass[text]`") from None
    transformers.logging.set_verbosity_error()  # its load reports (newly initialised heads...) are expected here
    transformers.logging.disable_progress_bar()
    return transformers


# --- heads ------------------------------------------------------------------------------------
class AttentionPool(nn.Module):
    """Learned weighted sum over token states: softmax of a linear score, padding masked out."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.score(h).squeeze(-1)  # (B, L)
        s = s.masked_fill(mask == 0, torch.finfo(s.dtype).min)
        w = s.softmax(dim=-1).unsqueeze(-1)  # (B, L, 1)
        return (w * h).sum(dim=1)  # (B, D)


class HFTextModel(nn.Module):
    """A transformers encoder behind the dict contract.

    pooling="cls": `net` is an AutoModelForSequenceClassification and its own head gives the logits.
    pooling="attention": `net` is the bare encoder (AutoModel) built without its pooler layer, which
    this head would never use (an unused parameter breaks DistributedDataParallel); AttentionPool +
    dropout + linear on top. Model folders saved with the pooler still load: its tensors are dropped.
    """

    def __init__(self, net: nn.Module, pooling: str, num_classes: int, dropout: float):
        super().__init__()
        self.pooling = pooling
        self.net = net
        if pooling == "attention":
            dim = net.config.hidden_size
            self.pool = AttentionPool(dim)
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(dim, num_classes)
            self._register_load_state_dict_pre_hook(self._drop_unused_pooler)

    def _drop_unused_pooler(self, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        if getattr(self.net, "pooler", None) is None:
            for k in [k for k in state_dict if k.startswith(prefix + "net.pooler.")]:
                del state_dict[k]

    def input_embeddings(self) -> nn.Module:
        """The token embedding table (adversarial training of text perturbs its weights)."""
        return self.net.get_input_embeddings()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.pooling == "cls":
            return self.net(input_ids=ids, attention_mask=mask).logits
        h = self.net(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        return self.fc(self.dropout(self.pool(h, mask)))


def _check_pooling(pooling: str) -> None:
    if pooling not in ("cls", "attention"):
        raise DuoclassError(f"--pooling: got {pooling!r}; choose one of: cls, attention")


def _encoder_kwargs(config: Any) -> dict[str, Any]:
    """AutoModel keyword arguments for a bare encoder without the pooler layer, where the architecture has one."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        cls = MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        return {}
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


def _wrap(config: Any, num_classes: int, pooling: str, dropout: float, weights: str | None = None) -> HFTextModel:
    """Build from `config` (random init), or load `weights` (an HF id or folder) into that architecture."""
    tf = transformers_module()
    _check_pooling(pooling)
    config.num_labels = num_classes
    for attr in ("classifier_dropout", "classifier_dropout_prob"):
        if hasattr(config, attr):
            setattr(config, attr, dropout)
    auto = tf.AutoModelForSequenceClassification if pooling == "cls" else tf.AutoModel
    kw = {} if pooling == "cls" else _encoder_kwargs(config)
    if weights is None:
        net = auto.from_config(config, **kw)
    else:
        kw = {"ignore_mismatched_sizes": True} if pooling == "cls" else kw
        try:
            net = auto.from_pretrained(weights, config=config, **kw)
        except OSError as e:
            raise DuoclassError(f"{weights}: cannot load the pretrained weights ({str(e).splitlines()[0]})") from None
    return HFTextModel(net, pooling, num_classes, dropout)


# --- ALBERT from scratch -----------------------------------------------------------------------
def albert_config(size: str, vocab_size: int, pad_token_id: int = 0, dropout: float = 0.1) -> Any:
    tf = transformers_module()
    return tf.AlbertConfig(
        vocab_size=vocab_size, pad_token_id=pad_token_id, max_position_embeddings=MAX_POSITIONS,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, classifier_dropout_prob=dropout,
        **ALBERT_SIZES[size],
    )


def _albert_builder(size: str):
    def build(num_classes: int, vocab_size: int = DEFAULT_VOCAB, pad_token_id: int = 0, pooling: str = "cls",
              dropout: float = 0.1) -> HFTextModel:
        return _wrap(albert_config(size, vocab_size, pad_token_id, dropout), num_classes, pooling, dropout)

    return build


for _size, _c in ALBERT_SIZES.items():
    register(
        f"albert-scratch-{_size}", "text",
        f"ALBERT trained from scratch with a tokenizer trained on your data; hidden {_c['hidden_size']}, "
        f"{_c['num_hidden_layers']} layers", lr=1e-3, input="trained-tokenizer", heads=("cls", "attention"),
    )(_albert_builder(_size))


# --- fastText-style baseline -------------------------------------------------------------------
class FastText(nn.Module):
    """Hashed word, word-bigram and char n-gram embeddings, pooled, then linear (Joulin et al., 2016).

    The preprocessor ("ngram-hash") turns text into bucket ids; id 0 is padding.
    """

    def __init__(self, num_classes: int, buckets: int = DEFAULT_BUCKETS, dim: int = 64, pooling: str = "cls",
                 dropout: float = 0.1):
        super().__init__()
        _check_pooling(pooling)
        self.pooling = pooling
        self.embed = nn.Embedding(buckets, dim, padding_idx=0)
        nn.init.normal_(self.embed.weight, std=0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.pool = AttentionPool(dim) if pooling == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def input_embeddings(self) -> nn.Module:
        """The n-gram embedding table (adversarial training of text perturbs its weights)."""
        return self.embed

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        e = self.embed(ids)  # (B, L, D)
        if self.pool is not None:
            v = self.pool(e, mask)
        else:  # mean over the real features
            m = mask.unsqueeze(-1).to(e.dtype)
            v = (e * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.fc(self.dropout(v))


@register("fasttext", "text", "fastText-style baseline: hashed word + char n-gram embeddings, mean-pooled, linear", lr=1e-2,
          input="ngram-hash", heads=("cls", "attention"))
def build_fasttext(num_classes: int, buckets: int = DEFAULT_BUCKETS, dim: int = 64, pooling: str = "cls",
                   dropout: float = 0.1) -> FastText:
    return FastText(num_classes, buckets, dim, pooling, dropout)


# --- TF-IDF bag of n-grams into a wide MLP ---------------------------------------------------------
class TfidfMLP(nn.Module):
    """TF-IDF-weighted sum of n-gram vectors (= a linear layer on the sparse TF-IDF vector), ReLU,
    dropout, linear: the "WideMLP" of Galke & Scherp (2022), one wide hidden layer over a bag of n-grams.

    The preprocessor ("ngram-vocab") gives the distinct n-gram ids of each text and their
    L2-normalised TF-IDF `weights`; id 0 is padding (weight 0).
    """

    def __init__(self, num_classes: int, vocab_size: int = DEFAULT_NGRAM_VOCAB, hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, hidden, mode="sum", padding_idx=0)
        nn.init.normal_(self.embed.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def input_embeddings(self) -> nn.Module:
        """The n-gram vectors, an EmbeddingBag (adversarial training of text perturbs its weights)."""
        return self.embed

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embed(batch["input_ids"], per_sample_weights=batch["weights"].to(self.embed.weight.dtype))
        return self.fc(self.dropout(torch.relu(h + self.bias)))


@register("tfidf-mlp", "text", "TF-IDF of words, word bigrams and char n-grams (vocabulary from your data) into one "
          "wide ReLU layer (256), dropout, linear (Galke & Scherp, 2022)", lr=1e-3, dropout=0.5,
          input="ngram-vocab", heads=("cls",))  # a bag of n-grams has no token states to pool
def build_tfidf_mlp(num_classes: int, vocab_size: int = DEFAULT_NGRAM_VOCAB, hidden: int = 256, pooling: str = "cls",
                    dropout: float = 0.5) -> TfidfMLP:
    if pooling != "cls":
        raise DuoclassError(f"--pooling {pooling}: tfidf-mlp has no {pooling!r} head (it has: cls); use --pooling cls")
    return TfidfMLP(num_classes, vocab_size, hidden, dropout)


_OLD_KIND = {"ngram-hash": "ngram-hash", "ngram-vocab": "ngram-vocab", "trained-tokenizer": "trained", "hf-tokenizer": "hf"}


# --- any Hugging Face checkpoint ----------------------------------------------------------------
def is_hf_folder(path: str) -> bool:
    """A local folder holding a Hugging Face config.json (not a duoclass model folder)."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "model_type" in d and d.get("format") != "duoclass-model"


def _offline_error(source: str) -> DuoclassError:
    return DuoclassError(
        f"hf:{source}: the pretrained weights need a download from the Hugging Face hub, which is not reachable from "
        "here (and they are not in the local cache); train without pretrained weights with `--model tfidf-mlp` "
        "(the most accurate duoclass model that needs none), `--model albert-scratch-tiny` or `--model fasttext`, "
        "or pass a local folder with config.json, weights and tokenizer (--model path/to/folder)"
    )


def _hub_reachable() -> bool:
    """Cheap check before transformers' own retry loop (about 30 s of retries when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def load_hf_config(source: str) -> Any:
    """AutoConfig of an HF id or local folder; the local cache first, the hub only when reachable."""
    tf = transformers_module()
    if Path(source).is_dir():
        try:
            return tf.AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DuoclassError(f"{source}: not a usable Hugging Face model folder ({str(e).splitlines()[0]})") from None
    try:
        return tf.AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise _offline_error(source)
    try:
        return tf.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise DuoclassError(f"hf:{source}: cannot load the config from the hub ({str(e).splitlines()[0]}); check the name") from None


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe config dict without the label maps (the model folder has its own classes)."""
    d = json.loads(config.to_json_string(use_diff=False))
    for k in ("id2label", "label2id", "num_labels", "architectures", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    return d


def create_hf_model(source: str, num_classes: int, hf_config: dict[str, Any] | None = None, pooling: str = "cls",
                    dropout: float = 0.1, pretrained: str | None = None) -> HFTextModel:
    """`hf:<source>`: with `pretrained` load those weights (training); else build from `hf_config` (a model folder)."""
    tf = transformers_module()
    if hf_config is not None:
        d = dict(hf_config)
        config = tf.AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        config = load_hf_config(source)
    weights = None
    if pretrained:
        weights = source if pretrained == "hub" else pretrained
        if not Path(weights).is_dir():
            load_hf_config(weights)  # the same clear error when the hub is out of reach
    return _wrap(config, num_classes, pooling, dropout, weights)
