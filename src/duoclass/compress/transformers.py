"""Export a duoclass text model folder as a standard Hugging Face transformers folder, checked against duoclass.

    duoclass export runs/x/model --format transformers --output hf-model
    check = export_transformers("runs/x/model", "hf-model")   # also in hf-model/duoclass_export.json

Models with a transformers architecture export: `hf:<id-or-folder>` and `albert-scratch-*`, trained
with `--pooling cls` (the network is then an AutoModelForSequenceClassification). The folder holds:

    config.json              the architecture (e.g. AlbertForSequenceClassification), num_labels and
                             id2label / label2id in duoclass's class order
    model.safetensors        the weights
    tokenizer.json           the model folder's tokenizer as it is (normaliser, vocabulary, special tokens)
    tokenizer_config.json    PreTrainedTokenizerFast, model_max_length = the folder's max_length, the
                             special tokens, inputs input_ids and attention_mask (what duoclass feeds)
    special_tokens_map.json  the special tokens: pad and unk are the ids duoclass pads with and counts as
                             unknown; cls, sep, mask, bos, eos by their usual names
    duoclass_export.json     the check below

It is used with transformers alone; pass truncation=True, as transformers expects, to cut texts
at max_length the way duoclass does (transformers tokenizers do not truncate by default):

    tok = AutoTokenizer.from_pretrained("hf-model")
    model = AutoModelForSequenceClassification.from_pretrained("hf-model")
    label = model.config.id2label[model(**tok(text, truncation=True, return_tensors="pt")).logits.argmax(-1).item()]
    pipeline("text-classification", model="hf-model")(text, truncation=True)

The check: before the folder is moved into place it is loaded back with transformers alone and run
on up to 64 texts of the training data that config.json records (or a few fixed texts when that
data is not readable here), plus one text longer than max_length. Its token ids must equal
duoclass's, and its labels, one text at a time and in padded batches, must equal
`duoclass.load(model_dir).predict`; the largest logit difference must stay within LOGIT_TOLERANCE.
Otherwise the export is refused and nothing new is left at the output path. The folder is built in a
hidden sibling (`.NAME.duoclass-new`), fsynced and renamed into place in one step, by
artifacts.atomic.replace_folder_with (the one folder replace of duoclass).

CPU example:  duoclass train ../shared/data/text/trec6 --model albert-scratch-tiny --epochs 3 --output runs/trec6
              duoclass export runs/trec6/model --format transformers --output runs/trec6/hf
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from duoclass.artifacts.folder import recorded_training
from duoclass.errors import DuoclassError

log = logging.getLogger("duoclass")

EXPORT_FILE = "duoclass_export.json"
EXAMPLES = 64  # texts the check runs, spread over the training data
BATCH_SIZE = 16  # padded batches of the check
LOGIT_TOLERANCE = 1e-3  # float32 on the CPU: the same network differs by ~1e-6, padding included
FIXED_TEXTS = (
    "This was a great film, I loved every minute of it.",
    "Terrible service, the food was cold and nobody cared.",
    "The parcel arrived on Tuesday.",
    "What is the capital of Australia?",
    "质量很好，物流也很快。",
    "ok",
    "12345 !!! ???",
)
_ONNX = "export it with --format onnx instead"
# special-token roles by the token's text; pad and unk come from the ids duoclass uses
_ROLES: dict[str, tuple[str, ...]] = {
    "[CLS]": ("cls_token",), "[SEP]": ("sep_token",), "[MASK]": ("mask_token",), "<mask>": ("mask_token",),
    "<s>": ("bos_token", "cls_token"), "</s>": ("eos_token", "sep_token"),
    "[PAD]": ("pad_token",), "<pad>": ("pad_token",), "[UNK]": ("unk_token",), "<unk>": ("unk_token",),
}


def export_transformers(model_dir: str | Path, output: str | Path, *, examples: int = EXAMPLES) -> dict[str, Any]:
    """Write the transformers folder of a duoclass text model at `output` (new or empty) and return its check.

    `examples`: how many texts of the training data the check runs (one long text is added).
    Raises DuoclassError, leaving nothing at `output`, for a model without a transformers
    equivalent, a damaged model folder, an output folder that is not empty, or a check that fails.
    """
    from duoclass.artifacts.folder import read_model_config

    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise DuoclassError(f"examples: got {examples!r}; pass a positive number of texts to check")
    model_dir = Path(model_dir)
    cfg = read_model_config(model_dir)  # a damaged folder fails here, naming the file
    _check_exportable(model_dir, cfg)
    out = _check_output(Path(output), model_dir)

    from duoclass.infer.classifier import Classifier
    from duoclass.models.text_models import HFTextModel, transformers_module

    tf = transformers_module()
    clf = Classifier.from_folder(model_dir, device="cpu")
    if not isinstance(clf.model, HFTextModel) or clf.model.pooling != "cls":
        raise DuoclassError(f"{model_dir}: {cfg['model']['name']} has no transformers equivalent; {_ONNX}")
    texts, source = sample_texts(cfg, examples)
    texts.append(_long_text(texts, clf.preprocessor))

    from duoclass.artifacts.atomic import replace_folder_with

    report: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        architecture = _write(tmp, clf, tf)
        check = _verify(tmp, clf, texts, tf)
        report.update({"format": "transformers", "model_dir": str(model_dir.resolve()), "output": str(out),
                       "model": cfg["model"]["name"], "architecture": architecture, "classes": list(clf.classes_),
                       "max_length": clf.preprocessor.max_length, "tokenizer_call": {"truncation": True},
                       "texts": source, **check, "versions": _versions(tf)})
        (tmp / EXPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")  # last
        _clear_output(out)
        written.append(tmp)

    written: list[Path] = []
    try:
        replace_folder_with(out, write, lambda p: (p / EXPORT_FILE).is_file())
    except OSError as e:
        if not written:  # the writer's own error, as it is
            raise
        raise _cannot_move(out, e) from None
    log.info("%s: transformers folder (%s), checked on %d texts: labels agree, max abs logit difference %.2g",
             out, report["architecture"], report["examples"], report["max_abs_logit_diff"])
    return report


# --- what can be exported, and where ----------------------------------------------------------
def _check_exportable(model_dir: Path, cfg: dict[str, Any]) -> None:
    name = cfg["model"]["name"]
    if cfg["task"] != "text" or cfg["preprocessing"].get("tokenizer") != "hf":
        raise DuoclassError(f"{model_dir}: {name} ({cfg['task']} model) has no transformers equivalent; {_ONNX}")
    if cfg["model"].get("args", {}).get("pooling", "cls") == "attention":
        raise DuoclassError(f"{model_dir}: attention pooling has no transformers equivalent (the head is duoclass's own); "
                            "retrain with --pooling cls or use --format onnx")


def _check_output(output: Path, model_dir: Path) -> Path:
    out = output.resolve()
    if out.exists() and not out.is_dir():
        raise DuoclassError(f"{output}: exists and is not a folder; pass a new folder for --output")
    if out.is_dir() and any(out.iterdir()):
        raise DuoclassError(f"{output}: exists and is not empty; pass a new folder for --output (or empty this one)")
    src = model_dir.resolve()
    if out == src or src in out.parents:
        raise DuoclassError(f"{output}: inside the model folder {model_dir}, which holds only its own files; "
                            "pass a folder outside it for --output")
    return out


def _clear_output(out: Path) -> None:
    """Remove the empty output folder, so that the export is renamed into place and nothing is swapped out."""
    try:
        if out.is_dir():
            out.rmdir()  # empty, as checked; fails if something was written there meanwhile
    except OSError as e:
        raise _cannot_move(out, e) from None


def _cannot_move(out: Path, e: OSError) -> DuoclassError:
    return DuoclassError(f"{out}: cannot move the exported folder into place ({e.strerror or e}); "
                         "pass a new folder for --output")


# --- writing ------------------------------------------------------------------------------------
def _write(folder: Path, clf: Any, tf: Any) -> str:
    """save_pretrained of the network (labels named) and of a fast tokenizer wrapping duoclass's; the class name."""
    import inspect

    from tokenizers import Tokenizer

    net = clf.model.net
    _bake_temperature(net, clf.temperature)
    net.config.num_labels = len(clf.classes_)
    net.config.id2label = {i: c for i, c in enumerate(clf.classes_)}
    net.config.label2id = {c: i for i, c in enumerate(clf.classes_)}
    net.config.problem_type = "single_label_classification"  # softmax over the classes, as duoclass
    kw = {"safe_serialization": True} if "safe_serialization" in inspect.signature(net.save_pretrained).parameters else {}
    net.save_pretrained(str(folder), **kw)
    if not (folder / "model.safetensors").is_file():
        raise DuoclassError(f"{folder}: transformers {tf.__version__} did not write model.safetensors; "
                            "upgrade transformers (pip install -U transformers)")

    pre = clf.preprocessor
    backend = Tokenizer.from_str(pre.tokenizer.to_str())  # a copy, truncation at max_length included
    specials = special_tokens(backend, pre.pad_id, pre.unk_id)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=pre.max_length,
                                      model_input_names=["input_ids", "attention_mask"], **specials)
    fast.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    tcfg = json.loads(path.read_text(encoding="utf-8"))
    tcfg.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=pre.max_length)  # a name every version knows
    path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not (folder / "special_tokens_map.json").is_file():
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")
    return type(net).__name__


