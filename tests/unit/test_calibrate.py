"""The InterAug threshold calibrated on real pairs: a quantile of matched cosines, with the scorer's
ability to tell matched from mismatched pairs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pairaug_ray import schema as S
from pairaug_ray.io.dicom import encode_png
from pairaug_ray.io.store import Store
from pairaug_ray.train.calibrate import calibrate_inter_threshold


def _studies(tmp_path, n=12, split="train"):
    rng = np.random.default_rng(0)
    rows = [{c: None for c in S.STUDY_COLUMNS} | {
        "row_id": f"r{i}", "split": split, "report": f"Study {i}: small left pleural effusion.",
        "image_png": encode_png(rng.random((32, 32)).astype(np.float32), bits=16)} for i in range(n)]
    Store(str(tmp_path)).write_table(S.STUDIES_DIR, pa.Table.from_pylist(rows, schema=S.STUDY_SCHEMA), "p0")
    return str(tmp_path)


def test_threshold_is_the_quantile_of_matched_cosines(tmp_path):
    studies = _studies(tmp_path)
    lo = calibrate_inter_threshold("tiny://vlp?seed=0&image_size=32", studies, quantile=0.1)
    hi = calibrate_inter_threshold("tiny://vlp?seed=0&image_size=32", studies, quantile=0.9)
    assert lo["n_pairs"] == 12 and -1.0 <= lo["threshold"] < hi["threshold"] <= 1.0
    assert 0.0 <= lo["auc"] <= 1.0 and lo == calibrate_inter_threshold(
        "tiny://vlp?seed=0&image_size=32", studies, quantile=0.1)        # deterministic


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no studies table"):
        calibrate_inter_threshold("tiny://vlp?seed=0", str(tmp_path / "none"))
    studies = _studies(tmp_path, n=6, split="test")
    with pytest.raises(ValueError, match="split 'train' has 0 rows"):
        calibrate_inter_threshold("tiny://vlp?seed=0", studies)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_inter_threshold("tiny://vlp?seed=0", studies, split="test", quantile=1.5)
