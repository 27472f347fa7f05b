"""What the ingress does to a request before any model sees it: image checks + decoding, and
recovering (branch, report) from chat messages.

Images go through the same PHI-free decoder as ingest (``pairaug_ray.io.dicom.decode_any``): only
pixels and a few code-string facts (modality, view position, bits stored) come out; no header
value (names, ids, dates, institution) reaches a response or a log. Before decoding, the byte size
is checked and the pixel count is read from the header alone (PNG/JPEG through Pillow's lazy open,
DICOM through pydicom without its pixel data), so a decompression bomb is refused unread.

Usage::

    img = read_image(data, name="", limits=cfg.limits, size=64)     # -> SourceImage, or ApiError
    branch, report, prompt = parse_chat(messages, model, library, "pairaug-rewriter")
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import secrets
import warnings
from dataclasses import dataclass

from pairaug_ray.serve.api import ApiError

# Pseudonyms that decode_dicom derives are thrown away here; a per-process random key keeps even
# the in-memory values unlinkable.
_EPHEMERAL_KEY = secrets.token_hex(16)


@dataclass(frozen=True)
class SourceImage:
    """A decoded request image: a 16-bit grayscale PNG at the editor's size and PHI-free facts."""

    png: bytes          # 16-bit grayscale PNG, size x size, bright = dense
    digest: str         # sha256 of ``png`` (pixels only, no header), for deterministic ids
    info: dict          # format, width, height (native pixels), bits_stored, modality, view_position


def _sniff(data: bytes, name: str) -> str:
    head = bytes(data[:132])
    if head[128:132] == b"DICM" or head[:4] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if name.lower().endswith((".dcm", ".dicom", ".dic")):
        return "dicom"
    return "unknown"


@contextlib.contextmanager
def _quiet():
    """pydicom logs and warns odd header values verbatim: keep them out of the logs."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def header_dims(data: bytes, kind: str) -> tuple[int, int] | None:
    """(rows, columns) from the image's header without decoding pixels; None when unreadable
    (the decoder then says why). Raises ``ApiError(413)`` for Pillow's decompression-bomb refusal."""
    if kind in ("png", "jpeg", "unknown"):
        from PIL import Image

        try:
            with _quiet(), Image.open(io.BytesIO(data)) as img:
                return int(img.size[1]), int(img.size[0])
        except Image.DecompressionBombError:
            raise ApiError(413, "image_too_many_pixels", "the image's header declares more pixels "
                           "than this server decodes", param="image") from None
        except Exception:  # noqa: BLE001 - not an image Pillow reads; DICOM or garbage
            if kind != "unknown":
                return None
    try:
        import pydicom

        with _quiet():
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                                 specific_tags=["Rows", "Columns"])
            rows, cols = ds.get("Rows"), ds.get("Columns")
        return (int(rows), int(cols)) if rows and cols else None
    except Exception:  # noqa: BLE001 - the decoder classifies unreadable files
        return None


def read_image(data: bytes, name: str, limits, size: int) -> SourceImage:
    """Check and decode a request image (PNG, JPEG or DICOM) to ``size`` x ``size`` pixels.

    ``limits`` is a ``ServeConfig.limits``. Raises ``ApiError`` 413 ``image_too_large`` (bytes) or
    ``image_too_many_pixels``, 422 with the decoder's class (``not_dicom``, ``bad_image``,
    ``no_pixel_data``, ``truncated_pixel_data``, ``unsupported_transfer_syntax``, ``not_an_image``,
    ``unreadable``) and its PHI-free message.
    """
    from pairaug_ray.errors import StageError
    from pairaug_ray.io.dicom import decode_any, encode_png

    if not data:
        raise ApiError(422, "empty_image", "the image is empty", param="image")
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, "image_too_large", f"the image is {len(data)} bytes; this server takes at "
                       f"most {limits.max_image_bytes} (limits.max_image_bytes)", param="image")
    kind = _sniff(data, name)
    dims = header_dims(data, kind)
    if dims is not None and dims[0] * dims[1] > limits.max_image_pixels:
        raise ApiError(413, "image_too_many_pixels", f"the image is {dims[1]}x{dims[0]} = "
                       f"{dims[0] * dims[1]} pixels; this server takes at most "
                       f"{limits.max_image_pixels} (limits.max_image_pixels)", param="image")
    try:
        decoded = decode_any(data, name=name, size=int(size), id_key=_EPHEMERAL_KEY)
    except StageError as exc:  # DecodeError: classified, message scrubbed of header values
        raise ApiError(422, str(exc.error_class), f"cannot decode the image: {exc}", param="image") from None
    except Exception as exc:  # noqa: BLE001 - never echo a library's text (may quote headers)
        raise ApiError(422, "bad_image", f"cannot decode the image ({type(exc).__name__})",
                       param="image") from None
    if kind == "unknown":
        kind = "dicom" if decoded.modality is not None or decoded.study_pid is not None else "image"
    png = encode_png(decoded.pixels, bits=16)
    info = {
        "format": kind,
        "height": dims[0] if dims else None,
        "width": dims[1] if dims else None,
        "bits_stored": int(decoded.bits_stored),
        "modality": decoded.modality,
        "view_position": decoded.view_position,
        "decoded_size": int(size),
    }
    return SourceImage(png=png, digest=hashlib.sha256(png).hexdigest(), info=info)


