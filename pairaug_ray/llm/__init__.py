"""LLM report rewriting: prompts, output post-processing, the offline tiny LLM, and the
``transformers`` / ``openai`` rewrite backends (``vllm`` lives beside them).

Usage::

    from pairaug_ray.llm.prompts import build_messages
    from pairaug_ray.llm.postprocess import postprocess
    from pairaug_ray.llm.tiny import tiny_llm_path

Importing this package imports neither torch nor transformers; the backends do, when built.
"""
