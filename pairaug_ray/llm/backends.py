"""The registry of rewrite backends: a name -> a lazy factory of a ``RewriteBackend``.

Usage::

    backend = make_backend(cfg)              # cfg: stages.rewrite.RewriteConfig, by cfg.backend
    BACKENDS["mine"] = lambda cfg: MyBackend(cfg)     # a plugin

Factories import their libraries only when called (on the actor), so importing this module
imports no LLM library.
"""

from __future__ import annotations

from typing import Any, Callable

from pairaug_ray.llm.base import RewriteBackend


def _rule(cfg) -> RewriteBackend:
    from pairaug_ray.llm.rule import RuleRewriter

    return RuleRewriter(max_words=cfg.max_words)


def _transformers(cfg) -> RewriteBackend:
    from pairaug_ray.llm.hf_backend import TransformersBackend

    return TransformersBackend(cfg)


def _openai(cfg) -> RewriteBackend:
    from pairaug_ray.llm.openai_backend import OpenAIBackend

    return OpenAIBackend(cfg)


def _vllm(cfg) -> RewriteBackend:
    from pairaug_ray.llm.vllm_backend import VLLMRewriter

    return VLLMRewriter(cfg)


# name -> factory(config); factories import their libraries only when called (on the actor).
BACKENDS: dict[str, Callable[[Any], RewriteBackend]] = {
    "rule": _rule,
    "transformers": _transformers,
    "openai": _openai,
    "vllm": _vllm,
}


def check_backend(name: str) -> None:
    """Raises ``ValueError`` naming the known backends when ``name`` is not registered."""
    if name not in BACKENDS:
        raise ValueError(f"unknown rewrite backend {name!r}; known: {sorted(BACKENDS)}")


def make_backend(cfg) -> RewriteBackend:
    """The backend ``cfg.backend`` names, built from ``cfg`` (a ``RewriteConfig``)."""
    check_backend(cfg.backend)
    return BACKENDS[cfg.backend](cfg)
