"""The one ``tiny://`` registry: seeded, offline tiny models named by a URI, for sd | vlp | llm.

Usage::

    kind, kwargs = parse_tiny_uri("tiny://sd?size=32&channels=16,32")
    # ("sd", {"seed": 0, "image_size": 32, "unet_channels": (16, 32)})
    parse_tiny_uri("tiny://llm?seed=3", kinds=("llm",))   # ("llm", {"seed": 3, "arch": "gpt2"})

One rule for every kind: a URI names a known kind, and every query parameter must be one of that
kind's parameters (an unknown one is a ``ValueError`` that lists the known ones: a typo such as
``sise=64`` never falls back silently to a default). The factories that build the models live
beside their families (``models.tiny`` for sd, ``models.vlp`` for vlp, ``llm.tiny`` for llm); this
module imports none of them, so parsing a URI costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

TINY_SCHEME = "tiny://"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(",") if c.strip())


def _arch(text: str) -> str:
    if text not in ("gpt2", "llama"):
        raise ValueError(f"arch must be gpt2 or llama, not {text!r}")
    return text


def _xattn(text: str) -> str:
    if text not in ("inner", "all"):
        raise ValueError(f"xattn must be inner or all, not {text!r}")
    return text


@dataclass(frozen=True)
class TinyParam:
    """A URI query parameter: the factory keyword it fills, its parser, and its default
    (``None`` = left out of the keywords unless the URI gives it)."""

    keyword: str
    parse: Callable[[str], Any]
    default: Any = None


_VLP = {"seed": TinyParam("seed", int, 0), "embed_dim": TinyParam("embed_dim", int),
        "image_size": TinyParam("image_size", int)}

# kind -> {URI parameter -> TinyParam}
TINY_MODELS: dict[str, dict[str, TinyParam]] = {
    "sd": {"seed": TinyParam("seed", int, 0), "size": TinyParam("image_size", int, 64),
           "channels": TinyParam("unet_channels", _ints), "cross": TinyParam("cross_attention_dim", int),
           "xattn": TinyParam("cross_attention_levels", _xattn),
           "text_layers": TinyParam("text_layers", int)},
    "vlp": _VLP,
    "vlp-minilm": _VLP,
    "llm": {"seed": TinyParam("seed", int, 0), "arch": TinyParam("arch", _arch, "gpt2")},
}


def is_tiny(name: str) -> bool:
    return str(name).startswith(TINY_SCHEME)


def parse_tiny_uri(uri: str, kinds: tuple[str, ...] | None = None,
                   defaults: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``tiny://KIND?key=value&...`` -> (KIND, factory keywords).

    ``kinds`` restricts the accepted kinds (a ``ValueError`` names them otherwise); ``defaults``
    (by keyword) replace the registry's defaults, e.g. the seed a caller uses when the URI has none.
    Raises ``ValueError`` for another scheme, an unknown kind, an unknown parameter or a bad value.
    """
    parsed = urlparse(str(uri))
    allowed = tuple(kinds) if kinds else tuple(TINY_MODELS)
    if parsed.scheme != "tiny" or parsed.netloc not in allowed:
        raise ValueError(f"unknown tiny model {uri!r}; expected tiny://KIND?... with KIND one of "
                         f"{list(allowed)}")
    params = TINY_MODELS[parsed.netloc]
    query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(params))
    if unknown:
        raise ValueError(f"unknown parameters {unknown} in {uri!r}; tiny://{parsed.netloc} takes "
                         f"{sorted(params)}")
    out: dict[str, Any] = {}
    for key, spec in params.items():
        default = (defaults or {}).get(spec.keyword, spec.default)
        if key in query:
            try:
                out[spec.keyword] = spec.parse(query[key])
            except ValueError as exc:
                raise ValueError(f"bad value {key}={query[key]!r} in {uri!r}: {exc}") from None
        elif default is not None:
            out[spec.keyword] = default
    return parsed.netloc, out
