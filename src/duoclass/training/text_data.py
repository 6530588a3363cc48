"""Text data, tokenizers and the text preprocessor: text becomes token ids for the shared engine.

    DATA/train.csv, DATA/valid.csv, DATA/test.csv   (.csv, .tsv or .jsonl; dev/val also name the valid split)
    DATA.csv                                          one file: split into train/valid/test (stratified, seeded)

Columns come from `--text-column` / `--label-column` (default text, label); an `id` column is
kept. CSVs may be UTF-8 (with or without BOM) or GBK/GB18030; quoted newlines are fine. A row
with empty text is skipped and counted (RUN_DIR/skipped.csv); an empty label, a duplicate id
or a missing column is an error naming the file and line.

Ways to turn text into ids, picked by the model's registry entry (models.input_kind):

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
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import Dataset as TorchDataset

from duoclass.data.text_files import read_text_dataset
from duoclass.errors import DuoclassError
from duoclass.preprocess.text import WORDS_PER_TOKEN, TextPreprocessor, build_ngram_vocab, cjk_share, count_words


if TYPE_CHECKING:
    from duoclass.data.splits import TaskData

log = logging.getLogger("duoclass")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# --- tokenizers ------------------------------------------------------------------------------
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

    from duoclass.models.text_models import transformers_module

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
    from duoclass.models.text_models import _hub_reachable, _offline_error, transformers_module

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


class TextDataset(TorchDataset):
    """(token ids, label) pairs, encoded once and kept in memory (`cache`: no loader workers needed)."""

    def __init__(self, encoded: list[list[int]], labels: list[int], texts: list[str] | None = None):
        self.cache, self.labels = encoded, labels
        self.texts = texts  # the raw texts, when kept (the report explains a few of them)

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
        batch = {k: torch.from_numpy(v) for k, v in self.pre.collate([x for x, _ in items]).items()}
        return batch, torch.tensor([y for _, y in items], dtype=torch.long)


# --- preparing a training run ----------------------------------------------------------------
def _data_model_args(pre: TextPreprocessor, pooling: str) -> dict[str, Any]:
    """Model args of a vocabulary built from the training texts (tfidf-mlp's n-grams, a trained tokenizer)."""
    if pre.kind == "ngram-vocab":
        return {"vocab_size": len(pre.vocab) + 1, "pooling": pooling}
    return {"vocab_size": pre.vocab_size(), "pad_token_id": pre.pad_id, "pooling": pooling}


def resumed_preprocessor(folder: Path, kind: str) -> TextPreprocessor | None:
    """The n-gram vocabulary or trained tokenizer an interrupted run saved in its model folder.

    A resumed run must keep it: the weights in state.pt index it, and rebuilding it from the data
    is not safe (the data may have changed, and WordPiece training is not repeatable across
    processes). None when the folder holds none (the run wrote no model folder, or one of another
    kind); the caller then builds one from the data. A damaged folder is an error, as on loading.
    """
    from duoclass.artifacts.folder import read_model_config, recover_model_folder

    if not recover_model_folder(folder):  # finishes a save interrupted between its two renames
        return None
    pcfg = read_model_config(folder)["preprocessing"]
    if pcfg.get("tokenizer") != ("ngram-vocab" if kind == "ngram-vocab" else "hf"):
        return None
    return TextPreprocessor.from_config(pcfg, folder)


def build_preprocessor(cfg: Any, train_texts: Sequence[str],
                       given: dict[str, Any] | None = None) -> tuple[TextPreprocessor, dict[str, Any]]:
    """The preprocessor a model needs, and the model args that depend on it.

    given: {"preprocessing": to_config(), "files": {name: bytes}, "model_args": ...} of a
    preprocessor built elsewhere (rank 0 under torchrun): loaded as from a model folder, not rebuilt.
    """
    from duoclass.models import input_kind
    from duoclass.models.text_models import DEFAULT_BUCKETS, MAX_POSITIONS, hf_config_dict, load_hf_config

    if given is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, blob in given["files"].items():
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise DuoclassError(f"preprocessor file {name!r}: expected a relative path inside the model folder")
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)
            pre = TextPreprocessor.from_config(given["preprocessing"], Path(tmp))
        return pre, dict(given["model_args"])
    kind = input_kind(cfg.model)  # the registry says what the model reads
    if kind in ("ngram-vocab", "trained-tokenizer") and getattr(cfg, "resume", None):
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
    if kind == "trained-tokenizer":
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


