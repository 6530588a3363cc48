"""Text preprocessing without torch: a text becomes token ids, a batch numpy arrays any backend runs.

    pre = TextPreprocessor.from_config(config["preprocessing"], folder)
    ids = pre.load("a text")                  # token ids (list of int)
    batch = pre.collate([ids, ...])           # {"input_ids": int64 (B, L), "attention_mask": int64 (B, L)[, "weights"]}

This module imports numpy, Pillow and (for tokenizer models) the `tokenizers` package only,
so a model exported to another runtime runs with the same preprocessing, and training,
evaluation and prediction all feed a model the same arrays. Image mean/std normalisation
is not done here: it lives inside the model, so every input stays in [0, 1] pixel space.

Text is turned into ids in one of three ways, the model's `input` kind (see models.ModelSpec):

    hf-tokenizer / trained-tokenizer   a Hugging Face `tokenizers` tokenizer (tokenizer/tokenizer.json)
    ngram-hash                          fasttext: hashed words, word bigrams and char 3/4-grams; no files
    ngram-vocab                         tfidf-mlp: the same n-grams, a vocabulary with IDF (ngrams.json);
                                        batches carry L2-normalised TF-IDF `weights`
"""
from __future__ import annotations

import json
import math
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from duoclass.errors import DuoclassError

# --- shared constants -----------------------------------------------------------------------
CJK_CLASS = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs: a Chinese character is a word
CJK = re.compile(f"[{CJK_CLASS}]")

TOKENIZER_DIR = "tokenizer"
NGRAM_FILE = "ngrams.json"
MIN_DF = 2  # an n-gram must occur in 2+ training texts to enter the vocabulary ...
MIN_VOCAB = 1000  # ... unless that leaves fewer than this many (tiny data): then every n-gram counts
MAX_VOCAB = 100_000  # the most frequent n-grams (by document frequency) when there are more
WORDS_PER_TOKEN = 8  # tfidf-mlp reads the first max_length * 8 words of a text: a bag of n-grams is cheap per word
HASH_FEATURES_PER_TOKEN = 4  # fasttext reads the first max_length * 4 n-grams


# --- text features --------------------------------------------------------------------------
def cjk_share(texts: Sequence[str], sample: int = 2000) -> float:
    """Share of CJK ideographs among the non-space characters of (a sample of) the texts."""
    step = max(1, len(texts) // sample)
    chars = "".join("".join(texts[::step]).split())
    return len(CJK.findall(chars)) / max(1, len(chars))


_WORD = re.compile(f"[{CJK_CLASS}]|[^\\W\\d_]+|\\d+|[^\\w\\s]")


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


def word_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) character spans of the words of `text` as ngram_features sees them (a CJK character, a run
    of letters or digits, one punctuation mark): the units leave-one-word-out occlusion removes."""
    return [m.span() for m in _WORD.finditer(text)]


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


def load_tokenizer_file(folder: Path) -> Any:
    """The `tokenizers` tokenizer of a model folder (tokenizer/tokenizer.json); no code from the folder runs."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DuoclassError("text models need the tokenizers package; install it with `pip install duoclass[text]`") from None
    path = Path(folder) / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception type)
        raise DuoclassError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]}); copy the model folder again") from None


# --- the text preprocessor ------------------------------------------------------------------
KINDS = ("hf", "ngram-hash", "ngram-vocab")


