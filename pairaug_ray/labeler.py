"""Rule-based CheXpert-style labeler: 14 observations with negation, uncertainty, laterality, severity.

Usage::

    from pairaug_ray.labeler import label_report, label_states, label_vector
    found = label_report("Small left pleural effusion. No pneumothorax.")
    label_states(found)   # {"Pleural Effusion": 1, "Pneumothorax": 0}
    found["Pleural Effusion"].laterality, found["Pleural Effusion"].severity   # "left", "mild"

    pairaug label reports.jsonl > labels.jsonl          # the command line
    python benchmarks/labeler_agreement.py              # agreement with the IU reports' MeSH tags

How a report is read (docs/labeler.md has the rules and the measured agreement):

1. Sentences are split on end punctuation; each is lower-cased, de-identification (``___``, ``XXXX``)
   removed, hyphens turned into spaces.
2. A sentence is cut into parts at ``, ; :`` and at ``but however although though whereas while
   except which where and with``. A part that continues a list (``no consolidation, effusion, or
   pneumothorax``) inherits the negation or uncertainty of the part before it, unless it starts like a
   new statement (a severity word, ``new``, ``there``...) or has its own verb.
3. Each observation's mention patterns are searched in each part. Before the mention the nearest
   cue wins: an uncertainty cue (``may``, ``possible``, ``likely``, ``suggestive``, ``question of``,
   ``versus``, ``borderline``...) makes it UNCERTAIN, a negation cue (``no``, ``without``,
   ``negative for``, ``free of``, ``resolution of``...) NEGATIVE; "no X to suggest Y" negates Y.
   With no cue before it, cues after it count (``cannot be excluded`` -> UNCERTAIN; ``has
   resolved``, ``is not seen``, ``removed`` -> NEGATIVE); then one of two alternatives (``atelectasis
   or pneumonia``) is UNCERTAIN; else POSITIVE. Requests and conditionals (``if``, ``evaluation
   for``, ``correlate``) and disclaimers (``fractures may not be demonstrated``) are not mentions.
   A "differential ..." cue hedges the rest of its sentence; a verb closing a list ("consolidation,
   atelectasis, and effusion have cleared") negates every item. ``uncertainty_grades`` tells
   hedges that favour a finding ("probable", "likely", "versus") from ones that only raise it
   ("may", "possible", "cannot be excluded"); the IU agreement counts the first kind as positive.
   "Normal" statements (``heart size is normal``, ``lungs are clear``, ``normal cardiomediastinal
   silhouette``) are NEGATIVE mentions of the observations they rule out.
4. Per observation, as in CheXpert: any POSITIVE mention wins, then UNCERTAIN, then NEGATIVE.
   "No Finding" is POSITIVE when no observation other than Support Devices is POSITIVE or UNCERTAIN.
"""

from __future__ import annotations

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
_NORMAL_PRED = (r"(?:(?:upper limits? of |top |high )?normal|within normal limits|unremarkable|"
                r"not (?:enlarged|widened))")

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
            _HEART + r"(?: \w+){0,4}? (?:enlarged|large|increased)\b",
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
    r"removal of|removed|nor|neither|rather than|clear of|ruled out|clearing of|cleared)\b")
# "no change in the effusion" is not a negation of the effusion.
_NOT_NEGATION = re.compile(
    r"\b(?:no (?:significant |appreciable |substantial |interval |definite )?(?:change|changes|"
    r"increase|decrease|worsening|improvement|progression)|not (?:significantly )?(?:changed|"
    r"increased|decreased|improved|worsened)|no longer|"
    # "not seen on the prior study": the finding is new, not absent
    r"not (?:seen|present|visible|identified|evident|apparent) (?:on|in) (?:the )?(?:prior|previous|"
    r"comparison|earlier|old)\w*|"
    # "nearly resolved", "partial resolution of": some of the finding is still there
    r"(?:almost|nearly|partially|partly|incompletely|near|partial|incomplete)(?: complete(?:ly)?)? "
    r"(?:resolved|resolving|resolution of|cleared|clearing of))\b")
_NO_LONGER = re.compile(r"\bno longer\b")
_POST_NEG = re.compile(
    r"^(?:\s+\w+){0,4}?\s+(?:(?:is|are|was|were) )?(?:not (?:seen|identified|present|visualized|"
    r"demonstrated|appreciated|evident|noted|detected|enlarged|widened)"
    r"(?! (?:on|in) (?:the )?(?:prior|previous|comparison|earlier|old))|(?:has |have )?"
    r"(?<!almost )(?<!nearly )(?<!partially )(?<!partly )(?<!near )(?:resolved|cleared)|"
    r"no longer|removed|absent|not appreciated)\b")
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
_POST_DROP = re.compile(r"^(?:\s+\w+){0,2}?\s+may not be (?:demonstrated|seen|visible|detected|apparent)")
# "no opacity to suggest pneumonia": the hedge sits inside a negation.
_NEG_BEFORE_HEDGE = re.compile(r"\b(?:no|without|not)\b.*\b(?:to suggest|suggest\w*|suspicious|"
                               r"concerning for|worrisome for)\b")
_POST_UNC = re.compile(
    r"^(?:\s+\w+){0,4}?\s+(?:(?:cannot|can not|could not|can t) (?:be )?(?:entirely )?"
    r"(?:excluded|ruled out)|not (?:be )?(?:entirely )?(?:excluded|ruled out)|(?:is|are)"
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
    r"visualized))(?: \w+){0,4}$")
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

