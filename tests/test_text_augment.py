"""Text augmentation: each operation's rate, words vs Chinese characters, pluggable synonym sources,
seeded determinism, train-only application, settings validation, and cached back-translation."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

import duoclass
from duoclass.settings.config import TrainConfig
from duoclass.errors import DuoclassError
from duoclass.settings.augment import TEXT_PRESETS, TextAugment, resolve_text_augment
from duoclass.training.text_augment import AugmentedTextDataset, EmbeddingNeighbours, TextAugmenter, back_translate, example_rng, join, units

from .test_text import FAST, make_toy, toy_rows

pytestmark = pytest.mark.timeout(120)

WORDS = [f"w{i}" for i in range(20)]
ZH = "这家酒店很好服务不错房间干净"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy(tmp_path_factory.mktemp("aug") / "toy", 120, 20)


class Fixed:
    """A synonym source that always answers the same list (the Protocol needs only `neighbours`)."""

    def __init__(self, words: list[str]):
        self.words = words

    def neighbours(self, token: str) -> list[str]:
        return self.words


# --- units ------------------------------------------------------------------------------------
def test_units_are_words_or_chinese_characters() -> None:
    assert units("the  movie, was great") == ["the", "movie,", "was", "great"]
    assert units(ZH[:4]) == list(ZH[:4])
    assert units("很好 excellent 电影") == ["很", "好", "excellent", "电", "影"]
    for text in ("the movie was great", ZH, "很好excellent电影a b"):  # no space next to a CJK character
        assert join(units(text)) == text


# --- each operation -----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_deletion_removes_tokens_at_the_given_rate(p: float) -> None:
    aug = TextAugmenter(TextAugment(delete=p))
    text = " ".join(WORDS)
    removed = [1 - len(units(aug(text, random.Random(i)))) / len(WORDS) for i in range(500)]
    assert abs(sum(removed) / len(removed) - p) < 0.02
    assert all(set(units(aug(text, random.Random(i)))) <= set(WORDS) for i in range(50))
    assert aug("alone", random.Random(0)) == "alone"  # one unit always survives


def test_swap_keeps_the_words_and_chinese_characters() -> None:
    aug = TextAugmenter(TextAugment(swap=0.3))
    text = " ".join(WORDS)
    outs = [aug(text, random.Random(i)) for i in range(50)]
    assert all(Counter(units(o)) == Counter(WORDS) for o in outs)
    assert sum(o != text for o in outs) > 40
    zh = [aug(ZH, random.Random(i)) for i in range(50)]
    assert all(sorted(o) == sorted(ZH) and " " not in o for o in zh)  # a permutation of the characters
    assert sum(o != ZH for o in zh) > 40


def test_insertion_and_synonyms_use_the_source() -> None:
    text = " ".join(WORDS)
    ins = TextAugmenter(TextAugment(insert=0.2), Fixed(["NEW"]))
    added = [Counter(units(ins(text, random.Random(i))))["NEW"] for i in range(300)]
    assert abs(sum(added) / len(added) - 0.2 * len(WORDS)) < 0.4
    # without neighbours an insertion copies a word of the text
    copy = TextAugmenter(TextAugment(insert=0.5), Fixed([]))
    out = units(copy(text, random.Random(0)))
    assert len(out) > len(WORDS) and set(out) <= set(WORDS)
    syn = TextAugmenter(TextAugment(synonym=1.0), Fixed(["S"]))
    assert syn(text, random.Random(0)) == " ".join(["S"] * len(WORDS))
    assert syn(ZH, random.Random(0)) == " ".join(["S"] * len(ZH))  # every character replaced
    with pytest.raises(DuoclassError, match="synonym source"):
        TextAugmenter(TextAugment(synonym=0.1), None)


def test_embedding_neighbours_from_cooccurrence() -> None:
    texts = ["the cat sat on the mat", "the dog sat on the rug", "a cat ate the fish", "a dog ate the bone"] * 20
    nb = EmbeddingNeighbours.fit(texts, seed=0)
    assert nb.neighbours("cat")[0] == "dog" and nb.neighbours("Dog")[0] == "cat"
    assert nb.neighbours("never-seen") == []
    assert "cat" not in nb.neighbours("cat")
    zh = EmbeddingNeighbours.fit(["我喜欢猫", "我喜欢狗", "猫很可爱", "狗很可爱"] * 20, seed=0)
    assert zh.neighbours("猫")[0] == "狗"  # character units for Chinese


def test_wordnet_missing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from duoclass.training.text_augment import synonym_source

    monkeypatch.setitem(sys.modules, "nltk", None)  # as if nltk were not installed
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with pytest.raises(DuoclassError, match=r"--synonyms wordnet needs nltk.*pip install nltk.*--synonyms embedding"):
        synonym_source("wordnet", ["a b c"])


# --- determinism ---------------------------------------------------------------------------------
def _dataset(seed: int) -> AugmentedTextDataset:
    texts = [" ".join(random.Random(i).sample(WORDS, 10)) for i in range(30)] + [ZH]
    aug = TextAugmenter(TEXT_PRESETS["default"], Fixed(["X", "Y"]))
    return AugmentedTextDataset(texts, [0] * len(texts), lambda t: [len(t)], aug, seed, [[0]] * len(texts))


def test_augmentation_is_seeded_by_seed_epoch_and_index() -> None:
    state = random.getstate()
    a, b, other = _dataset(0), _dataset(0), _dataset(1)
    first = [a.augmented(i) for i in range(len(a))]
    assert [b.augmented(i) for i in reversed(range(len(b)))][::-1] == first  # independent of the order
    assert [other.augmented(i) for i in range(len(other))] != first
    a.set_epoch(1)
    assert [a.augmented(i) for i in range(len(a))] != first
    a.set_epoch(0)
    assert [a.augmented(i) for i in range(len(a))] == first
    assert random.getstate() == state  # the global RNG is not used
    assert example_rng(0, 0, 5).random() == example_rng(0, 0, 5).random() != example_rng(0, 0, 6).random()


# --- settings ------------------------------------------------------------------------------------
def test_presets_and_overrides() -> None:
    assert resolve_text_augment(TrainConfig()) == TextAugment()  # off unless asked for
    cfg = TrainConfig(text_augment="default", text_delete=0.3, text_swap=0.0)
    aug = resolve_text_augment(cfg)
    assert (aug.delete, aug.swap, aug.insert, aug.synonym) == (0.3, 0.0, 0.1, 0.1)
    assert aug.back_translate == 0.0  # no models given: the preset's rate has nothing to act on
    cfg = TrainConfig(text_augment="light", back_translate="a,b")
    assert resolve_text_augment(cfg).back_translate == TEXT_PRESETS["light"].back_translate > 0


@pytest.mark.parametrize("kw, match", [
    (dict(text_augment="heavy"), "--text-augment: unknown preset 'heavy'"),
    (dict(text_delete=1.5), "--text-delete: got 1.5"),
    (dict(text_synonym=-0.1), "--text-synonym"),
    (dict(text_back_translate=0.5), "--text-back-translate: needs the translation models"),
    (dict(back_translate="only-one"), "--back-translate: got 'only-one'.*FORWARD_DIR,BACK_DIR"),
    (dict(synonyms="glove"), "--synonyms: got 'glove'"),
])
def test_bad_settings(kw: dict, match: str) -> None:
    with pytest.raises(DuoclassError, match=match):
        TrainConfig(**kw)


# --- in a run: train split only, deterministic ---------------------------------------------------
def test_only_the_training_split_is_augmented(toy: Path) -> None:
    from duoclass.training.run import resolve_settings
    from duoclass.training.text_data import TextDataset, prepare_text

    cfg = resolve_settings(TrainConfig(data=str(toy), model="fasttext", text_augment="default", seed=0))
    data = prepare_text(cfg)
    assert isinstance(data.train, AugmentedTextDataset)
    assert isinstance(data.valid, TextDataset) and isinstance(data.test, TextDataset)
    assert any("text augmentation (default preset" in n and "neighbours: embedding" in n for n in data.notes)
    changed = sum(data.train[i][0] != data.train.cache[i] for i in range(len(data.train)))
    assert changed > len(data.train) // 2
    assert data.train[3] == data.train[3]  # same epoch, same example: same ids
    assert data.valid[0][0] == data.preprocessor.load(_valid_text(toy, 0))  # valid: the text as it is


def _valid_text(toy: Path, i: int) -> str:
    import csv

    return list(csv.DictReader((toy / "valid.csv").open(encoding="utf-8")))[i]["text"]


def test_augmented_runs_are_reproducible(toy: Path, tmp_path: Path) -> None:
    def run(name: str, seed: int) -> list[float]:
        duoclass.train(toy, model="fasttext", epochs=2, output=str(tmp_path / name), text_augment="default",
                       deterministic=True, **dict(FAST, seed=seed))
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["train_loss"] for r in rows]

    first = run("a", 0)
    assert run("b", 0) == first
    assert "text_augment: default" in (tmp_path / "a" / "config.yaml").read_text()


# --- back-translation ------------------------------------------------------------------------------
def _tiny_seq2seq(folder: Path, words: list[str]) -> str:
    """A randomly initialised 1-layer T5 and a word-level tokenizer, saved like a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    import torch

    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def test_back_translation_is_cached(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from duoclass.training import text_augment

    monkeypatch.setenv("DUOCLASS_CACHE", str(tmp_path / "cache"))
    texts = [t for _, t, _ in toy_rows(12, "bt", 5)]
    words = " ".join(texts).split()
    fwd, back = _tiny_seq2seq(tmp_path / "fwd", words), _tiny_seq2seq(tmp_path / "back", words)
    out, counts = back_translate(texts, fwd, back, max_length=8)
    assert len(out) == len(texts) and all(o is None or isinstance(o, str) for o in out)
    assert counts["translated"] == len(set(texts)) and counts["cached"] == 0
    files = list((tmp_path / "cache" / "back-translation").glob("*.json"))
    assert len(files) == 1
    cache = json.loads(files[0].read_text(encoding="utf-8"))
    fr, br = str(Path(fwd).resolve()), str(Path(back).resolve())
    key = hashlib.sha256(json.dumps([texts[0], fr, br], ensure_ascii=False).encode()).hexdigest()
    assert key in cache and len(cache) == len(set(texts))

    # second run: every text comes from the cache, no model is loaded
    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(text_augment, "_load_seq2seq", no_model)
    again, counts = back_translate(texts, fwd, back, max_length=8)
    assert again == out and counts == {"cached": len(texts), "translated": 0, "empty": counts["empty"]}

    # through a run's settings: the training set carries the back-translations, the notes count them
    from duoclass.training.run import resolve_settings
    from duoclass.training.text_data import prepare_text

    monkeypatch.undo()
    monkeypatch.setenv("DUOCLASS_CACHE", str(tmp_path / "cache"))
    cfg = resolve_settings(TrainConfig(data=str(toy), model="fasttext", back_translate=f"{fwd},{back}",
                                       text_back_translate=1.0, max_length=8, device="cpu"))
    data = prepare_text(cfg)
    assert isinstance(data.train, AugmentedTextDataset) and len(data.train.back) == len(data.train)
    assert any(n.startswith("back-translation: ") for n in data.notes)
    i = next(i for i, b in enumerate(data.train.back) if b)  # p = 1: a translated example is always replaced
    assert data.train.augmented(i) == data.train.back[i]


def test_back_translate_needs_model_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUOCLASS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DuoclassError, match="not a Hugging Face model folder"):
        back_translate(["a text"], str(tmp_path / "missing"), str(tmp_path / "missing2"))
