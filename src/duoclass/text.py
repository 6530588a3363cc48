"""Text data, tokenizers and the text preprocessor: text becomes token ids for the shared engine.

    DATA/train.csv, DATA/valid.csv, DATA/test.csv   (.csv, .tsv or .jsonl; dev/val also name the valid split)
    DATA.csv                                          one file: split into train/valid/test (stratified, seeded)

Columns come from `--text-column` / `--label-column` (default text, label); an `id` column is
kept. CSVs may be UTF-8 (with or without BOM) or GBK/GB18030; quoted newlines are fine. A row
with empty text is skipped and counted (RUN_DIR/skipped.csv); an empty label, a duplicate id
or a missing column is an error naming the file and line.

Ways to turn text into ids, picked by the model (models.text_models.text_input_kind):

    hf          a Hugging Face tokenizer: the checkpoint's own, or one trained here on the
                training texts (WordPiece; character-level when the text is mostly Chinese)
    ngram-hash  fasttext: hashed words, word bigrams and char 3/4-grams; no files
    ngram-vocab tfidf-mlp: the same n-grams, a vocabulary of those in 2+ training texts with their
                IDF (ngrams.json in the model folder); batches carry TF-IDF weights; reads the
                first --max-length x 8 words

The tokenizer files travel in the model folder under `tokenizer/`; loading never downloads.
Training texts can be augmented per example and epoch (--text-augment, see text_augment.py);
valid and test texts never are.

CPU example:  duoclass train ../shared/data/text/trec6 --model albert-scratch-tiny --epochs 3 --lr 1e-3
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import Dataset as TorchDataset

from .data.clean import Finding
from .errors import DuoclassError


if TYPE_CHECKING:
    from .data.splits import TaskData

log = logging.getLogger("duoclass")

TEXT_EXTS = (".csv", ".tsv", ".jsonl")
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "dev", "val"), "test": ("test",)}
MISSING_LABELS = {"", "nan", "none", "null"}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_DIR = "tokenizer"
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# --- reading ---------------------------------------------------------------------------------
@dataclass
class TextRecord:
    id: str | None
    text: str
    label: str | None
    where: str  # "file: line N", for messages


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    from .data.tables import decode_text

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DuoclassError(f"{path}: cannot read ({e.strerror})") from None
    text, _ = decode_text(path, raw)
    rows, header = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DuoclassError(f"{path}: line {n}: not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DuoclassError(f"{path}: line {n}: expected a JSON object like {{\"text\": ..., \"label\": ...}}")
        header += [k for k in obj if k not in header]
        rows.append((n, obj))
    return header, rows


def _cell(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def read_text_file(
    path: str | Path, text_column: str = "text", label_column: str | None = "label", split: str = "",
    skip_empty: bool = True,
) -> tuple[list[TextRecord], list[Finding]]:
    """Records of one CSV/TSV/JSONL file and the skipped (empty-text) rows. label_column=None: unlabelled."""
    from .data.tables import read_table

    path = Path(path)
    header, rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_table(path)
    if not rows:
        raise DuoclassError(f"{path}: no data rows; add rows under the header")
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col is not None and col not in header:
            raise DuoclassError(
                f"{path}: no {col!r} column (columns: {', '.join(map(str, header))}); rename the column or pass {flag} NAME"
            )
    has_id = "id" in header
    records, skipped, seen = [], [], {}
    for line, row in rows:
        where = f"{path}: line {line}"
        rid = _cell(row.get("id")) if has_id else None
        if has_id:
            rid = (rid or "").strip()
            if not rid:
                raise DuoclassError(f"{where}: empty id; give every row an id or drop the id column")
            if rid in seen:
                raise DuoclassError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]}); ids must be unique")
            seen[rid] = line
        label = None
        if label_column is not None:
            label = (_cell(row.get(label_column)) or "").strip()
            if label.lower() in MISSING_LABELS:
                raise DuoclassError(f"{where}: empty label ({label_column!r} is {label or 'blank'!r}); fill it in or remove the row")
        text = _cell(row.get(text_column))
        if text is None or not text.strip():
            if skip_empty:
                skipped.append(Finding(f"{path}:{line}", split, label or "", "bad", "empty text"))
                continue
            text = ""
        records.append(TextRecord(rid, text, label, where))
    return records, skipped


def find_split_files(folder: Path) -> dict[str, Path]:
    """train/valid/test files of a folder (valid may be named dev or val)."""
    found: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        hits = [p for p in sorted(folder.iterdir()) if p.is_file() and p.stem.lower() in names and p.suffix.lower() in TEXT_EXTS]
        if len(hits) > 1:
            raise DuoclassError(f"{folder}: several {split} files ({', '.join(p.name for p in hits)}); keep one of them")
        if hits:
            found[split] = hits[0]
    return found


def read_text_dataset(data: str | Path, text_column: str, label_column: str) -> tuple[dict[str, list[TextRecord]], list[Finding], bool]:
    """(records per split, skipped rows, single_file). A single file comes back as its 'train' split."""
    p = Path(data)
    if p.is_dir():
        files = find_split_files(p)
        if "train" not in files:
            raise DuoclassError(
                f"{p}: no train file; add train.csv (or .tsv/.jsonl) with columns {text_column},{label_column} "
                "(optionally valid.* and test.*), or pass a single CSV to split automatically"
            )
        single = False
    elif p.is_file():
        if p.suffix.lower() not in TEXT_EXTS:
            raise DuoclassError(f"{p}: unsupported text file type {p.suffix!r}; use .csv, .tsv or .jsonl")
        files, single = {"train": p}, True
    else:
        raise DuoclassError(f"{p}: no such file or folder; pass a folder with train/valid/test files or one CSV/TSV/JSONL")
    splits, skipped = {}, []
    for split, f in files.items():
        recs, sk = read_text_file(f, text_column, label_column, split)
        splits[split] = recs
        skipped += sk
    return splits, skipped, single


# --- tokenizers ------------------------------------------------------------------------------
def cjk_share(texts: Sequence[str], sample: int = 2000) -> float:
    """Share of CJK ideographs among the non-space characters of (a sample of) the texts."""
    step = max(1, len(texts) // sample)
    chars = "".join(texts[::step])
    chars = "".join(chars.split())
    return len(CJK.findall(chars)) / max(1, len(chars))


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8000, lowercase: bool = True) -> tuple[Any, str]:
    """Train a tokenizer on `texts`: WordPiece, or character-level when most characters are Chinese.

    Returns (a transformers fast tokenizer with [PAD]=0, [UNK], [CLS], [SEP], [MASK] that adds
    [CLS] ... [SEP], and its kind: "trained-wordpiece" or "trained-char").
    The character vocabulary is the same in every process; a WordPiece vocabulary is not
    (the tokenizers library breaks ties in hash-map order, huggingface/tokenizers#1794), so
    two processes given the same texts can get different tokenizers. The model folder keeps
    the one a model was trained with.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from .models.text_models import transformers_module

    tf = transformers_module()
    chinese = cjk_share(texts) > 0.3
    if chinese:  # every character is a token: the strong, simple choice for Chinese
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
        )
        trainer: Any = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    return fast, "trained-char" if chinese else "trained-wordpiece"


