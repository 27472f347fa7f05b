"""benchmarks/t2i_train.py --enrich: the enriched training split docs/t2i.md's runs X1-X8 use."""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from benchmarks.t2i_train import enrich_studies  # noqa: E402
from pairaug_ray import schema as S  # noqa: E402
from pairaug_ray.io.store import Store  # noqa: E402


def _ptx(state, side=None, severity=None):
    return json.dumps({"Pneumothorax": {"observation": "Pneumothorax", "state": state, "laterality": side,
                                        "severity": severity, "evidence": ""}})


def _pool(tmp_path):
    rows = []
    # 4 moderate/large (kept), 2 small and 1 uncertain (not what the probe asks for), 1 in test
    for i, (split, f) in enumerate([
            ("train", _ptx(1, "left", "moderate")), ("train", _ptx(1, "right", "severe")),
            ("train", _ptx(1, "left", "severe")), ("train", _ptx(1, "right", "moderate")),
            ("train", _ptx(1, "left", "mild")), ("train", _ptx(1, "right", "mild")),
            ("train", _ptx(-1, "left", "moderate")), ("test", _ptx(1, "left", "severe"))]
            + [("train", _ptx(0))] * 12 + [("train", None)] * 4):
        rows.append({"row_id": f"r{i}", "split": split, "findings": f})
    pool = str(tmp_path / "pool")
    Store(pool).write_table(S.STUDIES_DIR, pa.Table.from_pylist(rows), "p0")
    return pool


def test_enrich_keeps_every_probe_positive_and_fills_with_other_training_rows(tmp_path):
    pool, out = _pool(tmp_path), str(tmp_path / "enriched")
    info = enrich_studies(pool, out, "Pneumothorax", 10)
    ids = Store(out).read_column(S.STUDIES_DIR, "row_id")
    assert len(ids) == len(set(ids)) == 10 == info["rows"]
    assert {"r0", "r1", "r2", "r3"} <= set(ids) and "r7" not in ids      # test split left out
    assert info["positives"]["left/moderate"] == 1 and info["positives"]["right/severe"] == 1
    again = enrich_studies(pool, str(tmp_path / "again"), "Pneumothorax", 10)
    assert again["positives"] == info["positives"]
    assert sorted(Store(str(tmp_path / "again")).read_column(S.STUDIES_DIR, "row_id")) == sorted(ids)
    exact = enrich_studies(pool, str(tmp_path / "exact"), "Pneumothorax", 4)   # no room for others
    assert sorted(Store(str(tmp_path / "exact")).read_column(S.STUDIES_DIR, "row_id")) == ["r0", "r1", "r2", "r3"]
    assert sum(exact["positives"].values()) == 4
    with pytest.raises(ValueError, match="more than --enrich-rows 3"):
        enrich_studies(pool, str(tmp_path / "small"), "Pneumothorax", 3)