_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n\s*\n|(?<=\.)(?=[A-Z])")
_DEID = re.compile(r"_{2,}|\bx{3,}\b", re.IGNORECASE)


def _normalize(sentence: str) -> str:
    s = _DEID.sub(" ", sentence.lower())
    s = re.sub(r"(?<=\w)[-/](?=\w)", lambda m: " / " if m.group() == "/" else " ", s)
    s = re.sub(r"[^\w,;:/ ]+", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCES.split(text or "") if s and s.strip()]


def _parts(sentence: str) -> list[tuple[str, str]]:
    """(separator before the part, part text) for each part of a normalized sentence."""
    out, pos, sep = [], 0, ""
    for m in _SPLIT.finditer(sentence):
        out.append((sep, sentence[pos:m.start()].strip()))
        sep, pos = (m.group(1) or m.group().strip()), m.end()
    out.append((sep, sentence[pos:].strip()))
    merged: list[tuple[str, str]] = []
    for s, p in out:
        if s == "with" and merged and _WITH_COMPLEMENT.search(merged[-1][1]):
            merged[-1] = (merged[-1][0], merged[-1][1] + " with " + p)
        else:
            merged.append((s, p))
    return [(s, p) for s, p in merged if p]


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
    if _NEG_BEFORE_HEDGE.search(pre):
        return NEGATIVE, False
    pre, post = _AGE_HEDGE.sub(" ", pre), _AGE_HEDGE.sub(" ", post)
    pre_clean = _NOT_NEGATION.sub(lambda m: m.group() if _NO_LONGER.fullmatch(m.group()) else " ", pre)
    unc = _last_end(_PRE_UNC, pre)
    neg = max(_last_end(_PRE_NEG, pre_clean), _last_end(_NO_LONGER, pre))
    if unc >= 0 or neg >= 0:
        if unc < neg:
            return NEGATIVE, False
        return UNCERTAIN, _all_favoured(pre)
    m = _POST_UNC.search(post)
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
        before = text[:c.start()]
        return (bool(_FAVOURED_UNC.fullmatch(c.group())) and not before.endswith("less ")) \
            or before.endswith("most ")
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


def _sentence_mentions(original: str) -> list[_Mention]:
    sentence = _normalize(original)
    found: list[_Mention] = []
    inherited: int | None = None
    inherited_favoured = False
    in_differential = False  # a "differential ..." cue earlier in the sentence hedges what follows
    parts = _parts(sentence)
    # from which part on every part is a verb-less list item ending in a list-closing negation
    closing_from = len(parts)
    if parts and _LIST_CLOSING_NEG.search(parts[-1][1]):
        closing_from = len(parts) - 1
        while closing_from > 0 and parts[closing_from][0] in (",", "and") \
                and not _VERB.search(parts[closing_from - 1][1]):
            closing_from -= 1
    fragment = ""  # a mention-free part before "and": "small left [and] moderate right effusions"
    for k, (sep, part) in enumerate(parts):
        context = (fragment + " " + part) if sep == "and" and fragment else part
        n_found = len(found)
        list_like = (sep in (",", "and") and not _NEW_STATEMENT.match(part)
                     and (_LIST_START.match(part) or not _VERB.search(_TRAILING_VERB.sub("", part))))
        carry = inherited if list_like else None
        carry_favoured = inherited_favoured if list_like else False
        for obs, patterns in MENTIONS.items():
            if obs in UNMENTIONS and UNMENTIONS[obs].search(part):
                continue
            for rx in patterns:
                for m in rx.finditer(part):
                    if _HYPOTHETICAL.search(part[:m.start()]) or _POST_DROP.search(part[m.end():]):
                        continue
                    pre, post = part[:m.end()], part[m.end():]
                    # a list part under "no ..." reads as if the "no" were repeated
                    lead = "no " if carry == NEGATIVE else ""
                    state, favoured = _cue_state(lead + pre[:m.start()] + " " + m.group(), post)
                    if state is None and carry is not None:
                        state, favoured = carry, carry_favoured
                    if state is None and k >= closing_from:
                        state, favoured = NEGATIVE, False
                    if state is None and in_differential:
                        state, favoured = UNCERTAIN, False
                    if state is None and (_ALT_AFTER.search(post) or _ALT_BEFORE.search(part[:m.start()])):
                        state, favoured = UNCERTAIN, True
                    if state is None:
                        state = POSITIVE
                    found.append(_Mention(obs, state, _laterality(context), _severity(context), original,
                                          favoured and state == UNCERTAIN))
        if not _EXCEPT.search(sentence):
            for obs, patterns in NORMAL_STATEMENTS.items():
                # "the heart size [and] mediastinal contours are normal": read the fragment too
                if any(rx.search(context) for rx in patterns):
                    state = UNCERTAIN if _PRE_UNC.search(context) else NEGATIVE
                    favoured = _all_favoured(context)
                    found.append(_Mention(obs, state, None, None, original, favoured))
                    if obs == "Cardiomegaly" and re.search(r"cardio ?mediastinal|mediastinum", context):
                        found.append(_Mention("Enlarged Cardiomediastinum", state, None, None, original,
                                              favoured))
        own, own_favoured = _part_mode(("no " if carry == NEGATIVE else "") + part)
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
