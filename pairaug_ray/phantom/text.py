"""PhantomCXR report text: sampled findings, template reports, a patient's course over studies.

Usage::

    truth = sample_findings(np.random.default_rng(0))
    text = template_report(truth, np.random.default_rng(1))
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pairaug_ray.labeler import NEGATIVE, POSITIVE, UNCERTAIN, Finding
from pairaug_ray.phantom.anatomy import _DEVICE_WORDS, _rng
from pairaug_ray.vocab import GRADED, NO_FINDING, SIDES

# ------------------------------------------------------------------------------------------------
# Reports from templates

# Rough MIMIC-CXR prevalences, used to sample positives.
_PREVALENCE = {
    "Support Devices": 0.2, "Pleural Effusion": 0.2, "Atelectasis": 0.18, "Cardiomegaly": 0.18,
    "Lung Opacity": 0.15, "Edema": 0.12, "Pneumonia": 0.07, "Consolidation": 0.05, "Pneumothorax": 0.05,
    "Lung Lesion": 0.05, "Enlarged Cardiomediastinum": 0.04, "Fracture": 0.03, "Pleural Other": 0.02,
}
_NEGATIVE_SENTENCES = {
    "Enlarged Cardiomediastinum": ["The mediastinal contours are normal.", "Normal mediastinal contours."],
    "Cardiomegaly": ["Heart size is normal.", "The heart is normal in size."],
    "Lung Opacity": ["No focal airspace opacity.", "No focal opacity is seen."],
    "Lung Lesion": ["No pulmonary nodules or masses.", "No suspicious pulmonary nodule."],
    "Edema": ["No pulmonary edema.", "There is no pulmonary edema."],
    "Consolidation": ["No focal consolidation.", "There is no focal consolidation."],
    "Pneumonia": ["No evidence of pneumonia."],
    "Atelectasis": ["No atelectasis."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "Pleural Other": ["No pleural thickening."],
    "Fracture": ["No acute rib fracture.", "No displaced fracture."],
    "Support Devices": ["No support devices are seen.", "No lines or tubes."],
}
_LOBES = {"right": ("upper", "middle", "lower"), "left": ("upper", "lower")}
_ORDINAL = {3: "3rd", 4: "4th", 5: "5th", 6: "6th", 7: "7th", 8: "8th", 9: "9th"}
_DEVICE_SENTENCES = {
    "ett": "Endotracheal tube terminates {n} cm above the carina.",
    "cvc": "Right internal jugular central venous catheter terminates in the SVC.",
    "ng": "Nasogastric tube courses below the diaphragm into the stomach.",
    "pacer": "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
    "sternotomy": "Median sternotomy wires are intact.",
}


def _noun_phrase(obs: str, f: Finding, d: np.random.Generator) -> str:
    """The finding as a noun phrase ('small left pleural effusion'); `d` draws the persistent
    details (lobe, rib, nodule size), so one patient's phrase keeps them across studies."""
    side, sev = f.laterality, f.severity
    size_adj = {"mild": "small", "moderate": "moderate", "severe": "large"}.get(sev, "")
    sev_adj = sev or ""
    if obs == "Cardiomegaly":
        return f"{sev_adj} cardiomegaly".strip()
    if obs == "Enlarged Cardiomediastinum":
        return f"{sev_adj} widening of the mediastinum".strip()
    if obs == "Pleural Effusion":
        return f"{size_adj} {side} pleural effusion{'s' if side == 'bilateral' else ''}".replace("  ", " ").strip()
    if obs == "Pneumothorax":
        return f"{size_adj} {side} apical pneumothorax".replace("  ", " ").strip()
    if obs == "Edema":
        return f"{sev_adj} {str(d.choice(['pulmonary', 'interstitial pulmonary']))} edema".strip()
    if obs == "Atelectasis":
        where = "bibasilar" if side == "bilateral" else f"{side} basilar"
        return f"{sev_adj} {where} atelectasis".strip()
    if obs in ("Consolidation", "Pneumonia"):
        lobe = str(d.choice(_LOBES[side]))
        grade = f"{sev_adj} " if obs in GRADED else ""  # the renderer draws the graded extent
        return f"{grade}{side} {lobe} lobe {obs.lower()}".strip()
    if obs == "Lung Opacity":
        zone = str(d.choice(["mid", "lower", "upper"]))
        return f"{sev_adj} hazy opacity in the {side} {zone} lung".replace("  ", " ").strip()
    if obs == "Lung Lesion":
        cm = {"mild": d.uniform(0.6, 1.2), "moderate": d.uniform(1.4, 2.5), "severe": d.uniform(3.5, 6.0)}[sev or "moderate"]
        kind = "mass" if cm >= 3 else "nodule"
        lobe = str(d.choice(_LOBES[side]))
        return f"{cm:.1f} cm {kind} in the {side} {lobe} lobe"
    if obs == "Pleural Other":
        return f"{side} pleural thickening"
    if obs == "Fracture":
        return f"acute fracture of the {side} {_ORDINAL[int(d.integers(4, 9))]} rib"
    raise KeyError(obs)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sentence(obs: str, f: Finding, rng: np.random.Generator, d: np.random.Generator) -> str:
    if f.state == NEGATIVE:
        return str(rng.choice(_NEGATIVE_SENTENCES[obs]))
    if obs == "Support Devices":
        kinds = [k for k, _ in _DEVICE_WORDS if k in _DEVICE_SENTENCES and k in (f.evidence or "")] or \
            list(d.choice(list(_DEVICE_SENTENCES), size=int(d.integers(1, 3)), replace=False))
        return " ".join(_DEVICE_SENTENCES[k].format(n=int(d.integers(3, 6))) for k in kinds)
    np_ = _noun_phrase(obs, f, d)
    article = ("" if np_.endswith("s") or obs in ("Cardiomegaly", "Edema")
               else "an " if np_[0] in "aeiou8" else "a ")
    if f.state == UNCERTAIN:
        form = int(rng.integers(2))
        return f"Possible {np_}." if form == 0 else f"Findings suggestive of {article}{np_}."
    if obs == "Lung Lesion":
        return f"There is a {np_}."
    return f"{_cap(np_)}."