def special_tokens(tokenizer: Any, pad_id: int | None, unk_id: int | None) -> dict[str, str]:
    """PreTrainedTokenizerFast special-token arguments of a `tokenizers.Tokenizer`: pad and unk from the ids
    duoclass uses, the other roles (cls, sep, mask, bos, eos) from the special tokens' usual names."""
    roles: dict[str, str] = {}
    for role, i in (("pad_token", pad_id), ("unk_token", unk_id)):
        token = tokenizer.id_to_token(i) if i is not None else None
        if token is not None:
            roles[role] = token
    added = tokenizer.get_added_tokens_decoder()
    for i in sorted(added):
        if added[i].special:
            for role in _ROLES.get(added[i].content, ()):
                roles.setdefault(role, added[i].content)
    return roles


# --- the check ----------------------------------------------------------------------------------
def sample_texts(cfg: dict[str, Any], examples: int = EXAMPLES) -> tuple[list[str], str]:
    """Up to `examples` distinct texts spread over the training data config.json records, and where they
    came from; FIXED_TEXTS and "fixed texts" when that data is not readable here."""
    from duoclass.data.text_files import read_text_dataset

    data = recorded_training(cfg)["data"]
    pre = cfg["preprocessing"]
    if data:
        try:
            splits, _, _ = read_text_dataset(data, pre.get("text_column", "text"), pre.get("label_column", "label"))
        except (DuoclassError, OSError, ValueError) as e:
            log.info("%s: training data not readable here (%s); checking the export on fixed texts", data, e)
        else:
            texts = list(dict.fromkeys(r.text for split in ("train", "valid", "test")
                                       for r in splits.get(split) or [] if r.text.strip()))
            if texts:
                step = len(texts) / min(examples, len(texts))
                return [texts[int(k * step)] for k in range(min(examples, len(texts)))], data
    return list(FIXED_TEXTS), "fixed texts"


