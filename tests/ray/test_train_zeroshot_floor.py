"""Issue #5: a short VLP training run on PhantomCXR lowers the loss and beats chance zero-shot.

Usage::

    .venv/bin/pytest -q tests/ray/test_train_zeroshot_floor.py --durations=5
    # re-measure another data/model seed (prints the figures):
    PAIRAUG_ZEROSHOT_SEED=3 .venv/bin/pytest -q -s tests/ray/test_train_zeroshot_floor.py

One PhantomCXR ingest (Ray Data), one Ray Train run (`train_vlp`, 2 DDP workers x 0.5 CPU), then
zero-shot evaluation (CheXzero protocol, `zeroshot_eval`) on the held-out `validate` + `test`
rows of the same table: patients are split by patient id, so none of them was trained on.

The floors come from measurements of exactly this configuration with five data/model seeds; see
docs/training.md ("Zero-shot floor test") for every figure and the command that produced them.
The run is deterministic per seed, so this test sees the seed-0 figures; the margins absorb
small numerical drift, and the floors stay below the worst seed measured.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pairaug_ray.config import load_config
from pairaug_ray.io.store import Store
from pairaug_ray.pipeline import run_ingest
from pairaug_ray.train.vlp import TrainConfig, read_metrics, train_vlp
from pairaug_ray.train.zeroshot import load_labeled, zeroshot_eval

pytestmark = pytest.mark.usefixtures("ray_cluster")

SEED = int(os.environ.get("PAIRAUG_ZEROSHOT_SEED", "0"))   # phantom, model and training seed
N_STUDIES = 800                       # ~80% train (by patient), ~160 validate + test images
SOURCE = f"phantom://{N_STUDIES}?seed={SEED}&size=64&reports=template"
IMAGE_SIZE = 64
MODEL = f"tiny://vlp?seed={SEED}&image_size={IMAGE_SIZE}"
EVAL_SPLIT = "validate,test"
TRAIN = dict(model=MODEL, steps=60, batch_size=64, lr=2e-3, warmup_steps=5, augment_images=False,
             image_size=IMAGE_SIZE, seed=SEED, num_workers=2, cpus_per_worker=0.5,
             checkpoint_every=1000)

# Floors, set from the measured distribution (docs/training.md, "Zero-shot floor test"), this
# configuration, 2026-11-28, seeds 0-4 (phantom seed = model seed = training seed):
#   mean AUC over the CheXpert-5 classes: 0.710, 0.724, 0.710, 0.686, 0.656 (min 0.656)
#     untrained model, same seeds:        0.528, 0.518, 0.332, 0.390, 0.409 (max 0.528)
#   mean AUC over every class with both labels present: 0.584, 0.646, 0.546, 0.563, 0.589
#     untrained model, same seeds:        0.510, 0.439, 0.429, 0.483, 0.489 (gain >= +0.074)
#   loss, mean of the first 5 steps minus mean of the last 10: >= 0.37 (4.17-4.19 -> 3.71-3.82)
# The CheXpert-5 mean (CheXzero's headline figure) is the floor that separates trained from
# untrained: the measured minimum minus 0.056, and 0.07 above the best untrained model. The mean
# over every class holds classes with 1-4 positives among 129-181 images, whose AUCs swing widely,
# so it only has to beat chance and the untrained model. Re-measure with PAIRAUG_ZEROSHOT_SEED
# (see the usage above) when the model, the phantom or the protocol changes.
FLOOR_CHEXPERT5 = 0.60
FLOOR_ALL = 0.52
GAIN_ALL = 0.03
LOSS_DROP = 0.2


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    out = tmp_path_factory.mktemp("zeroshot") / "ingest"
    cfg = load_config(None, [f"ingest.source={SOURCE}", f"ingest.out={out}",
                             f"ingest.decode.image_size={IMAGE_SIZE}", "ingest.decode.num_cpus=0.25",
                             "ingest.decode.batch_size=32", "ray.progress_bars=false"])
    assert run_ingest(cfg)["written"] == N_STUDIES
    return str(out)


def test_short_training_lowers_loss_and_beats_chance_zero_shot(studies, tmp_path):
    cfg = TrainConfig(studies=studies, out=str(tmp_path / "runs"), name="floor", **TRAIN)
    result = train_vlp(cfg)
    assert result["steps"] == TRAIN["steps"]
    losses = [line["loss"] for line in read_metrics(result["run_dir"])]
    assert len(losses) == TRAIN["steps"]
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - LOSS_DROP, losses

    # Held out: the evaluation rows' patients never appear in the training split.
    rows = Store(studies).read_table("studies", columns=["patient_id", "split"]).to_pylist()
    train_patients = {r["patient_id"] for r in rows if r["split"] == "train"}
    data = load_labeled(studies, EVAL_SPLIT, image_size=IMAGE_SIZE)
    assert len(data) >= 120 and not set(data.patient_ids) & train_patients

    trained = zeroshot_eval(result["model_dir"], data, split=EVAL_SPLIT, bootstrap=0)
    untrained = zeroshot_eval(MODEL, data, split=EVAL_SPLIT, bootstrap=0)
    figures = {"seed": SEED, "n_images": len(data), "train_s": result["seconds"],
               "loss_first5": round(float(np.mean(losses[:5])), 3),
               "loss_last10": round(float(np.mean(losses[-10:])), 3),
               **{f"{name}_{key}": round(r[key], 3)
                  for name, r in (("trained", trained), ("untrained", untrained))
                  for key in ("mean_auc_chexpert5", "mean_auc")}}
    print("zero-shot floor figures:", json.dumps(figures))
    # The floor can fail: the same model before training scores below it.
    assert untrained["mean_auc_chexpert5"] < FLOOR_CHEXPERT5, figures
    assert trained["mean_auc_chexpert5"] >= FLOOR_CHEXPERT5, figures
    assert trained["mean_auc"] >= FLOOR_ALL, figures
    assert trained["mean_auc"] >= untrained["mean_auc"] + GAIN_ALL, figures
    assert trained["n_classes_scored"] >= 10, figures
