"""Report rewriting stage: InterAug (partially opposite findings) and IntraAug (changed condition).

Usage::

    cfg = RewriteConfig(backend="rule", max_words=50)
    ds = planned.map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage))

Rows need ``report``, ``branch`` ("inter" | "intra") and ``seed``; they come out with
``rewritten_report``, ``change`` (JSON: observation → [before, after]), the labeler's ``labels`` and
``findings`` of the new text, and the provenance ``rewrite_backend``, ``rewrite_model``,
``prompt_id``. The contract (``llm/validation.py``) is the same for every backend: pre-checks,
post-processing and validation (word limit, not empty, not the source, the labeler must read the
kind of change asked for), retries with a new seed (``llm.base.attempt_seed``) up to
``max_attempts`` times, then a ``rewrite_rejected`` error row. Every row (error rows included)
carries ``rewrite_rejections``: JSON {reason: count} of the candidates rejected on the way.

Backends (``llm.backends.BACKENDS``, lazy factories): ``rule`` (offline, ``llm/rule.py``),
``transformers`` (``llm/hf_backend.py``), ``openai`` (``llm/openai_backend.py``), ``vllm``
(``llm/vllm_backend.py`` in this stage's actors with ``vllm.engine: actor``; the default engine is
the ray.data.llm chain of ``stages/rewrite_vllm.py``). Each backend's own options live in their
own section (``transformers``, ``openai``, ``vllm``; ``llm/options.py``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from pairaug_ray.errors import StageError  # noqa: F401  (a backend's per-row failure)
from pairaug_ray.llm.backends import BACKENDS, check_backend, make_backend  # noqa: F401 (re-exported)
from pairaug_ray.llm.base import RewriteBackend, RewriteRequest, attempt_seed  # noqa: F401 (re-exported)
from pairaug_ray.llm.options import (
    BACKEND_OPTIONS, LEGACY_KEYS, OpenAIOptions, TransformersOptions, VLLMOptions, route_legacy_keys,
)
from pairaug_ray.llm.validation import accepted_columns, precheck, rejection_error, review_rewrite
from pairaug_ray.stages.base import RowStage, StageConfig


class RewriteConfig(StageConfig):
    backend: str = Field("rule", description="rule | transformers | vllm | openai (or a registered plugin)")
    model: str = Field("", description="transformers / vllm: folder, hub id or tiny://llm?seed=N&arch=gpt2|llama "
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
    temperature: float = Field(0.5, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(300, ge=1, description="new tokens per answer")
    transformers: TransformersOptions = Field(default_factory=TransformersOptions,
                                              description="options of the transformers backend")
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions, description="options of the openai backend")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="options of the vllm backend")
    batch_size: int = 32
    num_cpus: float = 0.25

    @model_validator(mode="before")
    @classmethod
    def _legacy_flat_keys(cls, data: Any) -> Any:
        return route_legacy_keys(data) if isinstance(data, dict) else data

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "RewriteConfig":
        """As pydantic's, with the flat keys of earlier versions routed into their section."""
        if update and any(k in LEGACY_KEYS for k in update):
            sections = {k: getattr(self, k) for k in {LEGACY_KEYS[k] for k in update if k in LEGACY_KEYS}}
            update = route_legacy_keys({**sections, **update}, override=True)
            for name, group in list(update.items()):
                if name in sections:
                    update[name] = type(sections[name]).model_validate(group)
        return super().model_copy(update=update, deep=deep)

    def fingerprint_dump(self) -> dict:
        """What determines the output: every field but the other backends' option sections."""
        own = BACKEND_OPTIONS.get(self.backend, (None,))[0]
        return self.model_dump(mode="json", exclude={f for f, _ in BACKEND_OPTIONS.values() if f != own})


class RewriteStage(RowStage):
    name = "rewrite"

    def __init__(self, config: RewriteConfig):
        super().__init__(config)
        self.cfg = config
        self.backend = make_backend(config)

    def process(self, rows: list[dict]) -> list:
        cfg = self.cfg
        results: list = [precheck(r, cfg.min_source_words) for r in rows]
        reasons: list[str] = [""] * len(rows)
        rejected: list[dict[str, int]] = [{} for _ in rows]
        last_text: list[str] = [""] * len(rows)
        pending = [i for i, res in enumerate(results) if res is None]
        for attempt in range(cfg.max_attempts):
            if not pending:
                break
            reqs = [RewriteRequest(rows[i]["report"], rows[i]["branch"], attempt_seed(rows[i]["seed"], attempt))
                    for i in pending]
            texts = self.backend.rewrite(reqs)
            if len(texts) != len(reqs):
                raise RuntimeError(f"backend {self.backend.name} gave {len(texts)} texts for {len(reqs)}")
            still = []
            for i, raw in zip(pending, texts):
                if isinstance(raw, BaseException):  # the backend gave up on this row (e.g. timeout)
                    results[i] = raw
                    continue
                text, reason, change = review_rewrite(rows[i]["report"], raw, rows[i]["branch"],
                                                      cfg.max_words, cfg.overlong)
                if reason:
                    reasons[i] = reason
                    rejected[i][reason] = rejected[i].get(reason, 0) + 1
                    last_text[i] = text
                    still.append(i)
                    continue
                results[i] = [{**rows[i], **accepted_columns(
                    text, change, backend=self.backend.name, model=self.backend.model,
                    prompt_id=self.backend.prompt_id(rows[i]["branch"]), attempts=attempt + 1,
                    rejected=rejected[i])}]
            pending = still
        for i in pending:
            results[i] = rejection_error(cfg.max_attempts, reasons[i], last_text[i])
        for i, res in enumerate(results):
            if isinstance(res, BaseException):
                # error_row() copies the input row dict: the counts reach the error row this way.
                rows[i]["rewrite_rejections"] = json.dumps(rejected[i], sort_keys=True)
        return results
