"""Rule-based CheXpert-style labeler: phrase-level behaviour and agreement with the IU MeSH tags.

Usage: .venv/bin/pytest tests/unit/test_labeler.py
"""

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pairaug_ray import labeler
from pairaug_ray.io.reports import iter_iu_reports, iu_corpus_available
from pairaug_ray.labeler import (
    NEGATIVE,
    OBSERVATIONS,
    POSITIVE,
    UNCERTAIN,
    Finding,
    correct_spelling,
    findings_from_json,
    findings_to_json,
    label_jsonl,
    label_report,
    label_states,
    label_vector,
    split_sentences,
    uncertainty_grades,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.labeler_agreement import iu_agreement  # noqa: E402


def states(text):
    return label_states(label_report(text))


@pytest.mark.parametrize("text, obs", [
    ("No pleural effusion.", "Pleural Effusion"),
    ("There is no pneumothorax.", "Pneumothorax"),
    ("Lungs are expanded without consolidation.", "Consolidation"),
    ("Negative for pneumothorax.", "Pneumothorax"),
    ("The lungs are free of focal consolidation.", "Consolidation"),
    ("No evidence of pneumonia.", "Pneumonia"),
    ("The previously seen left effusion has resolved.", "Pleural Effusion"),
    ("Interval resolution of the right lower lobe atelectasis.", "Atelectasis"),
    ("The lungs are clear.", "Lung Opacity"),
    ("Clear lungs bilaterally.", "Lung Opacity"),
    ("Heart size is normal.", "Cardiomegaly"),
    ("Normal heart size.", "Cardiomegaly"),
    ("The heart size and mediastinal contours are within normal limits.", "Cardiomegaly"),
    ("The cardiomediastinal silhouette is normal.", "Enlarged Cardiomediastinum"),
    ("Heart size is at the upper limits of normal.", "Cardiomegaly"),
    ("No focal airspace disease to suggest pneumonia.", "Pneumonia"),
    ("The nasogastric tube has been removed.", "Support Devices"),
    ("No acute osseous abnormality.", "Fracture"),
    ("Borderline cardiomegaly without heart failure.", "Edema"),
])
def test_negation(text, obs):
    assert states(text)[obs] == NEGATIVE


@pytest.mark.parametrize("text", [
    "No focal consolidation, pleural effusion, or pneumothorax.",
    "No consolidation, large effusion, or pneumothorax is seen.",
    "No pneumothorax or pleural effusion.",
    "There is no consolidation, effusion or pneumothorax seen.",
    "The lungs are clear without focal consolidation, effusion, or pneumothorax.",
])
def test_negated_lists(text):
    s = states(text)
    assert s["Pleural Effusion"] == NEGATIVE and s["Pneumothorax"] == NEGATIVE
    assert s["No Finding"] == POSITIVE


@pytest.mark.parametrize("text, obs", [
    ("Possible left lower lobe pneumonia.", "Pneumonia"),
    ("Opacity which may represent atelectasis.", "Atelectasis"),
    ("Small pneumothorax cannot be excluded.", "Pneumothorax"),
    ("Findings suggestive of pulmonary edema.", "Edema"),
    ("Likely small left effusion.", "Pleural Effusion"),
    ("Bibasilar atelectasis versus pneumonia.", "Pneumonia"),
    ("Bibasilar atelectasis versus pneumonia.", "Atelectasis"),
    ("Question of a right upper lobe nodule.", "Lung Lesion"),
    ("Borderline cardiomegaly.", "Cardiomegaly"),
    ("Scarring or atelectasis at the left base.", "Atelectasis"),
])
def test_uncertainty(text, obs):
    assert states(text)[obs] == UNCERTAIN


def test_mixed_sentence_keeps_each_state():
    found = label_report("Small left pleural effusion, no pneumothorax.")
    assert found["Pleural Effusion"].state == POSITIVE
    assert found["Pleural Effusion"].laterality == "left"
    assert found["Pleural Effusion"].severity == "mild"
    assert found["Pneumothorax"].state == NEGATIVE
    assert "No Finding" not in found

    found = label_report("Mild cardiomegaly without pleural effusion or pneumothorax.")
    assert found["Cardiomegaly"].state == POSITIVE and found["Cardiomegaly"].severity == "mild"
    assert found["Pleural Effusion"].state == NEGATIVE and found["Pneumothorax"].state == NEGATIVE

    found = label_report("No pneumothorax, small right effusion.")
    assert found["Pneumothorax"].state == NEGATIVE and found["Pleural Effusion"].state == POSITIVE


@pytest.mark.parametrize("text, laterality", [
    ("Left basilar atelectasis.", "left"),
    ("Right upper lobe consolidation.", "right"),
    ("Bilateral pleural effusions.", "bilateral"),
    ("Effusions at both lung bases.", "bilateral"),
    ("Bibasilar opacities.", "bilateral"),
    ("Small left and moderate right pleural effusions.", "bilateral"),
    ("Pleural effusion.", None),
])
def test_laterality(text, laterality):
    found = label_report(text)
    obs = next(o for o, f in found.items() if o != "No Finding")
    assert found[obs].laterality == laterality


@pytest.mark.parametrize("text, severity", [
    ("Mild cardiomegaly.", "mild"), ("Minimal atelectasis.", "mild"),
    ("Trace right effusion.", "mild"), ("Small pneumothorax.", "mild"),
    ("Moderate pulmonary edema.", "moderate"), ("Severe cardiomegaly.", "severe"),
    ("Large left pleural effusion.", "severe"), ("Massive cardiomegaly.", "severe"),
    ("Marked cardiomegaly.", "severe"), ("Cardiomegaly.", None),
])
def test_severity(text, severity):
    found = label_report(text)
    obs = next(o for o, f in found.items() if o != "No Finding")
    assert found[obs].state == POSITIVE and found[obs].severity == severity


def test_no_change_is_not_negation_and_mentions_are_positive():
    assert states("No change in the moderate right pleural effusion.")["Pleural Effusion"] == POSITIVE
    assert states("Stable cardiomegaly.")["Cardiomegaly"] == POSITIVE
    assert states("The heart is mildly enlarged.")["Cardiomegaly"] == POSITIVE
    assert states("Enlarged cardiac silhouette.")["Cardiomegaly"] == POSITIVE
    assert states("Patchy airspace opacity in the right lower lobe.")["Lung Opacity"] == POSITIVE
    assert states("Interstitial edema.")["Edema"] == POSITIVE
    assert states("Pulmonary vascular congestion.")["Edema"] == POSITIVE


@pytest.mark.parametrize("text, state", [
    ("Heart size is not increased.", NEGATIVE),                 # a size that is not increased: normal
    ("The heart size is not significantly enlarged.", NEGATIVE),
    ("Cardiac silhouette is not increased compared to prior.", NEGATIVE),
    ("The heart is no longer enlarged.", NEGATIVE),
    ("The heart is not large.", NEGATIVE),
    ("Heart size has not increased.", None),                    # unchanged: says nothing of the size
    ("Heart size is increased.", POSITIVE),
    ("Cardiomegaly has not increased.", POSITIVE),              # unchanged, still there
    ("Left pleural effusion is not increased.", POSITIVE),
])
def test_heart_size_not_increased_is_a_normal_size(text, state):
    obs = "Pleural Effusion" if "effusion" in text else "Cardiomegaly"
    assert states(text).get(obs) == state


@pytest.mark.parametrize("text", [
    "Right PICC line with tip in the SVC.", "Endotracheal tube 4 cm above the carina.",
    "Left chest wall pacemaker with leads in the right ventricle.", "Median sternotomy wires.",
    "Surgical clips in the right upper quadrant.", "Coronary artery stent.",
    "Right chest port.", "Nasogastric tube in the stomach.",
])
def test_support_devices(text):
    s = states(text)
    assert s["Support Devices"] == POSITIVE
    assert s["No Finding"] == POSITIVE  # devices alone do not make a study abnormal


def test_fracture():
    assert states("Old healed left rib fractures.")["Fracture"] == POSITIVE
    assert states("Acute displaced fracture of the right clavicle.")["Fracture"] == POSITIVE
    assert "Fracture" not in states("The lateral screw is fractured.")
    assert "Fracture" not in states("Subtle rib fractures may not be demonstrated on radiographs.")


def test_no_finding_rule():
    assert states("Heart size normal. Lungs clear. No effusion.")["No Finding"] == POSITIVE
    assert "No Finding" not in states("Possible small left effusion.")
    assert "No Finding" not in states("Mild cardiomegaly.")
    assert label_report("") == {}
    assert label_report("No acute cardiopulmonary abnormality.") == {
        "No Finding": Finding("No Finding", POSITIVE, None, None, "")}


def test_evidence_is_the_sentence():
    found = label_report("Heart size is normal. There is a small left effusion. No pneumothorax.")
    assert found["Pleural Effusion"].evidence == "There is a small left effusion."


def test_vector_and_json_round_trip():
    found = label_report("Mild cardiomegaly. No pneumothorax. Possible right lower lobe pneumonia.")
    vec = label_vector(found)
    assert len(vec) == len(OBSERVATIONS) == 14
    assert vec[OBSERVATIONS.index("Cardiomegaly")] == 1.0
    assert vec[OBSERVATIONS.index("Pneumothorax")] == 0.0
    assert vec[OBSERVATIONS.index("Pneumonia")] == -1.0
    assert math.isnan(vec[OBSERVATIONS.index("Fracture")])
    assert findings_from_json(findings_to_json(found)) == found
    assert findings_from_json("") == {}


def test_label_jsonl_one_output_per_record():
    recs = [{"id": "a", "report": "Small right effusion."},
            json.dumps({"id": "b", "report": "No pneumothorax."}),
            {"id": "c"},
            {"id": "d", "report": 5}]
    out = list(label_jsonl(recs))
    assert [o["id"] for o in out] == ["a", "b", "c", "d"]
    assert out[0]["labels"] == {"Pleural Effusion": 1}
    assert out[0]["findings"]["Pleural Effusion"]["laterality"] == "right"
    assert out[1]["labels"] == {"No Finding": 1, "Pneumothorax": 0}
    assert "error" in out[2] and "error" in out[3]
    json.dumps(out)  # serialisable


@pytest.mark.parametrize("text, obs, grade", [
    ("Probable small left effusion.", "Pleural Effusion", "probable"),
    ("Bibasilar atelectasis versus pneumonia.", "Atelectasis", "probable"),
    ("Scarring or atelectasis at the left base.", "Atelectasis", "probable"),
    ("Borderline cardiomegaly.", "Cardiomegaly", "probable"),
    ("Likely right lower lobe pneumonia.", "Pneumonia", "probable"),
    ("Hazy perihilar opacities most suggestive of edema.", "Edema", "probable"),
    ("Opacity which may represent atelectasis.", "Atelectasis", "possible"),
    ("Possible left lower lobe pneumonia.", "Pneumonia", "possible"),
    ("Question of a small right effusion.", "Pleural Effusion", "possible"),
    ("Small pneumothorax cannot be excluded.", "Pneumothorax", "possible"),
    # a weak hedge scopes over the "versus" that follows it
    ("Opacities may represent atelectasis versus pneumonia.", "Atelectasis", "possible"),
    ("Less likely pneumonia.", "Pneumonia", "possible"),
    ("Basal streaks, maybe atelectasis or scarring.", "Atelectasis", "possible"),
    ("Aspiration or pneumonia are also possible.", "Pneumonia", "possible"),
])
def test_uncertainty_grades(text, obs, grade):
    assert states(text)[obs] == UNCERTAIN
    assert uncertainty_grades(text)[obs] == grade


def test_uncertainty_grades_only_name_uncertain_observations():
    assert uncertainty_grades("Mild cardiomegaly. No effusion.") == {}
    assert set(uncertainty_grades("Mild cardiomegaly. Possible pneumonia.")) == {"Pneumonia"}


def test_differential_list_hedges_the_rest_of_the_sentence():
    text = "Interstitial opacities, differential considerations include infection and mild pulmonary edema."
    assert states(text)["Edema"] == UNCERTAIN
    assert uncertainty_grades(text)["Edema"] == "possible"
    # the "differential" scope ends with the sentence
    assert states(text + " Mild pulmonary edema.")["Edema"] == POSITIVE


def test_with_after_compatible_keeps_the_hedge():
    text = "Increased opacities which may be compatible with mild pulmonary edema."
    assert states(text)["Edema"] == UNCERTAIN
    assert "Fracture" not in states("Correlate clinically with history of fracture.")
    # "with" still starts a new part elsewhere
    assert states("Mild cardiomegaly with small right effusion.")["Pleural Effusion"] == POSITIVE


@pytest.mark.parametrize("text", [
    "Right 6th rib fracture of indeterminate age.",
    "Age indeterminate compression fracture of T12.",
])
def test_age_hedge_is_not_uncertainty_about_the_fracture(text):
    assert states(text)["Fracture"] == POSITIVE


def test_not_seen_on_prior_means_new():
    assert states("Right apical pneumothorax not seen on the prior study.")["Pneumothorax"] == POSITIVE
    text = "New left hilar density not seen on the prior film, healed right rib fracture noted."
    assert states(text)["Fracture"] == POSITIVE
    assert states("Right apical pneumothorax is not seen.")["Pneumothorax"] == NEGATIVE


def test_old_and_healed_start_a_new_statement():
    s = states("No pneumothorax, healed left rib fractures.")
    assert s["Pneumothorax"] == NEGATIVE and s["Fracture"] == POSITIVE
    s = states("No effusion, old right clavicle fracture.")
    assert s["Pleural Effusion"] == NEGATIVE and s["Fracture"] == POSITIVE


def test_partial_resolution_is_not_negation():
    assert states("Nearly resolved small left pneumothorax.")["Pneumothorax"] == POSITIVE
    assert states("The left effusion has nearly resolved.")["Pleural Effusion"] == POSITIVE
    assert states("Partial resolution of the left lower lobe atelectasis.")["Atelectasis"] == POSITIVE
    assert states("The left effusion has resolved.")["Pleural Effusion"] == NEGATIVE


def test_list_closing_negation_covers_the_whole_list():
    s = states("Consolidation, atelectasis, and effusion have cleared in the interval.")
    assert s["Consolidation"] == s["Atelectasis"] == s["Pleural Effusion"] == NEGATIVE
    # a list item with its own verb is its own statement
    s = states("There is a small left effusion, atelectasis has resolved.")
    assert s["Pleural Effusion"] == POSITIVE and s["Atelectasis"] == NEGATIVE


def test_agreement_policies_on_a_tiny_corpus():
    reports = [SimpleNamespace(text="Probable small left effusion.", mesh=["Pleural Effusion/left/small"]),
               SimpleNamespace(text="Possible small left effusion.", mesh=["normal"]),
               SimpleNamespace(text="Large right effusion.", mesh=["Pleural Effusion/right/large"]),
               SimpleNamespace(text="Heart size normal. Lungs clear.", mesh=["normal"])]
    def row(**kw):
        return iu_agreement(reports=reports, **kw)["classes"]["Pleural Effusion"]
    assert row()["f1"] == 1.0 and row()["predicted"] == 2                 # policy "probable"
    assert row(policy="ones")["precision"] == round(2 / 3, 3)
    assert row(policy="zeros")["recall"] == 0.5
    assert row(count_uncertain=True) == row(policy="ones")
    assert row(count_uncertain=False) == row(policy="zeros")
    with pytest.raises(ValueError):
        iu_agreement(reports=reports, policy="sometimes")


# --- Field-failure kinds (../shared/fieldcases case19-26): each kind with inputs written here -------

@pytest.mark.parametrize("text, obs", [
    # the hedge in other word orders, with adverbs, contractions and auxiliaries
    ("A small left pneumothorax cannot be completely excluded.", "Pneumothorax"),
    ("Early pneumonia is not definitely excluded.", "Pneumonia"),
    ("Subtle pneumothorax is not completely ruled out.", "Pneumothorax"),
    ("Pneumonia has not yet been excluded.", "Pneumonia"),
    ("Can't rule out a right lower lobe pneumonia.", "Pneumonia"),
    ("We cannot entirely exclude a small right effusion.", "Pleural Effusion"),
    ("Unable to rule out a left basilar pneumonia.", "Pneumonia"),
    ("It is not possible to exclude mild pulmonary edema.", "Edema"),
    ("This study does not exclude a small pneumothorax.", "Pneumothorax"),
    ("Atelectasis and pneumonia cannot be excluded.", "Atelectasis"),
    ("Atelectasis and pneumonia cannot be excluded.", "Pneumonia"),
])
def test_hedges_in_any_word_order_are_uncertain(text, obs):
    s = states(text)
    assert s[obs] == UNCERTAIN
    assert "No Finding" not in s
    assert uncertainty_grades(text)[obs] == "possible"


def test_a_hedge_reaches_over_noun_phrases_not_statements():
    s = states("Basal opacities due in part to atelectasis, infiltrates, pulmonary edema difficult to "
               "entirely exclude.")
    assert s["Atelectasis"] == POSITIVE and s["Edema"] == UNCERTAIN
    assert "Pneumonia" not in states("Rule out pneumonia.")          # a request is still no mention
    assert "Pneumonia" not in states("Pneumonia is to be ruled out.")


@pytest.mark.parametrize("text, obs", [
    ("No evidence of interval change in the small right effusion.", "Pleural Effusion"),
    ("Without significant change in the mild cardiomegaly.", "Cardiomegaly"),
    ("There is no appreciable interval change in the left lower lobe atelectasis.", "Atelectasis"),
    ("No radiographic change in the moderate pulmonary edema.", "Edema"),
    ("With no further increase in the small left apical pneumothorax.", "Pneumothorax"),
])
def test_no_change_in_x_reports_x(text, obs):
    assert states(text)[obs] == POSITIVE


def test_a_finding_word_before_change_keeps_the_negation():
    assert states("No atelectatic change.")["Atelectasis"] == NEGATIVE
    assert states("No new pleural effusion.")["Pleural Effusion"] == NEGATIVE


@pytest.mark.parametrize("text, neg", [
    ("The right pneumothorax has been ruled out.", ["Pneumothorax"]),
    ("Pleural effusion was excluded on the lateral view.", ["Pleural Effusion"]),
    ("A pneumothorax can be excluded.", ["Pneumothorax"]),
    ("Pneumothorax and pleural effusion have been ruled out.", ["Pneumothorax", "Pleural Effusion"]),
])
def test_ruled_out_after_the_finding_negates_it(text, neg):
    s = states(text)
    assert all(s[o] == NEGATIVE for o in neg)
    assert s["No Finding"] == POSITIVE


@pytest.mark.parametrize("text, obs", [
    ("Small left pneumothroax.", "Pneumothorax"),           # adjacent letters swapped
    ("Mild cardiomgealy.", "Cardiomegaly"),
    ("Right pleural efusion.", "Pleural Effusion"),         # a letter missing
    ("Left basilar atelectais.", "Atelectasis"),
    ("Right lower lobe pneumoina.", "Pneumonia"),
    ("Mild pulmonary oedma.", "Edema"),
    ("Focal consolidaiton in the right base.", "Consolidation"),
    ("Displaced left rib fracure.", "Fracture"),
    ("Patchy opactiy at the left base.", "Lung Opacity"),
    ("Spiculated nodlue in the right upper lobe.", "Lung Lesion"),
    ("Small right pneumothoorax.", "Pneumothorax"),        # a letter doubled
    ("Cardiomegoly.", "Cardiomegaly"),                      # a wrong letter
    ("Pnuemothroax.", "Pneumothorax"),                      # two edits in a long word
])
def test_misspelled_observations_are_read(text, obs):
    s = states(text)
    assert s[obs] == POSITIVE
    assert "No Finding" not in s


def test_misspelling_guard_keeps_real_words():
    for word in ("module", "modular", "injection", "legion", "lesson", "pleura", "plural", "cardia",
                 "pneumonic", "tracheotomy", "enema", "peacemaker", "features", "consolation",
                 "tumour", "edematous"):
        assert correct_spelling(word) == word, word
    assert correct_spelling("pnuemothorax") == "pneumothorax"
    assert correct_spelling("effusoin") == "effusion"
    assert "Lung Lesion" not in states("The module of the stimulator was replaced.")
    assert "Pneumonia" not in states("Contrast injection into the right arm.")


@pytest.mark.parametrize("text, expected", [
    ("Mild pulmonary edema\nNo focal consolidation\nModerate cardiomegaly",
     {"Edema": POSITIVE, "Consolidation": NEGATIVE, "Cardiomegaly": POSITIVE}),
    ("* No pleural effusion\n* Right lower lobe atelectasis",
     {"Pleural Effusion": NEGATIVE, "Atelectasis": POSITIVE}),
    ("1) No effusion\n2) Mild cardiomegaly", {"Pleural Effusion": NEGATIVE, "Cardiomegaly": POSITIVE}),
    ("1) No pneumothorax 2) Left lower lobe consolidation",
     {"Pneumothorax": NEGATIVE, "Consolidation": POSITIVE}),
    ("no pneumothorax\nsmall left effusion", {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE}),
    ("NO PNEUMOTHORAX\nLEFT LOWER LOBE ATELECTASIS", {"Pneumothorax": NEGATIVE, "Atelectasis": POSITIVE}),
    # wrapped lines stay one sentence
    ("There is no focal consolidation or\npneumothorax.", {"Pneumothorax": NEGATIVE}),
    ("There is no evidence of focal airspace consolidation in the left lower\nlobe or pneumothorax.",
     {"Consolidation": NEGATIVE, "Pneumothorax": NEGATIVE}),
    ("No pneumothorax\ncardiomegaly is present", {"Pneumothorax": NEGATIVE, "Cardiomegaly": POSITIVE}),
])
def test_each_list_line_is_its_own_scope(text, expected):
    s = states(text)
    assert {o: s.get(o) for o in expected} == expected


def test_split_sentences_on_lines_and_markers():
    assert split_sentences("Mild edema\nNo effusion") == ["Mild edema", "No effusion"]
    assert split_sentences("- No effusion\n- Mild edema") == ["No effusion", "Mild edema"]
    assert split_sentences("1) No effusion 2) Mild edema") == ["No effusion", "Mild edema"]
    assert split_sentences("The heart is\nnormal. No effusion.") == ["The heart is normal.", "No effusion."]


@pytest.mark.parametrize("text, expected", [
    ("Pleural effusion: none seen.", {"Pleural Effusion": NEGATIVE}),
    ("PNEUMOTHORAX - NEGATIVE", {"Pneumothorax": NEGATIVE}),
    ("Consolidation = nil", {"Consolidation": NEGATIVE}),
    ("Edema: No", {"Edema": NEGATIVE}),
    ("Lines/tubes: none.", {"Support Devices": NEGATIVE}),
    ("Pneumothorax: none, effusion: not identified.",
     {"Pneumothorax": NEGATIVE, "Pleural Effusion": NEGATIVE}),
    ("Heart: enlarged.", {"Cardiomegaly": POSITIVE}),
    ("Cardiac silhouette: normal.", {"Cardiomegaly": NEGATIVE}),
    ("Pneumonia: possible.", {"Pneumonia": UNCERTAIN}),
    ("Effusion: questionable.", {"Pleural Effusion": UNCERTAIN}),
    ("Pneumothorax: ?", {"Pneumothorax": UNCERTAIN}),
])
def test_key_value_templates(text, expected):
    s = states(text)
    assert {o: s.get(o) for o in expected} == expected


def test_template_value_carries_laterality_and_severity():
    found = label_report("Pneumothorax: small right apical.")
    assert found["Pneumothorax"].state == POSITIVE
    assert (found["Pneumothorax"].laterality, found["Pneumothorax"].severity) == ("right", "mild")
    # a header before a sentence is not a template value
    assert states("Right shoulder: negative for fracture.")["Fracture"] == NEGATIVE


# --- Labelling time is linear in the text length ---------------------------------------------------
# A run-on report without punctuation is one sentence and, with no split word, one part. The old
# labeler read every cue before every mention in that part: quadratic, and cubic through the
# "no ... suggest" pattern (28 kB took 2.5-5.5 s, 56 kB 15 s).
_RUN_ON = {
    "run-on": "the heart size is within normal limits there is no focal consolidation ",
    "line list": "small right pleural effusion\nno pneumothorax\n",
    "hedges": "possible pneumonia cannot be excluded no evidence of change in the effusion may represent ",
}


def _run_on(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


@pytest.mark.parametrize("shape", sorted(_RUN_ON))
def test_cue_scope_work_grows_linearly(shape, monkeypatch):
    """Operation count: the characters the cue reader sees, for N and 2N characters of text."""
    seen = []
    real = labeler._cue_state
    monkeypatch.setattr(labeler, "_cue_state", lambda pre, post: (seen.append(len(pre) + len(post)),
                                                                  real(pre, post))[1])
    work = []
    for n in (4000, 8000):
        seen.clear()
        label_report(_run_on(_RUN_ON[shape], n))
        work.append(sum(seen))
        assert max(seen) < 1000        # each mention's window is bounded, whatever the text length
    assert work[1] / work[0] < 2.3, work


def test_labelling_time_is_linear_in_text_length():
    def best_of_3(text):
        # CPU time of this process: other jobs on a shared machine do not inflate it
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            label_report(text)
            best = min(best, time.process_time() - t0)
        return best
    label_report(_run_on(_RUN_ON["run-on"], 2000))      # warm the caches
    for shape, unit in _RUN_ON.items():
        t1, t2 = best_of_3(_run_on(unit, 8000)), best_of_3(_run_on(unit, 16000))
        assert t2 / t1 < 3.5, (shape, t1, t2)


# --- IU corpus (read from the installed torchxrayvision package) ---------------------------------

needs_iu = pytest.mark.skipif(
    not iu_corpus_available(),
    reason="IU reports not installed: pip install --no-deps torchxrayvision==1.5.7")

# Measured 2026-11-28 (docs/labeler.md, second revision), re-measured 2026-11-29 after the field-case
# rules (Edema 0.970 -> 0.964, Atelectasis 0.975 -> 0.976, the rest unchanged); each floor is the
# measured F1 minus about 0.02, so a rule change that loses agreement fails here. Main table: POSITIVE, and UNCERTAIN when
# its hedge favours the finding (policy "probable"); the U-Ones table (every UNCERTAIN counts) has
# floors too, so that the "possible" hedges cannot drift into POSITIVE unnoticed.
F1_FLOORS = {
    "Cardiomegaly": 0.96,
    "Pleural Effusion": 0.95,
    "Atelectasis": 0.955,
    "Edema": 0.95,
    "Pneumothorax": 0.90,                        # 27 positives: one report moves F1 by ~0.02
    "Fracture": 0.91,
    "No Finding": 0.645,                         # MeSH "normal" excludes non-CheXpert abnormalities
    "No Finding (CheXpert-scope subset)": 0.935,
    "No Finding (vs MeSH: no CheXpert-class term)": 0.915,
}
F1_FLOORS_U_ONES = {
    "Cardiomegaly": 0.96, "Pleural Effusion": 0.89, "Atelectasis": 0.885, "Edema": 0.84,
    "Pneumothorax": 0.90, "Fracture": 0.84,
}


@pytest.fixture(scope="module")
def iu_labeled():
    reports = list(iter_iu_reports())
    return (reports, [label_report(r.text) for r in reports],
            [uncertainty_grades(r.text) for r in reports])


@needs_iu
def test_all_iu_reports_label(iu_labeled):
    reports, labels, _ = iu_labeled
    assert len(reports) == 3955
    for found in labels:
        assert set(found) <= set(OBSERVATIONS)
        assert all(f.state in (POSITIVE, NEGATIVE, UNCERTAIN) for f in found.values())
    assert sum("No Finding" in f for f in labels) > 1000


@needs_iu
def test_iu_mesh_agreement_floors(iu_labeled):
    reports, labels, grades = iu_labeled
    result = iu_agreement(reports=reports, labels=labels, grades=grades)
    assert result["reports"] == 3955 and result["policy"] == "probable"
    for name, floor in F1_FLOORS.items():
        row = result["classes"][name]
        assert row["f1"] >= floor, (name, row)
        assert row["support"] > 20
    u_ones = iu_agreement(reports=reports, labels=labels, policy="ones")["classes"]
    for name, floor in F1_FLOORS_U_ONES.items():
        assert u_ones[name]["f1"] >= floor, (name, u_ones[name])
