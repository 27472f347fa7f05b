"""The ``rule`` rewrite backend: offline, deterministic, labeler-driven sentence edits.

Usage::

    RuleRewriter(max_words=50).rewrite([RewriteRequest(report, "inter", seed=3)])
    phrase("Pleural Effusion", POSITIVE, "left", "moderate")   # "Moderate left pleural effusion."

InterAug flips one or two findings of the source (present -> absent, absent -> present, never all
of them) and keeps the rest of the report; IntraAug changes the patient's condition: a finding
resolves, grows or shrinks a grade, becomes bilateral, or a new one appears. The new sentences come
first, then the source sentences that do not mention a changed finding, within ``max_words``.
"""

from __future__ import annotations

import random
import re

from pairaug_ray.errors import StageError
from pairaug_ray.labeler import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, Finding, label_report
from pairaug_ray.llm.base import RewriteBackend, RewriteRequest
from pairaug_ray.vocab import GRADED, NO_FINDING, NOUNS, RESOLVES, SEVERITIES, SIDED
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_NORMAL_SENTENCE = re.compile(
    r"\b(no acute|normal (chest|study|radiograph|examination)|unremarkable|no active|"
    r"no evidence of (acute )?(cardio)?pulmonary|within normal limits)\b", re.I)


def _lat(laterality: str | None, rng: random.Random) -> str:
    return laterality or rng.choice(["left", "right"])


def phrase(observation: str, state: int, laterality: str | None = None, severity: str | None = None,
           rng: random.Random | None = None) -> str:
    """A sentence stating ``observation`` as present (POSITIVE) or absent (NEGATIVE)."""
    rng = rng or random.Random(0)
    sev = f"{severity} " if severity else ""
    if state == NEGATIVE:
        return {
            "Enlarged Cardiomediastinum": "The mediastinum is not widened.",
            "Cardiomegaly": "The heart size is normal.",
            "Lung Opacity": "No focal opacity.",
            "Lung Lesion": "No pulmonary nodule or mass.",
            "Edema": "No pulmonary edema.",
            "Consolidation": "No focal consolidation.",
            "Pneumonia": "No evidence of pneumonia.",
            "Atelectasis": "No atelectasis.",
            "Pneumothorax": "No pneumothorax.",
            "Pleural Effusion": "No pleural effusion.",
            "Pleural Other": "No pleural thickening.",
            "Fracture": "No acute fracture.",
            "Support Devices": "No support devices are seen.",
        }[observation]
    lat = _lat(laterality, rng)
    side = "bilateral" if lat == "bilateral" else lat
    return {
        "Enlarged Cardiomediastinum": f"The mediastinum is {sev}widened.",
        "Cardiomegaly": f"{sev.capitalize() or 'The '}cardiomegaly is present." if sev
        else "The heart is enlarged.",
        "Lung Opacity": f"{sev.capitalize()}{side} lower lung opacity.",
        "Lung Lesion": f"A {side} lung nodule is seen.",
        "Edema": f"{sev.capitalize()}pulmonary edema.",
        "Consolidation": f"{sev.capitalize()}{side} lower lobe consolidation.",
        "Pneumonia": f"{side.capitalize()} lower lobe pneumonia.",
        "Atelectasis": f"{sev.capitalize()}{side} basilar atelectasis.",
        "Pneumothorax": f"{sev.capitalize()}{side} pneumothorax.",
        "Pleural Effusion": f"{sev.capitalize()}{side} pleural effusion." if lat != "bilateral"
        else f"{sev.capitalize()}bilateral pleural effusions.",
        "Pleural Other": f"{side.capitalize()} pleural thickening.",
        "Fracture": f"{side.capitalize()} rib fracture.",
        "Support Devices": "An endotracheal tube is in place.",
    }[observation].replace("  ", " ").strip().capitalize()


_HEADER = re.compile(r"^\s*(?:[A-Z][A-Z /]{2,}:\s*)+")


def _sentences(text: str) -> list[str]:
    """Sentences of ``text`` without section headers (FINDINGS:, IMPRESSION:)."""
    out = []
    for s in _SENT_SPLIT.split(text or ""):
        s = _HEADER.sub("", s or "").strip()
        if s:
            out.append(s)
    return out


def _mentions(sentence: str) -> set[str]:
    return {o for o in label_report(sentence) if o != NO_FINDING}


