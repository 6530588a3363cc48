"""Checks that explanations are not noise, and the synthetic data with known answers they run on.

    rho = spearman(a, b)                                   # rank correlation of two attribution maps
    pointing_hit(heat, box)                                # is the map's peak inside the box (r0, c0, r1, c1)?
    drop = deletion_drop(probs_of, x, heat, target, 0.1)   # fall of p(target) when the top 10% pixels are hidden
    write_patch_images(root, n_train=900, seed=0)          # class = the texture of a small patch at a random place
    write_keyword_texts(root, n_train=800, seed=0)         # class = the one keyword among filler words (or none)

The model-randomization check (Adebayo et al. 2018): an explanation of trained weights and of the same network
re-initialised should differ (low rank correlation); one that does not is explaining the input, not the model.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

PATCH_CLASSES = ("stripes", "bars", "checks")  # horizontal stripes, vertical bars, a checkerboard
KEYWORDS = {"sport": ["football", "goal", "tennis", "match"], "money": ["bank", "loan", "stocks", "profit"],
            "weather": ["rain", "storm", "sunny", "snow"], "other": []}  # "other": filler words only
FILLER = ("the a of to and in is it that for on with as was at by this be from or an are have not but "
          "one all they we there can so more what about up out if when which would their time like just "
          "some than into them could these other then its over also after only how new two first any way "
          "most people because our well even good very through here where much know back still great").split()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two attribution maps (flattened; ties get their mean rank); 0 when either
    is constant."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def pointing_hit(heat: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Whether the map's largest value (the first, where several tie) lies in rows r0..r1-1, columns c0..c1-1."""
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    r0, c0, r1, c1 = box
    return bool(r0 <= r < r1 and c0 <= c < c1)


def deletion_drop(probs_of: Callable[[Mapping[str, Any]], np.ndarray], x: np.ndarray, heat: np.ndarray | None,
                  target: int, share: float = 0.1, rng: np.random.Generator | None = None) -> float:
    """p(target | x) - p(target | x with a share of its pixels hidden): the most attributed ones (by `heat`), or,
    with heat None, pixels drawn at random by `rng`. Hidden pixels take the image's mean colour."""
    size = heat.size if heat is not None else x.shape[-1] * x.shape[-2]
    k = max(1, int(round(share * size)))
    if heat is None:
        idx = (rng or np.random.default_rng(0)).choice(size, k, replace=False)
    else:
        idx = np.argsort(-heat.ravel(), kind="stable")[:k]
    hidden = x.copy().reshape(x.shape[0], -1)
    hidden[:, idx] = x.reshape(x.shape[0], -1).mean(axis=1, keepdims=True)
    p = probs_of({"pixel_values": np.stack([x, hidden.reshape(x.shape)])})[:, target]
    return float(p[0] - p[1])