def _long_text(texts: Sequence[str], pre: Any) -> str:
    """The texts joined, repeated until they hold more than max_length tokens (the check of truncation)."""
    counter = type(pre.tokenizer).from_str(pre.tokenizer.to_str())
    counter.no_truncation()
    text = " ".join(texts) or FIXED_TEXTS[0]
    for _ in range(20):
        if len(counter.encode(text).ids) > pre.max_length:
            break
        text = f"{text} {text}"
    return text


def _bake_temperature(net: Any, temperature: float) -> None:
    """The calibrated temperature into the classifier's last linear layer (weights and bias divided by it), so
    pipeline() gives the probabilities duoclass gives. A head without one plain last layer is refused."""
    import torch

    if temperature == 1.0:
        return
    head = getattr(net, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        raise DuoclassError(f"this model's head ({type(head).__name__}) has no single last linear layer to hold the "
                            f"calibrated temperature {temperature:.4f}; export with --format onnx, or recalibrate "
                            "with `duoclass calibrate` after training with --calibration none")
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)


def _verify(folder: Path, clf: Any, texts: list[str], tf: Any) -> dict[str, Any]:
    """Load `folder` with transformers alone and compare token ids, labels and logits with duoclass on `texts`."""
    import numpy as np
    import torch

    tok = tf.AutoTokenizer.from_pretrained(str(folder))
    model, info = tf.AutoModelForSequenceClassification.from_pretrained(str(folder), output_loading_info=True)
    bad = [k for key in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(key) or []]
    if bad:
        raise DuoclassError(f"{folder}: transformers does not load every weight (e.g. {bad[0]}); "
                            f"the export does not fit transformers {tf.__version__}, use --format onnx instead")
    model.eval()
    pre, n = clf.preprocessor, len(texts)

    ours = [pre.load(t) for t in texts]
    theirs = [list(tok(t, truncation=True)["input_ids"]) for t in texts]
    wrong = [i for i in range(n) if ours[i] != theirs[i]]
    if wrong:
        raise DuoclassError(f"{folder}: the transformers tokenizer gives other token ids than duoclass for {len(wrong)} "
                            f"of {n} texts (e.g. {texts[wrong[0]][:60]!r}); the tokenizer cannot be exported, "
                            "use --format onnx instead")

    labels = clf.predict(texts)
    # the head holds the temperature now (_bake_temperature), in this copy as in the export: both give calibrated logits
    reference = np.concatenate([clf.backend.run(pre.collate([x])) for x in ours])
    with torch.inference_mode():
        single = np.concatenate([model(**tok(t, truncation=True, return_tensors="pt")).logits.float().numpy()
                                 for t in texts])
        batched = np.concatenate([model(**tok(texts[i : i + BATCH_SIZE], truncation=True, padding=True,
                                              return_tensors="pt")).logits.float().numpy()
                                  for i in range(0, n, BATCH_SIZE)])
    names = model.config.id2label
    agree = {}
    for how, logits in (("one at a time", single), ("batched", batched)):
        got = [names[int(j)] for j in logits.argmax(-1)]
        wrong = [i for i in range(n) if got[i] != labels[i]]
        if wrong:
            i = wrong[0]
            raise DuoclassError(f"{folder}: transformers ({how}) predicts other labels than duoclass for {len(wrong)} of "
                                f"{n} texts (e.g. {texts[i][:60]!r}: {got[i]!r}, duoclass {labels[i]!r}); not exported")
        agree[how] = 1.0
    diff = float(max(np.abs(single - reference).max(), np.abs(batched - reference).max()))
    if not diff <= LOGIT_TOLERANCE:
        raise DuoclassError(f"{folder}: transformers' logits differ from duoclass's by {diff:.3g} "
                            f"(more than {LOGIT_TOLERANCE:g}) though the labels agree; not exported")
    return {"examples": n, "token_agreement": 1.0, "label_agreement": agree["one at a time"],
            "label_agreement_batched": agree["batched"], "batch_size": BATCH_SIZE,
            "max_abs_logit_diff": diff, "logit_tolerance": LOGIT_TOLERANCE}


def _versions(tf: Any) -> dict[str, str]:
    import tokenizers

    from duoclass.artifacts.folder import versions

    return {**versions(), "transformers": tf.__version__, "tokenizers": tokenizers.__version__}
