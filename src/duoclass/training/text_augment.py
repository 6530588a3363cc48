"""Text augmentation for training: EDA-style edits and back-translation, per example, on the raw string.

    duoclass train data/ --model fasttext --text-augment default
    duoclass train data/ --model fasttext --text-delete 0.1 --text-swap 0.05 --synonyms wordnet
    duoclass train data/ --model albert-scratch-tiny --back-translate models/en-de,models/de-en

Only the training split is augmented; valid and test texts are never touched. An example is cut
into *units*: words for space-separated text, single characters for Chinese (CJK ideographs, the
same test as preprocess.CJK), so one code path serves both. Every operation has its own rate:

    delete      each unit is dropped with this probability (one unit always survives)
    insert      for each unit, with this probability, a neighbour of a random unit is inserted
                at a random position (the unit itself when it has no neighbours)
    swap        each unit is, with this probability, swapped with a random other unit
    synonym     each unit is, with this probability, replaced by one of its neighbours
    back_translate  the whole example is, with this probability, replaced by its back-translation

Neighbours come from a `SynonymSource` (anything with `neighbours(token) -> list[str]`):
WordNet (`--synonyms wordnet`, needs nltk and its corpus) or, the offline default, the nearest
neighbours in a word-vector space built once before training from the training texts
(co-occurrence counts in a +-2 window -> PPMI -> truncated SVD -> cosine top-k). These vectors
come from co-occurrence, not from the model being trained.

Randomness: each example draws from `random.Random` seeded by (seed, epoch, example index), so a
run is reproducible, a resumed run sees the same augmentations, and global RNG state is untouched.

Back-translation runs once over the training texts before training (a forward and a backward
Hugging Face seq2seq folder, greedy decoding) and is cached in
$DUOCLASS_CACHE/back-translation/ (default ~/.cache/duoclass), keyed by the SHA-256 of the text
and the two model folders; a second run with the same data and models translates nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Protocol, Sequence

from duoclass.errors import DuoclassError
from duoclass.preprocess.text import CJK, CJK_CLASS
from duoclass.settings.augment import TextAugment

log = logging.getLogger("duoclass")

# A CJK ideograph is a unit on its own; anything else is cut at whitespace (and at CJK ideographs).
_UNIT = re.compile(rf"[{CJK_CLASS}]|[^\s{CJK_CLASS}]+")
_IS_CJK = CJK


# --- units ------------------------------------------------------------------------------------
def units(text: str) -> list[str]:
    """Words of space-separated text; single characters of Chinese (mixed text: both)."""
    return _UNIT.findall(text)


def join(tokens: Sequence[str]) -> str:
    """Inverse of `units`: a space between two non-CJK units, nothing next to a CJK ideograph."""
    out: list[str] = []
    for i, t in enumerate(tokens):
        if i and not (_IS_CJK.match(t) or _IS_CJK.match(tokens[i - 1])):
            out.append(" ")
        out.append(t)
    return "".join(out)


# --- synonym sources --------------------------------------------------------------------------
class SynonymSource(Protocol):
    def neighbours(self, token: str) -> list[str]: ...


class WordNetSynonyms:
    """English synonyms from WordNet (nltk). Tokens are looked up lowercased, without edge punctuation."""

    def __init__(self) -> None:
        try:
            from nltk.corpus import wordnet
        except ImportError:
            raise DuoclassError("--synonyms wordnet needs nltk: `pip install nltk`, then "
                                "`python -m nltk.downloader wordnet`; or use --synonyms embedding (offline)") from None
        try:
            wordnet.ensure_loaded()
        except LookupError:
            raise DuoclassError("--synonyms wordnet: nltk is installed but its WordNet corpus is not; run "
                                "`python -m nltk.downloader wordnet`, or use --synonyms embedding (offline)") from None
        self.wordnet = wordnet
        self._cache: dict[str, list[str]] = {}

    def neighbours(self, token: str) -> list[str]:
        key = token.lower().strip(".,!?;:\"'()[]")
        if key not in self._cache:
            names = {lemma.name().replace("_", " ") for s in self.wordnet.synsets(key) for lemma in s.lemmas()}
            self._cache[key] = sorted(n for n in names if n.lower() != key)
        return self._cache[key]


class EmbeddingNeighbours:
    """Nearest neighbours in a word-vector space computed from co-occurrence in the given texts.

    Counts of (unit, context unit) pairs within +-`window`, positive PMI with context smoothing
    (counts ** 0.75), truncated SVD to `dim` dimensions (U * sqrt(S)), unit-length rows; a
    token's neighbours are the `k` most cosine-similar vocabulary entries. Only units seen at
    least `min_count` times (at most `max_vocab` of them) have vectors; others get no neighbours.
    """

    def __init__(self, vocab: list[str], vectors: Any, k: int = 10):
        self.index = {w: i for i, w in enumerate(vocab)}
        self.vocab, self.vectors, self.k = vocab, vectors, k  # vectors: (V, dim) float32, unit rows
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def fit(cls, texts: Sequence[str], dim: int = 64, window: int = 2, k: int = 10, min_count: int = 2,
            max_vocab: int = 20_000, seed: int = 0) -> "EmbeddingNeighbours":
        import numpy as np
        from scipy import sparse
        from sklearn.utils.extmath import randomized_svd

        docs = [[u.lower() for u in units(t)] for t in texts]
        counts = Counter(u for d in docs for u in d)
        vocab = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))[:max_vocab]
        if len(vocab) < 3:
            return cls(vocab, np.zeros((len(vocab), 1), dtype=np.float32), k)
        index = {w: i for i, w in enumerate(vocab)}
        rows, cols = [], []
        for d in docs:
            ids = [index.get(u, -1) for u in d]
            for off in range(1, window + 1):
                for a, b in zip(ids, ids[off:]):
                    if a >= 0 and b >= 0:
                        rows += (a, b)
                        cols += (b, a)
        n = len(vocab)
        c = sparse.coo_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(n, n)).tocsr()
        c.sum_duplicates()
        # PPMI: log(p(w, c) / (p(w) p_0.75(c))), negatives clipped to 0
        total = c.sum()
        pw = np.asarray(c.sum(axis=1)).ravel() / max(total, 1)
        pc = np.asarray(c.sum(axis=0)).ravel() ** 0.75
        pc = pc / max(pc.sum(), 1e-12)
        coo = c.tocoo()
        pmi = np.log((coo.data / total) / (pw[coo.row] * pc[coo.col]))
        keep = pmi > 0
        m = sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))
        r = max(1, min(dim, n - 1))
        u, s, _ = randomized_svd(m, n_components=r, random_state=seed)
        vec = (u * np.sqrt(s)).astype(np.float32)  # (V, r)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True).clip(min=1e-8)
        return cls(vocab, vec, k)

    def neighbours(self, token: str) -> list[str]:
        key = token.lower()
        if key not in self._cache:
            i = self.index.get(key)
            if i is None or self.vectors.shape[1] < 2:
                self._cache[key] = []
            else:
                sims = self.vectors @ self.vectors[i]  # (V,) cosine similarities
                sims[i] = -2.0
                top = sims.argsort()[::-1][: self.k]
                self._cache[key] = [self.vocab[j] for j in top if sims[j] > 0]
        return self._cache[key]


def synonym_source(name: str, texts: Sequence[str], seed: int = 0) -> SynonymSource:
    """'wordnet' or 'embedding' (co-occurrence neighbours of `texts`)."""
    if name == "wordnet":
        return WordNetSynonyms()
    if name == "embedding":
        return EmbeddingNeighbours.fit(texts, seed=seed)
    raise DuoclassError(f"--synonyms: got {name!r}; choose one of: embedding, wordnet")


# --- the augmenter ----------------------------------------------------------------------------
class TextAugmenter:
    """Applies the operations of a `TextAugment` to one string with a given random.Random."""

    def __init__(self, aug: TextAugment, synonyms: SynonymSource | None = None):
        if aug.synonym and synonyms is None:
            raise DuoclassError("synonym replacement needs a synonym source (see synonym_source)")
        self.aug, self.synonyms = aug, synonyms

    def __bool__(self) -> bool:
        return self.aug != TextAugment()

    def _neighbours(self, token: str) -> list[str]:
        return self.synonyms.neighbours(token) if self.synonyms is not None else []

    def __call__(self, text: str, rng: random.Random, back_translation: str | None = None) -> str:
        a = self.aug
        if a.back_translate and back_translation and rng.random() < a.back_translate:
            text = back_translation
        toks = units(text)
        if not toks or not (a.delete or a.insert or a.swap or a.synonym):
            return text
        if a.synonym:
            for i, t in enumerate(toks):
                if rng.random() < a.synonym:
                    nb = self._neighbours(t)
                    if nb:
                        toks[i] = rng.choice(nb)
        if a.insert:
            n = sum(rng.random() < a.insert for _ in range(len(toks)))
            for _ in range(n):
                src = rng.choice(toks)
                nb = self._neighbours(src)
                toks.insert(rng.randrange(len(toks) + 1), rng.choice(nb) if nb else src)
        if a.swap and len(toks) > 1:
            for i in range(len(toks)):
                if rng.random() < a.swap:
                    j = rng.randrange(len(toks) - 1)
                    j += j >= i  # another position
                    toks[i], toks[j] = toks[j], toks[i]
        if a.delete:
            kept = [t for t in toks if rng.random() >= a.delete]
            toks = kept or [rng.choice(toks)]
        return join(toks)


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one example in one epoch: independent of data order, workers and global state."""
    return random.Random(f"duoclass-text-augment:{seed}:{epoch}:{index}")  # str seeds hash with SHA-512