def _texture(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """An (n, n) pattern of 0/1 with a random phase."""
    i, j = np.mgrid[0:n, 0:n]
    phase = int(rng.integers(0, 2))
    if kind == "stripes":
        return ((i // 2 + phase) % 2).astype(np.float32)
    if kind == "bars":
        return ((j // 2 + phase) % 2).astype(np.float32)
    return (((i // 2) + (j // 2) + phase) % 2).astype(np.float32)


def patch_image(label: int, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One uint8 (size, size, 3) image and its patch box (r0, c0, r1, c1): grey noise, a distractor square of a
    random solid colour (in every class, so it tells nothing), and the class's textured patch in a random colour."""
    img = rng.uniform(0.25, 0.75, (size, size, 1)).repeat(3, axis=2) + rng.normal(0, 0.04, (size, size, 3))
    while True:
        r, c = rng.integers(0, size - patch + 1, 2)
        dr, dc = rng.integers(0, size - patch + 1, 2)
        if abs(int(r) - int(dr)) >= patch or abs(int(c) - int(dc)) >= patch:  # the two do not overlap
            break
    img[dr:dr + patch, dc:dc + patch] = rng.uniform(0, 1, 3)
    tex = _texture(PATCH_CLASSES[label], patch, rng)[..., None]
    colour = rng.uniform(0.5, 1.0, 3)
    img[r:r + patch, c:c + patch] = tex * colour + (1 - tex) * colour * 0.15
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), (int(r), int(c), int(r) + patch, int(c) + patch)


def write_patch_images(root: str | Path, n_train: int = 900, n_valid: int = 150, n_test: int = 150, size: int = 32,
                       patch: int = 8, seed: int = 0) -> Path:
    """An ImageFolder tree (train/valid/test) of patch images, and boxes.json: each test file's patch box."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    boxes: dict[str, list[int]] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        for k in range(n):
            label = k % len(PATCH_CLASSES)
            img, box = patch_image(label, size, patch, rng)
            path = root / split / PATCH_CLASSES[label] / f"{k:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            if split == "test":
                boxes[str(path.relative_to(root))] = list(box)
    (root / "boxes.json").write_text(json.dumps(boxes))
    return root


def keyword_text(label: str, rng: np.random.Generator) -> tuple[str, str | None]:
    """A sentence of 8 to 16 filler words with one keyword of the class at a random place, and that keyword
    (class "other": no keyword, None). Without the "other" class a model could learn one keyword class as the
    default for "no keyword seen" and never need its keywords, and no method could point at them."""
    words = list(rng.choice(FILLER, int(rng.integers(8, 17))))
    if not KEYWORDS[label]:
        return " ".join(words), None
    key = str(rng.choice(KEYWORDS[label]))
    words.insert(int(rng.integers(0, len(words) + 1)), key)
    return " ".join(words), key


def write_keyword_texts(root: str | Path, n_train: int = 800, n_valid: int = 200, n_test: int = 200,
                        seed: int = 0) -> Path:
    """train.csv, valid.csv, test.csv (id,text,label) of keyword texts, and keywords.json: each test id's keyword
    (test texts of class "other" have none and are not listed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = list(KEYWORDS)
    keys: dict[str, str] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "text", "label"])
            for k in range(n):
                label = labels[k % len(labels)]
                text, key = keyword_text(label, rng)
                w.writerow([f"{split}-{k}", text, label])
                if split == "test" and key is not None:
                    keys[f"{split}-{k}"] = key
    (root / "keywords.json").write_text(json.dumps(keys))
    return root


def randomized_copy(model: Any, seed: int = 12345) -> Any:
    """The same architecture with every parameter and buffer re-initialised (each module's reset_parameters, seeded),
    normalisation constants kept: the model-randomization check's "untrained" network."""
    import copy

    import torch

    twin = copy.deepcopy(model)
    keep = {k: v.clone() for k, v in twin.state_dict().items() if k.endswith(("normalize.mean", "normalize.std"))}
    torch.manual_seed(seed)
    for m in twin.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    if keep:
        twin.load_state_dict({**twin.state_dict(), **keep})
    return twin.eval()


def randomization_check(clf: Any, inputs: Any, method: str, seed: int = 12345, **kw: Any) -> dict[str, Any]:
    """The model-randomization check of a torch-backend classifier on `inputs`: each input explained by the trained
    weights (its predicted class) and by randomized_copy of them (the same class), and the Spearman rank
    correlation of the two maps. Returns the per-input correlations (signed attributions, and their absolute
    values), the share under 0.5, and how many inputs could be explained."""
    import copy

    twin = copy.copy(clf)
    twin.backend = copy.copy(clf.backend)
    twin.backend.model = randomized_copy(clf.model, seed)
    trained = clf.explain(inputs, method=method, **kw)
    rho, rho_abs = [], []
    for target in sorted({e.target for e in trained if e.ok}):
        idx = [i for i, e in enumerate(trained) if e.ok and e.target == target]
        rand = twin.explain([inputs[i] for i in idx], method=method, target=target, **kw)
        for i, r in zip(idx, rand):
            if r.ok:
                rho.append(spearman(trained[i].attributions, r.attributions))
                rho_abs.append(spearman(np.abs(trained[i].attributions), np.abs(r.attributions)))
    a = np.asarray(rho)
    return {"method": method, "n": len(rho), "spearman": [round(x, 4) for x in rho],
            "spearman_abs": [round(x, 4) for x in rho_abs], "share_below_0_5": float(np.mean(a < 0.5)) if len(a) else None,
            "share_below_0_5_abs": float(np.mean(np.asarray(rho_abs) < 0.5)) if rho_abs else None,
            "median": float(np.median(a)) if len(a) else None}