# ----------------------------------------------------------------------------- chat prompts

_R, _M = "\x00REPORT\x00", "\x00MAXWORDS\x00"


def _template_regex(template: str) -> re.Pattern:
    """A str.format template with {report} / {max_words} as a regex capturing them."""
    filled = template.format(report=_R, max_words=_M)
    out, seen = [], set()
    for piece in re.split(f"({re.escape(_R)}|{re.escape(_M)})", filled):
        if piece in (_R, _M):
            group = "report" if piece == _R else "max_words"
            pattern = r".+?" if group == "report" else r"\d+"
            out.append(f"(?P={group})" if group in seen else f"(?P<{group}>{pattern})")
            seen.add(group)
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out), re.DOTALL)


def match_prompt(library, messages: list) -> tuple[object, str] | None:
    """(prompt, report) when ``messages`` are [system, user] of a prompt in ``library``
    (``pairaug_ray.llm.prompts.PromptLibrary``), else None."""
    if len(messages) != 2 or messages[0].role not in ("system", "developer") or messages[1].role != "user":
        return None
    system, user = messages[0].content, messages[1].content
    for prompt in library.prompts.values():
        found: dict[str, str] = {}
        ok = True
        for text, template in ((system, prompt.system), (user, prompt.user)):
            m = _template_regex(template).fullmatch(text)
            if m is None:
                ok = False
                break
            for key, value in m.groupdict().items():
                if found.setdefault(key, value) != value:
                    ok = False
        if ok and found.get("report", "").strip():
            return prompt, found["report"].strip()
    return None


def parse_chat(messages: list, model: str, library, served_name: str) -> tuple[str, str, str | None]:
    """(branch, report, matched prompt id or None) for a chat request to the served rewriter.

    ``model`` ``served_name`` needs the [system, user] messages of a known prompt (what pairaug's
    ``openai`` backend sends); ``served_name:inter`` / ``served_name:intra`` name the branch and take
    the last user message as the report. Raises ``ApiError`` 404 (unknown model) or 422.
    """
    names = {served_name: None, f"{served_name}:inter": "inter", f"{served_name}:intra": "intra"}
    if model not in names:
        raise ApiError(404, "model_not_found", f"model {model!r} is not served here; served: "
                       f"{sorted(names)}", param="model")
    matched = match_prompt(library, messages)
    if matched is not None:
        prompt, report = matched
        branch = names[model] or prompt.branch
        if branch != prompt.branch:
            raise ApiError(422, "branch_mismatch", f"model {model!r} asks for the {branch} branch but "
                           f"the messages are prompt {prompt.id!r} ({prompt.branch})", param="messages")
        return branch, report, prompt.id
    if names[model] is None:
        raise ApiError(422, "unknown_prompt", "the messages are not the [system, user] messages of a "
                       f"rewrite prompt this server knows ({sorted(library.prompts)}); send those (as "
                       f"pairaug's openai backend does) or use model '{served_name}:inter' or "
                       f"'{served_name}:intra' with the report as the last user message", param="messages")
    users = [m.content for m in messages if m.role == "user" and m.content.strip()]
    if not users:
        raise ApiError(422, "missing_report", "no user message holds a report", param="messages")
    return names[model], users[-1].strip(), None
