"""``transformers`` rewrite backend: batched, left-padded ``generate`` with per-row seeded sampling.

Usage::

    cfg = RewriteConfig(backend="transformers", model="tiny://llm?seed=0")   # or a local model folder
    ds.map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage))

The model and tokenizer load once per actor. Prompts go through the tokenizer's chat template when
it has one (else a plain "instruction / report / rewritten report" text).

Determinism. Hugging Face ``generate`` samples with the process-global RNG, so in a batch a row's
tokens would depend on its neighbours. Instead this backend samples with the Gumbel-max trick:
each step adds Gumbel noise drawn from *the row's own* ``torch.Generator`` (seeded with the row's
seed) to the temperature-scaled, top-p-filtered logits and takes the argmax (greedy decoding on
perturbed scores), which is an exact sample from the softmax. What this guarantees:

* same model, prompt, seed and batch -> the same text, bit for bit;
* a row's random stream is its own, so its text does not depend on which rows share its batch,
  up to float rounding: padded batches compute logits with other matrix shapes, and in a near-tie
  (gap below ~1e-6) a last-bit difference could pick another token. Rare, not excluded.
* temperature 0 -> greedy decoding, no noise.
"""

from __future__ import annotations

import logging

from pairaug_ray.llm.prompts import library_for
from pairaug_ray.errors import StageError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny://llm?seed=0"


class RowSeededGumbel:
    """Logits processor: banned tokens, temperature, top-p, then Gumbel noise from one generator
    per row."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device,
                 banned_ids: list[int] = ()):
        import torch

        self.banned = sorted(set(banned_ids))
        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s) % 2**63) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        if self.banned:
            scores[:, [i for i in self.banned if i < scores.shape[-1]]] = float("-inf")
        if self.temperature <= 0:
            return scores
        scores = scores / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cum - sorted_scores.softmax(-1) > self.top_p  # keep the first token past p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        vocab = scores.shape[-1]
        uniform = torch.stack([
            torch.rand(vocab, generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
        return scores + gumbel


def _pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _pick_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


class TransformersBackend:
    """Loads the model once; ``rewrite`` generates one candidate per request."""

    name = "transformers"

    def __init__(self, cfg):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from pairaug_ray.llm.tiny import resolve_model

        self.cfg = cfg
        self.model = cfg.model or DEFAULT_MODEL
        self.prompts = library_for(cfg)
        path = resolve_model(self.model)
        self.device = _pick_device(cfg.transformers.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=_pick_dtype(cfg.transformers.dtype, self.device)).to(self.device).eval()
        conf = self.lm.config
        self.max_positions = (getattr(conf, "max_position_embeddings", None)
                              or getattr(conf, "n_positions", None) or 2048)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        eos = getattr(self.lm.generation_config, "eos_token_id", None)
        self.eos_ids = sorted({self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
                              - {None})
        # Padding, BOS and chat-role tokens are never part of an answer (pad may equal EOS: kept).
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if t.special}
        self.banned_ids = sorted(special - set(self.eos_ids))
        # generate() fills unset options from the model's generation_config (a chat model's may say
        # do_sample=True, top_k, repetition_penalty): start from a clean one so only ours apply.
        self.lm.generation_config = GenerationConfig(
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
            bos_token_id=self.tokenizer.bos_token_id)

    def prompt_id(self, branch: str) -> str:
        return self.prompts.prompt_id(branch)

    def prompt_text(self, report: str, branch: str) -> str:
        messages = self.prompts.messages(report, branch, max_words=self.cfg.max_words)
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system, user = messages[0]["content"], messages[1]["content"]
        return f"{system}\n\nReport: {user}\n\nRewritten report:"

    def rewrite(self, requests) -> list:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        results: list = [None] * len(requests)
        texts, idx = [], []
        room = self.max_positions - 8
        for i, r in enumerate(requests):
            text = self.prompt_text(r.report, r.branch)
            n = len(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])
            if n >= room:
                results[i] = StageError("prompt_too_long",
                                        f"prompt has {n} tokens; the model takes {self.max_positions}")
            else:
                texts.append(text)
                idx.append(i)
        if not texts:
            return results
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=not self.chat).to(self.device)
        width = enc["input_ids"].shape[1]
        gen = GenerationConfig(
            max_new_tokens=max(1, min(self.cfg.max_tokens, self.max_positions - width)),
            do_sample=False, num_beams=1,  # sampling happens in RowSeededGumbel
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
            bos_token_id=self.tokenizer.bos_token_id)
        sampler = RowSeededGumbel([requests[i].seed for i in idx], self.cfg.temperature,
                                  self.cfg.top_p, self.device, self.banned_ids)
        with torch.inference_mode():
            out = self.lm.generate(**enc, generation_config=gen,
                                   logits_processor=LogitsProcessorList([sampler]))
        decoded = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(idx, decoded):
            results[i] = text
        return results
