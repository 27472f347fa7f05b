"""Driver-side checks: first-run mistakes give their reason and exit 2 before any Ray cluster
starts; a folder a failed run left behind is reusable (issue 14.6); splits are explained."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pairaug_ray import cli
from pairaug_ray import schema as S
from pairaug_ray.checks import ConfigError, check_split_selection, model_problem
from pairaug_ray.config import load_config
from pairaug_ray.io.sources import assign_hash_splits, hash_split
from pairaug_ray.io.store import Store
from pairaug_ray.pipeline import (IngestConfig, _check_output, _claim_output, _note_splits, output_settings,
                                  settings_diff)
from pairaug_ray.stages.base import output_fingerprint

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")


@pytest.fixture()
def no_ray(monkeypatch):
    """Any attempt to start Ray fails the test (init_ray calls ray.init when Ray is not up)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray cluster was started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    return ray


def studies_folder(root: Path, splits: list[str]) -> str:
    rows = [dict(row_id=f"r{i}", study_id=f"s{i}", patient_id=f"p{i}", split=s, report="Small left effusion.",
                 source_uri=f"mem://{i}") for i, s in enumerate(splits)]
    Store(str(root)).write_table(S.STUDIES_DIR, pa.Table.from_pylist(rows, schema=S.STUDY_SCHEMA), "part-0")
    return str(root)


def diffusers_folder(root: Path, complete: bool) -> str:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text("{}")
    if complete:
        (root / "model_index.json").write_text("{}")
    return str(root)


def vlp_folder(root: Path, complete: bool) -> str:
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    if complete:
        (root / "model.safetensors").write_bytes(b"")
    return str(root)


