"""What a prediction says besides its label: a conformal set, or an abstention.

    rule = Rule(classes, conformal=cfg.get("conformal"), abstain_below=0.9)
    rule.check()                               # a clear error for an unusable threshold
    rule.apply(prediction)                     # sets prediction.set, and for an unsure input abstained / label

An input whose calibrated top probability is under `abstain_below` is abstained: its label is ABSTAINED (in the
CSV, the API and the server), `abstained` is true, and no class is given as its label; its probabilities and
top-k stay, so a person can look. A class may not itself be named ABSTAINED when abstaining is on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from duoclass.errors import DuoclassError

ABSTAINED = "abstained"


@dataclass
class Rule:
    classes: Sequence[str]
    conformal: dict[str, Any] | None = None  # the model folder's conformal record (calibrate.conformal)
    abstain_below: float | None = None

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
        return self.conformal is not None or self.abstain_below is not None

    def apply_all(self, results: Sequence[Any]) -> None:
        """Set each usable result's conformal set and abstention (results: predict.Prediction)."""
        ok = [r for r in results if r.probs is not None]
        if not ok or not self.active:
            return
        if self.conformal is not None:
            from duoclass.calibrate.conformal import prediction_sets

            for r, s in zip(ok, prediction_sets(np.stack([r.probs for r in ok]), self.conformal)):
                r.set = [str(self.classes[c]) for c in s]
        if self.abstain_below is not None:
            for r in ok:
                if r.score is not None and r.score < self.abstain_below:
                    r.abstained, r.label = True, ABSTAINED
