"""The PairAug Ray Serve app: one FastAPI ingress in front of the four model deployments.

Run it::

    serve run jobs/configs/serve_config.yaml                      # Serve config file (local Ray)
    serve deploy jobs/configs/serve_config.yaml --address http://HEAD:8265   # a running cluster
    serve run pairaug_ray.serve.app:build_app generate.steps=10   # import path + dotted args
    run_serve(ServeConfig(...), blocking=True)                    # from Python (`pairaug serve`)

Endpoints (under ``ServeConfig.route_prefix``):

``POST /v1/augment``
    JSON ``AugmentRequest`` (``report``, optional ``image_base64``, ``branches``, ``variants``,
    ``seed``, ``return_images``), or multipart with a ``request`` JSON part and an ``image`` file.
    Answer::

        {"request_id", "seed", "code_version",
         "source": {"report_words", "image": null | {"format", "width", "height", "bits_stored",
                    "modality", "view_position", "decoded_size"}, "image_used_by_editor": bool},
         "models": {"rewriter", "generator", "editor", "scorer"},
         "pairs": [{"pair_id", "branch", "variant", "seed", "status": "ok" | "error",
                    "report" (the rewritten report), "change", "labels",
                    "image_png" (base64 16-bit PNG), "source_image_png" (intra: the edit's source),
                    "edit_source" (intra: "real" = the request's image, "noise" = drawn from the
                    source report), "scores": {"align", "delta", "img"},
                    "error": null | {"stage", "class", "reason"},
                    "provenance": {"rewrite_backend", "rewrite_model", "prompt_id",
                                   "generator_model", "score_model", "seed", "request_seed",
                                   "code_version", "steps", "guidance_scale"}}],
         "notes": [...]}

    InterAug = rewrite → generate → score; IntraAug = rewrite → edit → score. Scores are cosines
    (``stages/score.py``); pruning is the batch job's business (it needs the whole candidate set).
    Same request + seed → same answer (per-row seeds and ids as the batch job plans them:
    ``stages.plan.pair_seed`` / ``pair_id_of``), bit for bit whatever the load while the model
    deployments keep ``share_batches: false`` (the default; see ``serve/deployments.py``).
``POST /v1/chat/completions``
    OpenAI chat completions (non-streaming, n=1), answered by the served rewriter through
    ``RewriteStage`` (the batch job's validation and retries). Point the batch job's ``openai``
    backend here: ``augment.rewrite.api_base=http://HOST:PORT/v1``, ``model=pairaug-rewriter``.
``GET /v1/models``
    The served model names.
``GET /healthz``
    200 ``{"status": "ok", "deployments": {...}}`` when every model deployment answers a ping
    within 5 s, else 503 naming the failing ones. Serve's own health checks call each replica's
    ``check_health``.

Errors have OpenAI's envelope ``{"error": {"message", "type", "code", "param"}}`` (``serve/api.py``).
No DICOM header value is ever returned or logged: images go through ``io.dicom.decode_any``, and
image file names are used only to tell formats apart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from pairaug_ray import __version__
from pairaug_ray.serve.api import (
    ApiError,
    AugmentRequest,
    ChatCompletionRequest,
    validation_error,
)
from pairaug_ray.serve.config import (
    EDITOR,
    GENERATOR,
    INGRESS,
    MODEL_DEPLOYMENTS,
    REWRITER,
    SCORER,
    ServeConfig,
)
from pairaug_ray.serve.deployments import (
    EDIT_SOURCE,
    MODEL_DEPLOYMENT_CLASSES,
    STUDY_IMAGE_COLUMN,
    plain,
)

log = logging.getLogger("ray.serve")

fastapi_app = FastAPI(title="pairaug_ray", version=__version__,
                      description="PairAug chest X-ray pair augmentation (InterAug / IntraAug) and an "
                      "OpenAI-compatible report rewriter")


@fastapi_app.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _b64(data) -> str | None:
    return base64.b64encode(bytes(data)).decode("ascii") if isinstance(data, (bytes, bytearray)) else None


def _json_field(value) -> Any:
    if isinstance(value, str) and value:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_content_length", "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(413, "body_too_large", f"the request body is {size} bytes; this server takes "
                           f"at most {limit} (limits.max_image_bytes as base64 + limits.max_json_bytes)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"the request body passed {limit} bytes, this "
                           "server's limit (limits.max_image_bytes as base64 + limits.max_json_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


def _decode_b64(text: str) -> bytes:
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", "image_base64 is not valid base64", param="image_base64") from None


class IngressReplica:
    """Parses requests, checks limits, decodes images, fans rows out to the model deployments."""

    def __init__(self, cfg: ServeConfig, rewriter, generator, editor, scorer):
        from pairaug_ray.io.store import content_hash
        from pairaug_ray.llm.prompts import library_for
        from pairaug_ray.stages.plan import pair_id_of, pair_seed

        self.cfg = cfg
        self.handles = {REWRITER: rewriter, GENERATOR: generator, EDITOR: editor, SCORER: scorer}
        self.library = library_for(cfg.rewrite)
        self._content_hash = content_hash
        self._pair_seed = pair_seed
        self._pair_id = pair_id_of
        self._editor_size: int | None = None
        rewriter = f"{cfg.rewrite.backend}:{cfg.rewrite.model}" if cfg.rewrite.model else cfg.rewrite.backend
        self.models = {"rewriter": rewriter,
                       "generator": cfg.generate.model, "editor": cfg.edit.model, "scorer": cfg.score.model}

    def check_health(self) -> None:
        if not self.handles:
            raise RuntimeError("ingress has no deployment handles")

    # ------------------------------------------------------------------ plumbing
    async def _call(self, deployment: str, rows: list[dict]) -> list[dict]:
        """``rows`` through a model deployment, in calls of at most its ``batch_size`` rows (cut in
        order, so a request always makes the same calls); backpressure → 503."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        handle = self.handles[deployment]
        size = self.cfg.stage_of(deployment).batch_size
        calls = [rows[i:i + size] for i in range(0, len(rows), size)]
        try:
            answers = await asyncio.gather(*[handle.remote(call) for call in calls])
            return [row for answer in answers for row in answer]
        except BackPressureError as exc:
            retry = max(1, round(getattr(exc, "retry_after_s", None) or 1))
            raise ApiError(503, "overloaded", f"the {deployment} deployment's queue is full; retry later",
                           headers={"Retry-After": str(retry)}) from None
        except DeploymentUnavailableError:
            raise ApiError(503, "unavailable", f"the {deployment} deployment is not available",
                           headers={"Retry-After": "5"}) from None

    async def _editor_image_size(self) -> int:
        if self._editor_size is None:
            info = await self.handles[EDITOR].info.remote()
            self._editor_size = int(info.get("image_size") or 512)
        return self._editor_size

    # ------------------------------------------------------------------ /v1/augment
    async def _augment_input(self, request: Request) -> tuple[AugmentRequest, bytes | None, str]:
        limits = self.cfg.limits
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return await self._multipart(request)
        if ctype not in ("application/json", ""):
            raise ApiError(415, "unsupported_media_type", f"content type {ctype!r}: send "
                           "application/json or multipart/form-data")
        body = _parse_json(await _read_body(request, limits.max_body_bytes))
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_request", "the body must be a JSON object")
        try:
            req = AugmentRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        image = None
        if req.image_base64 is not None:
            if len(req.image_base64) > limits.max_body_bytes:
                raise ApiError(413, "image_too_large", "image_base64 is longer than this server takes "
                               f"({limits.max_image_bytes} bytes as base64)", param="image_base64")
            image = _decode_b64(req.image_base64)
        return req, image, req.image_name or ""

    async def _multipart(self, request: Request) -> tuple[AugmentRequest, bytes | None, str]:
        limits = self.cfg.limits
        declared = request.headers.get("content-length")
        if declared is None:
            raise ApiError(411, "length_required", "multipart requests need a Content-Length header")
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", "Content-Length is not a number")
        if int(declared) > limits.max_body_bytes:
            raise ApiError(413, "body_too_large", f"the request body is {declared} bytes; this server "
                           f"takes at most {limits.max_body_bytes} (limits.max_image_bytes + "
                           "limits.max_json_bytes)")
        try:
            form = await request.form(max_files=1, max_fields=2, max_part_size=limits.max_json_bytes)
        except AssertionError as exc:  # python-multipart is not installed
            raise ApiError(415, "multipart_unavailable", f"multipart is not available here: {exc}; "
                           "send JSON with image_base64") from None
        except Exception as exc:  # noqa: BLE001 - malformed multipart
            raise ApiError(400, "invalid_multipart", f"cannot parse the multipart body "
                           f"({type(exc).__name__})") from None
        try:
            unknown = sorted(set(form.keys()) - {"request", "image"})
            if unknown:
                raise ApiError(422, "unknown_field", f"unknown multipart parts {unknown}; send 'request' "
                               "(JSON) and optionally 'image' (file)", param=unknown[0])
            text = form.get("request")
            if text is None:
                raise ApiError(422, "missing_field", "missing multipart part 'request' (the JSON request)",
                               param="request")
            if not isinstance(text, str):
                text = (await text.read()).decode("utf-8", "replace")
            body = _parse_json(text.encode())
            if not isinstance(body, dict):
                raise ApiError(422, "invalid_request", "the 'request' part must be a JSON object")
            try:
                req = AugmentRequest.model_validate(body)
            except ValidationError as exc:
                raise validation_error(exc) from None
            upload = form.get("image")
            image, name = None, ""
            if upload is not None:
                if req.image_base64 is not None:
                    raise ApiError(422, "duplicate_image", "give the image once: as the 'image' part or "
                                   "as image_base64", param="image")
                if isinstance(upload, str):
                    raise ApiError(422, "invalid_value", "the 'image' part must be a file", param="image")
                image = await upload.read(limits.max_image_bytes + 1)
                name = req.image_name or upload.filename or ""
            elif req.image_base64 is not None:
                image = _decode_b64(req.image_base64)
                name = req.image_name or ""
            return req, image, name
        finally:
            await form.close()

    def _check_limits(self, req: AugmentRequest) -> None:
        limits = self.cfg.limits
        if len(req.report) > limits.max_report_chars:
            raise ApiError(422, "report_too_long", f"the report has {len(req.report)} characters; this "
                           f"server takes at most {limits.max_report_chars} (limits.max_report_chars)",
                           param="report")
        if not req.report.strip():
            raise ApiError(422, "missing_report", "the report is blank", param="report")
        if req.variants > limits.max_variants:
            raise ApiError(422, "too_many_variants", f"variants={req.variants}; this server makes at "
                           f"most {limits.max_variants} per branch (limits.max_variants)", param="variants")

    def _plan(self, req: AugmentRequest, image) -> tuple[str, list[dict]]:
        """Candidate rows as the batch job plans them: deterministic ids and per-row seeds."""
        source_id = self._content_hash(["serve-v1", req.report, image.digest if image else ""], n=24)
        # Stands in for the batch job's config fingerprint: the models that make the pair.
        models = self._content_hash([json.dumps(self.models, sort_keys=True)], n=12)
        rows = []
        for branch in ("inter", "intra"):
            if branch not in req.branches:
                continue
            for v in range(req.variants):
                seed = self._pair_seed(source_id, branch, v, req.seed)
                pair_id = self._pair_id(source_id, branch, v, models, seed)
                rows.append({"row_id": pair_id, "pair_id": pair_id, "branch": branch, "variant": v,
                             "seed": seed, "source_row_id": source_id, "report": req.report,
                             "code_version": __version__})
        return source_id, rows

    async def augment(self, request: Request) -> dict:
        t0 = time.perf_counter()
        req, data, name = await self._augment_input(request)
        self._check_limits(req)
        image = None
        if data is not None:
            from pairaug_ray.serve.inputs import read_image

            size = await self._editor_image_size()
            image = await asyncio.to_thread(read_image, data, name, self.cfg.limits, size)
            del data
        source_id, rows = self._plan(req, image)

        # 1. Rewrite every candidate (the Rewriter batches them with other requests' rows).
        rows = await self._call(REWRITER, rows)
        # 2. InterAug rows → Generator, IntraAug rows → Editor (with the request image, if any).
        ok = [i for i, r in enumerate(rows) if r.get("status") != "error"]
        inter = [i for i in ok if rows[i]["branch"] == "inter"]
        intra = [i for i in ok if rows[i]["branch"] == "intra"]
        edit_rows = [{**rows[i], **({STUDY_IMAGE_COLUMN: image.png} if image else {})} for i in intra]
        drawn, edited = await asyncio.gather(self._call(GENERATOR, [rows[i] for i in inter]),
                                             self._call(EDITOR, edit_rows))
        for i, out in zip(inter + intra, list(drawn) + list(edited)):
            out.pop(STUDY_IMAGE_COLUMN, None)
            rows[i] = out
        # 3. Score what came out of the image stages.
        ok = [i for i, r in enumerate(rows) if r.get("status") != "error"]
        for i, out in zip(ok, await self._call(SCORER, [rows[i] for i in ok])):
            rows[i] = out

        used_image = any(r.get(EDIT_SOURCE) == "real" for r in rows if r.get("branch") == "intra")
        notes = []
        if image is not None and "intra" in req.branches and not used_image:
            notes.append("the editor of this server draws each IntraAug source image from the source "
                         "report (edit_source=noise); the given image was checked and decoded, not edited")
        if image is not None and req.branches == ["inter"]:
            notes.append("InterAug draws new patients from the rewritten report; the image is not used")
        pairs = [self._pair(r, req) for r in rows]
        log.info("augment: %d candidates (%s), %d ok, %.2f s", len(pairs), ",".join(req.branches),
                 sum(p["status"] == "ok" for p in pairs), time.perf_counter() - t0)
        return {
            "request_id": self._content_hash([source_id, json.dumps(req.model_dump(
                exclude={"image_base64", "image_name"}), sort_keys=True)], n=24),
            "seed": req.seed,
            "code_version": __version__,
            "source": {"source_id": source_id, "report_words": len(req.report.split()),
                       "image": image.info if image else None, "image_used_by_editor": used_image},
            "models": dict(self.models),
            "pairs": pairs,
            "notes": notes,
        }

    def _pair(self, row: dict, req: AugmentRequest) -> dict:
        branch = row.get("branch")
        gen_cfg = self.cfg.generate if branch == "inter" else self.cfg.edit
        error = None
        if row.get("status") == "error":
            error = {"stage": row.get("stage"), "class": row.get("error_class"), "reason": row.get("error")}
        images = req.return_images and error is None
        return {
            "pair_id": row.get("pair_id"),
            "branch": branch,
            "variant": plain(row.get("variant")),
            "seed": plain(row.get("seed")),
            "status": "error" if error else "ok",
            "report": row.get("rewritten_report"),
            "change": _json_field(row.get("change")),
            "labels": _json_field(row.get("labels")),
            "image_png": _b64(row.get("image_png")) if images else None,
            "source_image_png": _b64(row.get("source_image_png")) if images and branch == "intra" else None,
            "edit_source": (row.get(EDIT_SOURCE) or "noise") if branch == "intra" and not error else None,
            "scores": {"align": plain(row.get("score_align")), "delta": plain(row.get("score_delta")),
                       "img": plain(row.get("score_img"))},
            "error": error,
            "provenance": {
                "rewrite_backend": row.get("rewrite_backend"), "rewrite_model": row.get("rewrite_model"),
                "prompt_id": row.get("prompt_id"), "rewrite_attempts": plain(row.get("rewrite_attempts")),
                "generator_model": row.get("generator_model"), "score_model": row.get("score_model"),
                "seed": plain(row.get("seed")), "request_seed": req.seed, "code_version": __version__,
                "steps": gen_cfg.steps, "guidance_scale": gen_cfg.guidance_scale,
            },
        }

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, request: Request) -> dict:
        from pairaug_ray.serve.inputs import parse_chat

        limits = self.cfg.limits
        body = _parse_json(await _read_body(request, limits.max_json_bytes + 4 * limits.max_report_chars))
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_request", "the body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        branch, report, matched = parse_chat(req.messages, req.model, self.library, self.cfg.served_model_name)
        if len(report) > limits.max_report_chars:
            raise ApiError(422, "report_too_long", f"the report has {len(report)} characters; this server "
                           f"takes at most {limits.max_report_chars} (limits.max_report_chars)", param="messages")
        seed = int(req.seed or 0)
        row_id = self._content_hash(["chat", branch, report, str(seed)], n=24)
        [out] = await self._call(REWRITER, [{"row_id": row_id, "pair_id": row_id, "branch": branch,
                                            "variant": 0, "seed": seed, "report": report}])
        if out.get("status") == "error":
            raise ApiError(422, str(out.get("error_class") or "rewrite_failed"),
                           f"the rewriter gave no acceptable rewrite: {out.get('error')}", param="messages")
        text = out["rewritten_report"]
        return {
            "id": f"chatcmpl-{row_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": f"pairaug-{__version__}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
            "pairaug": {"branch": branch, "prompt_matched": matched, "prompt_id": out.get("prompt_id"),
                        "rewrite_backend": out.get("rewrite_backend"),
                        "rewrite_model": out.get("rewrite_model"),
                        "rewrite_attempts": plain(out.get("rewrite_attempts")),
                        "change": _json_field(out.get("change")), "seed": seed},
        }

    # ------------------------------------------------------------------ health
    async def healthz(self) -> JSONResponse:
        async def ping(name: str) -> str:
            try:
                return await asyncio.wait_for(self.handles[name].ping.remote(), timeout=5.0)
            except Exception as exc:  # noqa: BLE001 - any failure is "not ok"
                return f"error: {type(exc).__name__}"

        states = dict(zip(MODEL_DEPLOYMENTS, await asyncio.gather(*[ping(n) for n in MODEL_DEPLOYMENTS])))
        ok = all(s == "ok" for s in states.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "version": __version__,
                             "deployments": {INGRESS: "ok", **states}}, status_code=200 if ok else 503)


