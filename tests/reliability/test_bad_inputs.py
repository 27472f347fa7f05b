"""Item 5: a source mixing good studies with one input of every bad kind ingest knows (bad_inputs.py).

Every good study is written, every bad one quarantined with its class; the command exits 0 while the
bad share stays within ``ingest.max_bad_fraction`` and 1, with a summary by class, above it. A 50 MB
report costs one capped read (``decode.max_report_bytes``), not 50 MB of memory.
"""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pandas as pd
import pytest
from bad_inputs import FIFTY_MB, N_GOOD, build_source, cases

from pairaug_ray.cli import main as cli_main
from pairaug_ray.errors import DECODE_ERROR_CLASSES
from pairaug_ray.io.sources import list_items
from pairaug_ray.io.store import Store
from pairaug_ray.pipeline import NOT_DEFECTS
from pairaug_ray.stages.decode import DecodeConfig, DecodeStage

# Classes that stages other than decode's image reader give (decode: reports and views; label).
OTHER_CLASSES = {"missing_report", "report_too_short", "report_too_long", "non_frontal_view"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad-source"))
    return root, build_source(root)


def _study(uri: str) -> str:
    return uri.rstrip("/").split("/")[-2]


def test_the_cases_cover_every_class():
    classes = {cls for *_, cls in cases().values() if cls}
    assert classes == set(DECODE_ERROR_CLASSES) | OTHER_CLASSES


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_good_written_bad_quarantined_by_class_and_the_bad_share_sets_the_exit(source, tmp_path, capsys):
    root, expected = source
    out = str(tmp_path / "ingest")
    args = ["ingest", root, "--out", out, "ingest.decode.image_size=32", "ingest.decode.num_cpus=0.25",
            "ingest.decode.batch_size=8", "ingest.label.num_cpus=0.25", "ingest.write.num_cpus=0.25",
            "ray.progress_bars=false"]
    t0 = time.perf_counter()
    rc = cli_main(args)
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    manifest = json.loads(captured.out.strip().splitlines()[-1])

    store = Store(out)
    written = {_study(u) for u in store.read_column("studies", "source_uri")}
    quarantine = store.read_table("quarantine", columns=["source_uri", "error_class", "stage"]).to_pylist()
    got = {_study(r["source_uri"]): r["error_class"] for r in quarantine}
    assert written == {s for s, cls in expected.items() if cls is None}
    assert got == {s: cls for s, cls in expected.items() if cls is not None}
    assert len(quarantine) == len(got)  # one row per bad input

    bad = {cls: n for cls, n in pd.Series([c for c in expected.values() if c]).value_counts().items()
           if cls not in NOT_DEFECTS}
    total = len(expected)
    assert manifest["bad_by_class"] == dict(sorted(bad.items()))
    assert manifest["bad_fraction"] == round(sum(bad.values()) / total, 4) <= manifest["max_bad_fraction"]
    assert manifest["too_many_bad"] is False
    texts = dict(zip((_study(u) for u in store.read_column("studies", "source_uri")),
                     store.read_column("studies", "report")))
    assert any("Caf\u00e9-au-lait" in t and "\u00b1" in t for t in texts.values())  # cp1252 read right

    # The same source judged with a lower limit: nothing is redone, the exit is 1 with a summary.
    assert cli_main([*args, "ingest.max_bad_fraction=0.25"]) == 1
    captured = capsys.readouterr()
    again = json.loads(captured.out.strip().splitlines()[-1])
    assert again["skipped_already_written"] == total and again["too_many_bad"] is True
    summary = captured.err.strip().splitlines()[-1]
    assert summary.startswith(f"pairaug ingest: {sum(bad.values())} of {total} inputs")
    assert "ingest.max_bad_fraction=0.25" in summary
    for cls, n in bad.items():
        assert f"{cls} {n}" in summary
    print(f"\nFIGURE item5: {N_GOOD + 2} good + {total - N_GOOD - 2} bad inputs ({len(set(got.values()))} "
          f"classes) in {seconds:.0f} s: {len(written)} written, {len(got)} quarantined, each with its class; "
          f"bad share {manifest['bad_fraction']:.2f}: exit 0 at limit 0.5, exit 1 at 0.25")


def test_a_50_mb_report_costs_one_capped_read(source):
    root, _ = source
    [item] = [it for it in list_items(root) if os.path.basename(it["image_uri"]).startswith("report_50_mb")]
    assert os.path.getsize(item["report_uri"]) >= FIFTY_MB
    stage = DecodeStage(DecodeConfig(image_size=32))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = stage(pd.DataFrame([item]))
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.iloc[0]["error_class"] == "report_too_long"
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB: the report was read whole"
    assert seconds < 10
    print(f"\nFIGURE item5b: 50 MB report quarantined as report_too_long; decode peak "
          f"{peak / 2**20:.1f} MiB, {seconds * 1000:.0f} ms")
