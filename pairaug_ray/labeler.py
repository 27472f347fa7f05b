"""Rule-based CheXpert-style labeler: 14 observations with negation, uncertainty, laterality, severity.

Usage::

    from pairaug_ray.labeler import label_report, label_states, label_vector
    found = label_report("Small left pleural effusion. No pneumothorax.")
    label_states(found)   # {"Pleural Effusion": 1, "Pneumothorax": 0}
    found["Pleural Effusion"].laterality, found["Pleural Effusion"].severity   # "left", "mild"

    pairaug label reports.jsonl > labels.jsonl          # the command line
    python benchmarks/labeler_agreement.py              # agreement with the IU reports' MeSH tags

How a report is read (docs/labeler.md has the rules and the measured agreement):

1. Sentences end at end punctuation, a blank line, a list line ("- ", "* ", "1.", "2)": each line
   of a list is its own scope, aphp/edsnlp#176) or an inline "1) ... 2) ..."; wrapped lines are
   joined. Each sentence is lower-cased, de-identification (``___``, ``XXXX``) removed, hyphens
   turned into spaces. "Key: value" template lines are rewritten as statements ("Pneumothorax:
   none" -> "no pneumothorax", "Heart: enlarged" -> "heart enlarged"; medspacy/medspacy#49).
   Misspelled observation words within one edit (two for long words) are read as the word
   ("pnuemothorax", "effusoin"; CheXbert, arXiv 2004.09167), and negated exclusions in any word
   order ("cannot be completely excluded", "can't rule out", "is not definitely excluded") are
   rewritten to one canonical hedge (CheXpert's "cannot exclude" rule, arXiv 1901.07031).
2. A sentence is cut into parts at ``, ; :`` and at ``but however although though whereas while
   except which where and with``. A part that continues a list (``no consolidation, effusion, or
   pneumothorax``) inherits the negation or uncertainty of the part before it, unless it starts like a
   new statement (a severity word, ``new``, ``there``...) or has its own verb.
3. Each observation's mention patterns are searched in each part. Before the mention (within
   ``SCOPE_WORDS`` words, which keeps labelling linear in the text length) the nearest cue wins:
   an uncertainty cue (``may``, ``possible``, ``likely``, ``suggestive``, ``question of``,
   ``versus``, ``borderline``, ``cannot exclude``...) makes it UNCERTAIN, a negation cue (``no``,
   ``without``, ``negative for``, ``free of``, ``resolution of``...) NEGATIVE; "no X to suggest Y"
   negates Y, and "no (evidence of) (interval) change in X" does not negate X (CheXpert/NegBio).
   With no cue before it, cues after it count (``cannot be excluded`` -> UNCERTAIN; ``has
   resolved``, ``is not seen``, ``removed``, ``has been ruled out`` -> NEGATIVE, the last also over
   a hedge before it); then one of two alternatives (``atelectasis or pneumonia``) is UNCERTAIN;
   else POSITIVE. Requests and conditionals (``if``, ``evaluation for``, ``correlate``, ``rule
   out``, ``is to be excluded``) and disclaimers (``fractures may not be demonstrated``) are not
   mentions. A "differential ..." cue hedges the rest of its sentence; a verb closing a list
   ("consolidation, atelectasis, and effusion have cleared") negates every item, a hedge closing a
   list of short noun phrases ("atelectasis and pneumonia cannot be excluded") hedges each.
   ``uncertainty_grades`` tells hedges that favour a finding ("probable", "likely", "versus") from
   ones that only raise it ("may", "possible", "cannot be excluded"); the IU agreement counts the
   first kind as positive. "Normal" statements (``heart size is normal``, ``lungs are clear``,
   ``normal cardiomediastinal silhouette``, ``heart size is not increased``) are NEGATIVE mentions
   of the observations they rule out; a finding that "has not increased" is still there.
4. Per observation, as in CheXpert: any POSITIVE mention wins, then UNCERTAIN, then NEGATIVE.
   "No Finding" is POSITIVE when no observation other than Support Devices is POSITIVE or UNCERTAIN.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

OBSERVATIONS: list[str] = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
_STATE_RANK = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}
_SEVERITY_RANK = {"mild": 0, "moderate": 1, "severe": 2}


@dataclass(frozen=True)
class Finding:
    observation: str
    state: int                 # POSITIVE / NEGATIVE / UNCERTAIN
    laterality: str | None     # "left" | "right" | "bilateral" | None
    severity: str | None       # "mild" | "moderate" | "severe" | None
    evidence: str = ""         # the sentence the decision came from


def _rx(*alternatives: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")")


_HEART = r"(?:heart|cardiac (?:silhouette|shadow|contours?|size|borders?)|heart (?:size|contours?|shadow))"
_MEDIASTINUM = (r"(?:cardio ?mediastin(?:um|al (?:silhouettes?|contours?|shadows?|width))"
                r"|mediastin(?:um|al (?:silhouettes?|contours?|shadows?|width|configuration))"
                r"|superior mediastinum|cardiopericardial silhouette)")
# "upper limits of normal" / "top normal" heart size is a normal size (IU indexes it as normal)
# "not increased" of a size ("heart size is not increased") is a normal size, unlike a finding that
# "has not increased" (unchanged, still there: _NOT_NEGATION).
_NORMAL_PRED = (r"(?:(?:upper limits? of |top |high )?normal|within normal limits|unremarkable|"
                r"not (?:\w+ly )?(?:enlarged|widened)|(?<!has )(?<!have )(?<!had )not (?:\w+ly )?increased)")

# Mention patterns per observation: text that names the observation (state decided by context).
MENTIONS: dict[str, list[re.Pattern]] = {
    "Enlarged Cardiomediastinum": [
        _rx(r"enlarged cardio ?mediastinum", r"mediastinal (?:widening|enlargement|prominence)",
            r"(?:widen(?:ed|ing)|enlarge(?:d|ment)|prominen(?:t|ce)) (?:of )?(?:the )?" + _MEDIASTINUM,
            _MEDIASTINUM + r"(?: \w+){0,4}? (?:widened|enlarged|prominent|wide)\b"),
    ],
    "Cardiomegaly": [
        _rx(r"cardiomegaly", r"(?:cardiac|heart) enlargement", r"enlarged " + _HEART,
            r"enlargement of the " + _HEART,
            _HEART + r"(?: \w+){0,4}? (?:enlarged|large)\b",
            _HEART + r"(?: (?!not\b)\w+){0,4}? increased\b",   # "not increased": _NORMAL_PRED
            _HEART + r"(?: \w+){0,3}? borderline",
            r"borderline (?:enlarged )?(?:heart|cardiac)"),
    ],
    "Lung Opacity": [
        _rx(r"(?<!nodular )opaci(?:ty|ties|fication|fications|fied)", r"infiltrat(?:e|es|ion|ive)",
            r"air ?space (?:disease|process|filling)", r"hazy|haziness",
            r"(?:increased|patchy|streaky|ill defined|hazy|interstitial|alveolar) densit(?:y|ies)"),
    ],
    "Lung Lesion": [
        _rx(r"nodul(?:e|es|ar (?:opacit\w+|densit\w+))", r"mass(?:es)?\b", r"tumou?rs?\b",
            r"neoplasm", r"carcinoma", r"cavitary (?:lesion|mass)", r"(?:lung|pulmonary) lesions?"),
    ],
    "Edema": [
        _rx(r"o?edema", r"heart failure", r"chf\b", r"(?:vascular|pulmonary|venous) congestion",
            r"congestion", r"(?:cardiac|early|congestive) failure",
            r"cephalization", r"vascular redistribution", r"pulmonary venous hypertension",
            r"(?:prominen(?:t|ce)|engorged|engorgement|increased|indistinct\w*) (?:of )?(?:the )?"
            r"(?:central )?(?:pulmonary |lung )?(?:vasculature|vascularity|vascular markings|vessels)",
            r"(?:vasculature|vascularity)(?: \w+){0,2}? (?:prominent|engorged|increased|indistinct)",
            r"congestive", r"vascular prominence", r"indistinct(?:ness)? (?:of )?(?:the )?"
            r"(?:pulmonary )?vascul"),
    ],
    "Consolidation": [_rx(r"consolidat(?:ion|ions|ive|ed)")],
    "Pneumonia": [_rx(r"(?:broncho)?pneumonia", r"pneumonitis", r"infection", r"infectious")],
    "Atelectasis": [
        _rx(r"atelecta(?:sis|ses|tic)", r"(?:lobar|lobe|lung|segmental|subsegmental) collapse",
            r"collapse of the (?:\w+ ){0,3}?(?:lobe|lung)", r"collapsed (?:\w+ )?(?:lobe|lung)"),
    ],
    "Pneumothorax": [
        re.compile(r"(?:hydro|hemo|haemo)?pneumothora(?:x|ces)"),
        _rx(r"pleural air\b", r"air (?:collection )?(?:\w+ ){0,4}?(?:in|within) the pleural space"),
    ],
    "Pleural Effusion": [
        _rx(r"(?<!pericardial )effusions?", r"pleural fluid", r"hydrothorax",
            r"hydropneumothorax"),
    ],
    "Pleural Other": [
        _rx(r"pleural (?:thickening|plaques?|calcifications?|scar\w*)", r"fibrothorax",
            r"pleuro ?parenchymal scar\w*", r"pleural parenchymal scar\w*"),
    ],
    "Fracture": [_rx(r"fractur(?:e|es|ed)\b", r"fx\b")],
    "Support Devices": [
        _rx(r"(?:endotracheal|et|nasogastric|ng|og|orogastric|feeding|chest|tracheostomy|enteric|"
            r"dobhoff|gastric|drainage|thoracostomy|gastrostomy) tubes?", r"tubes?\b",
            r"(?:central|venous|arterial|picc|midline|swan ganz|dialysis|port|jugular|subclavian|"
            r"catheter) lines?", r"picc\b", r"catheters?\b", r"pacemakers?", r"pacers?\b",
            r"a?icd\b", r"defibrillators?", r"(?:pacer|pacemaker|pacing|cardiac|transvenous|icd|"
            r"defibrillator|ekg|ecg|monitoring|telemetry) (?:leads?|wires?)",
            r"(?:sternotomy|sternal|surgical|cerclage|epicardial|pacer|pacing) wires?", r"sternotomy",
            r"clips?\b", r"stents?\b", r"ports?\b", r"port a cath", r"portacath", r"mediport",
            r"prosthe(?:sis|tic)", r"valve (?:replacement|prosthesis)", r"hardware", r"devices?\b",
            r"drains?\b", r"coils?\b", r"staples\b", r"sutures?\b", r"arthroplast\w*",
            r"cannula", r"(?:ivc )?filter\b", r"electrodes?\b", r"(?:plates?|screws?|rods?)\b",
            r"stimulators?\b", r"shunt\b", r"tubing", r"tracheostomy", r"monitor leads",
            # de-identification often blanks the device name but leaves its tip
            r"tips? (?:\w+ ){0,3}?(?:projects?|projecting|overl\w+|terminat\w+|in the|at the)"),
    ],
}

# "Normal" statements: NEGATIVE mentions of what they rule out.
NORMAL_STATEMENTS: dict[str, list[re.Pattern]] = {
    "Cardiomegaly": [
        _rx(r"(?:" + _HEART + r"|cardio ?mediastinal silhouette|cardio ?mediastinal contours?|"
            r"cardiopericardial silhouette)(?: \w+){0,6}? " + _NORMAL_PRED,
            r"normal (?:\w+ )?(?:heart|cardiac|cardio ?mediastinal|cardiopericardial)",
            r"normal sized? heart", r"heart (?:is )?normal"),
    ],
    "Enlarged Cardiomediastinum": [
        _rx(_MEDIASTINUM + r"(?: \w+){0,6}? " + _NORMAL_PRED,
            r"normal (?:\w+ )?(?:cardio ?mediastin|mediastin)",
            r"(?:heart|cardiac silhouette) and mediastinum(?: \w+){0,4}? " + _NORMAL_PRED),
    ],
    "Lung Opacity": [
        _rx(r"(?:lungs?|lung fields?|lung parenchyma|lung zones?)(?: \w+){0,4}? clear",
            r"clear lungs?"),
    ],
    "Edema": [
        _rx(r"(?:pulmonary )?vascularity(?: \w+){0,5}? " + _NORMAL_PRED,
            r"normal (?:pulmonary )?vascularity"),
    ],
    "Pleural Effusion": [
        _rx(r"(?:costophrenic (?:angles?|sulci)|pleural spaces?)(?: \w+){0,3}? (?:sharp|clear|normal)"),
    ],
    "Fracture": [
        _rx(r"(?:bones|osseous structures|bony structures|skeletal structures|visualized osseous"
            r"|bony thorax)(?: \w+){0,4}? (?:intact|unremarkable|normal)",
            r"no acute (?:bony|osseous|skeletal) (?:abnormalit\w+|findings?|injury|process)"),
    ],
}
# "Lungs are clear except for ..." is not a normal statement.
_EXCEPT = re.compile(r"\b(?:except|other than|besides|apart from|aside from|save for)\b")

_PRE_NEG = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|resolution of|resolved|"
    r"removal of|removed|nor|neither|rather than|clear of|ruled out|rules out|excluded|excludes|"
    r"clearing of|cleared)\b")
# "no change in the effusion" is not a negation of the effusion (CheXpert and NegBio read a finding
# under "no change" / "no interval change" as present): a negation word, an optional "evidence of",
# up to three degree or time words, then a change noun. A finding word in between ("no atelectatic
# change") keeps the negation: only the words of _CHANGE_MOD may stand there.
_CHANGE_MOD = (r"(?:significant|significantly|appreciable|appreciably|substantial|substantially|interval|"
               r"definite|definitely|definitive|real|radiographic|radiographically|apparent|apparently|"
               r"measurable|measurably|gross|notable|visible|marked|markedly|obvious|obviously|further|"
               r"considerable|considerably|major|material|materially|meaningful|discernible|perceptible|"
               r"detectable|important|relevant|overall|evident|dramatic|noticeable|serial|short term|"
               r"recent|much|any|clear|convincing)")
_NOT_NEGATION = re.compile(
    r"\b(?:(?:no|without|with no|not any|nor)(?: (?:evidence|sign|signs|suggestion|indication) of)?"
    r"(?: " + _CHANGE_MOD + r"){0,3} (?:change|changes|increase|decrease|worsening|improvement|"
    r"progression|growth|difference|regression|evolution)|"
    r"(?:not|has not|have not)(?: " + _CHANGE_MOD + r"){0,2} (?:changed|increased|decreased|improved|"
    r"worsened|progressed|grown|regressed)|no longer|"
    # "not seen on the prior study": the finding is new, not absent
    r"not (?:seen|present|visible|identified|evident|apparent) (?:on|in) (?:the )?(?:prior|previous|"
    r"comparison|earlier|old)\w*|"
    # "nearly resolved", "partial resolution of": some of the finding is still there
    r"(?:almost|nearly|partially|partly|incompletely|near|partial|incomplete)(?: complete(?:ly)?)? "
    r"(?:resolved|resolving|resolution of|cleared|clearing of))\b")
_NO_LONGER = re.compile(r"\bno longer\b")
# CheXpert post-negation "ruled out" / "excluded": "has been ruled out", "was excluded", "can be
# excluded". "cannot be excluded" is read by _POST_UNC first, "to be excluded" (a request) by _POST_DROP.
_RULED_OUT = (r"(?:(?:(?:has|have|had) (?:now |since |also )?been |(?:is|are|was|were) (?:now |also )?|"
              r"(?:can|could) (?:now )?be )(?:\w+ly )?(?:ruled out|excluded)|"
              r"(?<!\bbe )(?<!\bnot )(?<!cannot )(?<!\bto )(?:ruled out|excluded))")
_POST_NEG = re.compile(
    r"^(?:\s+\w+){0,4}?\s+(?:(?:is|are|was|were) )?(?:not (?:seen|identified|present|visualized|"
    r"demonstrated|appreciated|evident|noted|detected|enlarged|widened)"
    r"(?! (?:on|in) (?:the )?(?:prior|previous|comparison|earlier|old))|(?:has |have )?"
    r"(?<!almost )(?<!nearly )(?<!partially )(?<!partly )(?<!near )(?:resolved|cleared)|"
    r"no longer|removed|absent|not appreciated|" + _RULED_OUT + r")\b")
_POST_RULED_OUT = re.compile(r"^(?:\s+\w+){0,4}?\s+" + _RULED_OUT + r"\b")
_PRE_UNC = re.compile(
    r"\b(?:may|maybe|might|could|possible|possibly|possibility|probable|probably|likely|presum\w*|suggest\w*|"
    r"suspicious|suspect\w*|concern\w*|question\w*|cannot (?:be )?exclude\w*|can not (?:be )?"
    r"exclude\w*|not (?:be )?(?:entirely )?excluded|cannot rule out|rule out|r o|differential|"
    r"versus|vs|equivocal|indeterminate|uncertain|borderline|"
    r"consider\w*|atypical)\b")
# Hedges that favour the finding (a likelihood above even: "probable", "likely", "borderline", a
# two-way "X versus Y"); the other uncertainty cues only raise it ("may", "possible", "question of",
# "cannot exclude", "differential includes"). Both give UNCERTAIN; uncertainty_grades() tells them apart.
_FAVOURED_UNC = re.compile(r"\b(?:probable|probably|likely|presum\w*|borderline|versus|vs)\b")
# "fracture of indeterminate age" hedges the age, not the fracture
_AGE_HEDGE = re.compile(r"\b(?:age (?:indeterminate|undetermined|uncertain|unknown)|(?:indeterminate|"
                        r"undetermined|uncertain|unknown) (?:age|chronicity))\b")
# "differential diagnosis includes A, B, mild C": every later part of the sentence is a hedge too
_DIFFERENTIAL = re.compile(r"\b(?:differential|considerations?)\b")
# "compatible with X", "correlate with X": "with" there joins a complement, not a new clause
_WITH_COMPLEMENT = re.compile(r"\b(?:compatible|consistent|associated|keeping|correlat\w*|clinically)$")
# Requests and conditionals name an observation without reporting it: such mentions are dropped.
_HYPOTHETICAL = re.compile(r"\b(?:if|evaluat\w* (?:for|of)|assess\w* for|correlat\w*|rule out|r o|"
                           r"in case of|to exclude)\b")
# Mentions that name another thing: a fractured screw or catheter is not a bone fracture.
UNMENTIONS: dict[str, re.Pattern] = {
    "Fracture": _rx(r"(?:screws?|catheters?|wires?|leads?|hardware|tubes?|lines?|plates?|rods?|"
                    r"devices?|sternotomy)\b"),
    "Edema": _rx(r"(?:soft tissue|subcutaneous) (?:edema|swelling)"),
}
# "fractures may not be demonstrated": a disclaimer, not a report of the observation.
_POST_DROP = re.compile(r"^(?:\s+\w+){0,2}?\s+(?:may not be (?:demonstrated|seen|visible|detected|apparent)|"
                        r"(?:is |are )?(?:to be|should be|must be|needs to be|need to be) "
                        r"(?:excluded|ruled out|evaluated|assessed)\b)")
# "no opacity to suggest pneumonia": the hedge sits inside a negation.
_NEG_WORD = re.compile(r"\b(?:no|without|not)\b")
_HEDGE_UNDER_NEG = re.compile(r"\b(?:to suggest|suggest\w*|suspicious|concerning for|worrisome for)\b")


def _neg_before_hedge(text: str) -> bool:
    # two forward scans; the old single pattern ("no" .* "suggest") backtracked from every "no"
    neg = _NEG_WORD.search(text)
    return neg is not None and _HEDGE_UNDER_NEG.search(text, neg.end()) is not None


_POST_UNC = re.compile(
    r"^(?:\s+\w+){0,4}?\s+(?:(?:cannot|can not|could not|can t) (?:be )?(?:entirely )?"
    r"(?:excluded|exclude|ruled out)|not (?:be )?(?:entirely )?(?:excluded|ruled out)|(?:is|are)"
    r"(?: also| still)? (?:possible|questioned|suspected|likely|questionable|not excluded)|may be present|"
    r"(?:difficult|hard) to exclude|versus|vs)\b")
_ALT_STEMS = (r"(?:atelecta|pneumon|infect|consolidat|infiltrat|o?edema|effusion|scar|fibros|opaci|"
              r"air ?space|mass|nodul|granulom|fluid|hemorrhage|aspiration|collapse|vascular|fat|"
              r"pleural|thickening|lymph|vessel|neoplasm|tumor)")
_ALT_AFTER = re.compile(r"^\s+(?:or|versus|vs|/)\s+(?:\w+ ){0,2}?" + _ALT_STEMS)
_ALT_BEFORE = re.compile(_ALT_STEMS + r"\w*(?: \w+){0,2}?\s+(?:or|versus|vs|/)\s+(?:\w+ ){0,2}?$")

_SPLIT = re.compile(r"\s*[,;:]\s*|\s+(but|however|although|though|whereas|while|except|which|where|"
                    r"and|with)\s+")
_NEW_STATEMENT = re.compile(
    r"^(?:small|mild|mildly|moderate|moderately|minimal|trace|tiny|new|increased|increasing|"
    r"persistent|stable|unchanged|residual|slight|there|the|a|an|possible|"
    r"probable|likely|may|old|healed|healing|chronic)\b")
_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|seen|noted|identified|present|demonstrated|"
                   r"visualized|appears?|remains?|persists?|there|shows?|again)\b")
# "..., or pneumothorax is identified": a verb that closes the whole list
_TRAILING_VERB = re.compile(r"(?: (?:is|are|was|were|has been|have been))?(?: \w+ly)? (?:seen|identified|"
                            r"noted|present|demonstrated|visualized|evident|appreciated|detected)$")
# "Consolidation, atelectasis, and effusion have cleared": a verb at the end of a list negates it all
_LIST_CLOSING_NEG = re.compile(
    r"\b(?:(?:has|have) (?:now |since |all |completely )?(?:resolved|cleared)|(?:is|are|was|were) no "
    r"longer (?:seen|present|visible|identified)|(?:is|are|was|were) not (?:seen|identified|present|"
    r"visualized)|(?:(?:has|have) (?:now |since |all |both )?been|(?:is|are|was|were)) "
    r"(?:ruled out|excluded))(?: \w+){0,4}$")
# ... and its hedged twin: "atelectasis and pneumonia cannot be excluded" hedges both
_LIST_CLOSING_UNC = re.compile(
    r"\b(?:cannot be excluded|cannot exclude|(?:is|are) (?:also |still )?(?:possible|questioned|suspected|"
    r"questionable|likely|probable))(?: \w+){0,4}$")
_LIST_START = re.compile(r"^(?:or|nor|and|and/or)\b")

_LEFT = re.compile(r"\bleft\b|\blt\b")
_RIGHT = re.compile(r"\bright\b|\brt\b")
_BILATERAL = re.compile(r"\b(?:bilateral(?:ly)?|both|bibasilar|bibasal|biapical|bilat)\b")
_SEVERITY = [
    ("severe", re.compile(r"\b(?:severe|severely|large|larger|massive|marked|markedly|extensive|"
                          r"significant|substantial|huge)\b")),
    ("moderate", re.compile(r"\b(?:moderate|moderately|medium)\b")),
    ("mild", re.compile(r"\b(?:mild|mildly|minimal|minimally|small|smaller|trace|tiny|slight|"
                        r"slightly|minor|subtle)\b")),
]
_NO_LATERALITY = {"Cardiomegaly", "Enlarged Cardiomediastinum", "No Finding"}

_SENTENCES = re.compile(r"(?<=[.!?])\s+|(?<=\.)(?=[A-Z])"
                        # an inline enumeration or bullet starts a new item: "1) no effusion 2) edema"
                        r"|\s+(?=\(?\d{1,2}[.)]\s+[A-Za-z])|\s*[\u2022\u25aa\u25e6\u2023]\s*")
_DEID = re.compile(r"_{2,}|\bx{3,}\b", re.IGNORECASE)

# --- Line lists (aphp/edsnlp#176: a negation on one line must not spread to the next) -------------
# A line break ends a sentence unless the line was wrapped. In order: a line that starts with a
# list marker ("- ", "* ", "1.", "2)", "(a)") starts a new sentence; a line that ends or starts with
# a word needing a continuation ("of", "or", "the", "no", "left"...) is joined to its neighbour; a
# line that opens like a statement ("No ...", "Mild ...", "Small ...") starts a new sentence, and so
# does one that starts in upper case in mixed-case text; any other line continues the previous one
# only when that one is of wrap width (a short line was ended by hand, not wrapped).
_LIST_MARKER = re.compile(r"^\s*(?:[-*+\u2022\u25aa\u25e6\u2023\u2013\u2014]|\(?\d{1,2}[.)]|"
                          r"\(?[a-hA-H]\))\s+")
_LINE_CONT_END = re.compile(
    r"(?:[,(/&-]|\b(?:and|or|nor|of|with|without|the|a|an|to|for|in|on|at|by|from|over|under|above|"
    r"below|into|within|through|along|near|between|beyond|onto|towards?|via|after|before|since|upon|"
    r"overlying|projecting|no|not|is|are|was|were|has|have|had|be|been|versus|vs|than|as|which|that|"
    r"there|these|its|their|small|large|mild|moderate|severe|left|right|bilateral|minimal|trace|"
    r"possible|probable|likely|may|can|cannot|could|would|suggest|suggests|suggesting|represent|"
    r"represents|concerning|consistent|compatible|due))\s*$",
    re.IGNORECASE)
_LINE_CONT_START = re.compile(
    r"(?:and|or|nor|of|with|which|that|to|in|on|at|by|from|is|are|was|were|has|have|had|than|as|"
    r"versus|vs)\b", re.IGNORECASE)
_LINE_OPENER = re.compile(
    r"(?:no|without|normal|mild|mildly|moderate|moderately|severe|small|large|minimal|trace|tiny|"
    r"new|increased|decreased|persistent|stable|unchanged|resolved|resolving|residual|slight|there|"
    r"possible|probable|likely|old|healed|healing|chronic|acute|bilateral|left|right|status)\b",
    re.IGNORECASE)
_WRAP_WIDTH = 50


def _wrapped(prev: str, cur: str, cased: bool) -> bool:
    """True when line ``cur`` continues line ``prev`` (see the rule above)."""
    if not prev or _LIST_MARKER.match(cur) or prev.endswith((".", "!", "?", ":", ";")):
        return False
    if _LINE_CONT_END.search(prev) or _LINE_CONT_START.match(cur):
        return True
    if _LINE_OPENER.match(cur):
        return False
    if cased and cur[0].isupper():
        return False
    return len(prev) >= _WRAP_WIDTH


def _joined_lines(text: str) -> list[str]:
    """Lines grouped into blocks: wrapped lines joined, list lines and paragraphs kept apart."""
    cased = text != text.lower() and text != text.upper()
    blocks: list[list[str]] = []
    prev = ""
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        cur = line.strip()
        if not cur:
            prev = ""               # a blank line ends a paragraph
            continue
        if _wrapped(prev, cur, cased):
            blocks[-1].append(cur)
        else:
            blocks.append([cur])
        prev = cur
    return [" ".join(b) for b in blocks]


def split_sentences(text: str) -> list[str]:
    """Sentences of a report: end punctuation, blank lines, list lines and inline enumerations
    ("1) ... 2) ...") end one; list markers are dropped."""
    out = []
    for block in _joined_lines(text or ""):
        for s in _SENTENCES.split(block):
            s = _LIST_MARKER.sub("", s or "").strip() if s else ""
            if s:
                out.append(s)
    return out


def sentence_text(text: str) -> str:
    """``text`` as one line of sentences, each ended by punctuation: wrapped lines joined, list
    lines ("- small effusion", "1. no pneumothorax") and lines that open a statement become
    sentences of their own, list markers dropped. What ingest stores, so every later reader
    (labeler, rewriter, generator prompt) sees the statements the author wrote."""
    return " ".join(s if s.endswith((".", "!", "?")) else s + "." for s in split_sentences(text or ""))


# --- "Finding: none" templates (medspacy/medspacy#49) ---------------------------------------------
# "Pneumothorax: none", "EFFUSION - absent", "Heart: enlarged", "Pneumonia: cannot be excluded":
# a key of up to four words, a colon (or a spaced dash, or "="), a short value, at the start of a
# sentence or of a segment after , ; or :. A status value ("none", "no", "absent", "negative",
# "not seen" ...) becomes "no <key>", "present" / "yes" becomes "<key>", a value that starts with a
# cue ("possible", "not enlarged") is read before the key, any other value after it ("heart enlarged",
# "lungs clear", "effusion small left"), so the ordinary rules read the line.
_TEMPLATE = re.compile(r"(^|[,;:]\s*)([a-z][a-z /&]{0,40}?)\s*(?::|\s[-\u2013\u2014]\s|=)\s*"
                       r"([^,;:.]{1,80}?)\s*(?=[,;.]|$)")
_NEG_STATUS = re.compile(
    r"(?:none|nil|no|neg|negative|absent|ruled out|excluded|not (?:seen|present|identified|detected|"
    r"demonstrated|visualized|appreciated|evident|noted|visible))(?: (?:seen|identified|noted|present|"
    r"detected|evident|demonstrated|visualized))?")
_POS_STATUS = re.compile(r"yes|present|positive|pos|seen|noted|identified|detected")


def _template_line(m: re.Match) -> str:
    lead, key, value = m.group(1), m.group(2).strip(), m.group(3).strip()
    if len(key.split()) > 4 or len(value.split()) > 6:
        return m.group()
    if _NEG_STATUS.fullmatch(value):
        return f"{lead}no {key}"
    if _POS_STATUS.fullmatch(value):
        return f"{lead}{key}"
    if value == "?":
        return f"{lead}possible {key}"
    if _PRE_UNC.match(value) or _PRE_NEG.match(value):
        return f"{lead}{value} {key}"
    return f"{lead}{key} {value}"


# --- Hedges in any word order (CheXpert's "cannot exclude" rule, arXiv 1901.07031) ----------------
# "cannot be completely excluded", "is not definitely excluded", "can't rule out", "has not been
# entirely ruled out", "unable to exclude", "it is not possible to rule out": an inability or a
# negation, up to two adverbs, then exclude / rule out. Each becomes "cannot be excluded" (passive)
# or "cannot exclude" (active), the forms the cue patterns read.
_HEDGE_ADV = (r"(?:completely|entirely|definitely|definitively|fully|totally|absolutely|confidently|"
              r"reliably|safely|really|wholly|certainly|conclusively|firmly|positively|altogether|quite|"
              r"yet|still|necessarily|now|\w+ly)")
_NEGATED_EXCLUSION = re.compile(
    r"\b(?:(?:is|are|was|were|has|have|had|has been|have been|had been|it is|this is) )?"
    r"(?:cannot|can not|can t|could not|couldn t|could t|may not|might not|unable to|not able to|"
    r"not possible to|impossible to|difficult to|hard to|does not|doesn t|do not|did not|would not|"
    r"wouldn t|will not|won t|not)"
    r"(?: " + _HEDGE_ADV + r"){0,2}(?: (?:be|been|being))?(?: " + _HEDGE_ADV + r"){0,2}"
    r" (?P<verb>excluded|exclude|ruled out|rule out|r o|r / o)\b")


def _canonical_hedge(m: re.Match) -> str:
    return "cannot be excluded" if m.group("verb") in ("excluded", "ruled out") else "cannot exclude"


# --- Misspelled observation words (CheXbert, arXiv 2004.09167: rule-based labelers miss mentions ----
# whose spelling their phrase lists do not cover). A token within one edit (insertion, deletion,
# substitution, or a swap of two adjacent letters: Damerau 1964, CACM 7(3)) of an observation head
# word, two edits for head words of 11 letters or more, is read as that word; doubled letters are
# compared once ("efussion", "cardiomegally" are one edit from "effusion"). Guards against false
# hits: only tokens of 5+ letters, the first letter must agree (misspellings seldom change it: Pollock
# & Zamora 1984, CACM 27(4)), and real words that lie that close (_SPELL_KEEP) are never rewritten.
_SPELL_KEYS: tuple[str, ...] = (
    # Pneumothorax, Pleural Effusion, Pleural Other
    "pneumothorax", "pneumothoraces", "hydropneumothorax", "hemopneumothorax", "effusion", "effusions",
    "pleural", "hydrothorax", "fibrothorax", "thickening",
    # Cardiomegaly, Enlarged Cardiomediastinum
    "cardiomegaly", "mediastinum", "mediastinal", "cardiomediastinal", "cardiomediastinum",
    # Lung Opacity, Consolidation, Pneumonia, Atelectasis, Edema
    "opacity", "opacities", "opacification", "opacified", "infiltrate", "infiltrates", "infiltration",
    "infiltrative", "haziness", "airspace", "consolidation", "consolidations", "consolidative",
    "consolidated", "pneumonia", "pneumonias", "pneumonitis", "bronchopneumonia", "infection",
    "atelectasis", "atelectases", "atelectatic", "edema", "oedema", "congestion", "cephalization",
    # Lung Lesion, Fracture
    "nodule", "nodules", "nodular", "tumor", "tumour", "tumors", "neoplasm", "carcinoma", "lesion",
    "lesions", "fracture", "fractures", "fractured",
    # Support Devices
    "catheter", "catheters", "pacemaker", "pacemakers", "sternotomy", "tracheostomy", "endotracheal",
    "nasogastric", "orogastric", "defibrillator",
)
# Real words (English or radiology) within reach of a head word: left as written.
_SPELL_KEEP = frozenset((
    "legion", "legions", "lesson", "lessons", "tutor", "tutors", "tudor", "timor", "tumours",
    "pleura", "pleurae", "plural", "cardia", "cardiac", "pneumonic", "pneumothoracic", "infections",
    "infectious", "injection", "injections", "inflection", "inflation", "infarction", "consolation",
    "consolidate", "consolidating", "consolidates", "features", "featured", "fraction",
    "fractional", "fracturing", "effusive", "nodal", "nodularity", "edemas", "edematous", "enema",
    "enemas", "oedemas", "congestive", "congested", "catheterization", "pacemaking", "peacemaker",
    "peacemakers", "tracheotomy", "happiness", "noodle", "noodles", "opacify", "opacifies",
    "opacifying", "opaque", "opacifications", "mediastina", "mediastinitis", "thickened",
    "thickenings", "haziest", "hazier", "lesional", "neoplasms", "neoplastic", "carcinomas",
    "carcinomatous", "hydrothoraces", "infiltrated", "infiltrating", "infiltrations", "airspaces"
))
_SPELL_MIN = 5
_SPELL_MAX = max(map(len, _SPELL_KEYS)) + 2


def _spell_tolerance(key: str) -> int:
    return 2 if len(key) >= 11 else 1


def _deletes(word: str, depth: int) -> set[str]:
    out, frontier = {word}, {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1:] for w in frontier for i in range(len(w))}
        out |= frontier
    return out


def _undouble(word: str) -> str:
    return re.sub(r"(.)\1+", r"\1", word)


# symmetric-delete index (every string a key reaches by deleting up to its tolerance of letters), on
# the keys with doubled letters collapsed: a token within k edits of a key shares a k-delete with it
_SPELL_INDEX: dict[str, list[str]] = {}
for _key in _SPELL_KEYS:
    for _d in _deletes(_undouble(_key), _spell_tolerance(_key)):
        _SPELL_INDEX.setdefault(_d, []).append(_key)
_SPELL_KNOWN = frozenset(_SPELL_KEYS) | _SPELL_KEEP


def _osa_distance(a: str, b: str) -> int:
    """Optimal-string-alignment edit distance (Damerau: adjacent swaps count as one edit)."""
    prev2, prev = [], list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


@functools.lru_cache(maxsize=1 << 16)
def correct_spelling(token: str) -> str:
    """The observation head word a misspelled lower-case ``token`` stands for, or ``token`` itself.

    ``correct_spelling("pnuemothorax") == "pneumothorax"``; ``correct_spelling("module") == "module"``.
    """
    if not _SPELL_MIN <= len(token) <= _SPELL_MAX or token in _SPELL_KNOWN or not token.isalpha():
        return token
    best, best_d, short = token, 3, _undouble(token)
    for d in _deletes(short, 2):
        for key in _SPELL_INDEX.get(d, ()):
            if key[0] != token[0]:
                continue
            dist = min(_osa_distance(token, key), _osa_distance(short, _undouble(key)))
            if dist <= _spell_tolerance(key) and (dist, key) < (best_d, best):
                best, best_d = key, dist
    return best


_SPELL_WORD = re.compile(rf"\b[a-z]{{{_SPELL_MIN},{_SPELL_MAX}}}\b")


def _normalize(sentence: str) -> str:
    s = _DEID.sub(" ", sentence.lower())
    if ":" in s or "=" in s or " -" in s or "\u2013" in s or "\u2014" in s:
        s = _TEMPLATE.sub(_template_line, s)
    s = re.sub(r"(?<=\w)[-/](?=\w)", lambda m: " / " if m.group() == "/" else " ", s)
    s = re.sub(r"[^\w,;:/ ]+", " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _SPELL_WORD.sub(lambda m: correct_spelling(m.group()), s)
    if "exclu" in s or "rule" in s or " r o" in s or " r / o" in s:
        s = _NEGATED_EXCLUSION.sub(_canonical_hedge, s)
    return s


def _parts(sentence: str) -> list[tuple[str, str]]:
    """(separator before the part, part text) for each part of a normalized sentence."""
    out, pos, sep = [], 0, ""
    for m in _SPLIT.finditer(sentence):
        out.append((sep, sentence[pos:m.start()].strip()))
        sep, pos = (m.group(1) or m.group().strip()), m.end()
    out.append((sep, sentence[pos:].strip()))
    merged: list[tuple[str, list[str]]] = []
    for s, p in out:
        if s == "with" and merged and _WITH_COMPLEMENT.search(merged[-1][1][-1].rsplit(" ", 1)[-1]):
            merged[-1][1].extend(("with", p))
        else:
            merged.append((s, [p]))
    return [(s, " ".join(q for q in p if q)) for s, p in merged if any(p)]


def _last_end(rx: re.Pattern, text: str) -> int:
    end = -1
    for m in rx.finditer(text):
        end = m.end()
    return end


def _cue_state(pre: str, post: str) -> tuple[int | None, bool]:
    """(UNCERTAIN / NEGATIVE / None, favoured) from cues around a mention.

    Before the mention the nearest cue wins ("borderline cardiomegaly without heart failure":
    heart failure is negated); cues after the mention are read when there is none before it.
    ``favoured`` is True for an UNCERTAIN state whose hedges all favour the finding ("probable",
    "likely", "versus"); one weaker hedge before it ("may represent X versus Y") makes it False.
    """
    if _neg_before_hedge(pre):
        return NEGATIVE, False
    pre, post = _AGE_HEDGE.sub(" ", pre), _AGE_HEDGE.sub(" ", post)
    # blanked to the same length, so that cue offsets in pre and pre_clean compare
    pre_clean = _NOT_NEGATION.sub(lambda m: m.group() if _NO_LONGER.fullmatch(m.group())
                                  else " " * len(m.group()), pre)
    unc = _last_end(_PRE_UNC, pre)
    neg = max(_last_end(_PRE_NEG, pre_clean), _last_end(_NO_LONGER, pre))
    m = _POST_UNC.search(post)
    if unc >= 0 or neg >= 0:
        if unc < neg:
            return NEGATIVE, False
        # "the questioned pneumothorax has been ruled out": the exclusion settles the hedge
        if not m and _POST_RULED_OUT.search(post):
            return NEGATIVE, False
        return UNCERTAIN, _all_favoured(pre)
    if m:
        return UNCERTAIN, bool(re.search(r"\b(?:likely|probable|versus|vs)$", m.group()))
    if _POST_NEG.search(post):
        return NEGATIVE, False
    return None, False


def _all_favoured(text: str) -> bool:
    """True when every uncertainty cue in ``text`` favours the finding ("probable", "most
    suggestive of"); False when one only raises it ("may", "possible") or there is none."""
    cues = list(_PRE_UNC.finditer(text))
    def favours(c: re.Match) -> bool:
        return (bool(_FAVOURED_UNC.fullmatch(c.group())) and not text.endswith("less ", 0, c.start())) \
            or text.endswith("most ", 0, c.start())
    return bool(cues) and all(favours(c) for c in cues)


def _part_mode(part: str) -> tuple[int | None, bool]:
    """The cue in force at the end of a part (for list parts that follow it)."""
    return _cue_state(part, "")


def _laterality(text: str) -> str | None:
    left, right = bool(_LEFT.search(text)), bool(_RIGHT.search(text))
    if _BILATERAL.search(text) or (left and right):
        return "bilateral"
    return "left" if left else "right" if right else None


def _severity(text: str) -> str | None:
    text = _NOT_NEGATION.sub(" ", text)
    for name, rx in _SEVERITY:
        if rx.search(text):
            return name
    return None


@dataclass
class _Mention:
    observation: str
    state: int
    laterality: str | None
    severity: str | None
    evidence: str
    favoured: bool = False     # an UNCERTAIN mention under hedges that favour it (see _FAVOURED_UNC)


# Cue scope, in words. Cues are read in the SCOPE_WORDS words before a mention (and the mention
# itself) and in the POST_WORDS words after it, so labelling is linear in the text length: a run-on
# report with no punctuation is one huge part, and reading every cue before every mention in it was
# quadratic (cubic with the old "no ... suggest" pattern). The longest part of any IU report is 30
# words, so no IU label depends on the bound; NegEx (Chapman et al. 2001) scopes a cue over 5 words.
SCOPE_WORDS = 40
POST_WORDS = 16
_WORD_START = re.compile(r"(?<!\S)\S")
_WORD_TAIL = re.compile(r"\w*")


class _Part:
    """A part with its word offsets, to cut scope windows around a mention in O(window)."""

    def __init__(self, text: str):
        self.text = text
        self.short = text.count(" ") < POST_WORDS   # every window is the whole part

    @functools.cached_property
    def starts(self) -> list[int]:
        return [m.start() for m in _WORD_START.finditer(self.text)]

    def _word_at(self, pos: int) -> int:
        return max(bisect.bisect_right(self.starts, pos) - 1, 0)

    def before(self, pos: int) -> str:
        """Text of the SCOPE_WORDS words before ``pos``."""
        if self.short or not self.starts:
            return self.text[:pos]
        i = self._word_at(pos)
        return self.text[self.starts[max(i - SCOPE_WORDS, 0)]:pos]

    def after(self, pos: int) -> str:
        """Text from ``pos`` to the end of the POST_WORDS-th word after it."""
        if self.short:
            return self.text[pos:]
        i = self._word_at(pos) + POST_WORDS + 1
        return self.text[pos:self.starts[i]] if i < len(self.starts) else self.text[pos:]

    def tail(self) -> str:
        """The last SCOPE_WORDS words."""
        if self.short or len(self.starts) <= SCOPE_WORDS:
            return self.text
        return self.text[self.starts[-SCOPE_WORDS]:]


def _closing_range(parts: list[tuple[str, str]]) -> tuple[int, tuple[int, bool] | None]:
    """From which part on every part is a verb-less list item closed by a negation ("consolidation,
    atelectasis, and effusion have cleared") or a hedge ("atelectasis and pneumonia cannot be
    excluded"), and the (state, favoured) it gives them."""
    if not parts:
        return 0, None
    last = parts[-1][1]
    if _LIST_CLOSING_NEG.search(last):
        closing, hedged = (NEGATIVE, False), False
    else:
        m = _LIST_CLOSING_UNC.search(last)
        if not m:
            return len(parts), None
        closing, hedged = (UNCERTAIN, bool(re.search(r"\b(?:likely|probable)\b", m.group()))), True
    k = len(parts) - 1
    while k > 0 and parts[k][0] in (",", "and") and not _VERB.search(parts[k - 1][1]):
        # a hedge reaches back over short noun phrases only ("atelectasis, pneumonia and edema cannot
        # be excluded"), not over a statement ("opacities due in part to atelectasis, ...")
        if hedged and (_NEW_STATEMENT.match(parts[k][1]) or len(parts[k - 1][1].split()) > 4):
            break
        k -= 1
    return k, closing


def _sentence_mentions(original: str) -> list[_Mention]:
    sentence = _normalize(original)
    found: list[_Mention] = []
    inherited: int | None = None
    inherited_favoured = False
    in_differential = False  # a "differential ..." cue earlier in the sentence hedges what follows
    parts = _parts(sentence)
    closing_from, closing = _closing_range(parts)
    has_except = bool(_EXCEPT.search(sentence))
    fragment = ""  # a mention-free part before "and": "small left [and] moderate right effusions"
    for k, (sep, part) in enumerate(parts):
        context = (fragment + " " + part) if sep == "and" and fragment else part
        n_found = len(found)
        list_like = (sep in (",", "and") and not _NEW_STATEMENT.match(part)
                     and (_LIST_START.match(part) or not _VERB.search(_TRAILING_VERB.sub("", part))))
        carry = inherited if list_like else None
        carry_favoured = inherited_favoured if list_like else False
        words = _Part(part)
        where: tuple[str | None, str | None] | None = None  # (laterality, severity), once per part
        for obs, patterns in MENTIONS.items():
            if obs in UNMENTIONS and UNMENTIONS[obs].search(part):
                continue
            for rx in patterns:
                for m in rx.finditer(part):
                    # cues after the mention start after its word ("infiltrate|s cannot be excluded")
                    before = words.before(m.start())
                    post = words.after(_WORD_TAIL.match(part, m.end()).end())
                    if _HYPOTHETICAL.search(before) or _POST_DROP.search(post):
                        continue
                    # a list part under "no ..." reads as if the "no" were repeated
                    lead = "no " if carry == NEGATIVE else ""
                    state, favoured = _cue_state(lead + before + " " + m.group(), post)
                    if state is None and carry is not None:
                        state, favoured = carry, carry_favoured
                    if state is None and k >= closing_from and closing is not None:
                        state, favoured = closing
                    if state is None and in_differential:
                        state, favoured = UNCERTAIN, False
                    if state is None and (_ALT_AFTER.search(post) or _ALT_BEFORE.search(before)):
                        state, favoured = UNCERTAIN, True
                    if state is None:
                        state = POSITIVE
                    if where is None:
                        where = (_laterality(context), _severity(context))
                    found.append(_Mention(obs, state, *where, original, favoured and state == UNCERTAIN))
        if not has_except:
            for obs, patterns in NORMAL_STATEMENTS.items():
                # "the heart size [and] mediastinal contours are normal": read the fragment too
                if any(rx.search(context) for rx in patterns):
                    state = UNCERTAIN if _PRE_UNC.search(context) else NEGATIVE
                    favoured = _all_favoured(context)
                    found.append(_Mention(obs, state, None, None, original, favoured))
                    if obs == "Cardiomegaly" and re.search(r"cardio ?mediastinal|mediastinum", context):
                        found.append(_Mention("Enlarged Cardiomediastinum", state, None, None, original,
                                              favoured))
        own, own_favoured = _part_mode(("no " if carry == NEGATIVE else "") + words.tail())
        inherited, inherited_favoured = ((own, own_favoured) if own is not None
                                         else (carry, carry_favoured))
        if own == UNCERTAIN and _DIFFERENTIAL.search(part):
            in_differential = True
        fragment = part if len(found) == n_found else ""
    return found


def _merge_laterality(values: list[str | None]) -> str | None:
    vals = {v for v in values if v}
    if "bilateral" in vals or {"left", "right"} <= vals:
        return "bilateral"
    return vals.pop() if vals else None


def label_report(text: str) -> dict[str, Finding]:
    """Label one report (findings + impression): only mentioned observations, plus "No Finding"."""
    return _label(text)[0]


def uncertainty_grades(text: str) -> dict[str, str]:
    """For each observation that :func:`label_report` makes UNCERTAIN: how strongly it is hedged.

    "probable" when one of its uncertain mentions is hedged only by cues that favour it
    ("probable effusion", "likely atelectasis", "borderline cardiomegaly", "atelectasis versus
    pneumonia", "scarring or atelectasis"); "possible" when every mention is merely raised ("may
    represent", "possible", "question of", "cannot be excluded", a differential-diagnosis list).
    """
    return _label(text)[1]


def _label(text: str) -> tuple[dict[str, Finding], dict[str, str]]:
    mentions = [m for s in split_sentences(text) for m in _sentence_mentions(s)]
    out: dict[str, Finding] = {}
    grades: dict[str, str] = {}
    for obs in OBSERVATIONS:
        mine = [m for m in mentions if m.observation == obs]
        if not mine:
            continue
        best = max(_STATE_RANK[m.state] for m in mine)
        chosen = [m for m in mine if _STATE_RANK[m.state] == best]
        state = chosen[0].state
        severities = [m.severity for m in chosen if m.severity]
        out[obs] = Finding(
            observation=obs,
            state=state,
            laterality=None if obs in _NO_LATERALITY else _merge_laterality([m.laterality for m in chosen]),
            severity=(max(severities, key=_SEVERITY_RANK.__getitem__)
                      if severities and state != NEGATIVE else None),
            evidence=chosen[0].evidence,
        )
        if state == UNCERTAIN:
            grades[obs] = "probable" if any(m.favoured for m in chosen) else "possible"
    abnormal = any(f.state in (POSITIVE, UNCERTAIN) for o, f in out.items() if o != "Support Devices")
    if not abnormal and re.search(r"\w", text or ""):
        out["No Finding"] = Finding("No Finding", POSITIVE, None, None, "")
    return {o: out[o] for o in OBSERVATIONS if o in out}, grades


def label_states(findings: dict[str, Finding]) -> dict[str, int]:
    return {obs: f.state for obs, f in findings.items()}


def label_vector(findings: dict[str, Finding]) -> list[float]:
    return [float(findings[o].state) if o in findings else math.nan for o in OBSERVATIONS]


def findings_to_json(findings: dict[str, Finding]) -> str:
    return json.dumps({obs: asdict(f) for obs, f in findings.items()}, sort_keys=True)


def findings_from_json(s: str) -> dict[str, Finding]:
    data = json.loads(s) if s else {}
    return {obs: Finding(**d) for obs, d in data.items()}


def label_jsonl(lines_iter: Iterable[dict | str]) -> Iterator[dict]:
    """{"id", "report"} records (dicts or JSON lines) -> {"id", "labels", "findings"} records.

    A record that cannot be read comes out as {"id", "error"}: every input yields one output.
    """
    for n, line in enumerate(lines_iter):
        rec_id = None
        try:
            rec = json.loads(line) if isinstance(line, str | bytes) else line
            rec_id = rec.get("id", n)
            report = rec["report"]
            if not isinstance(report, str):
                raise TypeError(f"'report' must be a string, got {type(report).__name__}")
            found = label_report(report)
            yield {"id": rec_id, "labels": label_states(found),
                   "findings": {obs: asdict(f) for obs, f in found.items()}}
        except Exception as exc:  # noqa: BLE001 - reported per record
            yield {"id": rec_id if rec_id is not None else n, "error": f"{type(exc).__name__}: {exc}"}
