"""Explanations as files a person opens: an image beside its heatmap overlay (PNG), a text with its words
highlighted (HTML), and a grid of several (PNG) for a run's report. numpy and Pillow (the grid: matplotlib).

Colours: Grad-CAM maps are non-negative (inferno); occlusion and integrated gradients are signed: red where the
part speaks for the explained class, blue where it speaks against it, the same scale on both sides.
"""
from __future__ import annotations

import html
import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

VIEW = 224  # small images (a 28-px X-ray) are shown enlarged to this many pixels, without smoothing


_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                     (250, 193, 39), (252, 255, 164)], dtype=np.float64) / 255  # anchors of matplotlib's inferno


def _inferno(v: np.ndarray) -> np.ndarray:
    """(..., 3) colours of values in [0, 1], interpolated between the anchors (no matplotlib needed)."""
    pos = np.clip(v, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    t = (pos - lo)[..., None]
    return _INFERNO[lo] * (1 - t) + _INFERNO[lo + 1] * t


def heat_rgba(heat: np.ndarray, signed: bool, alpha: float = 0.55) -> np.ndarray:
    """uint8 (S, S, 4): the heatmap in colour; opacity grows with the size of the value. Signed maps: red for
    positive, blue for negative, on one scale (the largest |value|); others: inferno. numpy only, so the
    torch-free onnx install renders them too."""
    h = np.nan_to_num(heat.astype(np.float64))
    top = float(np.max(np.abs(h))) or 1.0
    rgba = np.empty(h.shape + (4,), dtype=np.float64)
    if signed:
        v = h / top  # -1 .. 1
        pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
        rgba[..., 0] = 1 - neg * 0.8
        rgba[..., 1] = 1 - 0.8 * (pos + neg)
        rgba[..., 2] = 1 - pos * 0.8
        rgba[..., 3] = alpha * np.abs(v)
    else:
        v = np.clip(h / top, 0, 1)
        rgba[..., :3] = _inferno(v)
        rgba[..., 3] = alpha * (0.25 + 0.75 * v)
    return (rgba * 255).round().astype(np.uint8)


def overlay(pixels: np.ndarray, heat: np.ndarray, signed: bool) -> Image.Image:
    """The image the model saw (uint8 (3, S, S)) with the heatmap blended over it, enlarged to VIEW px if smaller."""
    base = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).convert("RGBA")
    top = Image.fromarray(heat_rgba(heat, signed), "RGBA")
    out = Image.alpha_composite(base, top).convert("RGB")
    if out.width < VIEW:
        out = out.resize((VIEW, VIEW), Image.NEAREST)
    return out


def side_by_side(pixels: np.ndarray, heat: np.ndarray, signed: bool) -> bytes:
    """PNG bytes: the image, then the image with its overlay."""
    plain = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).convert("RGB")
    if plain.width < VIEW:
        plain = plain.resize((VIEW, VIEW), Image.NEAREST)
    over = overlay(pixels, heat, signed)
    canvas = Image.new("RGB", (plain.width + over.width + 8, max(plain.height, over.height)), "white")
    canvas.paste(plain, (0, 0))
    canvas.paste(over, (plain.width + 8, 0))
    return png_bytes(canvas)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _shade(score: float, top: float) -> str:
    v = max(-1.0, min(1.0, score / top)) if top else 0.0
    return f"rgba(220,40,40,{v:.2f})" if v >= 0 else f"rgba(40,90,220,{-v:.2f})"


def highlighted_html(text: str, spans: Sequence[tuple[int, int]], scores: Sequence[float]) -> str:
    """The text as HTML with each scored span's background coloured by its score (title: the score)."""
    top = max([abs(float(s)) for s in scores] + [0.0]) or 1.0
    out, at = [], 0
    for (s, e), score in sorted(zip(spans, scores), key=lambda t: t[0]):
        if s < at:  # sub-word tokens of one word overlap nothing; guard against a tokenizer's odd offsets
            continue
        out.append(html.escape(text[at:s]))
        out.append(f'<span style="background:{_shade(float(score), top)}" title="{float(score):+.4f}">'
                   f"{html.escape(text[s:e])}</span>")
        at = e
    out.append(html.escape(text[at:]))
    return "".join(out)


def text_page(e: Any) -> str:
    """A small standalone HTML page for one text explanation."""
    head = (f"{html.escape(e.method or '')}: why {html.escape(str(e.target))} "
            f"(p = {e.score:.3f}; predicted {html.escape(str(e.label))})")
    return ("<!doctype html><meta charset='utf-8'><title>duoclass explanation</title>"
            "<style>body{font:16px/1.6 sans-serif;max-width:50em;margin:2em auto}p.t{white-space:pre-wrap}</style>"
            f"<h1 style='font-size:1.1em'>{head}</h1><p class='t'>{highlighted_html(e.text, e.spans, e.attributions)}</p>"
            "<p style='color:#555'>red: speaks for the explained class; blue: against it.</p>")


def grid_png(items: Sequence[Any], title: str = "explanations") -> bytes:
    """One PNG of several explanations (a run's report): images as overlays, texts as bars of their
    strongest words; each titled with its true label, the prediction and the method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(items)
    cols = min(4, max(1, n))
    rows = max(1, -(-n // cols))
    text = any(e.pixels is None for e in items)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, (3.2 if text else 3.6) * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, e in zip(axes.ravel(), items):
        head = f"true {e.truth} / pred {e.label}" if getattr(e, "truth", None) is not None else f"pred {e.label}"
        ax.set_title(f"{head}\n{e.method}, p={e.score:.2f}", fontsize=9)
        if e.pixels is not None:
            ax.imshow(np.asarray(overlay(e.pixels, e.attributions, e.signed)))
        else:
            order = np.argsort(-np.abs(e.attributions))[:6][::-1]
            words = [e.text[s:t][:18] for s, t in (e.spans[i] for i in order)]
            vals = [float(e.attributions[i]) for i in order]
            ax.axis("on")
            ax.barh(range(len(vals)), vals, color=["#d62828" if v >= 0 else "#2857d6" for v in vals])
            ax.set_yticks(range(len(vals)), words, fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
