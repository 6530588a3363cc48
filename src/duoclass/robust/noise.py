"""Character-level noise for measuring robustness to typos (`evaluate --char-noise`), never used in training.
"""
from __future__ import annotations

import logging
import random


log = logging.getLogger("duoclass")


# --- character-level perturbation, for measuring robustness ------------------------------------------
def perturb_chars(text: str, rate: float, rng: random.Random) -> str:
    """Each non-space character is, with probability `rate`, deleted, swapped with the next one, or followed by
    an inserted character (one of the three at random; insertions draw from the text's own characters, so
    Chinese text gets Chinese characters). Used to measure accuracy on typo-like noise, never in training."""
    chars = list(text)
    alphabet = [c for c in chars if not c.isspace()] or ["x"]
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if c.isspace() or rng.random() >= rate:
            out.append(c)
            i += 1
            continue
        op = rng.randrange(3)
        if op == 0:  # delete
            i += 1
        elif op == 1 and i + 1 < len(chars):  # swap with the next character
            out += [chars[i + 1], c]
            i += 2
        else:  # insert after (a swap at the end becomes an insertion)
            out += [c, rng.choice(alphabet)]
            i += 1
    return "".join(out)
