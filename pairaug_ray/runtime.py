"""Ray runtime settings: start or join a cluster with the job's settings, and check placement.

Usage::

    init_ray(RayConfig(num_cpus=2))               # a local 2-CPU cluster (the demo)
    init_ray(RayConfig(address="auto"))           # join the cluster this node belongs to
    check_placement(stage_requirements(cfg.augment, "augment"), cfg.ray)   # before any Ray Data work

On an existing cluster (``address`` given, or ``RAY_ADDRESS`` set as ``ray job submit`` does),
local-only settings such as ``num_cpus`` are ignored with a one-line notice: Ray refuses them
there ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided").

Placement pre-flight (``check_placement``): every stage pool's per-actor demand (CPU, GPU, custom
resources such as ``diffusion_node``, ``accelerator_type``, ``label_selector``) must fit one node
that is alive now (``ray.nodes()``: total resources and labels) or one node type the cluster can
autoscale to (``ray.node_types``: a launcher YAML or a KubeRay RayCluster/RayJob/RayService
manifest; by default the launcher's ``~/ray_bootstrap_config.yaml`` on the head node of a
``ray up`` cluster). Otherwise it raises ``PlacementError`` naming each stage and what is missing,
instead of Ray Data waiting forever for an actor no node can host.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray.stages.base import (
    ACCELERATOR_RESOURCE_PREFIX,
    PlacementRequirement,
    StageConfig,
)

log = logging.getLogger(__name__)

# Written by the cluster launcher (`ray up`) on the head node; its autoscaler reads it from there.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
ACCELERATOR_LABEL = "ray.io/accelerator-type"  # set by Ray on GPU nodes (L40S, A100, ...)
_EPS = 1e-9
_POLL_S = 5.0  # placement_wait_s: seconds between looks at the nodes


class RayConfig(BaseModel):
    """The ``ray:`` section of a job config."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="Ray address to join (e.g. auto, ray://head:10001); "
                                "None = RAY_ADDRESS if set, else start a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None = all); "
                                 "ignored when joining an existing cluster")
    progress_bars: bool = Field(False, description="Ray Data's own progress bars (off: pairaug shows one "
                                "progress display per job step)")
    verbose: bool = Field(False, description="Ray's own console output: progress bars, INFO logs of the "
                          "driver and workers, Ray Train's per-report lines (`pairaug --verbose` sets it)")
    placement_check: Literal["fail", "warn", "off"] = Field(
        "fail", description="before a job: stop (fail), log (warn) or skip (off) when a stage's pool "
        "fits no node and no autoscaling node type")
    node_types: str | None = Field(
        None, description="a launcher YAML or KubeRay RayCluster/RayJob/RayService manifest listing the "
        f"node types the cluster can autoscale to; None = {BOOTSTRAP_CONFIG} when joining a cluster "
        "and it exists (the head of a `ray up` cluster), else only the nodes alive now")
    placement_wait_s: float = Field(
        0.0, ge=0, description="how long the check waits for nodes still starting before it fails")


def joins_existing_cluster(cfg: RayConfig) -> bool:
    """True when ``init_ray`` connects to a running cluster instead of starting one."""
    return bool(cfg.address) or bool(os.environ.get("RAY_ADDRESS", "").strip())


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray per ``cfg`` (no-op when Ray is already up) and set Ray Data's options.

    Unless ``cfg.verbose``, Ray's own console output is kept to warnings (``console``)."""
    import ray

    from pairaug_ray.console import quiet_ray_data, ray_init_kwargs

    if not ray.is_initialized():
        # address None would join a head that `ray start` left running on this machine (Ray's
        # implicit rule); a job with no address and no RAY_ADDRESS means a cluster of its own.
        address = cfg.address if joins_existing_cluster(cfg) else "local"
        kwargs = dict(address=address, include_dashboard=False, log_to_driver=True,
                      **ray_init_kwargs(cfg.verbose))
        if cfg.num_cpus is not None:
            if joins_existing_cluster(cfg):
                where = cfg.address or f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
                log.warning("joining the existing Ray cluster at %s: ray.num_cpus=%s is a local-cluster "
                            "setting and is ignored", where, cfg.num_cpus)
            else:
                kwargs["num_cpus"] = cfg.num_cpus
        ray.init(**kwargs)
    quiet_ray_data(cfg.progress_bars, cfg.verbose)


