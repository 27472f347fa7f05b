"""A tiny, seeded, offline causal LM with a report-trained BPE tokenizer and a chat template.

Usage::

    from pairaug_ray.llm.tiny import build_tiny_llm, tiny_llm_path, resolve_model
    path = build_tiny_llm("/tmp/tiny_llm", seed=0, arch="gpt2")    # or arch="llama"
    path = tiny_llm_path()                       # built once per cache folder, then reused
    path = resolve_model("tiny://llm?seed=1&arch=llama")   # any other name is returned as is

The folder is a standard Hugging Face model folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with the chat template, ``generation_config.json``)
that ``AutoModelForCausalLM`` / ``AutoTokenizer`` and vLLM load. 2 layers, 64 wide, 2 heads of 32,
vocabulary a multiple of 64, 1,024 positions. The tokenizer is a byte-level BPE trained here on
report text: the IU corpus when ``torchxrayvision`` is installed, else PhantomCXR template
reports. The weights are random (seeded): the model's output is meaningless, it exists to test
plumbing, batching, determinism and validation. Same seed + same corpus -> identical files.
Weights are built at run time and never committed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from pairaug_ray.models.uri import is_tiny, parse_tiny_uri as _parse_tiny

TINY_LLM_VERSION = "v2"
ARCHS = ("gpt2", "llama")
VOCAB_SIZE = 1024
HIDDEN, LAYERS, HEADS, POSITIONS = 64, 2, 2, 1024
BOS, EOS, PAD = "<|endoftext|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
META_FILE = "pairaug_tiny_llm.json"
WEIGHT_STD = 0.08

_lock = threading.Lock()
_built: dict[tuple, str] = {}


@functools.lru_cache(maxsize=4)
def report_corpus(limit: int | None = None) -> tuple[str, tuple[str, ...]]:
    """(corpus name, texts): IU reports when installed, else 1,000 PhantomCXR template reports."""
    from pairaug_ray.io import reports

    if reports.iu_corpus_available():
        texts = [r.text for r in reports.iter_iu_reports() if r.text.strip()]
        return "iu", tuple(texts[:limit] if limit else texts)
    import numpy as np

    from pairaug_ray import phantom

    rng = np.random.default_rng(0)
    n = limit or 1000
    return "phantom", tuple(phantom.template_report(phantom.sample_findings(rng), rng) for _ in range(n))


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the chat tokens, vocab a multiple of 64."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # vLLM and fast kernels like a vocabulary that is a multiple of 64: pad with unused tokens.
    short = -tok.get_vocab_size() % 64
    if short:
        tok.add_special_tokens([f"<|unused{i}|>" for i in range(short)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=POSITIONS)


def _model_config(arch: str, tokenizer):
    ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
               eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
               pad_token_id=tokenizer.convert_tokens_to_ids(PAD))
    vocab = len(tokenizer)
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
                          n_head=HEADS, n_inner=4 * HIDDEN, **ids)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           max_position_embeddings=POSITIONS, tie_word_embeddings=True, **ids)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def init_weights(model, seed: int, std: float = WEIGHT_STD) -> None:
    """Seeded weights, independent of the library's own init: matrices ~ N(0, std), norm scales 1,
    biases 0. ``std`` sets how peaked the next-token distribution is (0.08: sampling varies with
    the seed; at GPT-2's 0.02 it is near uniform, at 1.0 near greedy)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # tied weights appear once
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def build_tiny_llm(out_dir: str | os.PathLike, seed: int = 0, arch: str = "gpt2") -> str:
    """Build the tiny LM into ``out_dir`` (created; existing files overwritten); returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus, texts = report_corpus()
    tokenizer = train_tokenizer(texts)
    config = _model_config(arch, tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_weights(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"arch": arch, "seed": seed, "corpus": corpus, "n_texts": len(texts),
            "vocab_size": len(tokenizer), "version": TINY_LLM_VERSION}
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return str(out)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PAIRAUG_CACHE") or Path(tempfile.gettempdir()) / "pairaug_cache") / "tiny_llm"


def tiny_llm_path(cache_dir: str | os.PathLike | None = None, seed: int = 0, arch: str = "gpt2") -> str:
    """The tiny LM's folder under ``cache_dir``, built on first use (safe across processes)."""
    from pairaug_ray.io.reports import iu_corpus_available

    corpus = "iu" if iu_corpus_available() else "phantom"
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"{arch}-seed{seed}-{corpus}-{TINY_LLM_VERSION}"
    key = (str(final),)
    with _lock:
        if key in _built and (final / META_FILE).is_file():
            return _built[key]
        if not (final / META_FILE).is_file():
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
            try:
                build_tiny_llm(tmp, seed=seed, arch=arch)
                try:
                    os.rename(tmp, final)  # atomic; another process may have won the race
                except OSError:
                    if not (final / META_FILE).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _built[key] = str(final)
        return str(final)


def parse_tiny_uri(uri: str) -> dict | None:
    """``tiny://llm?seed=N&arch=gpt2|llama`` -> {"seed": N, "arch": ...}; None for other names
    (the rules are ``models.uri``'s)."""
    if not is_tiny(uri):
        return None
    return _parse_tiny(uri, kinds=("llm",))[1]


def resolve_model(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A loadable model path: tiny:// names are built (once) into the cache, others returned as is."""
    spec = parse_tiny_uri(name)
    return tiny_llm_path(cache_dir, **spec) if spec is not None else name


def folder_digest(path: str | os.PathLike) -> str:
    """SHA-256 over the folder's files (names and bytes): equal digests = identical builds."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()
