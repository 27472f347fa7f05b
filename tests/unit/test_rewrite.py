"""The rule rewriter and the validation every rewrite backend goes through."""

import json

import pandas as pd
import pytest

from pairaug_ray.labeler import NEGATIVE, OBSERVATIONS, POSITIVE, label_report
from pairaug_ray.stages import rewrite as R
from pairaug_ray.llm.rule import RuleRewriter, phrase
from pairaug_ray.llm.validation import validate_rewrite
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteRequest, RewriteStage

REPORTS = [
    "FINDINGS: The heart is mildly enlarged. Small left pleural effusion. No pneumothorax. "
    "IMPRESSION: Cardiomegaly with small left effusion.",
    "Heart size normal. Lungs are clear. No pleural effusion or pneumothorax. No acute fracture.",
    "Right lower lobe consolidation. Endotracheal tube in place. No pleural effusion.",
    "Moderate pulmonary edema. Bilateral pleural effusions. The heart is enlarged.",
]


def _states(text):
    return {o: f.state for o, f in label_report(text).items() if o != "No Finding"}


@pytest.mark.parametrize("phrase_state", [POSITIVE, NEGATIVE])
def test_every_phrase_reads_back(phrase_state):
    for obs in OBSERVATIONS[1:]:
        for lat in (None, "left", "right", "bilateral"):
            for sev in (None, "mild", "moderate", "severe"):
                f = label_report(phrase(obs, phrase_state, lat, sev)).get(obs)
                assert f is not None and f.state == phrase_state, (obs, lat, sev)


@pytest.mark.parametrize("report", REPORTS)
def test_inter_flips_some_and_keeps_some(report):
    rw = RuleRewriter(max_words=50)
    before = _states(report)
    for seed in range(6):
        text = rw.one(RewriteRequest(report, "inter", seed))
        after = _states(text)
        flipped = [o for o in set(before) | set(after)
                   if (before.get(o) == POSITIVE) != (after.get(o) == POSITIVE) and o in after]
        kept = [o for o in before if after.get(o) == before[o]]
        assert flipped, (seed, text)
        assert kept, (seed, text)
        assert len(text.split()) <= 50
        assert validate_rewrite(report, text, "inter", 50)[0] == ""


@pytest.mark.parametrize("report", REPORTS)
def test_intra_changes_a_state(report):
    rw = RuleRewriter(max_words=50)
    before = label_report(report)
    for seed in range(6):
        text = rw.one(RewriteRequest(report, "intra", seed))
        after = label_report(text)
        changed = [o for o in OBSERVATIONS[1:] if o in after and (
            o not in before or (before[o].state, before[o].severity, before[o].laterality)
            != (after[o].state, after[o].severity, after[o].laterality))]
        assert changed, (seed, text)
        assert validate_rewrite(report, text, "intra", 50)[0] == ""


def test_same_seed_same_text_and_seeds_vary():
    rw = RuleRewriter()
    a = [rw.one(RewriteRequest(REPORTS[1], "inter", s)) for s in range(8)]
    b = [rw.one(RewriteRequest(REPORTS[1], "inter", s)) for s in range(8)]
    assert a == b and len(set(a)) > 1


def test_word_limit_holds_on_long_reports():
    long = " ".join(["The lungs are clear bilaterally without focal abnormality."] * 20) + \
        " Small right pleural effusion."
    for branch in ("inter", "intra"):
        text = RuleRewriter(max_words=30).one(RewriteRequest(long, branch, 3))
        assert len(text.split()) <= 30


def test_validation_reasons():
    src = "Small left pleural effusion. No pneumothorax."
    assert validate_rewrite(src, "", "inter", 50)[0] == "empty"
    assert validate_rewrite(src, src.upper(), "inter", 50)[0] == "identical_to_source"
    assert validate_rewrite(src, "word " * 60, "inter", 50)[0] == "too_long"
    same_reading = "There is a small left pleural effusion. Without pneumothorax."
    assert validate_rewrite(src, same_reading, "inter", 50)[0] == "no_polarity_flip"
    assert validate_rewrite(src, same_reading, "intra", 50)[0] == "no_change"
    reason, change = validate_rewrite(src, "No pleural effusion. No pneumothorax.", "inter", 50)
    assert reason == "" and change["Pleural Effusion"][1][0] == NEGATIVE


class _ScriptedBackend(R.RewriteBackend):
    """Returns no-change text until the attempt named by the seed offset, then a real flip."""

    name = "scripted"
    model = "scripted-v0"

    def __init__(self, good_from_attempt):
        self.good_from_attempt = good_from_attempt
        self.calls = []

    def rewrite(self, requests):
        self.calls.append([r.seed for r in requests])
        attempt = len(self.calls) - 1
        return ["No pleural effusion." if attempt >= self.good_from_attempt else r.report
                for r in requests]


def _stage(monkeypatch, backend, attempts):
    monkeypatch.setitem(R.BACKENDS, "scripted", lambda cfg: backend)
    return RewriteStage(RewriteConfig(backend="scripted", max_attempts=attempts))


def test_rejected_rows_retry_with_new_seed_then_error(monkeypatch):
    batch = pd.DataFrame({"report": ["Small left pleural effusion."] * 2, "branch": ["inter", "inter"],
                          "seed": [10, 20]})
    ok_backend = _ScriptedBackend(good_from_attempt=2)
    out = _stage(monkeypatch, ok_backend, attempts=3)(batch)
    assert list(out.status) == ["ok", "ok"]
    assert ok_backend.calls == [[10, 20], [10 + 7919, 20 + 7919], [10 + 2 * 7919, 20 + 2 * 7919]]
    assert list(out.rewrite_attempts) == [3, 3] and set(out.prompt_id) == {"scripted-inter-v1"}
    assert json.loads(out.labels[0])["Pleural Effusion"] == NEGATIVE

    failing = _ScriptedBackend(good_from_attempt=99)
    out = _stage(monkeypatch, failing, attempts=2)(batch)
    assert list(out.status) == ["error", "error"] and set(out.error_class) == {"rewrite_rejected"}
    assert "identical_to_source" in out.error[0] and len(failing.calls) == 2


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown rewrite backend"):
        RewriteStage(RewriteConfig(backend="gpt-17"))
