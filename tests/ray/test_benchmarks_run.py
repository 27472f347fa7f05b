"""The performance benchmarks and `pairaug estimate` still run (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

# Imported before any capsys test: pipeline.Progress binds sys.stderr when the module loads.
import pairaug_ray.pipeline  # noqa: E402,F401
from benchmarks import memory_scaling, pipeline_throughput, prune_memory, scaling_table  # noqa: E402
from pairaug_ray.cli import main as cli_main  # noqa: E402
from pairaug_ray.config import load_with_estimate  # noqa: E402
from pairaug_ray.estimate import estimate  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")

TINY = [
    "augment.generate.model=tiny://sd?size=32&seed=0", "augment.generate.steps=2",
    "augment.edit.model=tiny://sd?size=32&seed=0", "augment.edit.steps=2",
    "augment.score.model=tiny://vlp?seed=0&image_size=32", "augment.intra_variants=1",
    "augment.generate.num_cpus=0.25", "augment.edit.num_cpus=0.25",
]


def test_pipeline_throughput_runs_both_sides_on_the_same_candidates(tmp_path, capsys):
    out = pipeline_throughput.main(["--studies", "2", "--repeats", "1", "--workdir", str(tmp_path),
                                    "--profiles", "local,cluster", *TINY])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["benchmark"] == "pipeline_throughput" and line["studies"] == 2
    ref = out["reference_runs"][0]
    assert len([f for f in os.listdir(tmp_path / "ref-0") if f.endswith(".png")]) == 4
    for profile in ("local", "cluster"):
        ray_ = out["runs_by_profile"][profile][0]
        assert ray_["profile"] == profile
        # same studies, same plan: 1 inter + 1 intra per study on every side, same pruning outcome
        assert ref["candidates"] == ray_["candidates"] == 4 and ref["kept"] == ray_["kept"]
        assert ref["candidate_ids"] == ray_["candidate_ids"] and ref["kept_ids"] == ray_["kept_ids"]
        assert line["sides"][profile]["same_kept_ids_as_reference"] is True
        assert {"edit", "generate", "score"} <= set(ray_["stage_throughput"])
        # the finished job's re-run: nothing planned, nothing pruned again
        assert ray_["rerun_rows"] == 0 and ray_["rerun_seconds"] < 30
        assert ray_["manifest_seconds"]["fixed"] > 0 and ray_["prune_pass"]["skipped"] is False
    assert line["ratio"] == pytest.approx(line["pipeline_pairs_per_s"] / line["reference_pairs_per_s"], abs=0.01)


def test_memory_scaling_reports_peaks_and_growth(tmp_path, capsys):
    out = memory_scaling.main(["--studies", "1", "--factor", "2", "--every", "0.2",
                               "--workdir", str(tmp_path), *TINY])
    assert out["small"]["candidates"] == 2 and out["large"]["candidates"] == 4
    for size in ("small", "large"):
        assert out[size]["peak_total_rss_mib"] > out[size]["peak_driver_rss_mib"] > 0
        assert out[size]["peak_workers_rss_mib"] > 0  # the Ray workers were found and sampled
    assert out["growth"]["total_rss"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "memory_scaling"


def test_prune_memory_compares_old_and_streaming_on_the_same_table(tmp_path, capsys):
    out = prune_memory.main(["--sizes", "600", "--rows-per-shard", "100", "--workdir", str(tmp_path)])
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"old", "streaming"} and rows["old"]["shards"] == 6
    assert rows["old"]["kept"] == rows["streaming"]["kept"] > 0
    assert out["summary"]["same_kept_ids_across_methods"] == {600: True}
    assert rows["old"]["intra_count"] == rows["streaming"]["intra_count"] == 400
    assert all(r["peak_rss_mib"] >= r["rss_before_mib"] > 0 for r in rows.values())
    assert "| candidates | shards |" in capsys.readouterr().out


def test_scaling_table_names_a_bottleneck_per_point(tmp_path, capsys):
    rows = scaling_table.main(["--studies", "2", "--grid", "edit=1", "--workdir", str(tmp_path), *TINY])
    assert len(rows) == 1
    assert rows[0]["actors"]["edit"] == 1 and rows[0]["bottleneck"] in scaling_table.STAGES
    assert sum(rows[0]["num_cpus"].values()) <= 1.5  # the pools fit the 2-CPU cluster with room to read
    assert "| edit actors |" in capsys.readouterr().out


def test_estimate_from_config_rates(tmp_path, capsys):
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(
        "augment:\n  inter_variants: 1\n  intra_variants: 10\n"
        "  edit: {num_gpus: 1, max_actors: 4}\n  generate: {num_gpus: 1, max_actors: 1}\n"
        "estimate:\n  studies: 3600\n  rows_per_s: {rewrite: 100, generate: 1, edit: 2, score: 50, write: 100}\n")
    cfg, est = load_with_estimate(str(cfg_path))
    result = estimate(cfg.augment, est.rows_per_s, est.studies)
    edit = result["stages"]["edit"]
    assert edit["rows"] == 36000 and math.isclose(edit["gpu_hours"], 36000 / 2 / 3600)
    assert math.isclose(edit["wall_hours"], 5 / 4)                 # 5 GPU-hours over 4 actors
    assert result["bottleneck"] == "edit" and math.isclose(result["wall_hours"], 1.25)
    # generate needs 1 actor at 1 row/s for 3600 rows: 1 h, under the edit's 1.25 h
    assert result["stages"]["generate"]["balanced_actors"] == 1
    assert result["stages"]["edit"]["balanced_actors"] == 4
    assert cli_main(["estimate", "--config", str(cfg_path), "--studies", "7200"]) == 0
    assert "bottleneck: edit" in capsys.readouterr().out


def test_estimate_measures_a_sample(capsys):
    demo = os.path.join(REPO, "jobs", "configs", "demo.yaml")
    assert cli_main(["estimate", "--config", demo, "--studies", "1000", "--measure-sample", "2", "--json",
                          *TINY]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rates_from"] == "measured"
    assert {"generate", "edit", "score"} <= set(result["measured"]["rows_per_s"])
    assert result["stages"]["edit"]["rows"] == 1000 and result["wall_hours"] > 0
