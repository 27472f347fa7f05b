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
from pairaug_ray.runtime import RayConfig, init_ray, joins_existing_cluster

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
                                         ("evaluate", "evaluate"), ("ablate", "ablate")])
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
    assert calls[-1]["num_cpus"] == 2 and calls[-1]["address"] is None


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