def load_hf_tokenizer(source: str | Path) -> Any:
    """AutoTokenizer from a local folder or a (cached or reachable) hub id; no code from the folder is run.

    Chinese ALBERT checkpoints ship a BERT vocab.txt instead of spiece.model: they load as BertTokenizerFast.
    """
    from .models.text_models import _hub_reachable, _offline_error, transformers_module

    tf = transformers_module()
    src = str(source)
    local = Path(src).is_dir()
    names = {q.name for q in Path(src).iterdir()} if local else set()
    bert_vocab_only = "vocab.txt" in names and not names & {"tokenizer.json", "spiece.model", "sentencepiece.bpe.model"}
    kw: dict[str, Any] = {"local_files_only": True}
    if not local and _hub_reachable():
        kw = {}
    try:
        if bert_vocab_only:
            tok = tf.BertTokenizerFast.from_pretrained(src, **kw)
        else:
            tok = tf.AutoTokenizer.from_pretrained(src, **kw)
    except Exception as first:  # noqa: BLE001  (transformers raises many types here)
        try:
            tok = tf.BertTokenizerFast.from_pretrained(src, **kw)  # vocab.txt checkpoints with another model_type
        except Exception:  # noqa: BLE001
            if not local and "local_files_only" in kw:
                raise _offline_error(src) from None
            raise DuoclassError(f"{src}: cannot load the tokenizer ({str(first).splitlines()[0]}); "
                                "the folder needs tokenizer.json, spiece.model or vocab.txt") from None
    if len(tok) < 10:  # transformers 5 builds an empty tokenizer when the files are absent
        if not local and "local_files_only" in kw:
            raise _offline_error(src)
        raise DuoclassError(f"{src}: the tokenizer has only {len(tok)} tokens; the tokenizer files are missing or damaged")
    if tok.pad_token_id is None:  # e.g. GPT-style tokenizers
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\d_]+|\d+|[^\w\s]")


