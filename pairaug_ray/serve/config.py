"""Settings of the Ray Serve app: the four model deployments, the ingress, request limits, HTTP.

Usage::

    from pairaug_ray.serve.config import ServeConfig
    cfg = ServeConfig.model_validate({
        "generate": {"model": "tiny://sd?size=32&seed=0", "steps": 2},
        "edit": {"model": "tiny://sd?size=32&seed=0", "steps": 2},
        "score": {"model": "tiny://vlp?seed=0&image_size=32"},
        "limits": {"max_variants": 4},
    })

Each model deployment is configured by the *same* stage config the batch job uses
(``RewriteConfig``, ``GenerateConfig``, ``EditConfig``, ``ScoreConfig``): the model and its settings,
and the pool fields mapped onto Serve:

============================  ====================================================================
stage config field            Serve
============================  ====================================================================
``batch_size``                ``@serve.batch`` ``max_batch_size`` of the deployment
``min_actors``/``max_actors`` ``num_replicas`` when equal, else ``autoscaling_config``
                              ``min_replicas``/``max_replicas``
``num_cpus``, ``num_gpus``,   ``ray_actor_options`` of each replica (``device: auto`` = CUDA when
``accelerator_type``,         the replica was given a GPU)
``resources``
============================  ====================================================================

What only Serve has (queue limits, autoscaling target, batch wait, health checks) is in
``DeploymentOptions`` per deployment. A Serve config file (``serve deploy``/``serve run FILE``,
e.g. ``jobs/configs/serve_config.yaml``) may override any of those Serve options per deployment
name (``Ingress``, ``Rewriter``, ``Generator``, ``Editor``, ``Scorer``); keep resources in the stage
configs so that the device choice and the replica's resources stay in agreement.

Every model here forbids unknown keys, so a typo fails at load with the key's name.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pairaug_ray.serve.options import (  # noqa: F401 (re-exported)
    EDITOR,
    GENERATOR,
    INGRESS,
    MODEL_DEPLOYMENTS,
    REWRITER,
    SCORER,
    DeploymentOptions,
    IngressOptions,
    Limits,
)
from pairaug_ray.stages.edit import EditConfig
from pairaug_ray.stages.generate import GenerateConfig
from pairaug_ray.stages.rewrite import RewriteConfig
from pairaug_ray.stages.score import ScoreConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ServeConfig(_Strict):
    """The Serve app (the ``serve:`` section of the main config; ``args`` of a Serve config file)."""

    app_name: str = Field("pairaug", description="Serve application name (`serve status`)")
    host: str = Field("127.0.0.1", description="HTTP host the proxy binds (run_serve only; "
                      "`serve run/deploy FILE` take http_options from the file); 0.0.0.0 for a cluster")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (run_serve only, as host)")
    route_prefix: str = Field("/", description="URL prefix of every endpoint, e.g. /pairaug")
    served_model_name: str = Field(
        "pairaug-rewriter", description="model name of /v1/chat/completions; NAME:inter and "
        "NAME:intra are also served and take the last user message as the report")
    rewrite: RewriteConfig = Field(default_factory=lambda: RewriteConfig(backend="rule"),
                                   description="the rewriter (same settings as augment.rewrite)")
    generate: GenerateConfig = Field(default_factory=GenerateConfig,
                                     description="the InterAug generator (as augment.generate)")
    edit: EditConfig = Field(default_factory=EditConfig, description="the IntraAug editor (as augment.edit)")
    score: ScoreConfig = Field(default_factory=lambda: ScoreConfig(device="auto"),
                               description="the scorer (as augment.score); device auto = CUDA on a GPU replica")
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    rewriter: DeploymentOptions = Field(default_factory=DeploymentOptions)
    generator: DeploymentOptions = Field(default_factory=DeploymentOptions)
    editor: DeploymentOptions = Field(default_factory=DeploymentOptions)
    scorer: DeploymentOptions = Field(default_factory=DeploymentOptions)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {value!r}")
        return value.rstrip("/") or "/"

    @model_validator(mode="after")
    def _names(self) -> ServeConfig:
        if ":" in self.served_model_name:
            raise ValueError("served_model_name must not contain ':' (NAME:inter / NAME:intra are derived)")
        return self

    def options_of(self, deployment: str) -> DeploymentOptions:
        """The ``DeploymentOptions`` of a deployment named as in ``MODEL_DEPLOYMENTS`` or INGRESS."""
        return {INGRESS: self.ingress, REWRITER: self.rewriter, GENERATOR: self.generator,
                EDITOR: self.editor, SCORER: self.scorer}[deployment]

    def stage_of(self, deployment: str):
        """The stage config of a model deployment (``REWRITER`` → ``self.rewrite``, ...)."""
        return {REWRITER: self.rewrite, GENERATOR: self.generate, EDITOR: self.edit,
                SCORER: self.score}[deployment]