def sample_findings(rng: np.random.Generator) -> dict[str, Finding]:
    """A plausible set of findings for one study (positives, maybe an uncertain one, negatives)."""
    out: dict[str, Finding] = {}
    obs_all = list(_PREVALENCE)
    p = np.array([_PREVALENCE[o] for o in obs_all]); p = p / p.sum()
    n_pos = 0 if rng.random() < 0.3 else int(rng.choice([1, 1, 2, 2, 3]))
    pos = [str(o) for o in rng.choice(obs_all, size=n_pos, replace=False, p=p)] if n_pos else []
    rest = [o for o in obs_all if o not in pos and o != "Support Devices"]
    unc = [str(rng.choice(rest))] if rng.random() < 0.25 else []
    negs = [o for o in ("Pleural Effusion", "Pneumothorax", "Consolidation", "Cardiomegaly", "Edema",
                        "Lung Lesion", "Fracture") if o not in pos and o not in unc and rng.random() < 0.5]
    for o in pos + unc:
        sides = SIDES.get(o)
        out[o] = Finding(o, POSITIVE if o in pos else UNCERTAIN,
                         str(rng.choice(sides)) if sides else None,
                         str(rng.choice(["mild", "moderate", "severe"], p=[0.45, 0.35, 0.2])) if o in GRADED else None)
    if not out and not negs:
        negs = ["Pleural Effusion"]
    for o in negs:
        out[o] = Finding(o, NEGATIVE, None, None)
    return _with_no_finding(out)


def _with_no_finding(found: dict[str, Finding]) -> dict[str, Finding]:
    """CheXpert's rule: No Finding when nothing but Support Devices is positive or uncertain."""
    found = {o: f for o, f in found.items() if o != NO_FINDING}
    if not any(f.state in (POSITIVE, UNCERTAIN) for o, f in found.items() if o != "Support Devices"):
        found[NO_FINDING] = Finding(NO_FINDING, POSITIVE, None, None)
    return found


_ORDER = ["Support Devices", "Cardiomegaly", "Enlarged Cardiomediastinum", "Edema", "Consolidation", "Pneumonia",
          "Lung Opacity", "Lung Lesion", "Atelectasis", "Pleural Effusion", "Pneumothorax", "Pleural Other",
          "Fracture"]


def template_report(findings: dict[str, Finding], rng: np.random.Generator, detail_seed: int | None = None) -> str:
    """FINDINGS + IMPRESSION text stating `findings` (with side and severity wording).

    `rng` picks the phrasing; `detail_seed` (default: drawn from rng) picks per-observation details
    (lobe, rib, nodule size, device kinds) so a patient's follow-up reports keep them.
    """
    return _template_report(findings, rng, detail_seed)[0]


def _template_report(findings, rng, detail_seed=None) -> tuple[str, dict[str, str]]:
    if detail_seed is None:
        detail_seed = int(rng.integers(2**31))
    body, impression, said = [], [], {}
    for obs in _ORDER:
        f = findings.get(obs)
        if f is None:
            continue
        sent = _sentence(obs, f, rng, _rng("detail", detail_seed, obs))
        said[obs] = sent
        body.append(sent)
        if f.state != NEGATIVE:
            impression.append(sent)
    if not any(f.state in (POSITIVE, UNCERTAIN) for o, f in findings.items() if o not in ("Support Devices", NO_FINDING)):
        impression.append(str(rng.choice(["No acute cardiopulmonary process.", "No acute intrathoracic process."])))
    if not body:
        body.append("Unremarkable chest radiograph.")
    return "FINDINGS: " + " ".join(body) + "\n\nIMPRESSION: " + " ".join(impression), said


def _evolve(prev: dict[str, Finding], rng: np.random.Generator) -> dict[str, Finding]:
    """The next study of a patient: findings grow, shrink, resolve; sometimes a new one appears."""
    grades = ["mild", "moderate", "severe"]
    out: dict[str, Finding] = {}
    for o, f in prev.items():
        if o == NO_FINDING:
            continue
        r = rng.random()
        if f.state == POSITIVE:
            if o == "Support Devices":
                if r < 0.75:
                    out[o] = f
            elif o in GRADED and r < 0.35:
                k = int(np.clip(grades.index(f.severity or "moderate") + rng.choice([-1, 1]), 0, 2))
                out[o] = replace(f, severity=grades[k])
            elif r < 0.55:
                out[o] = f
            else:
                out[o] = Finding(o, NEGATIVE, None, None)   # resolved
        elif f.state == UNCERTAIN:
            out[o] = replace(f, state=POSITIVE) if r < 0.4 else Finding(o, NEGATIVE, None, None)
        elif r < 0.5:
            out[o] = f
    if rng.random() < 0.35:
        new = str(rng.choice(["Support Devices", "Pleural Effusion", "Atelectasis", "Edema", "Pneumothorax",
                              "Consolidation", "Lung Opacity"]))
        if out.get(new) is None or out[new].state != POSITIVE:
            sides = SIDES.get(new)
            out[new] = Finding(new, POSITIVE, str(rng.choice(sides)) if sides else None,
                               "mild" if new in GRADED else None)
    if not out:
        out["Pleural Effusion"] = Finding("Pleural Effusion", NEGATIVE, None, None)
    return _with_no_finding(out)