class TextPreprocessor:
    """Turns raw strings into token ids (load) and batches of them into padded arrays (collate).

    kind "hf" holds a `tokenizers.Tokenizer` (the fast tokenizer a Hugging Face model uses, or one
    trained on the data); truncation to max_length counts the special tokens, as transformers does.
    """

    task = "text"

    def __init__(self, kind: str, max_length: int = 128, lowercase: bool = True, tokenizer: Any = None,
                 source: str = "", buckets: int = 0, text_column: str = "text", label_column: str = "label",
                 ngrams: dict[str, Any] | None = None, pad_id: int | None = None, unk_id: int | None = None):
        if kind not in KINDS:
            raise DuoclassError(f"unknown text preprocessing {kind!r}; upgrade duoclass to load this model folder")
        if kind == "ngram-vocab" and ngrams is None:
            raise DuoclassError("ngram-vocab preprocessing needs its vocabulary (ngrams.json of the model folder)")
        if kind == "hf" and tokenizer is None:
            raise DuoclassError("hf preprocessing needs its tokenizer (tokenizer/tokenizer.json of the model folder)")
        self.kind, self.max_length, self.lowercase = kind, int(max_length), bool(lowercase)
        self.source, self.buckets = source, int(buckets)
        self.text_column, self.label_column = text_column, label_column
        self.ngrams = ngrams
        self.pad_id, self.unk_id, self.special_ids = 0, None, frozenset()
        if tokenizer is not None and hasattr(tokenizer, "backend_tokenizer"):  # a transformers fast tokenizer
            pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
            unk_id = tokenizer.unk_token_id if unk_id is None else unk_id
            tokenizer = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())  # a copy
        self.tokenizer = tokenizer
        if tokenizer is not None:
            if unk_id is None:
                unk_id = next((tokenizer.token_to_id(t) for t in ("[UNK]", "<unk>") if tokenizer.token_to_id(t) is not None), None)
            tokenizer.no_padding()
            tokenizer.enable_truncation(self.max_length)
            self.pad_id = int(pad_id) if pad_id is not None else int(tokenizer.token_to_id("[PAD]") or 0)
            self.unk_id = unk_id
            specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
            self.special_ids = frozenset(tokenizer.token_to_id(t) for t in specials)
        if ngrams is not None:  # feature -> id (1-based; 0 pads) and the IDF of each id
            feats, idf = ngrams.get("features"), ngrams.get("idf")
            if not (isinstance(feats, list) and isinstance(idf, list) and len(feats) == len(idf)
                    and all(isinstance(f, str) for f in feats) and all(isinstance(x, (int, float)) for x in idf)):
                raise DuoclassError("the n-gram vocabulary needs equally long lists 'features' (strings) and 'idf' (numbers)")
            self.vocab = {f: i + 1 for i, f in enumerate(feats)}
            self.idf = np.asarray([0.0] + idf, dtype=np.float32)

    def __repr__(self) -> str:
        return f"TextPreprocessor(kind={self.kind!r}, max_length={self.max_length}, vocab={self.vocab_size()})"

    def vocab_size(self) -> int:
        if self.kind == "hf":
            return int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        if self.kind == "ngram-vocab":
            return len(self.vocab)
        return self.buckets

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokenizer": self.kind, "source": self.source, "max_length": self.max_length,
                               "lowercase": self.lowercase, "text_column": self.text_column, "label_column": self.label_column,
                               "pad_id": self.pad_id}
        if self.kind == "hf":
            out.update(files=TOKENIZER_DIR + "/", vocab_size=self.vocab_size(), unk_id=self.unk_id)
        elif self.kind == "ngram-hash":
            out.update(buckets=self.buckets, features="words, word bigrams, char 3/4-grams; crc32 hashed")
        else:
            out.update(files=NGRAM_FILE, vocab_size=len(self.vocab), min_df=self.ngrams["min_df"],  # type: ignore[index]
                       features="words, word bigrams, char 3/4-grams; weights: (1 + log tf) * idf, L2-normalised")
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any], folder: Path | None = None) -> "TextPreprocessor":
        tok, ngrams = None, None
        kind = cfg.get("tokenizer")
        if kind in ("hf", "ngram-vocab") and folder is None:
            raise DuoclassError("the tokenizer lives in the model folder; pass the folder to from_config")
        if kind == "hf":
            tok = load_tokenizer_file(Path(folder) / TOKENIZER_DIR)  # type: ignore[arg-type]
        elif kind == "ngram-vocab":
            path = Path(folder) / NGRAM_FILE  # type: ignore[arg-type]
            try:
                ngrams = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(ngrams, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                raise DuoclassError(f"{path}: unreadable n-gram vocabulary ({e}); copy the model folder again") from None
        try:
            return cls(kind, cfg["max_length"], cfg.get("lowercase", True), tok, cfg.get("source", ""),
                       cfg.get("buckets", 0), cfg.get("text_column", "text"), cfg.get("label_column", "label"), ngrams,
                       cfg.get("pad_id"), cfg.get("unk_id"))
        except DuoclassError as e:
            if ngrams is None:
                raise
            raise DuoclassError(f"{Path(folder) / NGRAM_FILE}: {e}; copy the model folder again") from None  # type: ignore[arg-type]

    def inputs(self) -> dict[str, dict[str, Any]]:
        """The model's input tensors: name -> dtype and shape ("batch", "sequence" are dynamic axes)."""
        out = {"input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
               "attention_mask": {"dtype": "int64", "shape": ["batch", "sequence"]}}
        if self.kind == "ngram-vocab":
            out["weights"] = {"dtype": "float32", "shape": ["batch", "sequence"]}
        return out

    def files(self) -> dict[str, bytes]:
        """Tokenizer files for the model folder, as {"tokenizer/tokenizer.json": bytes} (or {"ngrams.json": bytes})."""
        if self.ngrams is not None:
            return {NGRAM_FILE: json.dumps(self.ngrams, ensure_ascii=False).encode("utf-8")}
        if self.tokenizer is None:
            return {}
        return {f"{TOKENIZER_DIR}/tokenizer.json": self.tokenizer.to_str().encode("utf-8")}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (no padding)."""
        if self.kind == "ngram-hash":
            cap = self.max_length * HASH_FEATURES_PER_TOKEN
            return [ngram_ids(t, self.buckets, cap, self.lowercase) for t in texts]
        if self.kind == "ngram-vocab":  # ids of known n-grams, repeats kept (they are the term frequency)
            vocab, cap = self.vocab, self.max_length * WORDS_PER_TOKEN
            return [[i for i in (vocab.get(f, 0) for f in ngram_features(t, self.lowercase, cap)) if i] for t in texts]
        out: list[list[int]] = []
        for i in range(0, len(texts), 1024):
            out += [e.ids for e in self.tokenizer.encode_batch(list(texts[i : i + 1024]))]
        return out

    def load(self, text: Any) -> list[int]:
        if not isinstance(text, str):
            raise DuoclassError(f"cannot use {type(text).__name__} as text; pass a string")
        return self.encode([text])[0]

    def warning(self, text: str, ids: list[int]) -> str | None:
        """Why a prediction for this text is a guess, or None: empty text, or no token the model knows."""
        if not text.strip():
            return "empty text: the label reflects only the model's bias"
        if self.kind == "hf":
            content = [i for i in ids if i not in self.special_ids]
            if not content or (self.unk_id is not None and all(i == self.unk_id for i in content)):
                return "no token of this text is in the model's vocabulary: the label is a guess"
        elif self.kind == "ngram-vocab" and not ids:
            return "no word or n-gram of this text is in the model's vocabulary: the label is a guess"
        return None

    def collate(self, items: Sequence[list[int]]) -> dict[str, np.ndarray]:
        """Pad to the longest example of the batch: input_ids and attention_mask, int64 (B, L).

        ngram-vocab: each distinct n-gram once, plus `weights` float32 (B, L): (1 + log tf) * idf, L2-normalised.
        """
        if self.kind == "ngram-vocab":
            return self._collate_tfidf(items)
        n = max([1] + [len(x) for x in items])
        ids = np.full((len(items), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), n), dtype=np.int64)
        for i, x in enumerate(items):
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _collate_tfidf(self, items: Sequence[list[int]]) -> dict[str, np.ndarray]:
        counts = [Counter(x) for x in items]
        n = max([1] + [len(c) for c in counts])
        ids = np.zeros((len(items), n), dtype=np.int64)
        weights = np.zeros((len(items), n), dtype=np.float32)
        for i, c in enumerate(counts):
            if not c:
                continue  # no known n-gram: an all-zero row (the model sees only its biases)
            k = np.fromiter(c.keys(), dtype=np.int64, count=len(c))
            w = (1.0 + np.log(np.fromiter(c.values(), dtype=np.float32, count=len(c)))) * self.idf[k]
            ids[i, : len(k)] = k
            weights[i, : len(k)] = w / max(float(np.sqrt(np.sum(w * w))), 1e-12)
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "weights": weights}
