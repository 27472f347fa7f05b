"""One options model per rewrite backend, as ray.data.llm has one processor config per engine.

Usage::

    rewrite:                      # the augment job's rewrite section
      backend: openai
      model: my-model
      openai: {api_base: "http://vllm-head:8000/v1", concurrency: 16}

``RewriteConfig`` (``stages/rewrite.py``) holds the settings every backend shares (model, word
limit, attempts, prompts, sampling) plus one of these per backend; only the selected backend's
options count towards the output fingerprint. The flat spellings of earlier versions
(``rewrite.api_base: ...``, ``rewrite.device: cuda``) are still read and moved into their backend's
section.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TransformersOptions(_Options):
    """``rewrite.transformers``: batched ``generate`` in the stage's actor pool."""

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (bfloat16 on GPU, float32 on CPU) | float32 | float16 | bfloat16")


class OpenAIOptions(_Options):
    """``rewrite.openai``: any OpenAI-compatible /v1/chat/completions server."""

    api_base: str = Field("http://127.0.0.1:8000/v1", description="base URL, up to and including /v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key "
                             "(read on the actor, never logged); unset = no Authorization header")
    request_timeout_s: float = Field(60.0, gt=0, description="seconds to wait for one answer")
    concurrency: int = Field(8, ge=1, description="requests in flight per actor")
    max_retries: int = Field(3, ge=0, description="retries on 429, 5xx, timeouts and connection errors")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry (jittered)")
    backoff_max_s: float = Field(30.0, ge=0, description="longest retry delay")


class VLLMOptions(_Options):
    """``rewrite.vllm``: vLLM settings beside the stage's pool resources."""

    engine: Literal["ray.data.llm", "actor"] = Field(
        "ray.data.llm", description="ray.data.llm: chained processors, one engine pool per attempt; "
        "actor: vllm.LLM inside the RewriteStage actor pool, retries in the actor")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine arguments (tensor_parallel_size, max_model_len, "
        "gpu_memory_utilization, ...); on CPU merged over CPU_ENGINE_DEFAULTS")
    retry_max_actors: int = Field(1, ge=1, description="engine replicas of each retry attempt")
    max_concurrent_batches: int = Field(4, ge=1, description="batches in flight per engine replica")
    helper_num_cpus: float = Field(0.1, gt=0, description="CPUs of the pre/postprocess tasks: keep "
                                   "it fractional or a small cluster deadlocks")
    log_engine_metrics: bool = Field(False, description="export vLLM metrics through Ray (needs "
                                     "ray.init(_metrics_export_port=...))")


# backend name -> (config field, options model); backends not listed (rule, plugins) have none.
BACKEND_OPTIONS: dict[str, tuple[str, type[_Options]]] = {
    "transformers": ("transformers", TransformersOptions),
    "openai": ("openai", OpenAIOptions),
    "vllm": ("vllm", VLLMOptions),
}
# Flat keys of earlier versions -> the options section they belong to.
LEGACY_KEYS: dict[str, str] = {
    **{k: "transformers" for k in TransformersOptions.model_fields},
    **{k: "openai" for k in OpenAIOptions.model_fields},
}


def route_legacy_keys(data: dict[str, Any], override: bool = False) -> dict[str, Any]:
    """Moves flat backend keys (``api_base``, ``device``, ...) into their options section.

    Raises ``ValueError`` when a key is given both flat and inside its section with other values,
    unless ``override`` (then the flat value wins, as in ``model_copy(update=...)``).
    """
    data = dict(data)
    for key in [k for k in data if k in LEGACY_KEYS]:
        section = LEGACY_KEYS[key]
        value = data.pop(key)
        group = data.get(section) or {}
        group = group.model_dump() if isinstance(group, BaseModel) else dict(group)
        if not override and key in group and group[key] != value:
            raise ValueError(f"rewrite.{key} and rewrite.{section}.{key} disagree; set only "
                             f"rewrite.{section}.{key}")
        group[key] = value
        data[section] = group
    return data
