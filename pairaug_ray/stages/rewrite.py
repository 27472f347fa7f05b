"""Report rewriting stage: InterAug (partially opposite findings) and IntraAug (changed condition).

Usage::

    cfg = RewriteConfig(backend="rule", max_words=50)
    ds = planned.map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage))

Rows need ``report``, ``branch`` ("inter" | "intra") and ``seed``; they come out with
``rewritten_report``, ``change`` (JSON: observation → [before, after]), the labeler's ``labels`` and
``findings`` of the new text, and the provenance ``rewrite_backend``, ``rewrite_model``,
``prompt_id``. Every backend's output goes through the same validation (word limit, not empty, not
the source, the labeler must read the kind of change asked for); a rejected row is retried with a
new seed up to ``max_attempts`` times, then becomes a ``rewrite_rejected`` error row. Before
validation the text goes through ``pairaug_ray.llm.postprocess`` (chat chatter stripped, word limit
cut or rejected per ``overlong``, non-report text rejected). Every row (error rows included) carries
``rewrite_rejections``: JSON {reason: count} of the candidates rejected on the way, for the manifest.

Backends implement ``RewriteBackend.rewrite(requests) -> texts`` (an Exception in place of a text
fails that row only, e.g. ``StageError("llm_timeout")``, without retries); ``rule`` is offline and
deterministic (labeler-driven sentence edits); the LLM backends register in ``BACKENDS`` as lazy
factories so importing this module imports no LLM library: ``transformers``
(``pairaug_ray.llm.hf_backend``), ``openai`` (``pairaug_ray.llm.openai_backend``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import Field

from pairaug_ray.labeler import (
    NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, Finding, findings_to_json, label_report, label_states,
)
from pairaug_ray.llm.vllm_backend import VLLMOptions
from pairaug_ray.stages.base import RowStage, StageConfig, StageError

BRANCHES = ("inter", "intra")
NO_FINDING = "No Finding"
SEVERITIES = ("mild", "moderate", "severe")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_NORMAL_SENTENCE = re.compile(
    r"\b(no acute|normal (chest|study|radiograph|examination)|unremarkable|no active|"
    r"no evidence of (acute )?(cardio)?pulmonary|within normal limits)\b", re.I)


@dataclass(frozen=True)
class RewriteRequest:
    report: str
    branch: str
    seed: int


class RewriteBackend:
    """Turns requests into candidate texts; validation and retries are the stage's job."""

    name = "base"
    model = ""

    def prompt_id(self, branch: str) -> str:
        return f"{self.name}-{branch}-v1"

    def rewrite(self, requests: list[RewriteRequest]) -> list[str | BaseException]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- rule backend

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
            sev = rng.choice(SEVERITIES) if new_state == POSITIVE and obs in _GRADED else None
            lat = (old.laterality if old else None) if obs in _SIDED else None
            sentences.append(phrase(obs, new_state, lat, sev, rng))
        adds_positive = any(s == POSITIVE for _, s in flips)
        return _compose(report, {o for o, _ in flips}, sentences, self.max_words, adds_positive)

    def _intra(self, report: str, found: dict[str, Finding], rng: random.Random) -> str:
        present = [o for o, f in found.items() if f.state == POSITIVE and o != "Support Devices"]
        ops = []
        for obs in present:
            f = found[obs]
            ops.append(("resolve", obs))
            if obs in _GRADED:
                ops.append(("worse" if f.severity != "severe" else "better", obs))
            if obs in _SIDED and f.laterality in ("left", "right"):
                ops.append(("bilateral", obs))
        for obs in ("Pleural Effusion", "Pneumothorax", "Consolidation", "Edema", "Atelectasis",
                    "Cardiomegaly", "Lung Opacity"):
            if obs not in present:
                ops.append(("new", obs))
        op, obs = rng.choice(ops)
        f = found.get(obs)
        sev = f.severity if f else None
        lat = (f.laterality if f else None) or rng.choice(["left", "right"])
        side = f"{lat} " if obs in _SIDED else ""
        noun = _NOUN[obs]
        if op == "resolve":
            text = (f"Interval resolution of the {side}{noun}." if obs in _RESOLVES
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
            new = rng.choice(SEVERITIES) if obs in _GRADED else None
            text = "New " + phrase(obs, POSITIVE, lat if obs in _SIDED else None, new, rng).lower()
        return _compose(report, {obs}, _sentences(text), self.max_words, op != "resolve")


_RESOLVES = {"Pleural Effusion", "Pneumothorax", "Consolidation", "Edema", "Atelectasis", "Lung Opacity",
             "Pneumonia"}
_GRADED = {"Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax", "Consolidation", "Atelectasis",
           "Lung Opacity", "Enlarged Cardiomediastinum"}
_SIDED = {"Pleural Effusion", "Pneumothorax", "Consolidation", "Atelectasis", "Lung Opacity",
          "Lung Lesion", "Pneumonia", "Fracture", "Pleural Other"}
_NOUN = {
    "Enlarged Cardiomediastinum": "mediastinal widening", "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity", "Lung Lesion": "lung nodule", "Edema": "pulmonary edema",
    "Consolidation": "consolidation", "Pneumonia": "pneumonia", "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax", "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural thickening", "Fracture": "rib fracture",
    "Support Devices": "endotracheal tube",
}

def _transformers_backend(cfg: "RewriteConfig") -> RewriteBackend:
    from pairaug_ray.llm.hf_backend import TransformersBackend

    return TransformersBackend(cfg)


def _openai_backend(cfg: "RewriteConfig") -> RewriteBackend:
    from pairaug_ray.llm.openai_backend import OpenAIBackend

    return OpenAIBackend(cfg)


def _vllm_backend(cfg: "RewriteConfig") -> RewriteBackend:
    from pairaug_ray.llm.vllm_backend import VLLMRewriter

    return VLLMRewriter(cfg)


# name -> factory(config); factories import their libraries only when called (on the actor).
BACKENDS: dict[str, Callable[["RewriteConfig"], RewriteBackend]] = {
    "rule": lambda cfg: RuleRewriter(max_words=cfg.max_words),
    "transformers": _transformers_backend,
    "openai": _openai_backend,
    "vllm": _vllm_backend,
}


# ----------------------------------------------------------------------------- validation

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


# ----------------------------------------------------------------------------- stage

class RewriteConfig(StageConfig):
    backend: str = Field("rule", description="rule | transformers | vllm | openai")
    model: str = Field("", description="transformers: folder, hub id or tiny://llm?seed=N&arch=gpt2|llama "
                       "(default tiny://llm?seed=0); openai: the server's model name")
    max_words: int = Field(50, ge=5, description="the paper's limit is 50 words")
    overlong: Literal["cut", "reject"] = Field(
        "cut", description="over-long output: keep whole sentences up to max_words, or reject it")
    max_attempts: int = Field(3, ge=1, description="tries per row, each with a new seed")
    min_source_words: int = Field(
        0, ge=0, description="source reports with fewer words become source_too_short error rows "
        "(the reference skipped reports under 20 words; 0 = keep all)")
    # Prompts (LLM backends): built-ins inter-v1 / intra-v1, plus variants from YAML or inline.
    prompts: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="prompt id -> {branch, system, user}; see llm/prompts.py")
    prompts_file: str | None = Field(None, description="YAML with `prompts:` and optional `defaults:`")
    prompt_ids: dict[str, str] = Field(
        default_factory=dict, description="branch -> prompt id to use (default inter-v1 / intra-v1)")
    # Sampling (LLM backends): the reference used temperature 0.5 and at most 300 tokens.
    temperature: float = Field(0.5, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(300, ge=1, description="new tokens per answer")
    # transformers backend
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (bfloat16 on GPU, float32 on CPU) | float32 | float16 | bfloat16")
    # openai backend (any OpenAI-compatible /v1/chat/completions server)
    api_base: str = Field("http://127.0.0.1:8000/v1", description="base URL, up to and including /v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key "
                             "(read on the actor, never logged); unset = no Authorization header")
    request_timeout_s: float = Field(60.0, gt=0)
    concurrency: int = Field(8, ge=1, description="requests in flight per actor")
    max_retries: int = Field(3, ge=0, description="retries on 429, 5xx, timeouts and connection errors")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry (jittered)")
    backoff_max_s: float = Field(30.0, ge=0)
    # vllm backend: engine kwargs, engine choice (ray.data.llm | actor); see llm/vllm_backend.py
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    batch_size: int = 32
    num_cpus: float = 0.25


class RewriteStage(RowStage):
    name = "rewrite"

    def __init__(self, config: RewriteConfig):
        super().__init__(config)
        self.cfg = config
        if config.backend not in BACKENDS:
            raise ValueError(f"unknown rewrite backend {config.backend!r}; known: {sorted(BACKENDS)}")
        self.backend = BACKENDS[config.backend](config)

    def process(self, rows: list[dict]) -> list:
        results: list = [None] * len(rows)
        reasons: list[str] = [""] * len(rows)
        rejected: list[dict[str, int]] = [{} for _ in rows]
        last_text: list[str] = [""] * len(rows)
        pending = []
        for i, r in enumerate(rows):
            if r.get("branch") not in BRANCHES:
                results[i] = StageError("bad_branch", f"unknown branch {r.get('branch')!r}")
            elif len(str(r.get("report") or "").split()) < self.cfg.min_source_words:
                results[i] = StageError("source_too_short",
                                        f"report has fewer than {self.cfg.min_source_words} words")
            else:
                pending.append(i)
        for attempt in range(self.cfg.max_attempts):
            if not pending:
                break
            reqs = [RewriteRequest(rows[i]["report"], rows[i]["branch"],
                                   int(rows[i]["seed"]) + 7919 * attempt) for i in pending]
            texts = self.backend.rewrite(reqs)
            if len(texts) != len(reqs):
                raise RuntimeError(f"backend {self.backend.name} gave {len(texts)} texts for {len(reqs)}")
            still = []
            for i, raw in zip(pending, texts):
                if isinstance(raw, BaseException):  # the backend gave up on this row (e.g. timeout)
                    results[i] = raw
                    continue
                text, reason, change = review_rewrite(rows[i]["report"], raw, rows[i]["branch"],
                                                      self.cfg.max_words, self.cfg.overlong)
                if reason:
                    reasons[i] = reason
                    rejected[i][reason] = rejected[i].get(reason, 0) + 1
                    last_text[i] = text
                    still.append(i)
                    continue
                found = label_report(text)
                results[i] = [{
                    **rows[i],
                    "rewritten_report": text,
                    "change": json.dumps(change, sort_keys=True),
                    "labels": json.dumps(label_states(found), sort_keys=True),
                    "findings": findings_to_json(found),
                    "rewrite_backend": self.backend.name,
                    "rewrite_model": self.backend.model,
                    "prompt_id": self.backend.prompt_id(rows[i]["branch"]),
                    "rewrite_attempts": attempt + 1,
                    "rewrite_rejections": json.dumps(rejected[i], sort_keys=True),
                }]
            pending = still
        for i in pending:
            snippet = last_text[i][:120] + ("..." if len(last_text[i]) > 120 else "")
            results[i] = StageError("rewrite_rejected", f"{self.cfg.max_attempts} attempts rejected; "
                                    f"last: {reasons[i]}: {snippet!r}")
        for i, res in enumerate(results):
            if isinstance(res, BaseException):
                # error_row() copies the input row dict: the counts reach the error row this way.
                rows[i]["rewrite_rejections"] = json.dumps(rejected[i], sort_keys=True)
        return results
