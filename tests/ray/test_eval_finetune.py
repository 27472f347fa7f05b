"""Fine-tuning on Ray Train (1% of labels, by patient), evaluation output, the ablation end to end.

One small PhantomCXR studies table (ingest on Ray Data) and a small pairs table made from its
rows are shared by the module; models are seeded tiny ones, trained for a few steps.
"""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pairaug_ray.config import load_config
from pairaug_ray.io.store import Store
from pairaug_ray.pipeline import run_ingest
from pairaug_ray.schema import PAIR_SCHEMA, PAIRS_DIR
from pairaug_ray.cli import add_ablate_args, cmd_ablate
from pairaug_ray.train.ablate import VARIANTS, AblateConfig
from pairaug_ray.train.data import load_items
from pairaug_ray.train.evaluate import run_evaluate
from pairaug_ray.train.finetune import finetune, sample_patients
from pairaug_ray.train.zeroshot import load_labeled

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    # phantom seed 0, 48 studies: 32 train rows of 18 patients, 11 test rows with both labels of
    # "No Finding" (and of a few other classes)
    out = tmp_path_factory.mktemp("evalft") / "ingest"
    cfg = load_config(None, ["ingest.source=phantom://48?seed=0", f"ingest.out={out}",
                             "ingest.decode.image_size=64", "ingest.decode.num_cpus=0.25",
                             "ingest.decode.batch_size=8", "ray.progress_bars=false"])
    assert run_ingest(cfg)["written"] == 48
    return str(out)


@pytest.fixture(scope="module")
def pairs(studies, tmp_path_factory):
    """A kept inter + intra pairs table made from train study rows (the ablation's input shape)."""
    out = str(tmp_path_factory.mktemp("evalft") / "augment")
    train = [r for r in Store(studies).read_table("studies").to_pylist() if r["split"] == "train"]
    rows = []
    for i, branch in enumerate(["inter"] * 4 + ["intra"] * 4):
        src, other = train[i], train[-1 - i]
        row = {name: None for name in PAIR_SCHEMA.names}
        row.update(row_id=f"p{i}", pair_id=f"p{i}", branch=branch, variant=0, seed=0,
                   source_row_id=src["row_id"], study_id=src["study_id"], patient_id=src["patient_id"],
                   split="train", report=src["report"], kept=True,
                   rewritten_report=other["report"] if branch == "inter" else "Interval improvement. " + src["report"],
                   image_png=other["image_png"] if branch == "inter" else src["image_png"])
        rows.append(row)
    Store(out).write_table(PAIRS_DIR, pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), "shard-0")
    return out


def test_finetune_one_percent_by_patient_reports_auc(studies):
    train = load_labeled(studies, "train", image_size=64)
    res = finetune("tiny://vlp?seed=0", studies, fraction=0.01, mode="linear", steps=15, bootstrap=20)
    # 1% of 18 patients rounds to 0: one whole patient, with all of its rows
    chosen = sample_patients(train.patient_ids, 0.01)
    assert res["n_train_patients"] == 1 == len(chosen)
    assert res["n_train"] == sum(p in chosen for p in train.patient_ids)
    assert res["n_train_patients_total"] == len(set(train.patient_ids))
    assert res["n_test"] == 11
    nf = res["classes"]["No Finding"]
    assert nf["auc"] is not None and 0.0 <= nf["auc"] <= 1.0
    assert 0.0 <= res["mean_auc"] <= 1.0 and res["n_classes_scored"] >= 1
    assert res["classes"]["Enlarged Cardiomediastinum"]["auc"] is None  # no positive in the test split
    assert res["loss_final"] < res["loss_first"]


def test_evaluate_writes_table_and_plots(studies, tmp_path):
    out = tmp_path / "eval"
    res = run_evaluate(["first=tiny://vlp?seed=0", "tiny://vlp?seed=1"], studies, str(out),
                       bootstrap=30)
    assert set(res["models"]) == {"first", "vlp-seed1"}
    for name in ("results.json", "results.md", "roc.png", "auc_bars.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["first"]["zeroshot"]["n_images"] == 11
    md = (out / "results.md").read_text()
    assert "| No Finding |" in md and "| first | vlp-seed1 |" in md.replace("positives / n | ", "")
    assert "n/a" in md  # a class without both labels in the test split
    auc = saved["models"]["first"]["zeroshot"]["classes"]["No Finding"]["auc"]
    assert f"{auc:.3f}" in md


def test_every_variant_has_training_items(studies, pairs):
    for variant, mix in VARIANTS.items():
        items = load_items(studies, pairs, mix, ["train"])
        sources = set(items.column("source").to_pylist())
        assert sources == set(mix), variant


def test_ablation_end_to_end_from_the_cli_args(studies, pairs, tmp_path):
    out = tmp_path / "ablate"
    parser = argparse.ArgumentParser()
    add_ablate_args(parser)
    args = parser.parse_args(["--studies", studies, "--pairs", pairs, "--out", str(out), "--steps", "4",
                              "--variants", "original,pairaug", "--fractions", "0.5",
                              "--finetune-steps", "5"])
    base = load_config(None, ["ray.progress_bars=false"])
    # what the loaded PairAugConfig looks like with an `ablate:` section; the flags override it
    args.config = SimpleNamespace(ray=base.ray, storage=base.storage,
                                  ablate=AblateConfig(bootstrap=10, batch_size=8, steps=100))
    assert cmd_ablate(args) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert list(res["models"]) == ["original", "pairaug"]
    assert res["models"]["original"]["items_per_source"] == {"original": 32}
    assert res["models"]["pairaug"]["items_per_source"] == {"original": 32, "inter": 4, "intra": 4}
    for m in res["models"].values():
        assert m["zeroshot"]["mean_auc"] is not None
        assert [r["fraction"] for r in m["finetune"]] == [0.5]
        assert m["finetune"][0]["mean_auc"] is not None
    diff = res["models"]["pairaug"]["zeroshot"]["diff_vs_original"]
    zs = {v: res["models"][v]["zeroshot"]["mean_auc"] for v in ("original", "pairaug")}
    assert abs(diff["diff"] - (zs["pairaug"] - zs["original"])) < 1e-9
    assert "diff_vs_original" not in res["models"]["original"]["zeroshot"]
    md = (out / "ablation.md").read_text()
    assert "(a) original" in md and "(d) + both (PairAug)" in md and "FT 50% mean AUC" in md
    assert "Δ vs (a), paired 95% CI" in md and f"{diff['diff']:+.3f}" in md
    assert (out / "auc_bars.png").stat().st_size > 0
    assert (out / "runs" / "pairaug" / "model" / "config.json").exists()

