"""The augmentation job end to end on PhantomCXR: counts, schema, resume after a kill, S3, demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairaug_ray import schema as S
from pairaug_ray.cli import main as cli_main
from pairaug_ray.config import load_config
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.pipeline import run_augment, run_ingest

pytestmark = pytest.mark.usefixtures("ray_cluster")

FAST = [
    "augment.generate.model=tiny://sd?size=32&seed=0", "augment.generate.steps=2",
    "augment.edit.model=tiny://sd?size=32&seed=0", "augment.edit.steps=3",
    "augment.score.model=tiny://vlp?seed=0&image_size=32",
    "augment.rewrite.batch_size=4", "augment.generate.batch_size=4", "augment.edit.batch_size=4",
    "augment.score.batch_size=4", "augment.write.batch_size=4",
    "augment.generate.num_cpus=0.25", "augment.edit.num_cpus=0.25",
    "augment.prune.inter_threshold=0.0", "ray.progress_bars=false",
]
DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "demo.yaml")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    cfg = load_config(None, ["ingest.source=phantom://8?seed=5", f"ingest.out={out}",
                             "ingest.decode.image_size=32", "ingest.decode.num_cpus=0.25"])
    assert run_ingest(cfg)["written"] == 8
    return str(out)


def _cfg(studies, out, *extra):
    return load_config(DEMO, [f"augment.studies={studies}", f"augment.out={out}", *FAST, *extra])


def _ids(store, table):
    return store.read_column(table, "pair_id")


@pytest.fixture(scope="module")
def clean_run(studies, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("aug-clean"))
    return out, run_augment(_cfg(studies, out))


def test_counts_schema_and_provenance(studies, clean_run):
    out, manifest = clean_run
    store = Store(out)
    n_train = sum(1 for s in Store(studies).read_column("studies", "split") if s == "train")
    cands = store.read_table(S.CANDIDATES_DIR)
    errors = store.read_table(S.QUARANTINE_DIR)
    n_err = 0 if errors is None else errors.num_rows
    # every planned candidate (1 inter + 2 intra per train study) is a candidate or quarantined
    assert cands.num_rows + n_err == 3 * n_train
    assert cands.schema.equals(S.PAIR_SCHEMA)
    ids = cands.column("pair_id").to_pylist()
    assert len(ids) == len(set(ids))
    b = manifest["branches"]
    assert b["inter"]["candidates"] + b["intra"]["candidates"] == cands.num_rows
    pairs = store.read_table(S.PAIRS_DIR)
    assert pairs.num_rows == manifest["pairs_total"] == b["inter"]["kept"] + b["intra"]["kept"]
    assert set(pairs.column("pair_id").to_pylist()) <= set(ids)
    assert all(pairs.column("kept").to_pylist())
    for row in pairs.to_pylist():
        assert row["image_png"][:4] == b"\x89PNG" and row["rewritten_report"]
        assert row["rewrite_backend"] == "rule" and row["prompt_id"].startswith("rule-")
        assert row["generator_model"].startswith("tiny://sd") and row["score_model"]
        assert row["config_fingerprint"] == manifest["config_fingerprint"] and row["code_version"]
        if row["branch"] == "intra":
            assert row["source_image_png"][:4] == b"\x89PNG"
    assert set(pairs.column("split").to_pylist()) == {"train"}
    for stage in ("rewrite", "generate", "edit", "score"):
        assert manifest["stage_throughput"][stage]["rows_per_busy_s"] > 0
    assert os.path.exists(os.path.join(out, "report.html"))
    assert json.load(open(os.path.join(out, "manifest.json")))["pairs_total"] == pairs.num_rows


def test_intraaug_edits_the_study_image_and_counts_unet_work(clean_run):
    """edit.source: real (the default): IntraAug rows are edits of their study's own image (joined
    from the studies table by source_row_id), and the manifest reports counted UNet work."""
    out, manifest = clean_run
    cands = Store(out).read_table(S.CANDIDATES_DIR).to_pylist()
    intra = [r for r in cands if r["branch"] == "intra"]
    assert intra and {r["edit_source"] for r in intra} == {"real"}
    assert all(r["inversion_method"] == "direct" and r["inversion_psnr"] > 0 for r in intra)
    assert all(r["unet_sample_steps"] > 0 for r in cands)
    work = manifest["unet_work"]
    assert work["intra"]["edit_source"] == {"real": len(intra)}
    assert work["intra"]["reference"]["per_candidate"] == 300 and work["inter"]["reference"]["per_candidate"] == 100
    assert work["intra"]["sample_steps"] == pytest.approx(sum(r["unet_sample_steps"] for r in intra), rel=1e-6)


def test_second_run_writes_nothing(studies, clean_run):
    out, first = clean_run
    listing = lambda: sorted(os.listdir(os.path.join(out, "candidates"))) + sorted(
        os.listdir(os.path.join(out, "pairs")))
    before = listing()
    again = run_augment(_cfg(studies, out))
    assert listing() == before
    assert again["this_run_rows"] == 0 and again["pairs_total"] == first["pairs_total"]


def test_kill_and_resume_matches_clean_run(studies, clean_run, tmp_path):
    out = str(tmp_path / "aug-killed")
    cmd = [sys.executable, "-m", "pairaug_ray.cli", "augment", "--config", DEMO, "--studies", studies,
           "--out", out, *FAST]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    cand_dir = os.path.join(out, "candidates")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(cand_dir) and any(f.endswith(".parquet") for f in os.listdir(cand_dir)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # a real kill of the job and its Ray processes
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = set(_ids(Store(out), S.CANDIDATES_DIR))
    assert partial, "nothing was written before the kill"

    resumed = run_augment(_cfg(studies, out))
    clean = Store(clean_run[0])
    store = Store(out)
    got = _ids(store, S.CANDIDATES_DIR)
    assert len(got) == len(set(got)), "duplicates after resume"
    assert set(got) == set(_ids(clean, S.CANDIDATES_DIR))
    assert resumed["skipped_already_written"] == len(partial)
    assert set(_ids(store, S.PAIRS_DIR)) == set(_ids(clean, S.PAIRS_DIR))


def test_changed_output_settings_refuse_the_same_folder(studies, clean_run):
    out, manifest = clean_run
    before = sorted(_ids(Store(out), S.CANDIDATES_DIR))
    with pytest.raises(ValueError, match="other output settings") as err:
        run_augment(_cfg(studies, out, "augment.generate.steps=3"))
    assert "augment.generate.steps: 2 → 3" in str(err.value)
    assert sorted(_ids(Store(out), S.CANDIDATES_DIR)) == before
    assert Store(out).read_json(S.RUN_FILE)["config_fingerprint"] == manifest["config_fingerprint"]


def test_manifest_has_pool_sizes_wall_and_busy_seconds_per_stage(clean_run):
    _, manifest = clean_run
    figs = manifest["stage_throughput"]
    assert set(figs) == {"rewrite", "generate", "edit", "score", "write"}
    for name, fig in figs.items():
        assert fig["min_actors"] == 1 and fig["max_actors"] >= 1, name
        assert fig["busy_seconds"] > 0 and fig["wall_seconds"] > 0, (name, fig)


def test_augment_to_s3(studies, s3_bucket):
    endpoint, bucket = s3_bucket
    out = f"s3://{bucket}/augment"
    manifest = run_augment(_cfg(studies, out, f"storage.endpoint_url={endpoint}", "augment.intra_variants=1",
                                "augment.limit=3"))
    store = Store(out, StorageConfig(endpoint_url=endpoint))
    cands = store.read_table(S.CANDIDATES_DIR)
    assert cands.num_rows == manifest["branches"]["inter"]["candidates"] + manifest["branches"]["intra"]["candidates"]
    n_train = sum(1 for s in Store(studies).read_column("studies", "split") if s == "train")
    assert cands.num_rows == 2 * min(3, n_train)
    assert store.read_json("manifest.json")["pairs_total"] == manifest["pairs_total"]
    assert store.exists("report.html")


def test_every_row_failing_ends_with_a_manifest_and_a_nonzero_exit(studies, tmp_path, capsys):
    out = tmp_path / "all-failed"
    rc = cli_main(["augment", "--config", DEMO, "--studies", studies, "--out", str(out), *FAST,
                   "augment.limit=2", "augment.rewrite.min_source_words=1000"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no candidate was produced" in err and "rewrite:source_too_short" in err
    store = Store(str(out))
    manifest = store.read_json("manifest.json")
    planned = 2 * (manifest["per_study"]["inter"] + manifest["per_study"]["intra"])
    assert manifest["errors_by_stage_class"] == {"rewrite:source_too_short": planned}
    assert manifest["pairs_total"] == 0 and manifest["intra_means"]["count"] == 0
    assert all(b["candidates"] == 0 for b in manifest["branches"].values())
    assert len(store.read_column(S.QUARANTINE_DIR, "row_id")) == planned
    assert store.read_table(S.CANDIDATES_DIR) is None
    assert not store.exists(S.RUN_FILE)          # no candidate, no claim (issue 14.6)


def test_a_failed_first_run_leaves_the_folder_to_the_corrected_command(studies, tmp_path, capsys):
    """A typo'd backend stops before any Ray work and writes nothing; the corrected command runs in
    the same folder. (A run whose every row failed writes no claim either: the test above; a folder
    holding another run's manifest but no candidate is free: tests/unit/test_driver_checks.py.)"""
    out = str(tmp_path / "aug")
    small = [*FAST, "augment.limit=1", "augment.intra_variants=0"]
    assert cli_main(["augment", "--config", DEMO, "--studies", studies, "--out", out, *small,
                     "augment.rewrite.backend=rulle"]) == 2
    assert "unknown rewrite backend 'rulle'" in capsys.readouterr().err
    assert cli_main(["augment", "--config", DEMO, "--studies", studies, "--out", out, *small]) == 0
    manifest = Store(out).read_json(S.MANIFEST_FILE)
    assert manifest["branches"]["inter"]["candidates"] == 1
    assert Store(out).read_json(S.RUN_FILE)["config_fingerprint"] == manifest["config_fingerprint"]


# The demo's generator at toy scale: 32 px, 2 VAE + 3 UNet steps.
TINY_T2I = ["t2i.init=tiny://sd?size=32&seed=0", "t2i.steps=3", "t2i.vae_steps=2", "t2i.batch_size=4",
            "t2i.vae_batch_size=4", "t2i.cpus_per_worker=0.5", "t2i.checkpoint_every=100",
            "fidelity.n_pairs=4", "fidelity.steps=2", "fidelity.bootstrap=10"]


def test_demo_runs_small(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    rc = cli_main(["demo", "--n", "10", "--size", "64", "--out", str(out), "--cache", str(cache),
                   "ingest.decode.image_size=32", *FAST, *TINY_T2I, "train.steps=4", "train.checkpoint_every=4",
                   "train.batch_size=8", "train.warmup_steps=1", "train.image_size=32"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PairAug demo finished" in text and "training pairs" in text
    assert "zero-shot mean AUC  : original" in text and "zero-shot mean AUC  : pairaug" in text
    # the generator was trained into the cache, and generate / edit drew with it
    (run,) = cache.iterdir()
    assert (run / "model" / "model_index.json").exists()
    cands = pq.read_table(out / "augment" / "candidates", columns=["branch", "generator_model"]).to_pylist()
    assert {c["generator_model"] for c in cands} == {str(run / "model")}
    assert "generator           : " + str(run / "model") + " (trained" in text
    assert "InterAug threshold  : " in text and "| Cardiomegaly | physical |" in text
    assert (out / "fidelity" / "fidelity.json").exists()
    # the same data and settings: the cached generator comes back without training
    from pairaug_ray.config import load_config
    from pairaug_ray.train.t2i import cached_t2i

    cfg = load_config(DEMO, [f"t2i.studies={out / 'ingest'}", *TINY_T2I])
    again = cached_t2i(cfg.t2i, cache_dir=str(cache))
    assert again["reused"] and again["model_dir"] == str(run / "model")
    # the same studies ingested elsewhere (other folder, other row ids): the same generator
    table = Store(str(out / "ingest")).read_table(S.STUDIES_DIR)
    ids = pa.array([f"elsewhere-{r}" for r in table["row_id"].to_pylist()])
    Store(str(tmp_path / "elsewhere")).write_table(
        S.STUDIES_DIR, table.set_column(table.schema.get_field_index("row_id"), "row_id", ids), "s0")
    moved = cached_t2i(cfg.t2i.model_copy(update={"studies": str(tmp_path / "elsewhere")}), cache_dir=str(cache))
    assert moved["reused"] and moved["model_dir"] == str(run / "model")
    assert len(list(cache.iterdir())) == 1
    assert (out / "train" / "original" / "model" / "config.json").exists()
    assert (out / "train" / "pairaug" / "model" / "config.json").exists()
    assert (out / "evaluate" / "results.md").exists()
    scorer = pq.read_table(next((out / "augment" / "candidates").glob("*.parquet")), columns=["score_model"])
    assert scorer.column("score_model")[0].as_py().endswith(os.path.join("original", "model"))
    assert (out / "augment" / "report.html").exists()
    assert (out / "augment" / "manifest.json").exists() and (out / "ingest" / "manifest.json").exists()
    shards = list((out / "augment" / "pairs").glob("*.parquet"))
    assert shards and sum(pq.read_metadata(p).num_rows for p in shards) > 0