# ----------------------------------------------------------------------------- placement pre-flight

class PlacementError(RuntimeError):
    """No node of the cluster, alive or autoscalable, can host some stage's actors.

    ``problems``: one line per stage, ``"stage <name>: missing <resource or label> (...)"``.
    """

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = list(problems)
        text = "cluster cannot place these stages:\n  " + "\n  ".join(self.problems)
        super().__init__(text + (f"\n{hint}" if hint else ""))


@dataclass(frozen=True)
class NodeShape:
    """One node (alive) or node type (autoscalable) as the placement check sees it.

    ``resources``: totals per node (CPU, GPU, memory, custom); ``None`` for CPU/GPU counts a node
    type file does not state (the launcher fills them in from the instance type). ``labels``: Ray
    node labels. ``kind``: ``"node"`` or ``"node type"``.
    """

    name: str
    resources: dict[str, float | None] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "node"


def stage_requirements(section: BaseModel, prefix: str) -> list[PlacementRequirement]:
    """One ``PlacementRequirement`` per stage pool of a job section (every ``StageConfig`` field,
    at any depth), named ``<prefix>.<field>``, e.g. ``augment.generate``."""
    out: list[PlacementRequirement] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, StageConfig):
            out.append(node.placement_requirement(path))
        if isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name), f"{path}.{name}")

    walk(section, prefix)
    return out


def label_matches(selector: str, value: str | None) -> bool:
    """Ray's label-selector value syntax: ``v`` (equals), ``!v``, ``in(a,b)``, ``!in(a,b)``;
    ``value`` is the node's label (``None`` = the node lacks it)."""
    text = selector.strip()
    negate = text.startswith("!")
    if negate:
        text = text[1:].strip()
    if text.startswith("in(") and text.endswith(")"):
        hit = value is not None and value in {x.strip() for x in text[3:-1].split(",") if x.strip()}
    else:
        hit = value is not None and value == text
    return not hit if negate else hit


def missing_on(req: PlacementRequirement, node: NodeShape) -> list[str]:
    """What ``node`` lacks to host one actor of ``req`` (empty = it fits)."""
    missing = []
    for name, amount in sorted(req.resources.items()):
        have = node.resources.get(name, 0.0)
        if have is None:          # a node type file that leaves CPU/GPU to the launcher: unknown
            continue
        if have + _EPS < amount:
            missing.append(f"{name} {_fmt(amount)} (has {_fmt(have)})" if have else name)
    if req.accelerator_type:
        key = ACCELERATOR_RESOURCE_PREFIX + req.accelerator_type
        by_label = node.kind == "node type" and node.labels.get(ACCELERATOR_LABEL) == req.accelerator_type
        if not (node.resources.get(key) or by_label):
            missing.append(f"accelerator_type {req.accelerator_type}")
    for key, sel in sorted(req.label_selector.items()):
        if not label_matches(sel, node.labels.get(key)):
            missing.append(f"label {key}={sel}")
    return missing


def actors_that_fit(req: PlacementRequirement, nodes: Iterable[NodeShape]) -> int:
    """How many actors of ``req`` the ``nodes`` hold at once (ignoring what else runs there)."""
    total = 0
    for node in nodes:
        if missing_on(req, node):
            continue
        per_node = [math.floor((node.resources.get(k) or 0.0) / v + _EPS)
                    for k, v in req.resources.items() if v > 0 and node.resources.get(k) is not None]
        total += min(per_node) if per_node else req.min_actors
    return total


def alive_nodes() -> list[NodeShape]:
    """The alive nodes of the connected cluster (``ray.nodes()``: total resources and labels)."""
    import ray

    return [NodeShape(name=f"node {n.get('NodeID', '?')[:8]} ({n.get('NodeManagerAddress', '?')})",
                      resources=dict(n.get("Resources") or {}), labels=dict(n.get("Labels") or {}))
            for n in ray.nodes() if n.get("Alive")]


def _k8s_quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("500m", "2", 4) as a number."""
    text = str(value).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_start_json(raw: Any) -> dict:
    """KubeRay's ``rayStartParams.resources``: JSON, often wrapped in escaped quotes."""
    if isinstance(raw, dict):
        return raw
    text = str(raw or "").strip()
    if not text:
        return {}
    text = text.strip("'")
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1].replace('\\"', '"')
    return json.loads(text)


