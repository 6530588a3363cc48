"""duoclass text models exported as transformers folders: used with transformers alone, they give
duoclass's token ids and labels; models without a transformers equivalent are refused.

Toy task of test_text.py (filler words plus one sentiment word); albert-scratch-tiny learns it in seconds.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import duoclass
from duoclass.errors import DuoclassError
from duoclass.compress.transformers import EXPORT_FILE, export_transformers

from .test_text import FAST, make_toy, toy_rows, write_csv

pytestmark = pytest.mark.timeout(180)

MAX_LENGTH = 16  # short, so that ordinary texts are cut
LONG = " ".join(["the plot was really good but the acting was quite awful"] * 6)  # far more than 16 tokens
TESTA = [  # id, text: held-out toy texts, made-up phrases, a text longer than max_length
    *[(f"t{i}", text) for i, (_, text, _) in enumerate(toy_rows(24, "x", 7))],
    ("made-1", "a wonderful story"), ("made-2", "dreadful acting, poor plot"), ("made-3", "unseenword zzz"),
    ("long", LONG), ("empty", ""),
]

# Written against transformers only: the way someone without duoclass uses the exported folder.
SCRIPT = """
import csv, sys
import torch
from transformers import AlbertForSequenceClassification, AutoTokenizer

folder, inputs, output = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(folder)
model = AlbertForSequenceClassification.from_pretrained(folder).eval()
with open(inputs, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
with open(output, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["id", "label"])
    for row in rows:
        with torch.inference_mode():
            logits = model(**tok(row["text"], truncation=True, return_tensors="pt")).logits
        w.writerow([row["id"], model.config.id2label[int(logits.argmax(-1))]])
assert not any(m.split(".")[0] == "duoclass" for m in sys.modules), "the script must not need duoclass"
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy(tmp_path_factory.mktemp("text") / "toy", 160, 30)


@pytest.fixture(scope="module")
def albert_dir(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("albert")
    clf = duoclass.train(toy, model="albert-scratch-tiny", epochs=6, lr=1e-3, max_length=MAX_LENGTH, output=str(out), **FAST)
    assert clf.result_.test["accuracy"] >= 0.8  # a model that learned: its labels vary with the text
    return Path(clf.result_.model_dir)


@pytest.fixture(scope="module")
def exported(albert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "hf"
    return out, export_transformers(albert_dir, out)


def read_labels(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {r["id"]: r["label"] for r in csv.DictReader(f)}


def tiny_cpu_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")


# --- the founding pattern --------------------------------------------------------------------------
def test_transformers_only_script_predicts_duoclass_labels(toy: Path, albert_dir: Path, exported: tuple[Path, dict],
                                                           tmp_path: Path) -> None:
    """A script that imports only transformers labels testa.csv exactly as `duoclass predict` does."""
    from duoclass.infer.csv import predict_to_csv

    folder, report = exported
    testa = write_csv(tmp_path / "testa.csv", TESTA, header=("id", "text"))
    script = tmp_path / "predict_hf.py"
    script.write_text(SCRIPT, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(folder), str(testa), str(tmp_path / "hf.csv")],
                          cwd=tmp_path, env=tiny_cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predict_to_csv(duoclass.load(albert_dir, device="cpu"), testa, tmp_path / "duoclass.csv", labels_only=True)
    ours, theirs = read_labels(tmp_path / "duoclass.csv"), read_labels(tmp_path / "hf.csv")
    assert list(theirs) == [i for i, _ in TESTA]
    assert theirs == ours
    assert set(ours.values()) == {"neg", "pos"}  # both classes occur: the comparison is not trivial

    # the folder is a plain transformers folder, and its check is on disk as returned
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", EXPORT_FILE} <= names
    assert not any(n.startswith(".") for n in names)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary sibling left
    assert json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8")) == report
    assert report["architecture"] == "AlbertForSequenceClassification" and report["texts"] == str(toy)
    assert report["label_agreement"] == report["label_agreement_batched"] == report["token_agreement"] == 1.0
    assert report["examples"] == 65 and report["max_abs_logit_diff"] <= 1e-4
    hf_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert hf_cfg["id2label"] == {"0": "neg", "1": "pos"} and hf_cfg["label2id"] == {"neg": 0, "pos": 1}


def test_pipeline_and_auto_model_agree_with_duoclass(albert_dir: Path, exported: tuple[Path, dict]) -> None:
    import torch
    from transformers import AlbertForSequenceClassification, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    folder, _ = exported
    texts = [t for _, t in TESTA]
    expected = duoclass.load(albert_dir, device="cpu").predict(texts)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert isinstance(model, AlbertForSequenceClassification) and model.config.num_labels == 2
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        logits = model(**tok(texts, truncation=True, padding=True, return_tensors="pt")).logits
    assert [model.config.id2label[int(i)] for i in logits.argmax(-1)] == expected
    pipe = pipeline("text-classification", model=str(folder), device="cpu")
    assert [r["label"] for r in pipe(texts, truncation=True)] == expected
    assert [r["label"] for r in pipe(texts, truncation=True, batch_size=8)] == expected
    assert pipe("a wonderful story")[0]["label"] == expected[texts.index("a wonderful story")]
    # the calibrated temperature travels with the export: pipeline() gives duoclass's probabilities
    clf = duoclass.load(albert_dir, device="cpu")
    assert clf.temperature != 1.0
    want = clf.predict_proba(texts).max(axis=1)
    got = [r["score"] for r in pipe(texts, truncation=True)]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_tokenizer_gives_duoclass_ids(albert_dir: Path, exported: tuple[Path, dict]) -> None:
    from transformers import AutoTokenizer

    folder, _ = exported
    pre = duoclass.load(albert_dir, device="cpu").preprocessor
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.model_max_length == MAX_LENGTH
    assert (tok.pad_token_id, tok.unk_token_id) == (pre.pad_id, pre.unk_id)
    assert (tok.cls_token, tok.sep_token, tok.mask_token) == ("[CLS]", "[SEP]", "[MASK]")
    for _, text in TESTA:
        assert tok(text, truncation=True)["input_ids"] == pre.load(text), text
    ids = tok(LONG, truncation=True)["input_ids"]
    assert len(ids) == MAX_LENGTH and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert len(tok(LONG)["input_ids"]) > MAX_LENGTH  # transformers cuts only when asked: truncation=True
    assert list(tok(["good", LONG], truncation=True, padding=True)) == ["input_ids", "attention_mask"]


# --- refusals ----------------------------------------------------------------------------------------
def nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy(tmp_path_factory.mktemp("small") / "toy", 40, 10)


@pytest.mark.parametrize("model, pooling, message", [
    ("tfidf-mlp", "cls", "tfidf-mlp \\(text model\\) has no transformers equivalent; export it with --format onnx instead"),
    ("fasttext", "cls", "fasttext \\(text model\\) has no transformers equivalent; export it with --format onnx instead"),
    ("albert-scratch-tiny", "attention", "attention pooling has no transformers equivalent .*retrain with --pooling cls or use --format onnx"),
], ids=["tfidf-mlp", "fasttext", "attention-pooling"])
def test_refuses_models_without_transformers_equivalent(model: str, pooling: str, message: str, small_toy: Path,
                                                         tmp_path: Path) -> None:
    clf = duoclass.train(small_toy, model=model, pooling=pooling, epochs=1, output=str(tmp_path / "run"), **FAST)
    out = tmp_path / "hf"
    with pytest.raises(DuoclassError, match=message):
        export_transformers(clf.result_.model_dir, out)
    assert nothing_written(out)


def test_refuses_image_model(tmp_path: Path) -> None:
    from duoclass.artifacts.folder import model_folder_config, save_model_folder
    from duoclass.models import create_model
    from duoclass.preprocess.image import ImagePreprocessor

    pre = ImagePreprocessor(16)
    args = {"image_size": 16}
    folder = save_model_folder(tmp_path / "model", create_model("msresnet-tiny", 2, **args).state_dict(),
                               model_folder_config("image", "msresnet-tiny", args, ["cat", "dog"], pre.to_config()))
    with pytest.raises(DuoclassError, match="msresnet-tiny \\(image model\\) has no transformers equivalent; export it with --format onnx"):
        export_transformers(folder, tmp_path / "hf")
    assert nothing_written(tmp_path / "hf")


def test_refuses_non_empty_output_and_output_inside_the_model(albert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DuoclassError, match="taken: exists and is not empty; pass a new folder for --output"):
        export_transformers(albert_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(DuoclassError, match="inside the model folder"):
        export_transformers(albert_dir, albert_dir / "hf")
    assert not (albert_dir / "hf").exists()
    duoclass.load(albert_dir, device="cpu")  # the model folder is untouched


def test_damaged_model_folder_is_refused_by_the_checkpoint_reader(albert_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(albert_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(DuoclassError, match="model.safetensors: checksum mismatch"):
        export_transformers(folder, tmp_path / "hf")
    assert nothing_written(tmp_path / "hf")


def test_disagreeing_labels_refuse_the_export(albert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights that transformers loads differently (here: the classifier's sign flipped) fail the check."""
    import torch
    import transformers

    real = transformers.AutoModelForSequenceClassification.from_pretrained

    def flipped(*args, **kwargs):
        model, info = real(*args, **kwargs)
        with torch.no_grad():
            model.classifier.weight.neg_()
            model.classifier.bias.neg_()
        return model, info

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", flipped)
    out = tmp_path / "empty"
    out.mkdir()  # an empty folder is a fine target, and stays as it was when the export fails
    with pytest.raises(DuoclassError, match="transformers \\(one at a time\\) predicts other labels than duoclass for"):
        export_transformers(albert_dir, out)
    assert out.is_dir() and not any(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_export_interrupted_mid_write_leaves_the_output_as_it_was(albert_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds: an export whose writer fails part-way (the weights written, then the tokenizer's save_pretrained
    raising) leaves the output as it was, absent or an empty folder, with nothing beside it; the files were
    being written in .NAME.duoclass-new (artifacts.atomic's one folder replace), and the next export succeeds."""
    import transformers

    seen: list[tuple[str, list[str]]] = []

    def disk_full(self, folder, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen.append((Path(folder).name, sorted(p.name for p in Path(folder).iterdir())))
        (Path(folder) / "tokenizer.json").write_text('{"half', encoding="utf-8")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", disk_full)
    absent, empty = tmp_path / "absent", tmp_path / "empty"
    empty.mkdir()
    for out in (absent, empty):
        with pytest.raises(OSError, match="No space left on device"):
            export_transformers(albert_dir, out)
    assert not absent.exists()
    assert empty.is_dir() and not any(empty.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert [name for name, _ in seen] == [".absent.duoclass-new", ".empty.duoclass-new"]
    assert all("model.safetensors" in names for _, names in seen)  # it failed mid-way, the weights written
    monkeypatch.undo()
    report = export_transformers(albert_dir, empty)
    assert report["label_agreement"] == 1.0 and (empty / EXPORT_FILE).is_file() and (empty / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --- an hf: model of another family -------------------------------------------------------------------
def test_hf_bert_folder_exports(toy: Path, tmp_path: Path) -> None:
    """hf:DIR with a tiny random BERT and its WordPiece tokenizer: the export loads as BertForSequenceClassification.
    Its training data is gone by then, so the check runs on the fixed texts."""
    import torch
    import transformers as tf

    from duoclass.compress.transformers import FIXED_TEXTS
    from duoclass.training.text_data import train_tokenizer

    tok, _ = train_tokenizer([r[1] for r in toy_rows(160, "train", 0)], vocab_size=200)
    tok.save_pretrained(tmp_path / "bert")
    config = tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    data = shutil.copytree(toy, tmp_path / "data")
    clf = duoclass.train(data, model=f"hf:{tmp_path / 'bert'}", epochs=3, lr=1e-3, max_length=12,
                         output=str(tmp_path / "run"), **FAST)
    shutil.rmtree(data)
    report = export_transformers(clf.result_.model_dir, tmp_path / "hf")
    assert report["architecture"] == "BertForSequenceClassification" and report["label_agreement"] == 1.0
    assert report["texts"] == "fixed texts" and report["examples"] == len(FIXED_TEXTS) + 1  # plus the long text

    model = tf.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [t for _, t in TESTA]
    assert [hf_tok(t, truncation=True)["input_ids"] for t in texts] == [clf.preprocessor.load(t) for t in texts]
    with torch.inference_mode():
        logits = model(**hf_tok(texts, truncation=True, padding=True, return_tensors="pt")).logits
    assert [model.config.id2label[int(i)] for i in logits.argmax(-1)] == clf.predict(texts)
