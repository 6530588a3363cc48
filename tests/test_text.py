"""Text classification on the shared engine, fully offline: readers, tokenizers, every text model,
train -> model folder -> load -> predict, pretraining, and bad input through the CLI.

Toy task: a sentence of filler words plus one sentiment word; any working model separates it.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import duoclass
from duoclass.cli import commands as cli
from duoclass.errors import DuoclassError
from duoclass.models import available, count_params, create_model

from .conftest import run_cli, shared

pytestmark = pytest.mark.timeout(180)

TEXT_MODELS = [s.name for s in available("text")]
POS = "good great excellent lovely superb wonderful".split()
NEG = "bad awful terrible poor horrible dreadful".split()
FILLER = "the movie was film plot acting really quite a story".split()
FAST = dict(batch_size=16, progress=False, tensorboard=False, device="cpu", seed=0, explain_examples=0)


def toy_rows(n: int, prefix: str, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(5)] + [rng.choice(POS if y == "pos" else NEG)]
        rng.shuffle(words)
        rows.append((f"{prefix}-{i}", " ".join(words), y))
    return rows


def write_csv(path: Path, rows: list[tuple], header: tuple = ("id", "text", "label"), encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_toy(root: Path, n_train: int, n_eval: int) -> Path:
    """root/{train,valid,test}.csv of the toy task."""
    write_csv(root / "train.csv", toy_rows(n_train, "train", 0))
    write_csv(root / "valid.csv", toy_rows(n_eval, "valid", 1))
    write_csv(root / "test.csv", toy_rows(n_eval, "test", 2))
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy(tmp_path_factory.mktemp("text") / "toy", 160, 30)


@pytest.fixture(scope="module")
def albert(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> duoclass.Classifier:
    """albert-scratch-tiny with a WordPiece tokenizer trained inside the test."""
    out = tmp_path_factory.mktemp("albert")
    return duoclass.train(toy, model="albert-scratch-tiny", epochs=6, lr=1e-3, output=str(out), **FAST)


# --- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "attention"])
@pytest.mark.parametrize("name", TEXT_MODELS)
def test_text_model_contract(name: str, pooling: str) -> None:
    """Every text model: dict of input_ids/attention_mask in, (B, C) logits out; padding does not change them."""
    args = {"vocab_size": 120} if name.startswith(("albert", "tfidf")) else {"buckets": 1000}
    if name == "tfidf-mlp" and pooling == "attention":  # a bag of n-grams has no token states to pool
        with pytest.raises(DuoclassError, match="--pooling attention: tfidf-mlp"):
            create_model(name, num_classes=3, pooling=pooling, **args)
        return
    m = create_model(name, num_classes=3, pooling=pooling, **args).eval()
    ids = torch.tensor([[2, 17, 18, 19, 3], [2, 20, 3, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    if name == "tfidf-mlp":  # its preprocessor adds TF-IDF weights, 0 on padding
        batch["weights"] = torch.tensor([[0.5, 0.5, 0.5, 0.3, 0.4], [0.6, 0.8, 0.2, 0.0, 0.0]])
    out = m(batch)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # the second example alone (no padding) gives the same logits: the mask is honoured
    alone = m({k: v[1:, :3] for k, v in batch.items()})
    assert torch.allclose(out[1], alone[0], atol=1e-4)
    # rebuilding from the same args gives the same state dict keys and shapes (model folders rely on it)
    again = create_model(name, num_classes=3, pooling=pooling, **args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    if pooling == "attention":
        assert any(k.endswith("pool.score.weight") for k in m.state_dict())


def test_models_command_lists_text_presets(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    for name in TEXT_MODELS:
        assert rows[name]["task"] == "text"
        assert rows[name]["params"] == count_params(create_model(name, num_classes=2))


# --- train -> folder -> load -> predict ------------------------------------------------------
@pytest.mark.slow  # long: runs with `make test-slow`
def test_albert_train_save_load_predict(albert: duoclass.Classifier, toy: Path, tmp_path: Path) -> None:
    res = albert.result_
    assert res.test["accuracy"] >= 0.8
    folder = Path(res.model_dir)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["task"] == "text" and cfg["preprocessing"]["tokenizer"] == "hf"
    assert "tokenizer/tokenizer.json" in cfg["files"]  # tokenizer files are hashed with the weights
    clf = duoclass.load(folder, device="cpu")
    # predict() agrees with the engine's evaluation on the test split (short made-up phrases are
    # out of distribution for a tiny model trained for seconds, so they make a flaky check)
    test_rows = list(csv.DictReader((toy / "test.csv").open(encoding="utf-8")))
    labels = clf.predict([r["text"] for r in test_rows])
    acc = sum(p == r["label"] for p, r in zip(labels, test_rows)) / len(test_rows)
    assert acc == pytest.approx(res.test["accuracy"])
    assert clf.predict_proba("superb story").shape == (1, 2)
    assert clf.evaluate(toy, split="test")["accuracy"] == pytest.approx(res.test["accuracy"])

    # testa.csv in GBK with ids out of order and a quoted newline: ids and order are kept
    rows = [("z9", "a great\nmovie", ), ("a1", "an awful film"), ("m5", "这部电影很好 excellent")]
    write_csv(tmp_path / "in" / "testa.csv", rows, header=("id", "text"), encoding="gbk")
    out = tmp_path / "result.csv"
    r = run_cli("predict", str(folder), str(tmp_path / "in"), "--output", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [g["id"] for g in got] == ["z9", "a1", "m5"]
    assert list(got[0]) == ["id", "label", "probability", "error", "warning"]  # the same columns as images
    assert [g["label"] for g in got] == clf.predict([t for _, t in rows])  # the same model, row for row
    assert all(0.5 <= float(g["probability"]) <= 1 and not g["error"] for g in got)
    # --labels-only: just id,label (a competition submission)
    r = run_cli("predict", str(folder), str(tmp_path / "in"), "--output", str(out), "--labels-only", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert out.read_text(encoding="utf-8").splitlines()[0] == "id,label"

    # no id column: 0-based row numbers; --top-k adds probability and top_k
    from duoclass.infer.csv import predict_to_csv

    write_csv(tmp_path / "plain.csv", [("lovely acting",), ("dreadful story",)], header=("text",))
    predict_to_csv(clf, tmp_path / "plain.csv", tmp_path / "plain_out.csv", top_k=2)
    got = list(csv.DictReader((tmp_path / "plain_out.csv").open(encoding="utf-8")))
    assert [g["id"] for g in got] == ["0", "1"] and set(got[0]) == {"id", "label", "probability", "top_k", "error", "warning"}
    assert got[0]["top_k"].startswith(got[0]["label"] + ":")


def test_fasttext_learns_toy_task(toy: Path, tmp_path: Path) -> None:
    clf = duoclass.train(toy, model="fasttext", epochs=4, lr=1e-2, output=str(tmp_path / "ft"), **FAST)
    assert clf.result_.test["accuracy"] >= 0.8  # chance is 0.5
    assert clf.predict(["wonderful acting", "horrible movie"]) == ["pos", "neg"]


def test_tfidf_weights_match_scikit_learn() -> None:
    """ngram-vocab batches carry scikit-learn's sublinear, smoothed-IDF, L2-normalised TF-IDF of our n-grams."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from duoclass.preprocess.text import TextPreprocessor, build_ngram_vocab, ngram_features

    texts = [r[1] for r in toy_rows(40, "v", 5)] + ["这家酒店很好，很好，服务不错", "房间太小了"]
    ngrams = build_ngram_vocab(texts)
    assert ngrams["min_df"] == 1  # tiny data: fewer than 1000 n-grams occur twice, so all of them count
    pre = TextPreprocessor("ngram-vocab", ngrams=ngrams)
    vec = TfidfVectorizer(analyzer=ngram_features, sublinear_tf=True, lowercase=False)
    ref = vec.fit_transform(texts).toarray()
    col = vec.vocabulary_
    batch = pre.collate(pre.encode(texts[-3:]))
    assert set(batch) == {"input_ids", "attention_mask", "weights"}
    for row, (ids, w) in enumerate(zip(batch["input_ids"], batch["weights"])):
        got = {ngrams["features"][i - 1]: float(x) for i, x in zip(ids.tolist(), w.tolist()) if i}
        want = {f: float(ref[len(texts) - 3 + row, j]) for f, j in col.items() if ref[len(texts) - 3 + row, j]}
        assert got.keys() == want.keys()
        assert all(abs(got[f] - want[f]) < 1e-5 for f in want)
    # an unseen text: no known n-gram, an all-zero row, and the model still answers
    empty = pre.collate(pre.encode(["qqqq zzzz"]))
    assert isinstance(empty["weights"], np.ndarray)  # preprocessing makes numpy arrays, not tensors
    assert np.abs(empty["weights"]).sum() == 0


