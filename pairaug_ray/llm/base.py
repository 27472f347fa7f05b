"""The rewrite backend interface and registry, shared by every backend and both rewrite stages.

Usage::

    class MyBackend(RewriteBackend):
        name = "mine"
        def rewrite(self, requests):                 # str or an Exception per request
            return [my_llm(r.report, r.branch, seed=r.seed) for r in requests]

A backend turns requests into candidate texts; an Exception in place of a text fails that row only
(e.g. ``StageError("llm_timeout")``), without retries. Post-processing, validation, retries and the
output columns are the rewrite contract's (``llm/validation.py``), the same for every backend.
The registry of backends by name is ``llm/backends.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Attempt k of a row samples with seed + SEED_STRIDE * k (a prime, so attempts never collide).
SEED_STRIDE = 7919


@dataclass(frozen=True)
class RewriteRequest:
    report: str     # the source report text
    branch: str     # "inter" | "intra"
    seed: int       # this attempt's sampling seed


class RewriteBackend:
    """Turns requests into candidate texts; validation and retries are the contract's job."""

    name = "base"
    model = ""

    def prompt_id(self, branch: str) -> str:
        return f"{self.name}-{branch}-v1"

    def rewrite(self, requests: list[RewriteRequest]) -> list[str | BaseException]:
        raise NotImplementedError


def attempt_seed(seed: int, attempt: int) -> int:
    """The sampling seed of ``attempt`` (0-based) for a row whose seed is ``seed``."""
    return int(seed) + SEED_STRIDE * int(attempt)