def _label_string(raw: Any) -> dict[str, str]:
    """``rayStartParams.labels`` / ``ray start --labels``: ``"k1=v1,k2=v2"``."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    out = {}
    for part in str(raw or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _kuberay_group(group: dict, name: str) -> NodeShape:
    params = group.get("rayStartParams") or {}
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers") or [{}])
    limits = {**((containers[0].get("resources") or {}).get("requests") or {}),
              **((containers[0].get("resources") or {}).get("limits") or {})}
    res: dict[str, float | None] = {"CPU": None, "GPU": 0.0}
    if "cpu" in limits:
        res["CPU"] = _k8s_quantity(limits["cpu"])
    if "nvidia.com/gpu" in limits:
        res["GPU"] = _k8s_quantity(limits["nvidia.com/gpu"])
    if "num-cpus" in params:
        res["CPU"] = float(params["num-cpus"])
    if "num-gpus" in params:
        res["GPU"] = float(params["num-gpus"])
    res.update({k: float(v) for k, v in _ray_start_json(params.get("resources")).items()})
    res.update({k: _k8s_quantity(v) for k, v in (group.get("resources") or {}).items()})  # KubeRay >= 1.4
    labels = {**_label_string(params.get("labels")), **_label_string(group.get("labels") or {})}
    return NodeShape(name=name, resources=res, labels=labels, kind="node type")


def load_node_types(path: str | os.PathLike) -> list[NodeShape]:
    """The node types a cluster can run, from a cluster launcher YAML (``available_node_types``:
    ``resources``, ``labels``; types with ``max_workers: 0`` other than the head are left out) or a
    KubeRay manifest (``RayCluster``, or the cluster spec inside a ``RayJob`` / ``RayService``: the
    head group and every worker group with ``maxReplicas > 0``).

    Raises ``FileNotFoundError``, or ``ValueError`` when the file is neither.
    """
    import yaml

    p = Path(path).expanduser()
    docs = [d for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    for doc in docs:
        if isinstance(doc.get("available_node_types"), dict):
            head = doc.get("head_node_type")
            out = []
            for name, spec in doc["available_node_types"].items():
                if name != head and int(spec.get("max_workers", 1) or 0) <= 0:
                    continue
                res: dict[str, float | None] = {"CPU": None, "GPU": None}
                if "resources" in spec:
                    res = {"GPU": 0.0, **{k: float(v) for k, v in (spec.get("resources") or {}).items()}}
                out.append(NodeShape(name=f"{name} ({p.name})", resources=res,
                                     labels={str(k): str(v) for k, v in (spec.get("labels") or {}).items()},
                                     kind="node type"))
            return out
        spec = {"RayCluster": lambda d: d.get("spec"),
                "RayJob": lambda d: (d.get("spec") or {}).get("rayClusterSpec"),
                "RayService": lambda d: (d.get("spec") or {}).get("rayClusterConfig")}.get(doc.get("kind"))
        cluster = spec(doc) if spec else None
        if cluster:
            out = [_kuberay_group(cluster.get("headGroupSpec") or {}, f"head ({p.name})")]
            for group in cluster.get("workerGroupSpecs") or []:
                if int(group.get("maxReplicas", group.get("replicas", 1)) or 0) > 0 and not group.get("suspend"):
                    out.append(_kuberay_group(group, f"{group.get('groupName', '?')} ({p.name})"))
            return out
    raise ValueError(f"{path}: neither a cluster launcher YAML (available_node_types) nor a KubeRay "
                     "RayCluster / RayJob / RayService manifest")


def autoscaling_node_types(cfg: RayConfig | None) -> tuple[list[NodeShape], str | None]:
    """(node types, where they came from): ``cfg.node_types`` when set, else the launcher's
    bootstrap config when joining a cluster whose head wrote one, else ``([], None)``."""
    if cfg is not None and cfg.node_types:
        return load_node_types(cfg.node_types), cfg.node_types
    boot = Path(BOOTSTRAP_CONFIG).expanduser()
    if cfg is not None and joins_existing_cluster(cfg) and boot.is_file():
        try:
            return load_node_types(boot), str(boot)
        except (ValueError, OSError) as exc:
            log.warning("placement check: cannot read node types from %s: %s", boot, exc)
    return [], None


def _fmt(x: float) -> str:
    return f"{x:g}"


def _have(nodes: list[NodeShape], types: list[NodeShape]) -> str:
    names = sorted({k for n in nodes for k in n.resources
                    if not k.startswith(("node:", "memory", "object_store_memory"))})
    text = f"the cluster's nodes have {', '.join(names) or 'nothing'}"
    if types:
        names = sorted({k for n in types for k in n.resources})
        text += f"; its node types have {', '.join(names)}"
    return text


def placement_problems(requirements: Iterable[PlacementRequirement], nodes: list[NodeShape],
                       node_types: list[NodeShape] = ()) -> tuple[list[str], list[str]]:
    """(problems, notes) for ``requirements`` against alive ``nodes`` and autoscalable
    ``node_types``. A problem: ``"stage augment.generate: missing diffusion_node, GPU (no alive node
    has {...} per actor; closest: <node>)"``, the missing items being those of the closest node or
    node type. A note: a stage that waits for the autoscaler, or whose
    ``min_actors`` exceed what the nodes that fit hold."""
    problems, notes = [], []
    for req in requirements:
        fits_now = [n for n in nodes if not missing_on(req, n)]
        if fits_now:
            held = actors_that_fit(req, fits_now)
            if held < req.min_actors and not any(not missing_on(req, t) for t in node_types):
                notes.append(f"{req.stage}: min_actors={req.min_actors} but the nodes that fit "
                             f"{req.describe()} hold {held} at once; the rest start when room frees up")
            continue
        typed = [t for t in node_types if not missing_on(req, t)]
        if typed:
            notes.append(f"{req.stage}: no node has {req.describe()} now; the autoscaler can add "
                         f"{typed[0].name}")
            continue
        candidates = list(nodes) + list(node_types)
        # closest: fewest missing items, then fewest missing outright (a node with too little of
        # a resource beats one without it)
        closest = min(candidates, default=None, key=lambda n: (
            len(missing_on(req, n)), sum(" (has " not in m for m in missing_on(req, n))))
        where = "no alive node" + (" or autoscaling node type" if node_types else "")
        lacking = ", ".join(missing_on(req, closest)) if closest is not None else req.describe()
        problems.append(f"stage {req.stage}: missing {lacking} ({where} has {req.describe()} per actor"
                        + (f"; closest: {closest.name})" if closest is not None else ")"))
    return problems, notes


def check_placement(requirements: Iterable[PlacementRequirement], cfg: RayConfig | None = None, *,
                    nodes: list[NodeShape] | None = None,
                    node_types: list[NodeShape] | None = None) -> list[str]:
    """Check, before a job starts, that every stage pool in ``requirements`` can be placed.

    Needs a connected Ray (``init_ray``) unless ``nodes`` is given. ``node_types`` defaults to
    ``autoscaling_node_types(cfg)``. With ``cfg.placement_wait_s > 0`` the alive nodes are polled
    until everything fits or the time is up (nodes still starting). ``cfg.placement_check``:
    ``"fail"`` raises ``PlacementError`` (one line per stage: the stage, the missing resources or
    labels, what it asks for per actor, the closest node), ``"warn"`` logs the same, ``"off"`` skips.
    Returns the notes (stages that wait for the autoscaler, ``min_actors`` above what fits).
    """
    cfg = cfg or RayConfig()
    if cfg.placement_check == "off":
        return []
    reqs = list(requirements)
    if node_types is None:
        node_types, source = autoscaling_node_types(cfg)
    else:
        source = "the node_types argument" if node_types else None
    deadline = time.monotonic() + cfg.placement_wait_s
    while True:
        current = nodes if nodes is not None else alive_nodes()
        problems, notes = placement_problems(reqs, current, node_types)
        if not problems or nodes is not None or time.monotonic() >= deadline:
            break
        time.sleep(min(_POLL_S, max(0.01, deadline - time.monotonic())))
    for note in notes:
        log.info("placement: %s", note)
    if problems:
        hint = _have(current, node_types) + "."
        if source:
            hint += f" Node types from {source}."
        else:
            hint += (" If the cluster autoscales or nodes are still starting, name its node types with "
                     "ray.node_types=<launcher YAML or KubeRay manifest> or wait with ray.placement_wait_s=N.")
        hint += " Fix the stage's resources / accelerator_type / label_selector in the job config."
        err = PlacementError(problems, hint)
        if cfg.placement_check == "fail":
            raise err
        log.warning("placement (ray.placement_check=warn): %s", err)
    return notes