def ngram_features(text: str, lowercase: bool = True, max_words: int | None = None) -> list[str]:
    """fastText features of one text: words (CJK characters count as words), word bigrams, then
    char 3/4-grams of each word longer than 2 characters, with boundary marks. With `max_words`,
    only the first that many words (and the n-grams within them) count."""
    if lowercase:
        text = text.lower()
    words = _WORD.findall(text)[:max_words]
    feats = [f"w {w}" for w in words]
    feats += [f"b {a} {b}" for a, b in zip(words, words[1:])]
    for w in words:
        if len(w) > 2:
            g = f"<{w}>"
            feats += [f"c {g[i:i + n]}" for n in (3, 4) for i in range(len(g) - n + 1)]
    return feats


def ngram_ids(text: str, buckets: int, max_features: int, lowercase: bool = True) -> list[int]:
    """ngram_features hashed (crc32, stable across runs) into ids 1..buckets-1; truncation drops char n-grams first."""
    return [zlib.crc32(f.encode("utf-8")) % (buckets - 1) + 1 for f in ngram_features(text, lowercase)[:max_features]]


NGRAM_FILE = "ngrams.json"
MIN_DF = 2  # an n-gram must occur in 2+ training texts to enter the vocabulary ...
MIN_VOCAB = 1000  # ... unless that leaves fewer than this many (tiny data): then every n-gram counts
MAX_VOCAB = 100_000  # the most frequent n-grams (by document frequency) when there are more
WORDS_PER_TOKEN = 8  # tfidf-mlp reads the first max_length * 8 words of a text: a bag of n-grams is cheap per word


def count_words(text: str) -> int:
    """Words as ngram_features sees them (a CJK character is a word)."""
    return len(_WORD.findall(text))


def build_ngram_vocab(texts: Sequence[str], lowercase: bool = True, max_words: int | None = None) -> dict[str, Any]:
    """The n-gram vocabulary of the training texts with smoothed IDF weights (as scikit-learn's TfidfVectorizer).

    Returns the JSON-safe dict stored in the model folder as ngrams.json: features (id 1 is the
    first; 0 is padding), idf, min_df, documents.
    """
    df: Counter[str] = Counter()
    for t in texts:
        df.update(set(ngram_features(t, lowercase, max_words)))
    min_df = MIN_DF if sum(c >= MIN_DF for c in df.values()) >= MIN_VOCAB else 1
    kept = sorted((f for f, c in df.items() if c >= min_df), key=lambda f: (-df[f], f))[:MAX_VOCAB]
    n = len(texts)
    return {"features": kept, "idf": [round(math.log((1 + n) / (1 + df[f])) + 1.0, 6) for f in kept],
            "min_df": min_df, "documents": n}