def test_tfidf_mlp_train_folder_load(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clf = duoclass.train(toy, model="tfidf-mlp", epochs=4, output=str(tmp_path / "tm"), **FAST)
    assert clf.result_.test["accuracy"] >= 0.8  # chance is 0.5
    # an empty text, and a text with no known n-gram, get a label flagged as a guess; a real text does not
    res = clf.predict_results(["", "qqqq zzzz", "a wonderful film"])
    assert [r.ok for r in res] == [True, True, True]
    assert "empty text" in res[0].warning and "vocabulary" in res[1].warning and res[2].warning is None
    folder = Path(clf.result_.model_dir)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["preprocessing"]["tokenizer"] == "ngram-vocab" and "ngrams.json" in cfg["files"]
    assert cfg["model"]["args"]["dropout"] == 0.5  # the model's own default when --dropout is not given
    assert "dropout: 0.5" in (tmp_path / "tm" / "config.yaml").read_text()
    # the folder alone (ngrams.json + weights) reproduces the training run's test score, which
    # the engine computed with the preprocessor built from the training data
    again = duoclass.load(folder, device="cpu")
    assert again.evaluate(toy, split="test")["accuracy"] == pytest.approx(clf.result_.test["accuracy"])
    assert again.predict(["wonderful acting", "horrible movie"]) == ["pos", "neg"]
    assert again.predict_proba(["qqqq unseen words"]).shape == (1, 2)  # no known n-gram: still an answer
    # the vocabulary is part of the model (hashed with the weights): a changed ngrams.json is a clear error
    out = ["--output", str(tmp_path / "o.csv")]
    (folder / "ngrams.json").write_text("{}", encoding="utf-8")
    line = _error_line(capsys, ["predict", str(folder), str(toy / "test.csv"), *out])
    assert "ngrams.json" in line and "checksum mismatch" in line
    # ... and a damaged one whose hash was updated too is still an error, not a traceback
    import hashlib

    from duoclass.artifacts.folder import config_digest

    for bad in ("[1, 2]", '{"features": ["w a"], "idf": []}', "not json"):
        (folder / "ngrams.json").write_text(bad, encoding="utf-8")
        cfg["files"]["ngrams.json"] = hashlib.sha256(bad.encode()).hexdigest()
        cfg["config_sha256"] = config_digest(cfg)  # a deliberate re-hash: only the contents can be wrong now
        (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        line = _error_line(capsys, ["predict", str(folder), str(toy / "test.csv"), *out])
        assert "ngrams.json" in line and "copy the model folder again" in line


def test_ngram_vocab_min_df_and_word_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from duoclass.preprocess import text as preprocess
    from duoclass.training.run import prepare, resolve_settings
    from duoclass.settings.config import TrainConfig

    texts = ["alpha beta gamma", "alpha beta delta", "epsilon zeta"]
    assert preprocess.build_ngram_vocab(texts)["min_df"] == 1  # under MIN_VOCAB n-grams occur twice: keep all
    monkeypatch.setattr(preprocess, "MIN_VOCAB", 2)
    v = preprocess.build_ngram_vocab(texts)  # "w alpha", "w beta", "b alpha beta" (and char n-grams) occur twice
    assert v["min_df"] == 2 and {"w alpha", "w beta", "b alpha beta"} <= set(v["features"])
    assert "w gamma" not in v["features"] and "w epsilon" not in v["features"]
    assert v["features"][0] == "c eta"  # most frequent first: in beta (twice) and zeta, 3 texts
    monkeypatch.undo()
    # the first --max-length x 8 words count; the run says how many training texts were cut
    assert preprocess.ngram_features("a b c", max_words=2) == ["w a", "w b", "b a b"]
    rows = [(f"r{i}", " ".join(["good" if i % 2 else "bad"] + ["word"] * (3 if i % 3 else 70)), "pos" if i % 2 else "neg")
            for i in range(30)]
    for split in ("train", "valid"):
        write_csv(tmp_path / "long" / f"{split}.csv", rows)
    data = prepare(resolve_settings(TrainConfig(data=str(tmp_path / "long"), model="tfidf-mlp", max_length=8)))
    assert any("10 training texts truncated to 64 words" in n for n in data.notes), data.notes
    # a head tfidf-mlp does not have is refused before any data is read or folder written
    line = _error_line(capsys, ["train", str(tmp_path / "long"), "--model", "tfidf-mlp", "--pooling", "attention",
                                "--output", str(tmp_path / "run")])
    assert "--pooling attention: tfidf-mlp" in line and not (tmp_path / "run").exists()


def test_dropout_default_per_model() -> None:
    from duoclass.training.run import resolve_settings
    from duoclass.settings.config import TrainConfig

    assert resolve_settings(TrainConfig(data="x", task="text", model="tfidf-mlp")).dropout == 0.5
    assert resolve_settings(TrainConfig(data="x", task="text", model="fasttext")).dropout == 0.1
    assert resolve_settings(TrainConfig(data="x", task="text", model="tfidf-mlp", dropout=0.2)).dropout == 0.2


def test_attention_pooling_trains(toy: Path, tmp_path: Path) -> None:
    clf = duoclass.train(toy, model="albert-scratch-tiny", pooling="attention", epochs=4, lr=1e-3,
                         output=str(tmp_path / "att"), **FAST)
    assert clf.config_["model"]["args"]["pooling"] == "attention"
    assert clf.result_.test["accuracy"] >= 0.8


def test_pretrain_then_finetune(toy: Path, tmp_path: Path) -> None:
    """Pretraining runs through the engine's loop (run files, validation, resume), then fine-tunes."""
    import csv as csv_

    from duoclass.settings.config import PretrainConfig
    from duoclass.training.pretrain import pretrain

    run = tmp_path / "mlm"
    settings = dict(corpus=str(toy / "train.csv"), output=str(run), batch_size=16, device="cpu", progress=False,
                    tensorboard=False)
    summary = pretrain(PretrainConfig(epochs=2, **settings))
    assert summary["held_out"] == 8 and summary["texts"] == 152  # 5% of the 160 texts measure the valid loss
    assert summary["steps"] == 2 * 10 and summary["valid_loss"] > 0
    assert {"config.yaml", "state.pt", "metrics.csv", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain.json"} <= {p.name for p in (run / "model").iterdir()}
    rows = list(csv_.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["valid_loss"]) > 0 for r in rows)
    # --resume continues from the saved state: only the third epoch runs
    again = pretrain(PretrainConfig(epochs=3, resume=str(run), **settings))
    rows = list(csv_.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and again["best_epoch"] >= 1
    # the run folder fine-tunes as --model (its model/ is the Hugging Face folder)
    clf = duoclass.train(toy, model=str(run), epochs=1, lr=1e-3, output=str(tmp_path / "ft"), **FAST)
    cfg = clf.config_
    assert cfg["model"]["name"] == f"hf:{run / 'model'}" and cfg["model"]["args"]["hf_config"]["model_type"] == "albert"
    # the model folder rebuilds offline even when the pretraining folder is gone
    import shutil

    shutil.rmtree(run)
    assert len(duoclass.load(clf.result_.model_dir, device="cpu").predict(["great", "bad"])) == 2


class _Saves:
    """Stands in for a transformers model or tokenizer: save_pretrained writes `files`, or fails at file `fail_at`."""

    def __init__(self, files: dict[str, bytes], fail_at: str | None = None):
        self.files, self.fail_at, self.folder = files, fail_at, None

    def save_pretrained(self, folder: str | Path, **kwargs: object) -> None:
        self.folder = Path(folder)
        for name, data in self.files.items():
            if name == self.fail_at:
                (self.folder / name).write_bytes(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
            (self.folder / name).write_bytes(data)


def test_pretrain_folder_write_interrupted_keeps_the_previous_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: a pretraining save whose writer fails part-way (save_pretrained raising with a file half written)
    leaves DIR/model exactly as the previous save left it and nothing beside it; the save writes into
    .model.duoclass-new, where artifacts.atomic's recovery looks, so a save that dies between the two renames of
    the swap (no atomic exchange) leaves the complete new folder to the next read, and the next save cleans up."""
    from duoclass.artifacts import atomic
    from duoclass.training.pretrain import _complete, _write_folder

    def files(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def version(k: int, fail_at: str | None = None) -> tuple[_Saves, _Saves, dict]:
        return (_Saves({"config.json": b'{"v": %d}' % k, "model.safetensors": b"weights %d" % k * 50}, fail_at),
                _Saves({"tokenizer.json": b'{"t": %d}' % k}), {"epoch": k})

    out = tmp_path / "mlm" / "model"
    _write_folder(out, *version(1))
    before = files(out)
    assert sorted(before) == ["config.json", "model.safetensors", "pretrain.json", "tokenizer.json"]
    assert json.loads(before["pretrain.json"]) == {"epoch": 1}

    model, tok, info = version(2, fail_at="model.safetensors")  # config.json written, the weights half, then the disk is full
    with pytest.raises(OSError, match="No space left on device"):
        _write_folder(out, model, tok, info)
    assert files(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert model.folder == out.parent / ".model.duoclass-new"

    class Killed(Exception):
        pass

    real_rename = atomic._rename

    def rename_then_die(src: Path, dst: Path) -> None:
        real_rename(src, dst)
        if Path(dst).name == ".model.duoclass-old":  # the old folder parked, the new one not yet in place
            raise Killed

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(atomic, "_rename", rename_then_die)
    with pytest.raises(Killed):
        _write_folder(out, *version(3))
    monkeypatch.undo()
    assert not out.exists()
    atomic.recover_folder(out, _complete)  # what the next read or save does first
    got = files(out)
    assert json.loads(got.pop("pretrain.json")) == {"epoch": 3}
    assert got == {"config.json": b'{"v": 3}', "model.safetensors": b"weights 3" * 50, "tokenizer.json": b'{"t": 3}'}
    _write_folder(out, *version(4))
    assert json.loads((out / "pretrain.json").read_text()) == {"epoch": 4}
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


# --- readers ---------------------------------------------------------------------------------
def test_single_file_jsonl_split_and_skipped_rows(tmp_path: Path) -> None:
    from duoclass.training.run import resolve_settings
    from duoclass.settings.config import TrainConfig
    from duoclass.training.text_data import prepare_text

    rows = toy_rows(60, "r", 3)
    lines = [json.dumps({"id": i, "text": t, "label": y}, ensure_ascii=False) for i, t, y in rows]
    lines.insert(5, json.dumps({"id": "empty-1", "text": "  ", "label": "pos"}))
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = resolve_settings(TrainConfig(data=str(tmp_path / "all.jsonl"), model="fasttext"))
    assert cfg.task == "text"
    data = prepare_text(cfg)
    assert len(data.train) + len(data.valid) + len(data.test) == 60
    assert len(data.skipped) == 1 and data.skipped[0].path.endswith("all.jsonl:6")
    assert any("held out" in n and "as test" in n for n in data.notes)
    assert any("skipped 1 rows with empty text" in n for n in data.notes)
    assert data.augment is None


def test_chinese_gets_a_character_tokenizer(tmp_path: Path) -> None:
    from duoclass.training.text_data import train_tokenizer

    tok, kind = train_tokenizer(["这家酒店很好，服务不错", "房间太小了，很吵"] * 20, vocab_size=200)
    assert kind == "trained-char"
    assert tok.convert_ids_to_tokens(tok("酒店很好")["input_ids"]) == ["[CLS]", "酒", "店", "很", "好", "[SEP]"]


def test_real_data_slice(tmp_path: Path) -> None:
    """fasttext on a slice of SMS spam (real, imbalanced): well above the majority-class rate."""
    src = shared("text/sms_spam")
    for split, n in (("train", 600), ("valid", 100), ("test", 200)):
        lines = (src / f"{split}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        head = list(csv.reader(lines))
        write_csv(tmp_path / "sms" / f"{split}.csv", head[1 : n + 1], header=tuple(head[0]))
    clf = duoclass.train(tmp_path / "sms", model="fasttext", epochs=3, lr=1e-2, output=str(tmp_path / "run"),
                         **dict(FAST, batch_size=32))
    test = clf.result_.test
    majority = max(s["support"] for s in test["per_class"].values()) / test["n"]
    assert test["accuracy"] > majority and test["f1_macro"] > 0.8


# --- bad input: one `error:` line, exit status 2, no traceback -------------------------------
def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and sum(x.startswith("error: ") for x in err.splitlines()) == 1
    return last


def test_bad_input_errors(albert: duoclass.Classifier, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = ["train", "--model", "fasttext", "--epochs", "1", "--no-progress", "--output", str(tmp_path / "run")]
    bad = tmp_path / "nocol"
    write_csv(bad / "train.csv", [("1", "good", "pos")], header=("id", "sentence", "label"))
    line = _error_line(capsys, [*train[:1], str(bad), *train[1:]])
    assert "train.csv" in line and "'text'" in line and "--text-column" in line

    dup = tmp_path / "dup"
    write_csv(dup / "train.csv", [("1", "good", "pos"), ("2", "bad", "neg"), ("1", "great", "pos")])
    line = _error_line(capsys, [*train[:1], str(dup), *train[1:]])
    assert "line 4" in line and "duplicate id '1'" in line and "line 2" in line

    nolabel = tmp_path / "nolabel"
    write_csv(nolabel / "train.csv", [("1", "good", "pos"), ("2", "bad", "")])
    line = _error_line(capsys, [*train[:1], str(nolabel), *train[1:]])
    assert "line 3" in line and "empty label" in line

    unseen = tmp_path / "unseen"
    write_csv(unseen / "test.csv", [("1", "good", "pos"), ("2", "meh", "neutral")])
    line = _error_line(capsys, ["evaluate", str(albert.result_.model_dir), str(unseen), "--device", "cpu"])
    assert "test.csv" in line and "'neutral'" in line and "never appears in the training data" in line


@pytest.mark.slow  # long: runs with `make test-slow`
def test_offline_hub_model_is_one_clear_error(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text data without --model means hf:albert-base-v2; offline that is one line naming the way out."""
    r = run_cli("train", str(toy), "--epochs", "1", "--output", str(tmp_path / "run"),
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "no-hub")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hf:albert-base-v2") and "download" in last and "--model albert-scratch-tiny" in last
    from duoclass.training.text_data import load_hf_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hub"))
    with pytest.raises(DuoclassError, match="albert-scratch-tiny"):
        load_hf_tokenizer("albert-base-v2")


def test_length_bucketed_batches() -> None:
    from duoclass.settings.config import TrainConfig
    from duoclass.training.batches import BucketBatchSampler, make_loader
    from duoclass.training.distributed import Dist
    from duoclass.training.text_data import TextDataset

    rnd = random.Random(0)
    lengths = [rnd.randint(1, 200) for _ in range(1003)]

    def batches(seed: int, drop_last: bool = False, rank: int = 0, world: int = 1, pool: int = 5) -> list[list[int]]:
        return list(BucketBatchSampler(lengths, 32, torch.Generator().manual_seed(seed), drop_last, rank, world, pool))

    b = batches(0)
    assert sorted(i for x in b for i in x) == list(range(1003))  # every example once, nothing lost
    assert len(b) == len(BucketBatchSampler(lengths, 32, torch.Generator(), False)) == 32
    assert sum(len(x) < 32 for x in b) == 1  # only one short batch
    assert b == batches(0) and b != batches(1)  # the order depends only on the generator's seed
    dropped = batches(0, drop_last=True)
    assert len(dropped) == 31 and all(len(x) == 32 for x in dropped)

    def padded(bs: list[list[int]]) -> int:
        return sum(len(x) * max(lengths[i] for i in x) for x in bs)

    plain = [list(range(i, min(i + 32, 1003))) for i in range(0, 1003, 32)]  # the data is already in random order
    assert padded(b) < 0.7 * padded(plain)  # buckets cut the padded tokens by far more than noise would
    # two processes: disjoint shards of equal size
    r0, r1 = batches(0, True, 0, 2), batches(0, True, 1, 2)
    assert len(r0) == len(r1) == 15 and not set(map(tuple, r0)) & set(map(tuple, r1))

    ds = TextDataset([[1] * n for n in lengths], [0] * len(lengths))
    assert not isinstance(make_loader(ds, TrainConfig(data="x"), list, True, 0, Dist(), 0).batch_sampler, BucketBatchSampler)
    ds.bucket = True  # what prepare_text sets for transformer models
    on = make_loader(ds, TrainConfig(data="x"), list, True, 0, Dist(), 0)
    off = make_loader(ds, TrainConfig(data="x", length_buckets=False), list, True, 0, Dist(), 0)
    assert isinstance(on.batch_sampler, BucketBatchSampler) and not isinstance(off.batch_sampler, BucketBatchSampler)
    assert len(on) == len(off) == 1003 // 64


def test_only_transformers_get_length_buckets(toy: Path) -> None:
    from duoclass.settings.config import TrainConfig
    from duoclass.training.run import prepare, resolve_settings

    def bucketed(model: str) -> bool:
        return prepare(resolve_settings(TrainConfig(data=str(toy), model=model))).train.bucket

    assert bucketed("albert-scratch-tiny") and not bucketed("fasttext") and not bucketed("tfidf-mlp")


@pytest.mark.parametrize("model", ["tfidf-mlp", "albert-scratch-tiny"])
def test_resume_keeps_the_saved_vocabulary(model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A resumed run reads the n-gram vocabulary / trained tokenizer from its model folder. Rebuilt
    from training data that changed meanwhile, it would no longer fit the weights in state.pt."""
    data, run = make_toy(tmp_path / "data", 60, 20), tmp_path / "run"
    args = dict(FAST, model=model, lr=1e-3, output=str(run))
    duoclass.train(data, epochs=1, **args)
    saved = {p.relative_to(run / "model"): p.read_bytes() for p in (run / "model").rglob("*")
             if p.is_file() and p.name in ("ngrams.json", "vocab.txt", "tokenizer.json")}
    assert saved
    # new words, in every training text: a vocabulary rebuilt from this data would be another size
    rows = [(i, f"{t} novel{k % 7} extra{k % 5}", y) for k, (i, t, y) in enumerate(toy_rows(60, "train", 0))]
    write_csv(data / "train.csv", rows)
    with caplog.at_level("INFO", logger="duoclass"):
        clf = duoclass.train(data, epochs=2, resume=str(run), **args)
    assert "resume: keeping the" in caplog.text
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    for rel, content in saved.items():  # the folder written after resuming holds the same vocabulary
        assert (run / "model" / rel).read_bytes() == content
    assert clf.predict(["good movie"])[0] in ("pos", "neg")
