"""Request bodies of the HTTP API and its error envelope.

``POST /v1/augment`` takes ``AugmentRequest`` as a JSON body (the image, if any, base64 in
``image_base64``) or as ``multipart/form-data`` with a ``request`` part holding the same JSON
without ``image_base64`` and an ``image`` file part. ``POST /v1/chat/completions`` takes
``ChatCompletionRequest``, the subset of OpenAI's chat-completions body that
``pairaug_ray.llm.openai_backend`` sends.

Every error answer, whatever the endpoint, has OpenAI's error shape::

    {"error": {"message": "why, in words", "type": "invalid_request_error",
               "code": "unknown_field", "param": "colour"}}

with status 400 (body not JSON), 404 (unknown model), 411 (multipart without Content-Length), 413
(image bytes or pixels, body size), 415 (content type), 422 (a field's value: unknown field, bad
base64, undecodable image with its decoder class, report too long, too many variants, ...),
503 (queue full: retry later; ``Retry-After`` is set) or 504 (no answer within the ingress's
``request_timeout_s``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

BranchName = Literal["inter", "intra"]


class ApiError(Exception):
    """An HTTP error answer: status, a stable machine ``code`` and a reason in words."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ("invalid_request_error" if self.status < 500 and self.status != 429
                else "server_error" if self.status != 503 else "overloaded_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


def validation_error(exc: ValidationError, status: int = 422) -> ApiError:
    """A pydantic ``ValidationError`` as one ``ApiError`` naming every bad or unknown field."""
    parts, codes, params = [], set(), []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
            codes.add("unknown_field")
        elif err.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
            codes.add("missing_field")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
            codes.add("invalid_value")
        params.append(loc)
    code = codes.pop() if len(codes) == 1 else "invalid_request"
    return ApiError(status, code, "; ".join(parts), param=params[0] if len(params) == 1 else None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentRequest(_Strict):
    """One source pair to augment. Limits (report length, variants, image size) are the server's
    ``ServeConfig.limits`` and are checked after this schema."""

    report: str = Field(..., min_length=1, description="the source report (findings + impression)")
    image_base64: str | None = Field(
        None, description="the study image, base64 (PNG, JPEG or DICOM Part 10; a data: URL prefix "
        "is accepted). IntraAug hands it to the editor as the source image; see each pair's "
        "edit_source for what was used. Never echoed.")
    image_name: str | None = Field(
        None, max_length=255, description="file name, only to tell the format when the bytes do not "
        "(e.g. a preamble-less DICOM as x.dcm); never echoed or logged")
    branches: list[BranchName] = Field(
        default_factory=lambda: ["inter", "intra"], min_length=1, max_length=2,
        description="inter = new patient (rewrite + generate), intra = same patient, changed "
        "condition (rewrite + edit)")
    variants: int = Field(1, ge=1, description="candidates per branch")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="same request + seed -> same response")
    return_images: bool = Field(True, description="false: reports and scores only, no base64 PNGs")

    @field_validator("branches")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"branches repeat: {value}")
        return value


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(..., description="text content (content-part lists are not supported)")
    name: str | None = None


class ChatCompletionRequest(_Strict):
    """The chat-completions subset this server answers (what ``OpenAIBackend.complete`` sends).

    ``temperature``, ``top_p`` and ``max_tokens`` are accepted and validated; the served rewriter
    samples with its own configured settings (``ServeConfig.rewrite``), as the batch job's does,
    and the answer's ``pairaug`` object says which prompt and backend made it.
    """

    model: str = Field(..., min_length=1)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=16)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed + messages -> same answer")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: Literal[False] = Field(False, description="streaming is not supported")
    user: str | None = None
