"""Which images get the expensive (budgeted) explanations, and why: rules on confidence, class and
a content-fixed sample, so a rerun selects the same images."""
from __future__ import annotations

import numpy as np

from allcluster.score.config import BudgetConfig


def sha_fraction(sha: str) -> float:
    """A uniform number in [0, 1) fixed by the content: the same images are sampled on every rerun."""
    return int(sha[:12], 16) / float(1 << 48)


def budget_reasons(confidence: np.ndarray, predicted: list[str], shas: list[str], budget: BudgetConfig) -> list[str]:
    """Why each image gets the expensive methods ("" when it does not), first matching rule wins."""
    if not budget.methods:
        return [""] * len(shas)
    reasons = []
    for conf, cls, sha in zip(confidence, predicted, shas):
        if conf < budget.low_confidence:
            reasons.append("low_confidence")
        elif cls in budget.classes:
            reasons.append("class")
        elif sha_fraction(sha) < budget.sample_fraction:
            reasons.append("sample")
        else:
            reasons.append("")
    return reasons
