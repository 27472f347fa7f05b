"""The command line and the Ray runtime: argument parsing shared by `pairaug` and jobs/, joining an
existing cluster without local-only settings, every command's help."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pairaug_ray import cli
from pairaug_ray.runtime import (
    NodeShape,
    PlacementError,
    RayConfig,
    check_placement,
    init_ray,
    joins_existing_cluster,
    label_matches,
    load_node_types,
    placement_problems,
    stage_requirements,
)
from pairaug_ray.stages.base import StageConfig, output_fingerprint, resolve_device

REPO = Path(__file__).resolve().parents[2]


def test_overrides_never_become_the_positional_source():
    # the form jobs/ingest.py's docstring shows: overrides right after --config, no positional source
    args = cli.parse_args(["ingest", "--config", "jobs/configs/demo.yaml", "ingest.source=phantom://4",
                           "ingest.out=/tmp/x"])
    assert args.source is None and args.overrides == ["ingest.source=phantom://4", "ingest.out=/tmp/x"]
    args = cli.parse_args(["ingest", "ray.num_cpus=1", "data/tree", "--out", "o", "ingest.decode.image_size=64"])
    assert args.source == "data/tree" and args.out == "o"
    assert args.overrides == ["ray.num_cpus=1", "ingest.decode.image_size=64"]
    # an s3 path with "=" in it is a path, not an override
    args = cli.parse_args(["ingest", "s3://bucket/part=1/tree"])
    assert args.source == "s3://bucket/part=1/tree" and args.overrides == []


def test_commands_without_a_config_refuse_overrides(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["phantom", "--out", "x", "ingest.out=y"])
    assert "takes no config overrides" in capsys.readouterr().err


def test_flags_win_over_overrides_and_file(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("pairaug_ray.pipeline.run_ingest",
                        lambda section, storage, ray: seen.update(section=section, ray=ray) or {"ok": 1})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  source: from-file\n  out: from-file\nray:\n  num_cpus: 3\n")
    assert cli.main(["ingest", "--config", str(cfg), "ingest.out=from-override", "--out", "from-flag",
                     "ingest.decode.image_size=64"]) == 0
    assert seen["section"].source == "from-file" and seen["section"].out == "from-flag"
    assert seen["section"].decode.image_size == 64 and seen["ray"].num_cpus == 3


@pytest.mark.parametrize("job,command", [("ingest", "ingest"), ("augment", "augment"), ("train_vlp", "train"),
                                         ("evaluate", "evaluate"), ("ablate", "ablate"),
                                         ("train_t2i", "train-t2i")])
def test_job_entry_points_parse_like_the_command(job, command):
    out = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: pairaug {command}")


def test_every_command_help_describes_every_flag():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(cli.COMMANDS)
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if action.dest in ("help",):
                continue
            assert action.help, f"pairaug {name}: {action.option_strings or action.dest} has no help"
        assert "``" not in (sp.description or "")


def test_help_is_fast_and_plain_text():
    code = ("import sys, time; t = time.perf_counter(); import pairaug_ray.cli as c; p = c.build_parser(); "
            "print(round(time.perf_counter() - t, 3)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'pandas', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = out.stdout.strip().splitlines()
    assert lines[1] == "[]", "building the parser imports heavy libraries: " + lines[1]


def test_init_ray_on_an_existing_cluster_drops_local_settings(monkeypatch, caplog):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with caplog.at_level(logging.WARNING, logger="pairaug_ray.runtime"):
        init_ray(RayConfig(num_cpus=2, progress_bars=False))
    assert "num_cpus" not in calls[-1]
    assert "ray.num_cpus=2 is a local-cluster setting and is ignored" in caplog.text
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == 1

    monkeypatch.delenv("RAY_ADDRESS")
    init_ray(RayConfig(address="ray://head:10001", num_cpus=2, progress_bars=False))
    assert calls[-1]["address"] == "ray://head:10001" and "num_cpus" not in calls[-1]

    init_ray(RayConfig(num_cpus=2, progress_bars=False))          # a local cluster keeps it
    assert calls[-1]["num_cpus"] == 2 and calls[-1]["address"] == "local"   # never a stray local head


def test_joins_existing_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not joins_existing_cluster(RayConfig())
    assert joins_existing_cluster(RayConfig(address="auto"))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert joins_existing_cluster(RayConfig())
    monkeypatch.setenv("RAY_ADDRESS", " ")
    assert not joins_existing_cluster(RayConfig())


def test_label_one_report():
    out = subprocess.run([sys.executable, "-m", "pairaug_ray.cli", "label", "--text", "Small left pleural effusion."],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and '"laterality": "left"' in out.stdout


# ----------------------------------------------------------------------------- placement pre-flight

HEAD = NodeShape("head", {"CPU": 0.0, "memory": 8e9})
CPU_NODE = NodeShape("cpu", {"CPU": 2.0, "cpu_node": 2.0}, {"pairaug.io/node-type": "cpu"})
GPU_NODE = NodeShape("gpu", {"CPU": 4.0, "GPU": 1.0, "diffusion_node": 1.0, "accelerator_type:A100": 1.0},
                     {"pairaug.io/node-type": "diffusion", "ray.io/accelerator-type": "A100"})


def test_stage_config_placement_fields_reach_ray_data_and_the_requirement():
    cfg = StageConfig(num_cpus=0.5, num_gpus=0.25, resources={"diffusion_node": 0.25}, accelerator_type="A100",
                      label_selector={"pairaug.io/node-type": "diffusion"}, min_actors=2, max_actors=3)
    kw = cfg.map_batches_kwargs(object)
    assert kw["label_selector"] == {"pairaug.io/node-type": "diffusion"}
    assert kw["resources"] == {"diffusion_node": 0.25} and kw["accelerator_type"] == "A100"
    assert kw["num_gpus"] == 0.25 and kw["num_cpus"] == 0.5
    assert "label_selector" not in StageConfig().map_batches_kwargs(object)
    req = cfg.placement_requirement("augment.score")
    assert req.stage == "augment.score" and req.min_actors == 2
    assert req.resources == {"CPU": 0.5, "GPU": 0.25, "diffusion_node": 0.25}
    assert req.accelerator_type == "A100" and req.label_selector == {"pairaug.io/node-type": "diffusion"}
    assert StageConfig(num_cpus=0).placement_requirement("x").resources == {}   # zero amounts left out
    # where a pool runs never changes its outputs' fingerprint
    assert output_fingerprint(cfg) == output_fingerprint(StageConfig())


def test_label_selector_syntax():
    assert label_matches("diffusion", "diffusion") and not label_matches("diffusion", "llm")
    assert not label_matches("diffusion", None)
    assert label_matches("!llm", "diffusion") and label_matches("!llm", None) and not label_matches("!llm", "llm")
    assert label_matches("in(A100, H100)", "H100") and not label_matches("in(A100,H100)", "L4")
    assert label_matches("!in(A100,H100)", "L4") and not label_matches("!in(A100,H100)", "A100")


def test_placement_check_names_the_stage_and_the_missing_resource(caplog):
    reqs = [StageConfig(num_cpus=0.5, resources={"cpu_node": 0.5}).placement_requirement("ingest.decode"),
            StageConfig(num_gpus=1, resources={"diffusion_node": 1}).placement_requirement("augment.generate"),
            StageConfig(label_selector={"pairaug.io/node-type": "llm"}).placement_requirement("augment.rewrite"),
            StageConfig(num_gpus=1, accelerator_type="H100").placement_requirement("augment.edit")]
    with pytest.raises(PlacementError) as err:
        check_placement(reqs, RayConfig(), nodes=[HEAD, CPU_NODE], node_types=[])
    lines = err.value.problems
    assert [line.split(":")[0] for line in lines] == ["stage augment.generate", "stage augment.rewrite",
                                                      "stage augment.edit"]
    assert "missing GPU, diffusion_node" in lines[0]
    assert "missing label pairaug.io/node-type=llm" in lines[1]
    assert "missing GPU, accelerator_type H100" in lines[2]
    assert "ray.node_types=" in str(err.value)          # the hint when no node types are known
    # the GPU node hosts generate; the A100 resource is not an H100
    problems, _ = placement_problems(reqs, [HEAD, CPU_NODE, GPU_NODE])
    assert [p.split(":")[0] for p in problems] == ["stage augment.rewrite", "stage augment.edit"]
    assert "missing accelerator_type H100" in problems[1]
    with caplog.at_level(logging.WARNING, logger="pairaug_ray.runtime"):
        check_placement(reqs, RayConfig(placement_check="warn"), nodes=[HEAD], node_types=[])
    assert "stage augment.generate: missing" in caplog.text
    assert check_placement(reqs, RayConfig(placement_check="off"), nodes=[HEAD], node_types=[]) == []


def test_min_actors_beyond_what_fits_is_a_note_not_a_failure():
    req = StageConfig(num_cpus=1, resources={"cpu_node": 1}, min_actors=4).placement_requirement("ingest.decode")
    problems, notes = placement_problems([req], [CPU_NODE])
    assert problems == [] and "min_actors=4" in notes[0] and "hold 2" in notes[0]


def test_autoscaling_node_types_from_the_cluster_definitions():
    from pairaug_ray.config import load_config

    cfg = load_config(str(REPO / "jobs" / "configs" / "mimic.yaml"))
    reqs = stage_requirements(cfg.augment, "augment") + stage_requirements(cfg.ingest, "ingest")
    assert {r.stage for r in reqs} >= {"augment.generate", "augment.edit", "augment.score", "augment.rewrite",
                                       "augment.write", "ingest.decode", "ingest.label", "ingest.write"}
    for path in ("cluster/pairaug-cluster.yaml", "cluster/kuberay/raycluster.yaml",
                 "cluster/kuberay/rayjob-augment.yaml"):
        types = load_node_types(REPO / path)
        by_kind = {t.labels.get("pairaug.io/node-type"): t for t in types}
        assert set(by_kind) == {"head", "cpu", "llm", "diffusion"}, path
        assert by_kind["diffusion"].resources["diffusion_node"] > 0 and by_kind["diffusion"].resources["GPU"] > 0
        # only the head is up (CPU 0): every stage waits for an autoscaled node of its type
        notes = check_placement(reqs, RayConfig(), nodes=[HEAD], node_types=types)
        assert len(notes) == len(reqs)
        gen = next(n for n in notes if n.startswith("augment.generate:"))
        assert "diffusion" in gen.split("can add")[1]
        ask = StageConfig(num_gpus=1, resources={"tpu_node": 1}).placement_requirement("augment.generate")
        with pytest.raises(PlacementError, match=r"stage augment.generate: missing tpu_node"):
            check_placement([ask], RayConfig(), nodes=[HEAD], node_types=types)
    bad = REPO / "jobs" / "configs" / "demo.yaml"
    with pytest.raises(ValueError, match="neither a cluster launcher YAML"):
        load_node_types(bad)


def test_bootstrap_config_counts_only_when_joining_a_cluster(tmp_path, monkeypatch):
    from pairaug_ray.runtime import autoscaling_node_types

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert autoscaling_node_types(RayConfig(address="auto")) == ([], None)
    (tmp_path / "ray_bootstrap_config.yaml").write_text((REPO / "cluster" / "pairaug-cluster.yaml").read_text())
    types, source = autoscaling_node_types(RayConfig(address="auto"))
    assert source.endswith("ray_bootstrap_config.yaml") and len(types) == 4
    assert autoscaling_node_types(RayConfig()) == ([], None)          # a new local cluster never scales
    explicit, source = autoscaling_node_types(RayConfig(node_types=str(REPO / "cluster/kuberay/raycluster.yaml")))
    assert source.endswith("raycluster.yaml") and len(explicit) == 4


def test_placement_wait_polls_for_nodes_still_starting(monkeypatch):
    import pairaug_ray.runtime as rt

    seen = iter([[HEAD], [HEAD], [HEAD, GPU_NODE]])
    monkeypatch.setattr(rt, "alive_nodes", lambda: next(seen))
    monkeypatch.setattr(rt, "_POLL_S", 0.05)
    req = StageConfig(num_gpus=1, resources={"diffusion_node": 1}).placement_requirement("augment.edit")
    assert check_placement([req], RayConfig(placement_wait_s=30), node_types=[]) == []
    monkeypatch.setattr(rt, "alive_nodes", lambda: [HEAD])
    with pytest.raises(PlacementError, match="stage augment.edit: missing"):
        check_placement([req], RayConfig(placement_wait_s=0.3), node_types=[])


def test_device_auto_follows_the_gpus_the_actor_got(monkeypatch):
    import types

    import torch

    from pairaug_ray.stages.score import ScoreConfig

    assert ScoreConfig().device == "auto"
    assert resolve_device("cpu", 1) == "cpu" and resolve_device("cuda:1", 0) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_gpu_ids=lambda: [])
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    assert resolve_device("auto", 0) == "cpu"          # no GPU asked for, none given: CPU on a GPU node
    assert resolve_device("auto", 0.25) == "cuda"      # the mimic.yaml scorer's GPU slice
    fake_ray.get_gpu_ids = lambda: [0]                 # e.g. a Serve replica Ray gave a GPU
    assert resolve_device("auto", 0) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == "cpu"          # a GPU resource but no CUDA (tests' fake GPUs)


def test_the_closest_node_is_the_one_with_too_little_not_the_one_without():
    req = StageConfig(num_cpus=0.25, resources={"cpu_node": 2}).placement_requirement("ingest.decode")
    llm = NodeShape("llm", {"CPU": 1.0, "GPU": 1.0, "llm_node": 1.0})
    for order in ([llm, NodeShape("cpu", {"CPU": 1.0, "cpu_node": 1.0})],
                  [NodeShape("cpu", {"CPU": 1.0, "cpu_node": 1.0}), llm]):
        problems, _ = placement_problems([req], order)
        assert problems[0].startswith("stage ingest.decode: missing cpu_node 2 (has 1)"), problems
        assert problems[0].endswith("closest: cpu)")


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))


def test_help_text_mentions_every_command_and_flag():
    parser = cli.build_parser()
    top = parser.format_help()
    for name in cli.COMMANDS:
        assert name in top, f"pairaug --help does not list {name}"
    for name, sp in _subparsers(parser).choices.items():
        text = sp.format_help()
        for action in sp._actions:
            for opt in action.option_strings:
                assert opt in text, f"pairaug {name} --help does not mention {opt}"
            if not action.option_strings and action.help:
                assert action.help.split()[0] in text
    show = _subparsers(_subparsers(parser).choices["config"]).choices["show"].format_help()
    assert "--config" in show and "section" in show


def test_subcommand_help_runs_fast_and_lists_its_flags():
    out = subprocess.run([sys.executable, "-m", "pairaug_ray.cli", "evaluate", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0
    for flag in ("--model", "--finetune-mode", "--finetune-steps", "--verbose", "--config"):
        assert flag in out.stdout


def test_config_show_lists_every_key_of_the_loaded_config(capsys, tmp_path):
    from pydantic import BaseModel

    from pairaug_ray.config import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("augment:\n  generate:\n    steps: 7\n")
    assert cli.main(["config", "show", "--config", str(cfg_file), "ray.num_cpus=3"]) == 0
    text = capsys.readouterr().out
    cfg = load_config(str(cfg_file), ["ray.num_cpus=3"])
    keys = []

    def walk(model, prefix):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")

    walk(cfg, "")
    lines = {line.split(" = ", 1)[0]: line for line in text.splitlines() if " = " in line and not line.startswith("#")}
    assert sorted(lines) == sorted(keys)
    for key, line in lines.items():
        _, _, notes = line.partition("  # ")
        typ, default, description = (notes.split("; ", 2) + ["", ""])[:3]
        assert typ and default.startswith("default ") and description.strip(), f"{key}: {line}"
    assert lines["augment.generate.steps"].startswith("augment.generate.steps = 7  # int; default 50 (changed); ")
    assert lines["ray.num_cpus"].startswith("ray.num_cpus = 3  #")
    # one section, and an unknown one
    assert cli.main(["config", "show", "augment.generate"]) == 0
    shown = capsys.readouterr().out
    assert "augment.generate.steps = 50" in shown and "ray.num_cpus" not in shown
    assert cli.main(["config", "show", "augment.nope"]) == 2
    assert "no config section 'augment.nope'" in capsys.readouterr().err


def test_readme_command_table_lists_every_command():
    table = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `pairaug ")]
    listed = {line.split("`pairaug ", 1)[1].split()[0].rstrip("`") for line in table}
    assert listed == set(cli.COMMANDS)
    assert any("`pairaug config show" in line for line in table)


def test_name_equals_uri_values_are_not_overrides():
    args = cli.parse_args(["evaluate", "--model", "original=runs/train/vlp/model", "evaluate.split=all"])
    assert args.models == ["original=runs/train/vlp/model"] and args.overrides == ["evaluate.split=all"]


def test_verbose_reaches_the_ray_config(monkeypatch):
    seen = {}
    monkeypatch.setattr("pairaug_ray.pipeline.run_ingest",
                        lambda section, storage, ray: seen.update(ray=ray) or {"ok": 1})
    assert cli.main(["ingest", "phantom://2", "--out", "x", "--verbose"]) == 0
    assert seen["ray"].verbose is True
    assert cli.main(["-v", "ingest", "phantom://2", "--out", "x"]) == 0 and seen["ray"].verbose is True
    assert cli.main(["ingest", "phantom://2", "--out", "x"]) == 0 and seen["ray"].verbose is False
    assert RayConfig().progress_bars is False and RayConfig().verbose is False
