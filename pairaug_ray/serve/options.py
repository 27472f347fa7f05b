"""Serve-side settings that do not depend on any model: deployment names, per-deployment Serve
options, request limits. Light to import (pydantic only), so model replicas that unpickle these do
not import the other stages' libraries; ``ServeConfig`` (``serve/config.py``) composes them with the
stage configs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Deployment names: the keys of `serve status`, of a Serve config file's `deployments:` list and
# of `/healthz`.
INGRESS = "Ingress"
REWRITER = "Rewriter"
GENERATOR = "Generator"
EDITOR = "Editor"
SCORER = "Scorer"
MODEL_DEPLOYMENTS = (REWRITER, GENERATOR, EDITOR, SCORER)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DeploymentOptions(_Strict):
    """Serve-only settings of one deployment (replicas and resources come from its stage config)."""

    max_ongoing_requests: int | None = Field(
        None, ge=1, description="calls (of up to batch_size rows each) one replica works on at once; "
        "None = twice the stage's batch_size")
    max_queued_requests: int = Field(
        64, ge=-1, description="requests waiting for a replica beyond max_ongoing_requests; over it "
        "the caller gets HTTP 503 at once (-1 = unbounded, Serve's default)")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="autoscaling target per replica (used when max_actors > min_actors)")
    upscale_delay_s: float = Field(30.0, ge=0, description="autoscaling: sustained load before adding")
    downscale_delay_s: float = Field(600.0, ge=0, description="autoscaling: idle time before removing")
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, description="@serve.batch: seconds to wait for a batch to fill")
    share_batches: bool = Field(
        False, description="run the rows of concurrent requests through the model together (more "
        "throughput; answers then equal up to float rounding, not bit for bit). False: each "
        "request's rows form their own model calls, so an answer depends only on its request")
    health_check_period_s: float = Field(10.0, gt=0, description="Serve calls check_health this often")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a check slower than this fails")
    max_failed_batches: int = Field(
        3, ge=1, description="check_health fails (Serve replaces the replica) after this many batches "
        "in a row failed as a whole (model errors, not bad rows)")


class IngressOptions(DeploymentOptions):
    """The FastAPI ingress: request parsing, image decoding, fan-out to the model deployments."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0, description="CPUs per ingress replica (it decodes images)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources per ingress replica, e.g. {cpu_node: 1} "
        "to keep it on CPU nodes (cluster/pairaug-cluster.yaml)")
    max_ongoing_requests: int = Field(16, ge=1, description="HTTP requests one ingress replica "
                                      "works on at once")
    request_timeout_s: float = Field(
        600.0, gt=0, description="an /v1/augment request still unanswered after this gets HTTP 504")


class Limits(_Strict):
    """Request limits; a request over one gets HTTP 413 (sizes) or 422 (fields) with the reason."""

    max_image_bytes: int = Field(32 * 2**20, ge=1, description="encoded image (PNG/JPEG/DICOM) bytes")
    max_image_pixels: int = Field(
        6000 * 6000, ge=1, description="rows x columns of the image, read from its header before decoding")
    max_report_chars: int = Field(10_000, ge=1, description="characters of the source report")
    max_variants: int = Field(10, ge=1, description="variants per branch in one request (the reference: 10)")
    max_json_bytes: int = Field(
        256 * 2**10, ge=1024, description="a request body's bytes besides the image (JSON fields)")

    @property
    def max_body_bytes(self) -> int:
        """Largest accepted HTTP body: the image as base64 (4/3 of its bytes) plus the JSON fields."""
        return -(-self.max_image_bytes * 4 // 3) + self.max_json_bytes
