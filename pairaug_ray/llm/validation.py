"""The rewrite contract, written once: pre-checks, output validation, the accepted row's columns,
and the rejection error. ``stages/rewrite.py`` (any backend in an actor pool) and
``stages/rewrite_vllm.py`` (the ray.data.llm chain) both build their rows with it.

Usage::

    error = precheck(row, min_source_words=20)          # None, or a StageError for the row
    text, reason, change = review_rewrite(row["report"], raw_answer, row["branch"], max_words=50)
    if not reason:
        row.update(accepted_columns(text, change, backend="rule", model="rule-v1",
                                    prompt_id="rule-inter-v1", attempts=1, rejected={}))
    else:  # after the last attempt
        raise rejection_error(max_attempts=3, reason=reason, last_text=text)

Validation (every backend): post-processing (``llm/postprocess.py``: chat chatter stripped, word
limit cut or rejected), then not empty, at most ``max_words`` words, not the source, at least one
finding the labeler reads, and the change the branch asks for: InterAug must flip a finding's
polarity (present <-> absent), IntraAug must change some finding's state, severity or side.
"""

from __future__ import annotations

import json

from pairaug_ray.errors import StageError
from pairaug_ray.labeler import (
    NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, Finding, findings_to_json, label_report, label_states,
)
from pairaug_ray.vocab import BRANCHES, NO_FINDING


def _key(f: Finding | None):
    return None if f is None else (f.state, f.severity, f.laterality)


def finding_change(before: dict[str, Finding], after: dict[str, Finding]) -> dict[str, list]:
    """Observations whose (state, severity, laterality) differ: {obs: [before, after]}."""
    out = {}
    for obs in OBSERVATIONS:
        if obs == NO_FINDING:
            continue
        b, a = _key(before.get(obs)), _key(after.get(obs))
        if b != a and a is not None:
            out[obs] = [list(b) if b else None, list(a)]
    return out


def _flipped(before: dict[str, Finding], after: dict[str, Finding]) -> list[str]:
    flips = []
    for obs, a in after.items():
        if obs == NO_FINDING:
            continue
        b = before.get(obs)
        was_present = b is not None and b.state in (POSITIVE, UNCERTAIN)
        if (was_present and a.state == NEGATIVE) or (not was_present and a.state == POSITIVE):
            flips.append(obs)
    return flips


def validate_rewrite(source: str, text: str, branch: str, max_words: int) -> tuple[str, dict]:
    """(reason, change): reason is "" when ``text`` is an acceptable rewrite of ``source``."""
    text = text.strip()
    if not text:
        return "empty", {}
    if len(text.split()) > max_words:
        return "too_long", {}
    if " ".join(text.lower().split()) == " ".join(source.lower().split()):
        return "identical_to_source", {}
    before, after = label_report(source), label_report(text)
    if not any(o != NO_FINDING for o in after):
        return "no_findings_in_output", {}
    change = finding_change(before, after)
    if branch == "inter":
        if not _flipped(before, after):
            return "no_polarity_flip", change
    elif not change:
        return "no_change", change
    return "", change


def review_rewrite(source: str, raw: str, branch: str, max_words: int = 50,
                   overlong: str = "cut") -> tuple[str, str, dict]:
    """(clean text, reason, change) for a backend's raw answer: post-processing, then validation."""
    from pairaug_ray.llm.postprocess import postprocess

    text, reason = postprocess(raw, max_words=max_words, overlong=overlong)
    if reason:
        return text, reason, {}
    reason, change = validate_rewrite(source, text, branch, max_words)
    return text, reason, change


def precheck(row: dict, min_source_words: int = 0) -> StageError | None:
    """The row's error before any attempt (unknown branch, source too short), else None."""
    if row.get("branch") not in BRANCHES:
        return StageError("bad_branch", f"unknown branch {row.get('branch')!r}")
    if len(str(row.get("report") or "").split()) < min_source_words:
        return StageError("source_too_short", f"report has fewer than {min_source_words} words")
    return None


def accepted_columns(text: str, change: dict, *, backend: str, model: str, prompt_id: str,
                     attempts: int, rejected: dict[str, int]) -> dict:
    """The columns an accepted rewrite adds to its row (the pair schema's rewrite columns)."""
    found = label_report(text)
    return {
        "rewritten_report": text,
        "change": json.dumps(change, sort_keys=True),
        "labels": json.dumps(label_states(found), sort_keys=True),
        "findings": findings_to_json(found),
        "rewrite_backend": backend,
        "rewrite_model": model,
        "prompt_id": prompt_id,
        "rewrite_attempts": int(attempts),
        "rewrite_rejections": json.dumps(rejected, sort_keys=True),
    }


def rejection_error(max_attempts: int, reason: str, last_text: str) -> StageError:
    """The ``rewrite_rejected`` error of a row whose every attempt was rejected."""
    snippet = last_text[:120] + ("..." if len(last_text) > 120 else "")
    return StageError("rewrite_rejected", f"{max_attempts} attempts rejected; last: {reason}: {snippet!r}")