@serve.deployment(name=INGRESS)
@serve.ingress(fastapi_app)
class Ingress(IngressReplica):
    """The HTTP ingress (FastAPI routes; the work is in ``IngressReplica``)."""

    @fastapi_app.post("/v1/augment")
    async def augment_route(self, request: Request):
        return await self._bounded(self.augment(request))

    @fastapi_app.post("/v1/chat/completions")
    async def chat_route(self, request: Request):
        return await self._bounded(self.chat(request))

    @fastapi_app.get("/v1/models")
    async def models_route(self):
        name = self.cfg.served_model_name
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "pairaug",
                                            "created": 0} for m in (name, f"{name}:inter", f"{name}:intra")]}

    @fastapi_app.get("/healthz")
    async def healthz_route(self):
        return await self.healthz()

    async def _bounded(self, work):
        try:
            return await asyncio.wait_for(work, timeout=self.cfg.ingress.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {self.cfg.ingress.request_timeout_s} s "
                           "(ingress.request_timeout_s)") from None


# ---------------------------------------------------------------------------------------- build


def _deployment_kwargs(stage_cfg, options) -> dict:
    """Serve options of a model deployment from its stage config (resources, replicas, batch) and
    its ``DeploymentOptions`` (queues, autoscaling target, health checks)."""
    actor: dict[str, Any] = {"num_cpus": stage_cfg.num_cpus}
    if stage_cfg.num_gpus:
        actor["num_gpus"] = stage_cfg.num_gpus
    if stage_cfg.accelerator_type:
        actor["accelerator_type"] = stage_cfg.accelerator_type
    if stage_cfg.resources:
        actor["resources"] = dict(stage_cfg.resources)
    selector = getattr(stage_cfg, "label_selector", None)
    if selector:
        actor["label_selector"] = dict(selector)
    kwargs: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": options.max_ongoing_requests or max(2 * stage_cfg.batch_size, 2),
        "max_queued_requests": options.max_queued_requests,
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
    }
    lo, hi = stage_cfg.min_actors, max(stage_cfg.min_actors, stage_cfg.max_actors)
    if hi > lo:
        kwargs["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s, "downscale_delay_s": options.downscale_delay_s,
        }
    else:
        kwargs["num_replicas"] = lo
    return kwargs


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"argument {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def serve_config_from_args(args: dict | ServeConfig | None) -> ServeConfig:
    """``ServeConfig`` from ``build_app``'s args: a ServeConfig, a nested mapping (a Serve config
    file's ``args:``), and/or ``serve run`` CLI strings ``section.key=value`` (values read as YAML).
    A ``config: FILE.yaml`` entry loads a YAML file first: a ServeConfig mapping, a main config
    with a ``serve:`` section, or a Serve config file (the pairaug application's ``args``); the
    other args override it. Raises pydantic ``ValidationError``."""
    import yaml

    if isinstance(args, ServeConfig):
        return args
    args = dict(args or {})
    data: dict = {}
    path = args.pop("config", None)
    if path:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping")
        if "applications" in loaded:  # a Serve config file: the first pairaug app's args
            apps = [a for a in loaded["applications"] or []
                    if str(a.get("import_path", "")).startswith("pairaug_ray.serve.app:")]
            if not apps:
                raise ValueError(f"{path}: no application with import_path pairaug_ray.serve.app:build_app")
            data = dict(apps[0].get("args") or {})
        else:
            data = dict(loaded["serve"] or {}) if "serve" in loaded else loaded
    for key, value in args.items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else ""
        if "." in key:
            _set_dotted(data, key, value)
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ServeConfig.model_validate(data)