def run_cli(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- model strings

@pytest.mark.parametrize("kind,model,expect", [
    ("sd", "tiny://sd?size=32&seed=1", None),
    ("sd", "tiny://sd?sise=32", "unknown parameters ['sise']"),
    ("sd", "tiny://vlp?seed=0", "expected tiny://KIND?... with KIND one of ['sd']"),
    ("sd", "stanfordmimi/RoentGen", None),                      # a hub id: the loader takes it
    ("vlp", "stanfordmimi/RoentGen", "does not exist"),          # load_vlp reads folders only
    ("vlp", "tiny://vlp-minilm?seed=2", None),
    ("llm", "tiny://llm?arch=mamba", "arch must be gpt2 or llama"),
    ("sd", "/no/such/folder", "does not exist"),
    ("vlp", "s3://bucket/vlp", "a VLP model is a local folder or a tiny:// URI"),
    ("sd", "", "is empty"),
])
def test_model_strings(kind, model, expect):
    problem = model_problem("k", model, kind)
    assert (problem is None) if expect is None else (expect in problem), problem


def test_model_folders_of_the_wrong_kind(tmp_path):
    assert model_problem("k", diffusers_folder(tmp_path / "sd_ok", True), "sd") is None
    problem = model_problem("augment.edit.model", diffusers_folder(tmp_path / "sd_bad", False), "sd")
    assert "is not a Stable Diffusion (diffusers) folder: it lacks model_index.json (it holds unet)" in problem
    assert model_problem("k", vlp_folder(tmp_path / "vlp_ok", True), "vlp") is None
    problem = model_problem("augment.score.model", vlp_folder(tmp_path / "vlp_bad", False), "vlp")
    assert "is not a VLP folder: it lacks model.safetensors" in problem
    (tmp_path / "file.bin").write_bytes(b"x")
    assert "is a file" in model_problem("k", str(tmp_path / "file.bin"), "vlp")


def test_a_folder_missing_here_is_only_logged_when_joining_a_cluster(caplog):
    with caplog.at_level(logging.WARNING, logger="pairaug_ray.checks"):
        assert model_problem("augment.generate.model", "/models/roentgen", "sd", remote=True) is None
    assert "must exist on the nodes that run the stage" in caplog.text


# ----------------------------------------------------------------------------- splits

def test_splits_that_select_nothing_say_what_exists_and_how_to_fix():
    assert check_split_selection(["train", "test", "train"], ["train"], "/x") == 2
    with pytest.raises(ConfigError) as err:
        check_split_selection(["", "", "validate"], ["train"], "/runs/ingest")
    text = str(err.value)
    assert "augment.splits=['train'] selects none of the 3 studies in /runs/ingest" in text
    assert "'' (no split) 2, validate 1" in text
    assert "augment.splits=[validate]" in text and "ingest.split_by=patient_hash" in text
    assert "split file" in text


def test_hash_split_is_per_patient_stable_and_proportional():
    assert hash_split("p10000032") == hash_split("p10000032")
    got = [hash_split(f"p{i}") for i in range(3000)]
    assert abs(got.count("train") / 3000 - 0.8) < 0.03 and abs(got.count("test") / 3000 - 0.1) < 0.02
    items = [dict(row_id=f"r{i}", patient_id=f"p{i // 3}", study_id="", split="") for i in range(30)]
    items[0]["split"] = "test"
    assert assign_hash_splits(items) == 29
    assert items[0]["split"] == "test"                          # a source split is kept
    by_patient = {}
    for it in items[1:]:
        by_patient.setdefault(it["patient_id"], set()).add(it["split"])
    assert all(len(v) == 1 for v in by_patient.values())        # one split per patient
    with pytest.raises(ValueError):
        hash_split("p1", {"train": -1.0})


def test_ingest_warns_without_a_split_file_and_assigns_by_hash_on_request(caplog):
    items = [dict(row_id=f"r{i}", patient_id=f"p{i}", study_id="", split="") for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="pairaug_ray.pipeline"):
        _note_splits(IngestConfig(source="/data/mimic"), items)
    assert "5 of 5 images get split '' because no split file was found" in caplog.text
    assert "ingest.split_by=patient_hash" in caplog.text and all(it["split"] == "" for it in items)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pairaug_ray.pipeline"):
        _note_splits(IngestConfig(source="/data/mimic", split_by="patient_hash"), items)
    assert all(it["split"] in ("train", "validate", "test") for it in items)
    assert "assigned by patient-id hash" in caplog.text


# ----------------------------------------------------------------------------- the CLI, before Ray

def test_augment_checks_exit_2_before_ray(tmp_path, capsys, no_ray):
    studies = studies_folder(tmp_path / "ingest", ["train", "train", "test"])
    base = ["augment", "--config", DEMO, "--studies", studies, "--out", str(tmp_path / "out")]
    cases = [
        (["augment.rewrite.backend=rul"], "unknown rewrite backend 'rul'; known: ['openai', 'rule', "),
        ([f"augment.generate.model={tmp_path / 'nope'}"], "augment.generate.model="),
        ([f"augment.edit.model={diffusers_folder(tmp_path / 'sd', False)}"], "lacks model_index.json"),
        ([f"augment.score.model={vlp_folder(tmp_path / 'vlp', False)}"], "is not a VLP folder"),
        (["augment.rewrite.backend=transformers", "augment.rewrite.model=tiny://llm?arch=x"],
         "augment.rewrite.model: bad value arch='x'"),
    ]
    for overrides, message in cases:
        rc, err = run_cli(base + overrides, capsys)
        assert rc == 2 and message in err, (overrides, err)
        assert not (tmp_path / "out").exists()          # nothing written, nothing claimed
    rc, err = run_cli(["augment", "--config", DEMO, "--studies", str(tmp_path / "missing"), "--out",
                       str(tmp_path / "out")], capsys)
    assert rc == 2 and "augment.studies=" in err and "does not exist" in err and "pairaug ingest" in err
    # several problems at once are all listed
    rc, err = run_cli(base + ["augment.rewrite.backend=rul", "augment.score.model=/nope"], capsys)
    assert rc == 2 and "2 problems" in err and "rul" in err and "augment.score.model='/nope'" in err


def test_augment_with_splits_that_select_nothing_exits_2_before_ray(tmp_path, capsys, no_ray):
    studies = studies_folder(tmp_path / "ingest", ["", "", ""])
    rc, err = run_cli(["augment", "--config", DEMO, "--studies", studies, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert "selects none of the 3 studies" in err and "'' (no split) 3" in err
    assert "ingest.split_by=patient_hash" in err


def test_ingest_train_evaluate_demo_check_before_ray(tmp_path, capsys, no_ray):
    rc, err = run_cli(["ingest", str(tmp_path / "no-such-tree"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "source folder not found" in err
    rc, err = run_cli(["train", "--studies", str(tmp_path / "none"), "--out", str(tmp_path / "t"),
                       "train.model=/no/vlp"], capsys)
    assert rc == 2 and "train.model='/no/vlp' does not exist" in err and "train.studies=" in err
    studies = studies_folder(tmp_path / "ingest", ["train", "test"])
    rc, err = run_cli(["train", "--studies", studies, "--mix", "original,inter", "--out", str(tmp_path / "t")],
                      capsys)
    assert rc == 2 and "needs train.pairs" in err
    rc, err = run_cli(["train", "--studies", studies, "--out", str(tmp_path / "t"), "train.splits=[validate]"],
                      capsys)
    assert rc == 2 and "train.splits=['validate'] selects none of the 2 studies" in err
    rc, err = run_cli(["evaluate", "--model", f"a={vlp_folder(tmp_path / 'v', False)}", "--studies", studies,
                       "--out", str(tmp_path / "e")], capsys)
    assert rc == 2 and "lacks model.safetensors" in err
    rc, err = run_cli(["demo", "--out", str(tmp_path / "demo"), "augment.rewrite.backend=rul"], capsys)
    assert rc == 2 and "unknown rewrite backend 'rul'" in err
    assert not (tmp_path / "demo").exists()             # not even PhantomCXR was written


def test_a_typo_run_in_a_subprocess_starts_no_ray(tmp_path):
    """The whole command as a user runs it: exit 2 with the reason, and no Ray session (a local
    cluster would create a session folder under RAY_TMPDIR)."""
    studies = studies_folder(tmp_path / "ingest", ["train"])
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "raytmp"), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pairaug_ray.cli", "augment", "--config", DEMO, "--studies",
                          studies, "--out", str(tmp_path / "out"), "augment.rewrite.backend=rulee"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert "pairaug augment: error: augment.rewrite.backend: unknown rewrite backend 'rulee'" in out.stderr
    assert not list((tmp_path / "raytmp").glob("**/session_*"))
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - t0 < 120


# ----------------------------------------------------------------------------- 14.6: the claim

def _settings(*overrides):
    return load_config(DEMO, list(overrides)).augment


def _candidates(store: Store, fp: str) -> None:
    rows = [dict(row_id="c1", pair_id="c1", branch="inter", config_fingerprint=fp, kept=None)]
    store.write_table(S.CANDIDATES_DIR, pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA), "part-0")


def test_output_settings_are_what_the_fingerprint_hashes():
    acfg = _settings("augment.generate.steps=7")
    settings = output_settings(acfg)
    blob = json.dumps(list(settings.values()), sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest()[:12] == output_fingerprint(acfg.rewrite, acfg.generate,
                                                                       acfg.edit, acfg.score)
    assert "batch_size" not in settings["generate"] and settings["generate"]["steps"] == 7


def test_a_folder_without_candidates_is_free_whatever_it_records(tmp_path):
    store = Store(str(tmp_path / "out"))
    old, new = _settings("augment.rewrite.backend=rule"), _settings("augment.generate.steps=20")
    fp_old = output_fingerprint(old.rewrite, old.generate, old.edit, old.score)
    fp_new = output_fingerprint(new.rewrite, new.generate, new.edit, new.score)
    # a failed earlier run: manifest and an old-style run.json of other settings, no candidate
    store.write_json(S.RUN_FILE, {"config_fingerprint": fp_old})
    store.write_json(S.MANIFEST_FILE, {"config_fingerprint": fp_old})
    _check_output(store, fp_new, output_settings(new))           # no error
    # the same settings as the candidates present: resume
    _candidates(store, fp_new)
    _check_output(store, fp_new, output_settings(new))


def test_a_real_settings_change_is_refused_naming_the_keys(tmp_path):
    store = Store(str(tmp_path / "out"))
    first = _settings()
    fp1, s1 = output_fingerprint(first.rewrite, first.generate, first.edit, first.score), output_settings(first)
    _candidates(store, fp1)
    _claim_output(store, fp1, s1)
    second = _settings("augment.generate.steps=20", "augment.score.model=tiny://vlp?seed=3",
                       "augment.generate.batch_size=2")            # a pool setting: not a change
    fp2 = output_fingerprint(second.rewrite, second.generate, second.edit, second.score)
    with pytest.raises(ValueError) as err:
        _check_output(store, fp2, output_settings(second))
    text = str(err.value)
    assert f"fingerprint {fp1}; this run: {fp2}" in text
    assert "augment.generate.steps: 10 → 20" in text
    assert 'augment.score.model: "tiny://vlp?seed=0" → "tiny://vlp?seed=3"' in text
    assert "batch_size" not in text.split("Pair ids")[0]
    assert "new --out" in text
    # without the settings recorded (crash before run.json, or an older pairaug) it still refuses
    os.remove(store.path(S.RUN_FILE))
    with pytest.raises(ValueError, match="does not record the settings"):
        _check_output(store, fp2, output_settings(second))


def test_settings_diff_lists_added_removed_and_changed_keys():
    assert settings_diff({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3, "z": 4}}) == [
        "augment.a.y: 2 → 3", "augment.a.z: (unset) → 4"]
    assert settings_diff({"a": {"x": 1}}, {"a": {}}) == ["augment.a: (unset) → {}", "augment.a.x: 1 → (unset)"]