# --- the preprocessor ------------------------------------------------------------------------
class TextPreprocessor:
    """Turns raw strings into token ids (load) and batches of them into padded tensors (collate)."""

    task = "text"

    def __init__(self, kind: str, max_length: int = 128, lowercase: bool = True, tokenizer: Any = None,
                 source: str = "", buckets: int = 0, text_column: str = "text", label_column: str = "label",
                 ngrams: dict[str, Any] | None = None):
        if kind not in ("hf", "ngram-hash", "ngram-vocab"):
            raise DuoclassError(f"unknown text preprocessing {kind!r}; upgrade duoclass to load this model folder")
        if kind == "ngram-vocab" and ngrams is None:
            raise DuoclassError("ngram-vocab preprocessing needs its vocabulary (ngrams.json of the model folder)")
        self.kind, self.max_length, self.lowercase = kind, int(max_length), bool(lowercase)
        self.tokenizer, self.source, self.buckets = tokenizer, source, int(buckets)
        self.text_column, self.label_column = text_column, label_column
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer is not None else 0
        self.ngrams = ngrams
        if ngrams is not None:  # feature -> id (1-based; 0 pads) and the IDF of each id
            feats, idf = ngrams.get("features"), ngrams.get("idf")
            if not (isinstance(feats, list) and isinstance(idf, list) and len(feats) == len(idf)
                    and all(isinstance(f, str) for f in feats) and all(isinstance(x, (int, float)) for x in idf)):
                raise DuoclassError("the n-gram vocabulary needs equally long lists 'features' (strings) and 'idf' (numbers)")
            self.vocab = {f: i + 1 for i, f in enumerate(feats)}
            self.idf = torch.tensor([0.0] + idf, dtype=torch.float32)

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokenizer": self.kind, "source": self.source, "max_length": self.max_length,
                               "lowercase": self.lowercase, "text_column": self.text_column, "label_column": self.label_column,
                               "pad_id": self.pad_id}
        if self.kind == "hf":
            out["files"] = TOKENIZER_DIR + "/"
            out["vocab_size"] = len(self.tokenizer)
        elif self.kind == "ngram-hash":
            out.update(buckets=self.buckets, features="words, word bigrams, char 3/4-grams; crc32 hashed")
        else:
            out.update(files=NGRAM_FILE, vocab_size=len(self.vocab), min_df=self.ngrams["min_df"],  # type: ignore[index]
                       features="words, word bigrams, char 3/4-grams; weights: (1 + log tf) * idf, L2-normalised")
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any], folder: Path | None = None) -> "TextPreprocessor":
        tok, ngrams = None, None
        if cfg["tokenizer"] in ("hf", "ngram-vocab") and folder is None:
            raise DuoclassError("the tokenizer lives in the model folder; pass the folder to from_config")
        if cfg["tokenizer"] == "hf":
            tok = load_hf_tokenizer(Path(folder) / TOKENIZER_DIR)  # type: ignore[arg-type]
        elif cfg["tokenizer"] == "ngram-vocab":
            path = Path(folder) / NGRAM_FILE  # type: ignore[arg-type]
            try:
                ngrams = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(ngrams, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                raise DuoclassError(f"{path}: unreadable n-gram vocabulary ({e}); copy the model folder again") from None
        try:
            return cls(cfg["tokenizer"], cfg["max_length"], cfg.get("lowercase", True), tok, cfg.get("source", ""),
                       cfg.get("buckets", 0), cfg.get("text_column", "text"), cfg.get("label_column", "label"), ngrams)
        except DuoclassError as e:
            if ngrams is None:
                raise
            raise DuoclassError(f"{Path(folder) / NGRAM_FILE}: {e}; copy the model folder again") from None  # type: ignore[arg-type]

    def files(self) -> dict[str, bytes]:
        """Tokenizer files for the model folder, as {"tokenizer/NAME": bytes} (or {"ngrams.json": bytes})."""
        if self.ngrams is not None:
            return {NGRAM_FILE: json.dumps(self.ngrams, ensure_ascii=False).encode("utf-8")}
        if self.tokenizer is None:
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            return {f"{TOKENIZER_DIR}/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (no padding)."""
        if self.kind == "ngram-hash":
            return [ngram_ids(t, self.buckets, self.max_length * 4, self.lowercase) for t in texts]
        if self.kind == "ngram-vocab":  # ids of known n-grams, repeats kept (they are the term frequency)
            vocab, cap = self.vocab, self.max_length * WORDS_PER_TOKEN
            return [[i for i in (vocab.get(f, 0) for f in ngram_features(t, self.lowercase, cap)) if i] for t in texts]
        out: list[list[int]] = []
        for i in range(0, len(texts), 1024):
            out += self.tokenizer(list(texts[i : i + 1024]), truncation=True, max_length=self.max_length)["input_ids"]
        return out

    def load(self, text: Any) -> list[int]:
        if not isinstance(text, str):
            raise DuoclassError(f"cannot use {type(text).__name__} as text; pass a string")
        return self.encode([text])[0]

    def collate(self, items: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Pad to the longest example of the batch: input_ids and attention_mask, (B, L) long.

        ngram-vocab: each distinct n-gram once, plus `weights` (B, L) float: (1 + log tf) * idf, L2-normalised.
        """
        if self.kind == "ngram-vocab":
            return self._collate_tfidf(items)
        n = max([1] + [len(x) for x in items])
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for i, x in enumerate(items):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _collate_tfidf(self, items: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        counts = [Counter(x) for x in items]
        n = max([1] + [len(c) for c in counts])
        ids = torch.zeros((len(items), n), dtype=torch.long)
        weights = torch.zeros((len(items), n), dtype=torch.float32)
        for i, c in enumerate(counts):
            if not c:
                continue  # no known n-gram: an all-zero row (the model sees only its biases)
            k = torch.tensor(list(c.keys()), dtype=torch.long)
            w = (1.0 + torch.tensor(list(c.values()), dtype=torch.float32).log()) * self.idf[k]
            ids[i, : len(k)] = k
            weights[i, : len(k)] = w / w.norm().clamp_min(1e-12)
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "weights": weights}


class TextDataset(TorchDataset):
    """(token ids, label) pairs, encoded once and kept in memory (`cache`: no loader workers needed)."""

    def __init__(self, encoded: list[list[int]], labels: list[int]):
        self.cache, self.labels = encoded, labels

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.cache[i], self.labels[i]

    def lengths(self) -> list[int]:
        """Tokens per example, for length-bucketed batches."""
        return [len(x) for x in self.cache]


class LabelledCollate:
    """Engine collate: [(ids, label), ...] -> (padded inputs, labels)."""

    def __init__(self, pre: TextPreprocessor):
        self.pre = pre

    def __call__(self, items: list[tuple[list[int], int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.pre.collate([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


# --- preparing a training run ----------------------------------------------------------------
def _data_model_args(pre: TextPreprocessor, pooling: str) -> dict[str, Any]:
    """Model args of a vocabulary built from the training texts (tfidf-mlp's n-grams, a trained tokenizer)."""
    if pre.kind == "ngram-vocab":
        return {"vocab_size": len(pre.vocab) + 1, "pooling": pooling}
    return {"vocab_size": len(pre.tokenizer), "pad_token_id": pre.pad_id, "pooling": pooling}


def resumed_preprocessor(folder: Path, kind: str) -> TextPreprocessor | None:
    """The n-gram vocabulary or trained tokenizer an interrupted run saved in its model folder.

    A resumed run must keep it: the weights in state.pt index it, and rebuilding it from the data
    is not safe (the data may have changed, and WordPiece training is not repeatable across
    processes). None when the folder holds none (the run wrote no model folder, or one of another
    kind); the caller then builds one from the data. A damaged folder is an error, as on loading.
    """
    from .checkpoint import read_model_config

    if not (folder / "config.json").is_file():
        return None
    pcfg = read_model_config(folder)["preprocessing"]
    if pcfg.get("tokenizer") != ("ngram-vocab" if kind == "ngram-vocab" else "hf"):
        return None
    return TextPreprocessor.from_config(pcfg, folder)


def build_preprocessor(cfg: Any, train_texts: Sequence[str]) -> tuple[TextPreprocessor, dict[str, Any]]:
    """The preprocessor a model needs, and the model args that depend on it."""
    from .models.text_models import DEFAULT_BUCKETS, MAX_POSITIONS, hf_config_dict, load_hf_config, text_input_kind

    kind = text_input_kind(cfg.model)
    if kind in ("ngram-vocab", "trained") and getattr(cfg, "resume", None):
        pre = resumed_preprocessor(Path(cfg.resume) / "model", kind)
        if pre is not None:
            log.info("resume: keeping the %s saved in %s (not rebuilt from the data)",
                     "n-gram vocabulary" if kind == "ngram-vocab" else "trained tokenizer", Path(cfg.resume) / "model")
            return pre, _data_model_args(pre, cfg.pooling)
    if kind == "ngram-hash":
        pre = TextPreprocessor("ngram-hash", cfg.max_length, cfg.lowercase, buckets=DEFAULT_BUCKETS,
                               text_column=cfg.text_column, label_column=cfg.label_column)
        return pre, {"buckets": DEFAULT_BUCKETS, "pooling": cfg.pooling}
    if kind == "ngram-vocab":
        ngrams = build_ngram_vocab(train_texts, cfg.lowercase, cfg.max_length * WORDS_PER_TOKEN)
        pre = TextPreprocessor("ngram-vocab", cfg.max_length, cfg.lowercase, source=f"{len(ngrams['features'])} n-grams",
                               text_column=cfg.text_column, label_column=cfg.label_column, ngrams=ngrams)
        return pre, _data_model_args(pre, cfg.pooling)
    if kind == "trained":
        tok, how = train_tokenizer(train_texts, cfg.vocab_size, cfg.lowercase)
        pre = TextPreprocessor("hf", min(cfg.max_length, MAX_POSITIONS), cfg.lowercase, tok, how,
                               text_column=cfg.text_column, label_column=cfg.label_column)
        return pre, _data_model_args(pre, cfg.pooling)
    source = cfg.model[len("hf:"):]
    config = load_hf_config(source)
    tok = load_hf_tokenizer(source)
    limit = getattr(config, "max_position_embeddings", None) or cfg.max_length
    pre = TextPreprocessor("hf", min(cfg.max_length, limit), cfg.lowercase, tok, source,
                           text_column=cfg.text_column, label_column=cfg.label_column)
    return pre, {"hf_config": hf_config_dict(config), "pooling": cfg.pooling}


def prepare_text(cfg: Any) -> "TaskData":
    """Read, check, split and encode a text dataset for the engine."""
    from .data.splits import TaskData, label_ids, stratified_split

    splits, skipped, single = read_text_dataset(cfg.data, cfg.text_column, cfg.label_column)
    train = splits["train"]
    if not train:
        raise DuoclassError(f"{cfg.data}: every training row has empty text; nothing to train on")
    notes = []
    if single:
        keep, held = stratified_split([r.label for r in train], cfg.valid_fraction, cfg.seed)
        splits["test"] = [train[i] for i in held]
        train = [train[i] for i in keep]
        notes.append(f"one file: held out {len(held)} rows as test (stratified, seed {cfg.seed})")
    if not splits.get("valid"):
        keep, held = stratified_split([r.label for r in train], cfg.valid_fraction, cfg.seed + 1)
        splits["valid"] = [train[i] for i in held]
        train = [train[i] for i in keep]
        notes.append(f"no valid split: held out {len(held)} training rows (stratified, seed {cfg.seed + 1})")
    splits["train"] = train
    if not splits.get("test"):
        notes.append("no test split: the final test evaluation is skipped")
    if skipped:
        notes.append(f"skipped {len(skipped)} rows with empty text (listed in skipped.csv), e.g. {skipped[0].path}")
    if cfg.augment not in ("default", "none"):
        notes.append(f"--augment {cfg.augment}: image augmentation presets do not apply to text; ignored")
    classes = sorted({r.label for r in train})  # type: ignore[type-var]
    if len(classes) < 2:
        raise DuoclassError(f"{cfg.data}: the training data has only the class {classes[0]!r}; a classifier needs 2 or more")

    pre, model_args = build_preprocessor(cfg, [r.text for r in train])

    def build(split: str) -> TextDataset | None:
        recs = splits.get(split) or []
        if not recs:
            return None
        labels = label_ids([r.label for r in recs], classes, f"{recs[0].where.split(': line')[0]} ({split} split)")  # type: ignore[misc]
        return TextDataset(pre.encode([r.text for r in recs]), labels)

    train_ds, valid_ds, test_ds = build("train"), build("valid"), build("test")
    train_ds = augmented_training_set(cfg, [r.text for r in train], train_ds, pre, notes)  # type: ignore[arg-type]
    # Length buckets pay off for transformers, whose cost grows with the padded length. A bag of
    # n-grams gains little, and on small data whose length tracks the label (long texts = spam)
    # length-sorted batches of one class hurt it (measured: SMS spam slice, macro F1 0.92 -> 0.76).
    train_ds.bucket = pre.kind == "hf"  # type: ignore[union-attr]
    if valid_ds is None:
        raise DuoclassError(f"{cfg.data}: the valid split is empty; add rows to it or remove the file")
    lengths = sorted(train_ds.lengths())  # type: ignore[union-attr]
    if pre.kind == "hf":
        truncated, limit = sum(n >= pre.max_length for n in lengths), f"--max-length {pre.max_length} tokens"
    elif pre.kind == "ngram-vocab":
        cap = pre.max_length * WORDS_PER_TOKEN
        truncated, limit = sum(count_words(r.text) > cap for r in train), f"{cap} words (--max-length x {WORDS_PER_TOKEN})"
    else:
        truncated = 0
    notes.append(f"text: {pre.kind} ({pre.source or 'hashed n-grams'}), median {lengths[len(lengths) // 2]} "
                 f"{'features' if pre.kind.startswith('ngram') else 'tokens'}"
                 + (f", {truncated} training texts truncated to {limit}" if truncated else ""))
    return TaskData(
        task="text",
        classes=classes,
        train=train_ds,  # type: ignore[arg-type]
        valid=valid_ds,
        test=test_ds,
        collate=LabelledCollate(pre),
        preprocessor=pre,
        model_args=model_args,
        train_labels=list(train_ds.labels),  # type: ignore[union-attr]
        skipped=skipped,
        notes=notes,
        extra_files=pre.files(),
        augment=None,
    )


def augmented_training_set(cfg: Any, texts: list[str], ds: TextDataset, pre: TextPreprocessor, notes: list[str]) -> Any:
    """The training set with text augmentation (--text-augment and friends), or `ds` itself when it is off."""
    from .text_augment import (AugmentedTextDataset, TextAugment, TextAugmenter, back_translate, parse_back_translate,
                               resolve_text_augment, synonym_source)

    aug = resolve_text_augment(cfg)
    if aug == TextAugment():
        return ds
    synonyms = synonym_source(cfg.synonyms, texts, cfg.seed) if (aug.synonym or aug.insert) else None
    back = None
    if aug.back_translate:
        fwd, bwd = parse_back_translate(cfg.back_translate)
        back, counts = back_translate(texts, fwd, bwd, device=cfg.device, max_length=cfg.max_length)
        notes.append(f"back-translation: {counts['translated']} texts translated, {counts['cached']} from the cache, "
                     f"{counts['empty']} came back empty (kept as they are)")
    ops = ", ".join(f"{k} {v:g}" for k, v in dataclasses.asdict(aug).items() if v)
    notes.append(f"text augmentation ({cfg.text_augment} preset + overrides): {ops}"
                 + (f"; neighbours: {cfg.synonyms}" if synonyms is not None else ""))
    return AugmentedTextDataset(texts, ds.labels, pre.load, TextAugmenter(aug, synonyms), cfg.seed, ds.cache, back)


# --- prediction and evaluation inputs -------------------------------------------------------
def read_predict_inputs(path: str | Path, text_column: str = "text") -> tuple[list[str], list[str]]:
    """(ids, texts) of an unlabelled file, or of FOLDER/testa.csv; ids are 0-based row numbers without an id column."""
    p = Path(path)
    if p.is_dir():
        cands = [p / n for n in ("testa.csv", "testa.tsv", "testa.jsonl") if (p / n).is_file()]
        if not cands:
            raise DuoclassError(f"{p}: no testa.csv in the folder; pass the CSV/TSV/JSONL file to predict")
        p = cands[0]
    elif not p.is_file():
        raise DuoclassError(f"{p}: no such file or folder; pass a CSV/TSV/JSONL of texts or a folder with testa.csv")
    if p.suffix.lower() not in TEXT_EXTS:
        raise DuoclassError(f"{p}: unsupported text file type {p.suffix!r}; use .csv, .tsv or .jsonl")
    recs, _ = read_text_file(p, text_column, None, skip_empty=False)
    empty = sum(not r.text.strip() for r in recs)
    if empty:
        log.warning("%s: %d rows have empty text; they are predicted anyway", p, empty)
    ids = [r.id if r.id is not None else str(i) for i, r in enumerate(recs)]
    return ids, [r.text for r in recs]


def read_eval_split(data: str | Path, split: str, text_column: str, label_column: str) -> tuple[list[TextRecord], int, str]:
    """(records, skipped, where) of one labelled split: DATA/<split>.* of a folder, or all rows of one file."""
    p = Path(data)
    if p.is_dir():
        files = find_split_files(p)
        if split not in files:
            raise DuoclassError(f"{p}: no '{split}' split (found: {', '.join(sorted(files)) or 'none'}); pass --split NAME")
        f = files[split]
    elif p.is_file():
        f = p
        log.info("%s: one file, evaluating all of its rows", p)
    else:
        raise DuoclassError(f"{p}: no such file or folder")
    recs, skipped = read_text_file(f, text_column, label_column, split)
    return recs, len(skipped), str(f)
