"""Prompts as config, the post-processing every LLM answer goes through, and the rewrite stage's
rejection accounting with a scripted chatty backend."""

import json

import pandas as pd
import pytest

from pairaug_ray.llm.postprocess import cut_to_words, is_report_text, postprocess, strip_chatter
from pairaug_ray.llm.prompts import BUILTIN_PROMPTS, PromptLibrary, build_messages, library_for
from pairaug_ray.stages import rewrite as R
from pairaug_ray.llm.validation import review_rewrite
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteStage

SOURCE = "Small left pleural effusion. No pneumothorax. The heart size is normal."


# ----------------------------------------------------------------------------- prompts

def test_builtin_prompts_ask_for_the_two_kinds_of_rewrite():
    inter = build_messages(SOURCE, "inter")
    intra = build_messages(SOURCE, "intra", max_words=40)
    for msgs in (inter, intra):
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert msgs[1]["content"] == SOURCE
    assert "opposite" in inter[0]["content"] and "50 words" in inter[0]["content"]
    assert "change in the patient's condition" in intra[0]["content"] and "40 words" in intra[0]["content"]
    assert PromptLibrary().prompt_id("inter") == "inter-v1"
    assert PromptLibrary().prompt_id("intra") == "intra-v1"


def test_prompt_variants_from_yaml_and_inline(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(
        "prompts:\n"
        "  inter-terse:\n"
        "    branch: inter\n"
        "    system: 'Flip one finding. At most {max_words} words.'\n"
        "    user: 'Report: {report}'\n"
        "defaults: {inter: inter-terse}\n")
    lib = PromptLibrary.from_config(prompts_file=str(path))
    assert lib.prompt_id("inter") == "inter-terse" and lib.prompt_id("intra") == "intra-v1"
    msgs = lib.messages(SOURCE, "inter", max_words=30)
    assert msgs == [{"role": "system", "content": "Flip one finding. At most 30 words."},
                    {"role": "user", "content": f"Report: {SOURCE}"}]
    # Inline prompts and prompt_ids override the file; built-ins stay reachable by id.
    cfg = RewriteConfig(prompts_file=str(path), prompt_ids={"inter": "inter-v1", "intra": "intra-x"},
                        prompts={"intra-x": {"branch": "intra", "system": "Worsen it.", "user": "{report}"}})
    lib = library_for(cfg)
    assert lib.prompt_id("inter") == "inter-v1" and lib.prompt_id("intra") == "intra-x"
    assert lib.messages(SOURCE, "inter", "inter-terse")[0]["content"].startswith("Flip one")
    assert lib.messages(SOURCE, "inter")[0]["content"] == BUILTIN_PROMPTS["inter-v1"].messages(SOURCE)[0]["content"]


@pytest.mark.parametrize("bad, match", [
    ({"p": {"branch": "sideways", "system": "x"}}, "branch"),
    ({"p": {"branch": "inter", "system": ""}}, "empty system"),
    ({"p": {"branch": "inter", "system": "x", "user": "no placeholder"}}, "report"),
    ({"p": {"branch": "inter", "system": "x", "temperature": "1"}}, "unknown keys"),
])
def test_bad_prompt_variants_fail_early(bad, match):
    with pytest.raises(ValueError, match=match):
        PromptLibrary.from_config(prompts=bad)


def test_prompt_of_the_wrong_branch_or_unknown_id_fails():
    with pytest.raises(ValueError, match="branch"):
        PromptLibrary.from_config(prompt_ids={"intra": "inter-v1"})
    with pytest.raises(KeyError, match="unknown prompt id"):
        build_messages(SOURCE, "inter", prompt_id="inter-v9")


# ----------------------------------------------------------------------------- post-processing

@pytest.mark.parametrize("raw", [
    'Sure! Here is the rewritten report: "No pleural effusion. No pneumothorax."',
    "Certainly. Here's a plausible rewrite of the report:\n\nNo pleural effusion. No pneumothorax.",
    "**Rewritten report:**\n\nNo pleural effusion. No pneumothorax.\n\nNote: I removed the effusion.",
    "Rewritten Report: No pleural effusion. No pneumothorax. I hope this helps!",
    "<|assistant|>\n```\nNo pleural effusion.\nNo pneumothorax.\n```<|end|>",
    "Here is the new report:\n- No pleural effusion.\n- No pneumothorax.\n\nExplanation: flipped one.",
    "\u201cNo pleural effusion.   No pneumothorax.\u201d",
    "Report: No pleural effusion. No pneumothorax. (Note: the effusion was removed.)",
])
def test_chatter_is_stripped(raw):
    assert strip_chatter(raw) == "No pleural effusion. No pneumothorax."
    assert postprocess(raw) == ("No pleural effusion. No pneumothorax.", "")


def test_report_text_is_kept_as_is():
    for text in ("FINDINGS: The heart is enlarged. IMPRESSION: Cardiomegaly.",
                 "Here the lungs are clear.", "New small right pleural effusion."):
        assert strip_chatter(text) == text


def test_overlong_output_is_cut_at_a_sentence_or_rejected():
    raw = "Mild cardiomegaly. " + "The lungs are clear without focal consolidation. " * 6
    text, reason = postprocess(raw, max_words=20, overlong="cut")
    assert reason == "" and len(text.split()) <= 20 and text.endswith(".")
    assert text == "Mild cardiomegaly. " + " ".join(["The lungs are clear without focal consolidation."] * 2)
    assert postprocess(raw, max_words=20, overlong="reject")[1] == "too_long"
    assert postprocess(raw, max_words=200, overlong="reject") == (" ".join(raw.split()), "")
    # One sentence longer than the limit: cut at a word.
    one = "The heart " + "and lungs " * 30 + "are normal."
    assert cut_to_words(one, 10).split()[-1].endswith(".") and len(cut_to_words(one, 10).split()) == 10
    with pytest.raises(ValueError):
        postprocess(raw, overlong="truncate")


@pytest.mark.parametrize("raw, reason", [
    ("", "empty"), ("   \n ", "empty"), ('Sure! Here is the rewritten report: ""', "empty"),
    ("I cannot help with that request.", "not_a_report"),
    ("The quick brown fox jumps over the lazy dog.", "not_a_report"),
    ("ing ed the, of and , . . the a", "not_a_report"),
])
def test_empty_and_non_report_text_is_rejected(raw, reason):
    assert postprocess(raw)[1] == reason


def test_report_detection_uses_labeler_and_anatomy():
    assert is_report_text("No pneumothorax.")                       # observation, no anatomy
    assert is_report_text("The cardiomediastinal silhouette is stable.")  # anatomy, no observation
    assert not is_report_text("Thank you for your question.")


def test_review_rewrite_runs_postprocess_then_validation():
    assert review_rewrite(SOURCE, f'Sure! "{SOURCE}"', "inter")[1] == "identical_to_source"
    assert review_rewrite(SOURCE, "Hello!", "inter")[1] == "not_a_report"
    text, reason, change = review_rewrite(SOURCE, "Rewritten report: No pleural effusion. No pneumothorax.",
                                          "inter")
    assert (text, reason) == ("No pleural effusion. No pneumothorax.", "") and "Pleural Effusion" in change


# ----------------------------------------------------------------------------- stage accounting

class _ChattyBackend(R.RewriteBackend):
    """Attempt 0: chatter around the unchanged source; attempt 1: a non-report; attempt 2: a good
    rewrite wrapped in chatter. Rows whose report says "stubborn" never get a good answer."""

    name = "chatty"
    model = "chatty-v0"

    def __init__(self):
        self.calls = 0

    def rewrite(self, requests):
        attempt, self.calls = self.calls, self.calls + 1
        out = []
        for r in requests:
            if attempt == 0:
                out.append(f'Sure! Here is the rewritten report: "{r.report}"')
            elif attempt == 1 or "stubborn" in r.report:
                out.append("As an AI language model I cannot do that.")
            else:
                out.append("**Rewritten report:** No pleural effusion. Moderate cardiomegaly.\n\nNote: flipped.")
        return out


def test_stage_strips_chatter_retries_and_counts_rejections(monkeypatch):
    monkeypatch.setitem(R.BACKENDS, "chatty", lambda cfg: _ChattyBackend())
    stage = RewriteStage(RewriteConfig(backend="chatty", max_attempts=3, min_source_words=3))
    batch = pd.DataFrame({
        "report": [SOURCE, SOURCE + " stubborn", "Effusion."],
        "branch": ["inter", "intra", "inter"], "seed": [1, 2, 3]})
    out = stage(batch)
    assert list(out.status) == ["ok", "error", "error"]
    assert out.rewritten_report[0] == "No pleural effusion. Moderate cardiomegaly."
    assert out.rewrite_attempts[0] == 3
    assert json.loads(out.rewrite_rejections[0]) == {"identical_to_source": 1, "not_a_report": 1}
    assert out.error_class[1] == "rewrite_rejected" and "not_a_report" in out.error[1]
    assert json.loads(out.rewrite_rejections[1]) == {"identical_to_source": 1, "not_a_report": 2}
    assert out.error_class[2] == "source_too_short"
    assert json.loads(out.rewrite_rejections[2]) == {}


def test_backend_exception_fails_only_its_row(monkeypatch):
    class Flaky(R.RewriteBackend):
        name = "flaky"

        def rewrite(self, requests):
            return [R.StageError("llm_timeout", "no answer") if "slow" in r.report
                    else "No pleural effusion." for r in requests]

    monkeypatch.setitem(R.BACKENDS, "flaky", lambda cfg: Flaky())
    out = RewriteStage(RewriteConfig(backend="flaky"))(pd.DataFrame({
        "report": ["Left pleural effusion.", "Left pleural effusion. slow"], "branch": ["inter"] * 2,
        "seed": [0, 1]}))
    assert list(out.status) == ["ok", "error"] and out.error_class[1] == "llm_timeout"