def build_app(args: dict | ServeConfig | None = None):
    """The Serve application (``serve run pairaug_ray.serve.app:build_app [k=v ...]``, the
    ``import_path`` of a Serve config file, or ``serve.run(build_app(cfg))``).

    ``args``: see ``serve_config_from_args``. Returns a bound ``Application`` whose ingress is
    ``Ingress`` and whose model deployments are named ``Rewriter``, ``Generator``, ``Editor``,
    ``Scorer`` (the names a Serve config file's ``deployments:`` entries override).
    """
    cfg = serve_config_from_args(args)
    bound = {}
    for name in MODEL_DEPLOYMENTS:
        stage_cfg, options = cfg.stage_of(name), cfg.options_of(name)
        bound[name] = MODEL_DEPLOYMENT_CLASSES[name].options(
            **_deployment_kwargs(stage_cfg, options)).bind(stage_cfg, options)
    ing = cfg.ingress
    ingress = Ingress.options(
        num_replicas=ing.num_replicas,
        ray_actor_options={"num_cpus": ing.num_cpus, **({"resources": dict(ing.resources)} if ing.resources else {})},
        max_ongoing_requests=ing.max_ongoing_requests, max_queued_requests=ing.max_queued_requests,
        health_check_period_s=ing.health_check_period_s, health_check_timeout_s=ing.health_check_timeout_s,
    )
    return ingress.bind(cfg, bound[REWRITER], bound[GENERATOR], bound[EDITOR], bound[SCORER])


def run_serve(cfg: ServeConfig, blocking: bool = True):
    """Start Serve on ``cfg.host:cfg.port`` and deploy the app at ``cfg.route_prefix``.

    Joins the Ray cluster already initialised in this process, else ``ray.init()`` (which joins
    ``RAY_ADDRESS`` when set, else starts a local cluster). ``blocking=True`` serves until
    Ctrl-C, then shuts Serve down and returns None; ``blocking=False`` returns the app's
    ``DeploymentHandle`` once every replica is up. The base URL is
    ``http://{host}:{port}{route_prefix}``.
    """
    import ray

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"pairaug serve: {url}/v1/augment, {url}/v1/chat/completions, {url}/healthz", flush=True)
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("pairaug serve: shutting down", flush=True)
    finally:
        serve.shutdown()
    return None
