"""The cluster launcher YAML validates against Ray's own schema; job configs load."""

import json
import os

import jsonschema
import pytest
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_cluster_yaml_matches_ray_schema():
    import ray.autoscaler

    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    schema = json.load(open(schema_path))
    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster", "pairaug-cluster.yaml")))
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert types["llm_gpu"]["resources"]["llm_node"] > 0
    assert types["diffusion_gpu"]["resources"]["diffusion_node"] > 0


@pytest.mark.parametrize("name", ["demo.yaml", "mimic.yaml"])
def test_job_configs_load(name):
    from pairaug_ray.config import load_config

    cfg = load_config(os.path.join(ROOT, "jobs", "configs", name))
    assert cfg.augment.rewrite.max_words == 50
    if name == "mimic.yaml":
        assert cfg.augment.edit.resources == {"diffusion_node": 1}
        assert cfg.augment.intra_variants == 10
