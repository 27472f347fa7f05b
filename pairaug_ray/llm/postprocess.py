"""Clean an LLM's answer into report text, or say why it is not one.

Usage::

    from pairaug_ray.llm.postprocess import postprocess
    text, reason = postprocess('Sure! Here is the rewritten report: "No pleural effusion."',
                               max_words=50, overlong="cut")
    # -> ("No pleural effusion.", "")          reason is "" when the text is usable

Strips what chat models wrap around an answer (greetings, "Here is ...:", "Rewritten report:",
quotes, markdown, chat-template tokens, trailing "Note: ..." paragraphs), normalises whitespace,
enforces the word limit (``overlong="cut"`` keeps whole sentences up to the limit, or cuts at a
word when even the first sentence is too long; ``"reject"`` rejects), and rejects empty text and
text that is not a chest radiograph report (the labeler reads no observation and no chest anatomy
is named). The rewrite stage then checks the kind of change (``validate_rewrite``).

Reasons: ``empty``, ``not_a_report``, ``too_long``.
"""

from __future__ import annotations

import re

from pairaug_ray.labeler import label_report
from pairaug_ray.vocab import NO_FINDING

OVERLONG_MODES = ("cut", "reject")

_SPECIAL_TOKENS = re.compile(r"<\|[^|<>]{1,40}\|>|</?s>|\[/?INST\]")
# Control characters (not newlines/tabs) and U+FFFD: byte pieces of a cut multi-byte character.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
_CODE_FENCE = re.compile(r"```[a-zA-Z]*")
# Markdown emphasis; underscores stay (MIMIC de-identification writes "___").
_MD_EMPHASIS = re.compile(r"(\*\*|\*|`)")
_MD_LINE_PREFIX = re.compile(r"^\s*(#{1,6}\s+|>\s*|[-*•]\s+|\d+[.)]\s+)", re.M)
_LEAD = [
    re.compile(r"^(sure|certainly|of course|okay|ok|absolutely|great|alright)\b[!.,]*\s*", re.I),
    re.compile(r"^(here(?:'s| is| are)|below is|this is)\b[^:\n]{0,80}:\s*", re.I),
    re.compile(r"^(i (?:have|'ve) (?:rewritten|revised|written)|as requested)\b[^:\n]{0,80}[:.]\s*", re.I),
    re.compile(r"^((?:the )?(?:new|rewritten|revised|modified|updated|augmented|altered|follow-up)\s+"
               r"(?:(?:radiology|chest x-?ray|cxr|radiograph)\s+)?report|rewrite|rewritten|answer|output|"
               r"report)\s*:\s*", re.I),
]
# Trailing paragraphs or sentences that talk about the answer instead of being part of it.
_TRAILER = re.compile(
    r"(?:\n|(?<=[.!?])\s+|\(\s*)(?:please\s+)?(?:notes?|explanation|changes(?: made)?|disclaimer|rationale|"
    r"summary of changes)\s*:.*$|"
    r"(?:\n|(?<=[.!?])\s+)(?:i hope|let me know|feel free|this (?:rewrite|rewritten|revised|new) "
    r"(?:report|version))\b.*$", re.I | re.S)
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("«", "»")]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ANATOMY = re.compile(
    r"\b(lungs?|pulmonary|heart|cardiac|cardio\w*|mediastin\w*|pleura\w*|hil(?:um|a|ar)|"
    r"(?:hemi)?diaphragm\w*|costophrenic|chest|thora\w*|ribs?|spine|spinal|vertebra\w*|osseous|bon(?:e|es|y)|"
    r"aort\w*|trache\w*|bronch\w*|lobes?|lobar|apex|apices|apical|bases?|basilar|bibasilar|"
    r"soft tissues?|clavicles?|sternum|sternotomy|silhouette|airspace|parenchym\w*)\b", re.I)


def strip_chatter(text: str) -> str:
    """The answer without chat wrapping, on one line with single spaces."""
    text = _SPECIAL_TOKENS.sub(" ", text or "")
    text = _CONTROL.sub(" ", text)
    text = _CODE_FENCE.sub(" ", text)
    text = _MD_EMPHASIS.sub("", text)
    text = _MD_LINE_PREFIX.sub("", text)
    text = text.strip()
    for _ in range(6):  # leading chatter comes in layers: "Sure! Here is the report: Report: ..."
        before = text
        for pattern in _LEAD:
            text = pattern.sub("", text, count=1).strip()
        text = _strip_quotes(text)
        if text == before:
            break
    text = _TRAILER.sub("", text).strip()
    text = _strip_quotes(text)
    return " ".join(text.split())


def _strip_quotes(text: str) -> str:
    for left, right in _QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            inner = text[len(left):-len(right)].strip()
            if left not in inner and right not in inner:
                return inner
    return text


def cut_to_words(text: str, max_words: int) -> str:
    """Whole sentences up to ``max_words`` words; a word cut when the first sentence alone is longer."""
    out, n = [], 0
    for sentence in _SENTENCE_END.split(text):
        k = len(sentence.split())
        if n + k > max_words:
            break
        out.append(sentence)
        n += k
    if out:
        return " ".join(out)
    words = text.split()[:max_words]
    return " ".join(words).rstrip(",;:") + "."


def is_report_text(text: str) -> bool:
    """True when the labeler reads an observation or a chest structure is named."""
    if any(o != NO_FINDING for o in label_report(text)):
        return True
    return bool(_ANATOMY.search(text))


def postprocess(text: str, max_words: int = 50, overlong: str = "cut") -> tuple[str, str]:
    """(clean text, reason): reason is "" when the text can go on to validation."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    text = strip_chatter(text)
    if not text:
        return "", "empty"
    if not is_report_text(text):
        return text, "not_a_report"
    if len(text.split()) > max_words:
        if overlong == "reject":
            return text, "too_long"
        text = cut_to_words(text, max_words)
    return text, ""
