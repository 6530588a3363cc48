"""The model-folder schema: what config.json holds, how a folder is read, validated and saved. This docstring is the format's reference.

A model folder (`RUN_DIR/model`) is self-describing and pickle-free:

    model.safetensors   the weights, input normalisation included (inputs are RGB in [0, 1] or token ids)
    config.json         everything needed to rebuild, feed and evaluate the model (keys below)
    metrics.json        the evaluation of these weights: {"epoch", "valid", "test"}
    ngrams.json         text models with an n-gram vocabulary (tfidf-mlp)
    tokenizer/...       text models with a trained or Hugging Face tokenizer
    variants/...        other forms of the same model (ONNX, int8, pruned), when exported

config.json, format_version 2 (a key not listed here is refused):

    format          "duoclass-model"
    format_version  2 (1: the first format, still read; see below)
    task            "image" | "text"
    model           {"name": registered model name, "args": {builder keyword arguments}}
    classes         the class names in output order: at least 2, unique, non-empty strings
    preprocessing   how a raw input becomes tensors (image.py / text.py write and read it):
                      image: "image_size" (int > 0), plus descriptive keys
                      text:  "tokenizer" ("hf" | "ngram-hash" | "ngram-vocab"), "max_length" (int > 0),
                             "files" (the tokenizer's path inside the folder, for "hf" and "ngram-vocab")
    evaluation      optional: {"tta": bool, "top_k": int > 0}, how the saved metrics were computed
    inputs          optional: tensor name -> {"dtype": "float32" | "int64", "shape": [int > 0, or "batch" /
                    "sequence" for a dynamic axis], "range": [low, high] (optional)}
    variants        optional: name -> {"path": a file or folder inside the model folder, "format": str, ...}; a
                    variant whose logits differ from the weights' (int8, pruned) carries its own "calibration"
    calibration     optional: {"method": "temperature" | "none", "temperature": float > 0, "fitted_on": str, "n": int,
                    ...the fit's figures}: the predict path divides the logits by the temperature (calibrate/)
    conformal       optional: {"alpha": (0, 1), "score": "aps" | "raps", "qhat": float, "lambda": float,
                    "k_reg": int, "n": int, ...}: predictions carry a conformal set (calibrate/conformal.py)
    operating_point optional, two classes: {"metric": "sensitivity" | "specificity", "target": (0, 1),
                    "threshold": float, ...}: the label is the second class when its probability reaches the threshold
    training        optional: a record of the run (data, seed, epochs, the training step, ...); only
                    `recorded_training` reads it (the data path, as an absolute path, and the seed)
    versions        {"duoclass": ..., "torch": ..., ...} that wrote the folder
    files           relative path -> SHA-256 of every file in the folder except config.json
    config_sha256   SHA-256 of config.json's own content: the canonical JSON (sorted keys, no
                    spaces, UTF-8) of the object without this key, so reformatting the file keeps it valid

Loading checks the config's own digest and every file's hash, and refuses a folder holding a
file that `files` does not list (the tokenizer loader reads whole folders, so a stray file could
change the model); names starting with "." (.DS_Store, .ipynb_checkpoints/) are ignored. This
protects against damage, truncation and accidental edits. It is not a signature: anyone can
recompute the hashes. Nothing in the folder is executed or unpickled.

Format 1 folders (duoclass 0.1) still load: their config.json has no config_sha256 and their
metrics.json is not hashed, so only the listed files are checked. Updating one
(`update_model_folder_metrics`) rewrites it as format 2.

Saving replaces the whole folder at once, through artifacts.atomic.replace_folder: a kill at any
moment leaves the old folder or the new one, never a mix. One process writes a folder at a time;
readers may run alongside.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duoclass.errors import DuoclassError
from duoclass.artifacts.atomic import recover_folder, replace_folder, sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger("duoclass")

FORMAT = "duoclass-model"
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
TASKS = ("image", "text")
TOKENIZERS = ("hf", "ngram-hash", "ngram-vocab")
DTYPES = ("float32", "int64")
DYNAMIC_AXES = ("batch", "sequence")
_KEYS = ("format", "format_version", "task", "model", "classes", "preprocessing", "evaluation", "inputs",
         "variants", "calibration", "conformal", "operating_point", "training", "versions", "files", "config_sha256")  # config.json's keys, in written order
_HEX64 = re.compile(r"[0-9a-f]{64}")


# --- config.json: the schema --------------------------------------------------------------
def config_digest(cfg: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `cfg` without its "config_sha256" key."""
    body = {k: v for k, v in cfg.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")).hexdigest()


def _inside(rel: Any) -> bool:
    """A relative POSIX path that stays inside the folder ("dir/" names a folder)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/") or re.match(r"[A-Za-z]:", rel):
        return False
    parts = rel[:-1].split("/") if rel.endswith("/") else rel.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _listed(rel: str, files: dict[str, str]) -> bool:
    """A path in `files`, or a folder ("tokenizer/") with at least one listed file under it."""
    prefix = rel.rstrip("/") + "/"
    return rel in files or any(f.startswith(prefix) for f in files)


def _obj(x: Any) -> bool:
    return isinstance(x, dict)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _json_type(kind: str) -> str:
    return {"dict": "a JSON object", "list": "a JSON list", "str": "a string"}[kind]


def config_problem(cfg: Any, version: int = FORMAT_VERSION) -> str | None:
    """What is wrong with a model folder config (None when it is valid). The schema is the module docstring."""
    if not _obj(cfg):
        return "not a JSON object"
    required = ["task", "model", "classes", "preprocessing", "files"] + (["versions", "config_sha256"] if version >= 2 else [])
    for key in required:
        if key not in cfg:
            return f"missing key {key!r}"
    if version >= 2:
        unknown = [k for k in cfg if k not in _KEYS]
        if unknown:
            return f"unknown key {unknown[0]!r} (format {version} has: {', '.join(_KEYS)})"
    for key, kind in (("model", "dict"), ("classes", "list"), ("preprocessing", "dict"), ("files", "dict"),
                      ("evaluation", "dict"), ("inputs", "dict"), ("variants", "dict"), ("training", "dict"),
                      ("versions", "dict"), ("config_sha256", "str")):
        if key in cfg and not isinstance(cfg[key], {"dict": dict, "list": list, "str": str}[kind]):
            return f"{key!r} should be {_json_type(kind)}"
    if cfg["task"] not in TASKS:
        return f"task {cfg['task']!r} is not one of {', '.join(TASKS)} (a newer duoclass may know it; upgrade it)"
    model = cfg["model"]
    if not isinstance(model.get("name"), str) or not model["name"]:
        return "'model' needs a 'name' (a registered model name)"
    if version >= 2 and set(model) != {"name", "args"}:
        return "'model' should have exactly the keys 'name' and 'args'"
    if not _obj(model.get("args", {})):
        return "'model.args' should be a JSON object"
    classes = cfg["classes"]
    if len(classes) < 2:
        return f"'classes' has {len(classes)} name(s); a classifier has at least 2"
    seen: set[str] = set()
    for c in classes:
        if not isinstance(c, str) or not c:
            return f"'classes' holds {c!r}; every class name is a non-empty string"
        if c in seen:
            return f"'classes' names {c!r} twice; class names are unique"
        seen.add(c)
    files = cfg["files"]
    for rel, digest in files.items():
        if not _inside(rel) or rel.endswith("/") or rel == CONFIG:
            return f"'files' lists {rel!r}; entries are relative paths of files inside the folder, config.json excepted"
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            return f"'files' has {digest!r} for {rel!r}; expected a SHA-256 (64 lowercase hex digits)"
    if WEIGHTS not in files:
        return f"'files' does not list {WEIGHTS}"
    problem = _preprocessing_problem(cfg["task"], cfg["preprocessing"], files)
    if problem:
        return problem
    for key, value in cfg.get("evaluation", {}).items():
        if key == "tta" and not isinstance(value, bool):
            return f"'evaluation.tta' should be true or false, not {value!r}"
        if key == "top_k" and not _int(value):
            return f"'evaluation.top_k' should be a positive integer, not {value!r}"
        if key not in ("tta", "top_k"):
            return f"'evaluation' has unknown key {key!r} (known: tta, top_k)"
    for name, spec in cfg.get("inputs", {}).items():
        where = f"'inputs.{name}'"
        if not name or not _obj(spec) or set(spec) - {"dtype", "shape", "range"} or not {"dtype", "shape"} <= set(spec):
            return f"{where} should be {{\"dtype\", \"shape\"}} with an optional \"range\""
        if spec["dtype"] not in DTYPES:
            return f"{where}: dtype {spec['dtype']!r} is not one of {', '.join(DTYPES)}"
        if not isinstance(spec["shape"], list) or not spec["shape"] or not all(_int(d) or d in DYNAMIC_AXES for d in spec["shape"]):
            return f"{where}: shape {spec['shape']!r} should be a list of positive integers and {' / '.join(DYNAMIC_AXES)}"
        r = spec.get("range", [0, 1])
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) and r[0] <= r[1]):
            return f"{where}: range {r!r} should be [low, high]"
    for name, spec in cfg.get("variants", {}).items():
        where = f"'variants.{name}'"
        if not name or not _obj(spec) or not isinstance(spec.get("format"), str) or not spec["format"]:
            return f"{where} should be an object with \"path\" and \"format\" (a non-empty string)"
        if not _inside(spec.get("path")):
            return f"{where}: path {spec.get('path')!r} is not a relative path inside the model folder"
        if not _listed(spec["path"], files):
            return f"{where}: path {spec['path']!r} is not among the folder's hashed files"
    problem = _calibration_records_problem(cfg)
    if problem:
        return problem
    for key, value in cfg.get("versions", {}).items():
        if not isinstance(value, str):
            return f"'versions.{key}' should be a string, not {value!r}"
    return None


def _calibration_records_problem(cfg: dict[str, Any]) -> str | None:
    """What is wrong with the calibration of the folder and its variants, and with its conformal record."""
    problem = calibration_problem(cfg.get("calibration"), "'calibration'")
    for name, spec in cfg.get("variants", {}).items():
        problem = problem or calibration_problem(spec.get("calibration"), f"'variants.{name}.calibration'")
    if problem:
        return problem
    cp = cfg.get("conformal")
    if cp is not None:
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not _obj(cp) or not all(k in cp for k in ("alpha", "score", "qhat", "lambda", "k_reg")):
            return "'conformal' should be an object with alpha, score, qhat, lambda and k_reg"
        if not (num(cp["alpha"]) and 0 < cp["alpha"] < 1) or cp["score"] not in ("aps", "raps") or not num(cp["qhat"]) \
                or not num(cp["lambda"]) or not isinstance(cp["k_reg"], int):
            return f"'conformal' has an unusable value ({cp!r}); refit it with `duoclass calibrate`"
        by = cp.get("qhat_by_class")
        if by is not None and (not isinstance(by, list) or len(by) != len(cfg.get("classes", [])) or not all(num(q) for q in by)):
            return "'conformal.qhat_by_class' should be one number per class; refit it with `duoclass calibrate`"
    op = cfg.get("operating_point")
    if op is not None:
        ok = _obj(op) and op.get("metric") in ("sensitivity", "specificity") and \
            isinstance(op.get("threshold"), (int, float)) and not isinstance(op.get("threshold"), bool)
        if not ok:
            return "'operating_point' should be {\"metric\": sensitivity | specificity, \"threshold\": a number, ...}"
        if len(cfg["classes"]) != 2:
            return f"'operating_point' is for two classes; this model has {len(cfg['classes'])}"
    return None


def calibration_problem(cal: Any, where: str) -> str | None:
    if cal is None:
        return None
    t = cal.get("temperature") if _obj(cal) else None
    if not _obj(cal) or isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        return f"{where} should be an object whose \"temperature\" is a positive number"
    return None


def _preprocessing_problem(task: str, pre: dict[str, Any], files: dict[str, str]) -> str | None:
    if task == "image":
        if not _int(pre.get("image_size")):
            return f"'preprocessing.image_size' should be a positive integer, not {pre.get('image_size')!r}"
        return None
    if pre.get("tokenizer") not in TOKENIZERS:
        return f"'preprocessing.tokenizer' {pre.get('tokenizer')!r} is not one of {', '.join(TOKENIZERS)}"
    if not _int(pre.get("max_length")):
        return f"'preprocessing.max_length' should be a positive integer, not {pre.get('max_length')!r}"
    if pre["tokenizer"] != "ngram-hash":
        rel = pre.get("files")
        if not _inside(rel):
            return f"'preprocessing.files' {rel!r} is not a relative path inside the model folder"
        if not _listed(rel, files):
            return f"'preprocessing.files' {rel!r} is not among the folder's hashed files"
    return None


def model_folder_config(task: str, model_name: str, model_args: dict[str, Any], classes: list[str],
                        preprocessing: dict[str, Any], evaluation: dict[str, Any] | None = None,
                        inputs: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `config` argument of `save_model_folder`: the keys a trainer knows, checked against the schema.

    `save_model_folder` adds format, versions, files (with the tokenizer files' paths) and the digest;
    a problem in the keys given here is reported by it (or at once, for the keys that need no files).
    """
    cfg: dict[str, Any] = {"task": task, "model": {"name": model_name, "args": dict(model_args)},
                           "classes": list(classes), "preprocessing": dict(preprocessing)}
    for key, value in (("evaluation", evaluation), ("inputs", inputs), ("training", training)):
        if value is not None:
            cfg[key] = value
    # check it now, with stand-ins for what save_model_folder adds (the hashes of the weights and tokenizer files)
    files = {WEIGHTS: "0" * 64}
    rel = cfg["preprocessing"].get("files") if isinstance(cfg["preprocessing"], dict) else None
    if _inside(rel):
        files[rel + "tokenizer.json" if rel.endswith("/") else rel] = "0" * 64
    problem = config_problem(dict(cfg, versions={}, files=files, config_sha256="0" * 64))
    if problem:
        raise DuoclassError(f"model folder config: {problem}")
    return cfg


# --- model folders: reading ---------------------------------------------------------------
def versions() -> dict[str, str]:
    from duoclass import __version__

    out = {"duoclass": __version__}
    try:
        import torch

        out["torch"] = torch.__version__.split("+")[0]
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def recover_model_folder(folder: str | Path) -> bool:
    """Finish a model-folder replace interrupted between its two renames (see artifacts.atomic.recover_folder);
    True if `folder` holds a config.json."""
    folder = Path(folder)
    recover_folder(folder, _verifies)
    return (folder / CONFIG).is_file()


def _variant_root(path: str) -> str:
    """variants/onnx/model.onnx -> variants/onnx: the folder a variant lives in."""
    parts = Path(path).parts
    return "/".join(parts[:2]) if len(parts) > 2 and parts[0] == "variants" else path


def _deleted_variants(folder: Path, cfg: dict[str, Any]) -> list[str]:
    """Variants whose whole folder is gone (files listed under it but the folder itself absent)."""
    out = []
    for name, v in (cfg.get("variants") or {}).items():
        root = _variant_root(str(v.get("path", "")))
        if root.startswith("variants/") and not (folder / root).exists():
            out.append(name)
    return out


def _verifies(folder: Path) -> bool:
    try:
        _read_config(folder, keep_weights=False)
    except DuoclassError:
        return False
    return True


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """Validate a model folder's config.json and the checksums of all its files; return the config."""
    return _read_config(Path(folder), recover=True, keep_weights=False)[0]


def read_model_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Validate a model folder and return (config, state_dict). Runs no code from the folder."""
    from safetensors.torch import load as st_load

    folder = Path(folder)
    cfg, weights = _read_config(folder, recover=True)
    try:
        state = st_load(weights)  # the very bytes that were hashed
    except Exception as e:  # safetensors raises its own error types
        raise DuoclassError(f"{folder / WEIGHTS}: unreadable weights ({e}); copy the model folder again") from None
    return cfg, state


def _read_config(folder: Path, recover: bool = False, keep_weights: bool = True) -> tuple[dict[str, Any], bytes]:
    """(config, bytes of model.safetensors) of a verified folder; DuoclassError naming the file otherwise."""
    if recover and not folder.is_dir():
        recover_model_folder(folder)
    if not folder.is_dir():
        raise DuoclassError(f"{folder}: model folder not found; pass the folder written by `duoclass train` (RUN_DIR/model)")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        if (folder / "model" / CONFIG).is_file():
            raise DuoclassError(f"{folder}: a run folder, not a model folder; did you mean {folder / 'model'}?")
        raise DuoclassError(f"{cfg_path}: missing; {folder} is not a complete duoclass model folder (re-run training or copy the whole folder)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DuoclassError(f"{cfg_path}: not valid JSON ({e}); the file is damaged, copy the model folder again") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise DuoclassError(
            f"{cfg_path}: not a duoclass model config (no \"format\": \"{FORMAT}\"); "
            "pass the model folder written by `duoclass train` (RUN_DIR/model)"
        )
    version = cfg.get("format_version")
    if not _int(version):
        raise DuoclassError(f"{cfg_path}: format_version {version!r} is not a positive integer; the file is damaged, copy the model folder again")
    if version > FORMAT_VERSION:
        raise DuoclassError(f"{cfg_path}: written by a newer duoclass (format {version}); upgrade duoclass to load it")
    problem = config_problem(cfg, version)
    if problem:
        raise DuoclassError(f"{cfg_path}: {problem}; the file is damaged, copy the model folder again")
    if version >= 2 and config_digest(cfg) != cfg["config_sha256"]:
        raise DuoclassError(f"{cfg_path}: checksum mismatch (config.json was edited or damaged after it was saved); "
                            "copy the model folder again")
    weights = b""
    gone = _deleted_variants(folder, cfg)  # a variant deleted whole (rm -r variants/onnx): the model itself is intact
    if gone:
        log.warning("%s: the %s variant%s %s deleted; the folder loads without %s (re-export to bring %s back)", folder,
                    ", ".join(gone), "s" if len(gone) > 1 else "", "were" if len(gone) > 1 else "was",
                    "them" if len(gone) > 1 else "it", "them" if len(gone) > 1 else "it")
        prefixes = tuple(_variant_root(cfg["variants"][n]["path"]) + "/" for n in gone)
        cfg = {**cfg, "files": {r: d for r, d in cfg["files"].items() if not r.startswith(prefixes)},
               "variants": {n: v for n, v in cfg["variants"].items() if n not in gone}}
    for rel, digest in cfg["files"].items():
        p = folder / rel
        if not p.is_file():
            raise DuoclassError(f"{p}: missing from the model folder; copy the whole folder again")
        if rel == WEIGHTS and keep_weights:
            weights = p.read_bytes()
            actual = hashlib.sha256(weights).hexdigest()
        else:
            actual = sha256_file(p)
        if actual != digest:
            raise DuoclassError(f"{p}: checksum mismatch (the file was modified or truncated); copy the model folder again")
    if version >= 2:
        for rel in _folder_files(folder):
            if rel != CONFIG and rel not in cfg["files"]:
                raise DuoclassError(f"{folder / rel}: not part of the model folder (config.json does not list it); "
                                    f"remove it, or keep your own files outside {folder}")
    return cfg, weights


def _folder_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under `folder`; names starting with "." are skipped (OS and editor clutter)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(root).relative_to(folder)
        out += [(base / n).as_posix() for n in sorted(names) if not n.startswith(".")]
    return out


# --- model folders: writing ---------------------------------------------------------------
def save_model_folder(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete model folder, replacing any folder there in one step.

    `config` holds task, model, classes, preprocessing and optionally evaluation, inputs, training
    (`model_folder_config` builds it); `extra_files` maps relative paths to bytes (tokenizer files).
    """
    from safetensors.torch import save as st_save

    folder = Path(folder)
    for key in ("format", "format_version", "versions", "files", "config_sha256"):
        if key in config:
            raise DuoclassError(f"{folder}: config key {key!r} is written by save_model_folder itself; leave it out")
    blobs: dict[str, bytes] = {WEIGHTS: st_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})}
    for rel, data in (extra_files or {}).items():
        if rel in (WEIGHTS, CONFIG, METRICS) or not _inside(rel) or rel.endswith("/"):
            raise DuoclassError(f"{folder}: cannot add the file {rel!r}; extra files need their own relative path inside the folder")
        blobs[rel] = data
    if metrics is not None:
        blobs[METRICS] = _json_bytes(metrics)
    _write_folder(folder, {"format": FORMAT, "format_version": FORMAT_VERSION, **config, "versions": versions()}, blobs)
    return folder


