"""Cluster definitions: the launcher YAML validates against Ray's own schema; the KubeRay manifests
parse, have the expected kinds, one worker group per node type and one cluster spec; placeholders
are marked and documented; every stage of jobs/configs/mimic.yaml (and every Serve deployment of
the RayService) fits a node type of both; job configs load."""

import json
import os
import re

import jsonschema
import pytest
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CLUSTER = os.path.join(ROOT, "cluster")
LAUNCHER = os.path.join(CLUSTER, "pairaug-cluster.yaml")
KUBERAY = {name: os.path.join(CLUSTER, "kuberay", f"{name}.yaml")
           for name in ("raycluster", "rayjob-augment", "rayservice")}
NODE_TYPE_LABEL = "pairaug.io/node-type"
NODE_TYPES = {"cpu", "llm", "diffusion"}
FILL = re.compile(r"<FILL: ([A-Z0-9_]+)>")


def _read(path) -> str:
    with open(path) as fh:
        return fh.read()


def _load(path):
    return yaml.safe_load(_read(path))


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _launcher_types() -> dict[str, dict]:
    """node-type label -> {"resources": {...}, "accelerators": set()} of the launcher's worker types."""
    out = {}
    for name, spec in _load(LAUNCHER)["available_node_types"].items():
        label = spec.get("labels", {}).get(NODE_TYPE_LABEL)
        if label == "head":
            continue
        assert label not in out, f"two launcher node types labelled {label}"
        out[label] = {"name": name, "resources": dict(spec["resources"]), "labels": dict(spec.get("labels", {}))}
    return out


def _k8s_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_start_resources(params: dict) -> dict:
    """KubeRay's rayStartParams.resources: a JSON object inside escaped quotes ('"{\\"x\\": 1}"')."""
    raw = params.get("resources")
    if not raw:
        return {}
    return json.loads(raw.strip().strip('"').replace('\\"', '"'))


def _group_types(cluster_spec: dict) -> dict[str, dict]:
    """node-type label -> resources Ray sees on a pod of that worker group."""
    from ray._private.label_utils import parse_node_labels_string, validate_node_labels

    out = {}
    for group in cluster_spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{group['groupName']}: rayStartParams must be strings"
        labels = parse_node_labels_string(params.get("labels", ""))
        validate_node_labels(labels)
        label = labels.get(NODE_TYPE_LABEL)
        assert label not in out, f"two worker groups labelled {label}"
        [container] = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        resources = {"CPU": _k8s_quantity(limits["cpu"]), **_ray_start_resources(params)}
        if "nvidia.com/gpu" in limits:
            resources["GPU"] = _k8s_quantity(limits["nvidia.com/gpu"])
        out[label] = {"name": group["groupName"], "resources": resources, "labels": labels,
                      "min": group["minReplicas"], "max": group["maxReplicas"]}
    return out


def _cluster_specs() -> dict[str, dict]:
    docs = {name: _load(path) for name, path in KUBERAY.items()}
    return {"raycluster": docs["raycluster"]["spec"],
            "rayjob-augment": docs["rayjob-augment"]["spec"]["rayClusterSpec"],
            "rayservice": docs["rayservice"]["spec"]["rayClusterConfig"]}


def test_cluster_yaml_matches_ray_schema():
    import ray.autoscaler
    from ray._private.label_utils import validate_label_key, validate_node_labels

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    schema = json.loads(_read(schema_path))
    cfg = _load(LAUNCHER)
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert types["llm_gpu"]["resources"]["llm_node"] > 0
    assert types["diffusion_gpu"]["resources"]["diffusion_node"] > 0
    for spec in types.values():
        validate_node_labels(spec.get("labels"))
        assert all(validate_label_key(k) is None for k in spec.get("labels", {}))
    workers = _launcher_types()
    assert set(workers) == NODE_TYPES
    # One unit of the node type's custom resource per GPU (GPU types) or per CPU (the CPU type).
    assert workers["cpu"]["resources"]["cpu_node"] == workers["cpu"]["resources"]["CPU"]
    for kind in ("llm", "diffusion"):
        res = workers[kind]["resources"]
        assert res[f"{kind}_node"] == res["GPU"] > 0


def test_placeholders_are_marked_and_documented():
    files = [LAUNCHER, *KUBERAY.values()]
    found: set[str] = set()
    for path in files:
        # Markers in values, not in comments (which may mention "<FILL: NAME>" as the pattern).
        text = "\n".join(line.split(" #")[0] for line in _read(path).splitlines()
                         if not line.lstrip().startswith("#"))
        names = set(FILL.findall(text))
        found |= names
        # Every marker survives YAML parsing as a whole string value (an unquoted "<FILL: X>" in a
        # command would turn into a mapping).
        parsed = " ".join(_strings(_load(path)))
        assert set(FILL.findall(parsed)) == names, path
        assert "<FILL" not in FILL.sub("", text), f"{path}: a malformed <FILL...> marker"
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", _read(os.path.join(CLUSTER, "README.md")), re.MULTILINE))
    assert found == documented, (found - documented, documented - found)
    assert {"AMI_ID", "S3_INSTANCE_PROFILE_ARN", "VLLM_CUDA_SPEC", "MODELS_S3_URI", "CONTAINER_IMAGE"} <= found