def _compose(source: str, changed: set[str], new_sentences: list[str], max_words: int,
             drop_normal: bool) -> str:
    """New sentences first, then the source sentences that do not mention a changed finding."""
    kept = [s for s in _sentences(source)
            if not (_mentions(s) & changed) and not (drop_normal and _NORMAL_SENTENCE.search(s))]
    out: list[str] = []
    words = 0
    for s in new_sentences + kept:
        n = len(s.split())
        if words + n > max_words:
            if s in new_sentences:
                continue
            break
        out.append(s if s.endswith((".", "!", "?")) else s + ".")
        words += n
    return " ".join(out)


class RuleRewriter(RewriteBackend):
    """Offline, deterministic rewrites driven by the labeler's reading of the source report."""

    name = "rule"
    model = "rule-v1"

    def __init__(self, max_words: int = 50):
        self.max_words = max_words

    def rewrite(self, requests: list[RewriteRequest]) -> list[str]:
        return [self.one(r) for r in requests]

    def one(self, req: RewriteRequest) -> str:
        rng = random.Random(req.seed)
        found = {o: f for o, f in label_report(req.report).items() if o != NO_FINDING}
        if req.branch == "inter":
            return self._inter(req.report, found, rng)
        if req.branch == "intra":
            return self._intra(req.report, found, rng)
        raise StageError("bad_branch", f"unknown branch {req.branch!r}")

    def _inter(self, report: str, found: dict[str, Finding], rng: random.Random) -> str:
        present = [o for o, f in found.items() if f.state in (POSITIVE, UNCERTAIN)]
        absent = [o for o in OBSERVATIONS[1:] if o not in present]
        # Flip one or two findings, never all of them, so the rest of the report is kept.
        n_flip = 1 if len(found) <= 2 else rng.choice([1, 2])
        flips: list[tuple[str, int]] = []
        pool = [(o, NEGATIVE) for o in present] + [(o, POSITIVE) for o in absent if o != "Support Devices"]
        rng.shuffle(pool)
        for obs, new_state in pool[:n_flip]:
            flips.append((obs, new_state))
        sentences = []
        for obs, new_state in flips:
            old = found.get(obs)
            sev = rng.choice(SEVERITIES) if new_state == POSITIVE and obs in GRADED else None
            lat = (old.laterality if old else None) if obs in SIDED else None
            sentences.append(phrase(obs, new_state, lat, sev, rng))
        adds_positive = any(s == POSITIVE for _, s in flips)
        return _compose(report, {o for o, _ in flips}, sentences, self.max_words, adds_positive)

    def _intra(self, report: str, found: dict[str, Finding], rng: random.Random) -> str:
        present = [o for o, f in found.items() if f.state == POSITIVE and o != "Support Devices"]
        ops = []
        for obs in present:
            f = found[obs]
            ops.append(("resolve", obs))
            if obs in GRADED:
                ops.append(("worse" if f.severity != "severe" else "better", obs))
            if obs in SIDED and f.laterality in ("left", "right"):
                ops.append(("bilateral", obs))
        for obs in ("Pleural Effusion", "Pneumothorax", "Consolidation", "Edema", "Atelectasis",
                    "Cardiomegaly", "Lung Opacity"):
            if obs not in present:
                ops.append(("new", obs))
        op, obs = rng.choice(ops)
        f = found.get(obs)
        sev = f.severity if f else None
        lat = (f.laterality if f else None) or rng.choice(["left", "right"])
        side = f"{lat} " if obs in SIDED else ""
        noun = NOUNS[obs]
        if op == "resolve":
            text = (f"Interval resolution of the {side}{noun}." if obs in RESOLVES
                    else phrase(obs, NEGATIVE, rng=rng))
        elif op in ("worse", "better"):
            i = SEVERITIES.index(sev) if sev in SEVERITIES else 1
            new = SEVERITIES[min(i + 1, 2)] if op == "worse" else SEVERITIES[max(i - 1, 0)]
            if new == sev:
                new = "moderate" if sev != "moderate" else "severe"
            trend = "increase" if op == "worse" else "decrease"
            text = f"Interval {trend} in the {side}{noun}, now {new}."
        elif op == "bilateral":
            text = f"The {noun} is now bilateral. " + phrase(obs, POSITIVE, "bilateral", sev, rng)
        else:  # new finding
            new = rng.choice(SEVERITIES) if obs in GRADED else None
            text = "New " + phrase(obs, POSITIVE, lat if obs in SIDED else None, new, rng).lower()
        return _compose(report, {obs}, _sentences(text), self.max_words, op != "resolve")
