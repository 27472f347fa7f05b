"""Ray runtime settings: start or join a cluster with the job's settings.

Usage::

    init_ray(RayConfig(num_cpus=2))               # a local 2-CPU cluster (the demo)
    init_ray(RayConfig(address="auto"))           # join the cluster this node belongs to

On an existing cluster (``address`` given, or ``RAY_ADDRESS`` set as ``ray job submit`` does),
local-only settings such as ``num_cpus`` are ignored with a one-line notice: Ray refuses them
there ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided").
"""

from __future__ import annotations

import logging
import os

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class RayConfig(BaseModel):
    """The ``ray:`` section of a job config."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="Ray address to join (e.g. auto, ray://head:10001); "
                                "None = RAY_ADDRESS if set, else start a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None = all); "
                                 "ignored when joining an existing cluster")
    progress_bars: bool = Field(True, description="Ray Data's own progress bars")


def joins_existing_cluster(cfg: RayConfig) -> bool:
    """True when ``init_ray`` connects to a running cluster instead of starting one."""
    return bool(cfg.address) or bool(os.environ.get("RAY_ADDRESS", "").strip())


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray per ``cfg`` (no-op when Ray is already up) and set Ray Data's options."""
    import ray

    if not ray.is_initialized():
        kwargs = dict(address=cfg.address, include_dashboard=False, log_to_driver=True)
        if cfg.num_cpus is not None:
            if joins_existing_cluster(cfg):
                where = cfg.address or f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
                log.warning("joining the existing Ray cluster at %s: ray.num_cpus=%s is a local-cluster "
                            "setting and is ignored", where, cfg.num_cpus)
            else:
                kwargs["num_cpus"] = cfg.num_cpus
        ray.init(**kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    ctx.enable_operator_progress_bars = cfg.progress_bars
