"""What a prediction says besides its label: a conformal set, or an abstention.

    rule = Rule(classes, conformal=cfg.get("conformal"), abstain_below=0.9)
    rule.check()                               # a clear error for an unusable threshold
    rule.apply(prediction)                     # sets prediction.set, and for an unsure input abstained / label

With an operating point (two classes), the label is the second class when its probability reaches the
threshold chosen on valid, else the first; `score` is the probability of that label. An input whose calibrated
probability of its label is under `abstain_below` is abstained: its label is ABSTAINED (in the
CSV, the API and the server), `abstained` is true, and no class is given as its label; its probabilities and
top-k stay, so a person can look. A class may not itself be named ABSTAINED when abstaining is on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from duoclass.errors import DuoclassError

ABSTAINED = "abstained"


def choose_threshold(p_positive: Any, y: Any, metric: str, target: float) -> float:
    """The threshold t on the positive class's probability (label positive when p >= t) that reaches `target`
    `metric` on these labelled examples, keeping the other figure as high as it can: for sensitivity the largest
    such t, for specificity the smallest."""
    p = np.asarray(p_positive, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    if not len(pos) or not len(neg):
        raise DuoclassError("--operating-point: the valid split needs examples of both classes to choose a threshold")
    # 0 < target < 1 (settings check it) and both classes are present, so k >= 1 below
    if metric == "sensitivity":  # at least k = ceil(target * P) positives at or above t
        k = max(1, int(np.ceil(target * len(pos) - 1e-9)))
        return float(pos[len(pos) - k])
    k = max(1, int(np.ceil(target * len(neg) - 1e-9)))  # at least k negatives strictly below t
    return float(np.nextafter(neg[k - 1], np.inf))


@dataclass
class Rule:
    classes: Sequence[str]
    conformal: dict[str, Any] | None = None  # the model folder's conformal record (calibrate.conformal)
    abstain_below: float | None = None
    operating_point: dict[str, Any] | None = None  # {"metric", "target", "threshold"}: label by the threshold

    def check(self) -> "Rule":
        p = self.abstain_below
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1 or p != p:
                raise DuoclassError(f"--abstain-below {p!r}: a probability in (0, 1], e.g. 0.9")
            if ABSTAINED in [str(c) for c in self.classes]:
                raise DuoclassError(f"--abstain-below: this model has a class named {ABSTAINED!r}, so an abstention "
                                    "could not be told from it; rename the class and retrain, or predict without it")
        return self

    @property
    def active(self) -> bool:
        return self.conformal is not None or self.abstain_below is not None or self.operating_point is not None

    def apply_all(self, results: Sequence[Any]) -> None:
        """Set each usable result's conformal set and abstention (results: predict.Prediction)."""
        ok = [r for r in results if r.probs is not None]
        if not ok or not self.active:
            return
        if self.operating_point is not None:  # two classes: the second is positive at or above the threshold
            t = self.operating_point["threshold"]
            for r in ok:
                c = 1 if r.probs[1] >= t else 0
                r.label, r.score = str(self.classes[c]), float(r.probs[c])
        if self.conformal is not None:
            from duoclass.calibrate.conformal import prediction_sets

            for r, s in zip(ok, prediction_sets(np.stack([r.probs for r in ok]), self.conformal)):
                r.set = [str(self.classes[c]) for c in s]
        if self.abstain_below is not None:
            for r in ok:
                if r.score is not None and r.score < self.abstain_below:
                    r.abstained, r.label = True, ABSTAINED