def update_model_folder(folder: str | Path, metrics: dict[str, Any] | None = None,
                        files: dict[str, bytes] | None = None, variants: dict[str, dict[str, Any]] | None = None,
                        output: str | Path | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Replace a verified model folder by a copy with new metrics.json, added or replaced files and
    added variants (name -> {"path", "format", ...}), re-hashed; the same one-step replace as saving.
    With `output`, the copy is written there (replacing any model folder at `output`) and `folder` is left alone.
    `settings`: top-level keys to set ("calibration", "conformal"; a value of None removes the key).

    A format 1 folder comes out as format 2. The weights and every other file are copied as they are.
    """
    folder = Path(folder)
    cfg, _ = _read_config(folder, recover=True, keep_weights=False)
    blobs: dict[str, bytes] = {}
    for rel, digest in cfg["files"].items():
        data = (folder / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:  # changed since it was verified
            raise DuoclassError(f"{folder / rel}: checksum mismatch (the file was modified or truncated); copy the model folder again")
        blobs[rel] = data
    if cfg["format_version"] < 2 and (folder / METRICS).is_file() and METRICS not in blobs:
        blobs[METRICS] = (folder / METRICS).read_bytes()  # format 1 kept metrics.json unhashed
    for rel, data in (files or {}).items():
        if rel in (CONFIG, WEIGHTS) or not _inside(rel) or rel.endswith("/"):
            raise DuoclassError(f"{folder}: cannot add the file {rel!r}; added files need their own relative path inside the folder")
        blobs[rel] = data
    if metrics is not None:
        blobs[METRICS] = _json_bytes(metrics)
    base = {k: v for k, v in cfg.items() if k not in ("files", "config_sha256")}
    base["format_version"] = FORMAT_VERSION
    base["model"] = {"name": cfg["model"]["name"], "args": cfg["model"].get("args", {})}
    if variants:
        base["variants"] = {**cfg.get("variants", {}), **variants}
    for key, value in (settings or {}).items():
        if key not in ("calibration", "conformal", "operating_point"):
            raise DuoclassError(f"{folder}: cannot set {key!r} in config.json (settable: calibration, conformal, "
                                "operating_point)")
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    target = Path(output) if output is not None else folder
    _write_folder(target, base, blobs)
    return target


def update_model_folder_metrics(folder: str | Path, metrics: dict[str, Any]) -> Path:
    """Replace the folder's metrics.json (e.g. the final valid and test evaluation), keeping it verifiable."""
    return update_model_folder(folder, metrics=metrics)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _write_folder(folder: Path, base: dict[str, Any], blobs: dict[str, bytes]) -> None:
    """Complete `base` with files and digest, check it against the schema, then replace the folder."""
    cfg = {k: base[k] for k in _KEYS if k in base}
    extra = [k for k in base if k not in _KEYS]
    if extra:
        raise DuoclassError(f"{folder}: unknown model folder config key {extra[0]!r} (known: {', '.join(_KEYS)})")
    blobs = {WEIGHTS: blobs[WEIGHTS], **{rel: blobs[rel] for rel in sorted(blobs) if rel != WEIGHTS}}  # one order for every save
    cfg["files"] = {rel: hashlib.sha256(data).hexdigest() for rel, data in blobs.items()}
    cfg["config_sha256"] = config_digest(cfg)
    problem = config_problem(cfg)
    if problem:
        raise DuoclassError(f"{folder}: cannot save the model folder: {problem}")
    replace_folder(folder, {**blobs, CONFIG: _json_bytes(cfg)}, _verifies)


def recorded_training(cfg: dict[str, Any]) -> dict[str, Any]:
    """What config.json's "training" record says that other stages use: {"data": the dataset path as recorded
    (absolute since format 2 runs record it so; may not exist on this machine) or None, "seed": int}.
    The one reader of that record: export, quantize, prune and the transformers export go through it."""
    t = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
    data = t.get("data")
    seed = t.get("seed")
    return {"data": data if isinstance(data, str) and data else None,
            "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else 0}


# --- variants ----------------------------------------------------------------------------------
BACKENDS = ("torch", "onnx", "onnx-int8")  # what `backend=` / `--backend` accept


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise DuoclassError(f"--backend {backend}: unknown backend; choose one of: {', '.join(BACKENDS)}")


def backend_variant(folder: Path, cfg: dict[str, Any], backend: str) -> dict[str, Any] | None:
    """The folder's record of the variant `backend` runs (None for torch, which runs the weights); a clear error
    for an unknown backend or a variant the folder does not have."""
    check_backend_name(backend)
    if backend == "torch":
        return None
    variant = cfg.get("variants", {}).get(backend)
    if variant is None:
        how = "duoclass export MODEL_DIR --format onnx" if backend == "onnx" else "duoclass quantize MODEL_DIR"
        raise DuoclassError(f"{folder}: --backend {backend}: the folder has no {backend} variant; make it with `{how}`")
    return variant