def cache_dir() -> Path:
    return Path(os.environ.get("DUOCLASS_CACHE", "~/.cache/duoclass")).expanduser() / "back-translation"


def _key(text: str, fwd: str, back: str) -> str:
    return hashlib.sha256(json.dumps([text, fwd, back], ensure_ascii=False).encode("utf-8")).hexdigest()


def _load_seq2seq(folder: str, device: Any) -> tuple[Any, Any]:
    from duoclass.models.text_models import transformers_module

    tf = transformers_module()
    p = Path(folder)
    if not (p / "config.json").is_file():
        raise DuoclassError(f"--back-translate: {p} is not a Hugging Face model folder (no config.json); "
                            "pass local seq2seq folders such as Helsinki-NLP/opus-mt-* saved with save_pretrained")
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        model = tf.AutoModelForSeq2SeqLM.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DuoclassError(f"--back-translate: {p}: cannot load a seq2seq model and its tokenizer "
                            f"({str(e).splitlines()[0]})") from None
    return tok, model.to(device).eval()


def _translate(texts: list[str], tok: Any, model: Any, device: Any, batch_size: int, max_length: int) -> list[str]:
    import torch

    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_length, num_beams=1, do_sample=False)
        out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


def back_translate(texts: Sequence[str], fwd_dir: str, back_dir: str, device: str = "cpu", batch_size: int = 32,
                   max_length: int = 128) -> tuple[list[str | None], dict[str, int]]:
    """Back-translations of `texts` (None where the round trip came back empty), and counts.

    Texts already in the cache are not translated again; new results are added to the cache
    file with an atomic write. Counts: {"cached": ..., "translated": ..., "empty": ...}.
    """
    from duoclass.artifacts.atomic import atomic_write_json
    from duoclass.infer.torch_backend import pick_device

    fwd, back = str(Path(fwd_dir).resolve()), str(Path(back_dir).resolve())
    path = cache_dir() / (hashlib.sha256(f"{fwd}\n{back}".encode()).hexdigest()[:16] + ".json")
    cache: dict[str, str] = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s: unreadable back-translation cache; translating again", path)
    keys = [_key(t, fwd, back) for t in texts]
    todo = sorted({t for t, k in zip(texts, keys) if k not in cache})
    counts = {"cached": len(texts) - sum(k not in cache for k in keys), "translated": len(todo), "empty": 0}
    if todo:
        dev = pick_device(device)
        log.info("back-translating %d training texts through %s and %s", len(todo), fwd_dir, back_dir)
        tok, model = _load_seq2seq(fwd_dir, dev)
        middle = _translate(todo, tok, model, dev, batch_size, max_length)
        del model
        tok, model = _load_seq2seq(back_dir, dev)
        round_trip = _translate(middle, tok, model, dev, batch_size, max_length)
        for t, r in zip(todo, round_trip):
            cache[_key(t, fwd, back)] = r.strip()
        atomic_write_json(path, cache)
    out: list[str | None] = []
    for k in keys:
        r = cache[k]
        counts["empty"] += not r
        out.append(r or None)
    return out, counts


# --- the training dataset ---------------------------------------------------------------------
class AugmentedTextDataset:
    """Training texts, augmented per example and epoch, then encoded; (token ids, label) pairs.

    `cache` holds the ids of the unaugmented texts (used when an example comes out unchanged,
    and for statistics); the engine calls `set_epoch` before each epoch.
    """

    def __init__(self, texts: list[str], labels: list[int], encode: Any, augmenter: TextAugmenter, seed: int,
                 cache: list[list[int]], back_translations: list[str | None] | None = None):
        self.texts, self.labels, self.encode, self.augmenter = texts, labels, encode, augmenter
        self.seed, self.cache, self.back = seed, cache, back_translations
        self.epoch = 0

    def lengths(self) -> list[int]:
        """Tokens per unaugmented example (augmented ones are close), for length-bucketed batches."""
        return [len(x) for x in self.cache]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.texts)

    def augmented(self, i: int) -> str:
        back = self.back[i] if self.back is not None else None
        return self.augmenter(self.texts[i], example_rng(self.seed, self.epoch, i), back)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        text = self.augmented(i)
        return (self.cache[i] if text == self.texts[i] else self.encode(text)), self.labels[i]
