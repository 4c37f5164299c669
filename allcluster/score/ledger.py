"""Job-wide bookkeeping of a scoring run: one owner per distinct file content, and the budget of
expensive explanations. A Ray actor in a job (``score/ray_data.py``), a plain object in tests."""
from __future__ import annotations

from typing import Callable

Claim = Callable[[list[str], list[str]], list[str]]   # (sha256s, paths) -> owner path per file ("" = you)
Reserve = Callable[[int, str], int]                   # (n budgeted explanations, batch key) -> granted


class Ledger:
    """Job-wide bookkeeping shared by every worker (a Ray actor in a job): which file computes each
    distinct content (sha256), and how many budgeted explanations are left."""

    def __init__(self, budget_cap: int, budget_used: int = 0):
        self.owners: dict[bytes, str] = {}
        self.budget_left = max(0, budget_cap - budget_used)
        self.tries: dict[str, int] = {}
        self.granted: dict[str, int] = {}

    def attempt(self, batch: str) -> int:
        """Which try of the batch ``batch`` (its first path) this is: Ray runs a task again when its
        process died (``allcluster.score.reading``)."""
        self.tries[batch] = self.tries.get(batch, 0) + 1
        return self.tries[batch]

    def claim(self, shas: list[str], paths: list[str]) -> list[str]:
        owners = []
        for sha, path in zip(shas, paths):
            owner = self.owners.setdefault(bytes.fromhex(sha), path)
            owners.append("" if owner == path else owner)
        return owners

    def reserve(self, n: int, batch: str) -> int:
        """Grant up to ``n`` of the budget to the batch ``batch``. A batch asking again is a retry whose
        process died before its rows were written (a broken GPU's replica): its earlier grant comes back
        first, so a dead replica never spends budget on rows nobody wrote."""
        self.budget_left += self.granted.pop(batch, 0)
        granted = self.granted[batch] = min(n, self.budget_left)
        self.budget_left -= granted
        return granted