def prepare_text(cfg: Any, given: dict[str, Any] | None = None) -> "TaskData":
    """Read, check, split and encode a text dataset for the engine; `given`: see build_preprocessor."""
    from duoclass.data.splits import TaskData, apply_fold, class_order, label_ids, stratified_split

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
    if cfg.fold is not None:  # --folds: train and valid pooled, this fold's part is valid; test untouched
        train, splits["valid"] = apply_fold(cfg, train, splits["valid"], lambda r: r.label, "rows", notes)
    splits["train"] = train
    if not splits.get("test"):
        notes.append("no test split: the final test evaluation is skipped")
    if skipped:
        notes.append(f"skipped {len(skipped)} rows with empty text (listed in skipped.csv), e.g. {skipped[0].path}")
    if cfg.augment not in ("default", "none"):
        log.warning("--augment %s: image augmentation presets do not apply to text; ignored", cfg.augment)
    if cfg.image_size is not None:
        log.warning("--image-size %d: applies to images; ignored for text (--max-length sets the text length)", cfg.image_size)
    classes = class_order(r.label for r in train)  # type: ignore[arg-type]
    if len(classes) < 2:
        raise DuoclassError(f"{cfg.data}: the training data has only the class {classes[0]!r}; a classifier needs 2 or more")

    pre, model_args = build_preprocessor(cfg, [r.text for r in train], given)

    def build(split: str) -> TextDataset | None:
        recs = splits.get(split) or []
        if not recs:
            return None
        labels = label_ids([r.label for r in recs], classes, f"{recs[0].where.split(': line')[0]} ({split} split)")  # type: ignore[misc]
        return TextDataset(pre.encode([r.text for r in recs]), labels, [r.text for r in recs])

    train_ds, valid_ds, test_ds = build("train"), build("valid"), build("test")
    warn_unknown_tokens(pre, train_ds, cfg.model)  # type: ignore[arg-type]
    warn_shared_texts(splits)
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


UNKNOWN_TOKENS_WARN = 0.05  # share of [UNK] among the training tokens above which a tokenizer does not fit the data


def unknown_token_share(pre: TextPreprocessor, ids: Sequence[Sequence[int]]) -> float:
    """Share of the content tokens (special tokens left out) that the tokenizer maps to its unknown token."""
    if pre.kind != "hf" or pre.unk_id is None:
        return 0.0
    content = [i for row in ids for i in row if i == pre.unk_id or i not in pre.special_ids]  # [UNK] is special too
    return sum(i == pre.unk_id for i in content) / max(1, len(content))


def warn_unknown_tokens(pre: TextPreprocessor, train: Any, model: str) -> float:
    """Warn when the tokenizer does not cover the training texts (an English vocabulary on Chinese text maps
    most of it to [UNK], and the model then learns the class mix); returns the share."""
    share = unknown_token_share(pre, train.cache)
    if share > UNKNOWN_TOKENS_WARN:
        log.warning("%s: %.0f%% of the training tokens are unknown to its tokenizer ([UNK]); it cannot read this data. "
                    "Pick a model whose tokenizer covers the language, or albert-scratch-tiny / tfidf-mlp, which build "
                    "their vocabulary from your texts", model, 100 * share)
    return share


def warn_shared_texts(splits: dict[str, list[Any]]) -> dict[str, int]:
    """Warn when valid or test texts also stand verbatim in train (they overstate the figures); counts per split."""
    seen = {r.text.strip() for r in splits.get("train") or []}
    counts = {}
    for split in ("valid", "test"):
        recs = splits.get(split) or []
        shared = [r for r in recs if r.text.strip() in seen]
        counts[split] = len(shared)
        if shared:
            log.warning("%d of %d %s texts (%.1f%%) also stand verbatim in the training split (e.g. %s: %r); the %s "
                        "figures overstate how the model does on new texts: remove them from one of the splits",
                        len(shared), len(recs), split, 100 * len(shared) / len(recs), shared[0].where,
                        shared[0].text[:60], split)
    return counts


def augmented_training_set(cfg: Any, texts: list[str], ds: TextDataset, pre: TextPreprocessor, notes: list[str]) -> Any:
    """The training set with text augmentation (--text-augment and friends), or `ds` itself when it is off."""
    from duoclass.training.text_augment import AugmentedTextDataset, TextAugmenter, back_translate, synonym_source
    from duoclass.settings.augment import TextAugment, parse_back_translate, resolve_text_augment

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