def test_kuberay_manifests_parse_with_one_group_per_node_type():
    kinds = {name: _load(path) for name, path in KUBERAY.items()}
    assert {n: (d["apiVersion"], d["kind"]) for n, d in kinds.items()} == {
        "raycluster": ("ray.io/v1", "RayCluster"),
        "rayjob-augment": ("ray.io/v1", "RayJob"),
        "rayservice": ("ray.io/v1", "RayService"),
    }
    specs = _cluster_specs()
    assert specs["rayjob-augment"] == specs["raycluster"] == specs["rayservice"]
    spec = specs["raycluster"]
    assert spec["rayVersion"].startswith("2.60")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _group_types(spec)
    assert set(groups) == NODE_TYPES
    launcher = _launcher_types()
    for label, group in groups.items():
        want = launcher[label]["resources"]
        custom = {k: v for k, v in want.items() if k not in ("CPU", "GPU")}
        assert {k: group["resources"].get(k) for k in custom} == custom, label
        assert group["resources"].get("GPU", 0) == want.get("GPU", 0), label
        assert 0 < group["resources"]["CPU"] <= want["CPU"], label
        assert group["labels"] == launcher[label]["labels"], label
        assert 0 <= group["min"] <= group["max"]

    job = kinds["rayjob-augment"]["spec"]
    assert job["entrypoint"].startswith("python -m jobs.augment --config jobs/configs/mimic.yaml")
    assert os.path.exists(os.path.join(ROOT, "jobs", "augment.py"))
    assert os.path.exists(os.path.join(ROOT, "jobs", "configs", "mimic.yaml"))
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"]


def _serve_app():
    from ray.serve.schema import ServeDeploySchema

    from pairaug_ray.serve.app import serve_config_from_args

    data = yaml.safe_load(_load(KUBERAY["rayservice"])["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(data)
    [app] = schema.applications
    assert app.import_path == "pairaug_ray.serve.app:build_app"
    return app, serve_config_from_args(app.args)


def test_rayservice_serve_config_is_a_valid_serve_config():
    from pairaug_ray.serve.config import INGRESS, MODEL_DEPLOYMENTS

    app, cfg = _serve_app()
    assert {d.name for d in app.deployments} <= {INGRESS, *MODEL_DEPLOYMENTS}
    assert cfg.generate.resources == {"diffusion_node": 1} and cfg.generate.num_gpus == 1
    assert cfg.edit.model.startswith("/models/") and cfg.score.device == "auto"


def _demands():
    """(where, num_cpus, num_gpus, custom resources, accelerator type) of every pool mimic.yaml
    configures and of every deployment of the RayService's Serve app."""
    from pairaug_ray.config import load_config
    from pairaug_ray.serve.config import MODEL_DEPLOYMENTS
    from pairaug_ray.stages.base import StageConfig

    out = []

    def walk(node, path):
        if isinstance(node, StageConfig):
            out.append((path, node.num_cpus, node.num_gpus, dict(node.resources), node.accelerator_type))
        if hasattr(node, "model_fields"):
            for name in type(node).model_fields:
                walk(getattr(node, name), f"{path}.{name}" if path else name)

    walk(load_config(os.path.join(ROOT, "jobs", "configs", "mimic.yaml")), "")
    _, serve_cfg = _serve_app()
    for name in MODEL_DEPLOYMENTS:
        st = serve_cfg.stage_of(name)
        out.append((f"rayservice.{name}", st.num_cpus, st.num_gpus, dict(st.resources), st.accelerator_type))
    ing = serve_cfg.ingress
    out.append(("rayservice.Ingress", ing.num_cpus, 0.0, dict(ing.resources), None))
    return out


def _fits(resources: dict, labels: dict, cpus, gpus, custom, accel) -> bool:
    if resources.get("CPU", 0) < cpus or resources.get("GPU", 0) < gpus:
        return False
    if any(resources.get(k, 0) < v for k, v in custom.items()):
        return False
    if accel and resources.get(f"accelerator_type:{accel}", 0) <= 0 \
            and labels.get("ray.io/accelerator-type") != accel:
        return False
    return True


def test_every_stage_fits_a_node_type_of_both_definitions():
    demands = _demands()
    paths = {d[0] for d in demands}
    assert {"augment.generate", "augment.edit", "augment.score", "ingest.decode", "rayservice.Rewriter"} <= paths
    custom_names = {k for d in demands for k in d[3]}
    assert {"diffusion_node"} <= custom_names  # mimic.yaml pins generate/edit with it
    definitions = {"launcher": _launcher_types(), "kuberay": _group_types(_cluster_specs()["raycluster"])}
    for where, types in definitions.items():
        for path, cpus, gpus, custom, accel in demands:
            hosts = [label for label, t in types.items() if _fits(t["resources"], t["labels"], cpus, gpus, custom, accel)]
            assert hosts, (f"{where}: no node type has what {path} asks for: {cpus} CPU, {gpus} GPU, "
                           f"{custom}, accelerator {accel}")
            if custom:  # a pinned stage lands only where its custom resource is
                assert all(set(custom) <= set(types[h]["resources"]) for h in hosts)
            if gpus:
                assert all(types[h]["resources"].get("GPU", 0) > 0 for h in hosts)


@pytest.mark.parametrize("name", ["demo.yaml", "mimic.yaml"])
def test_job_configs_load(name):
    from pairaug_ray.config import load_config

    cfg = load_config(os.path.join(ROOT, "jobs", "configs", name))
    assert cfg.augment.rewrite.max_words == 50
    if name == "mimic.yaml":
        assert cfg.augment.edit.resources == {"diffusion_node": 1}
        assert cfg.augment.intra_variants == 10
