"""Item 1: stage actors exit abruptly (os._exit) mid-job; the run finishes with nothing lost or doubled.

`pairaug augment` runs as its own process with its own Ray cluster; fault_hooks (Ray's
worker_process_setup_hook) makes the GenerateStage actor exit as its 2nd batch arrives and the
WriteStage actor exit right after it has written its 2nd shard, before it answers: the worst moment,
work persisted but not acknowledged. Ray Data restarts the actors and resubmits their batches;
shards are named by the hash of the ids they hold, so the rewritten shard replaces the first one.
"""

from __future__ import annotations

import os

import pytest
from fault_hooks import job_config_env
from reliability_support import augment_args, files_under, id_multiset, run_command

from pairaug_ray import schema as S
from pairaug_ray.io.store import Store

pytestmark = pytest.mark.slow


def test_actor_killed_mid_job_loses_and_duplicates_nothing(studies, clean_augment, tmp_path):
    out = str(tmp_path / "augment")
    generate_fired, write_fired = tmp_path / "generate.fired", tmp_path / "write.fired"
    faults = [
        {"target": "pairaug_ray.stages.generate.GenerateStage", "batch": 2, "when": "before",
         "marker": str(generate_fired)},
        {"target": "pairaug_ray.stages.write.WriteStage", "batch": 2, "when": "after",
         "marker": str(write_fired)},
    ]
    cmd = run_command(augment_args(studies, out), str(tmp_path / "cmd"), timeout=600, **job_config_env(faults))
    cmd.cleanup()
    assert cmd.proc.returncode == 0, cmd.stderr[-4000:]

    # Both faults fired, each once, in processes other than the driver.
    pids = {int(p.read_text()) for p in (generate_fired, write_fired)}
    assert len(pids) == 2 and cmd.proc.pid not in pids

    got = id_multiset(out)
    assert len(got) == len(set(got)), "a pair id was written twice"
    assert got == sorted(clean_augment.candidates + clean_augment.quarantined), "lost or extra pair ids"
    store = Store(out)
    assert sorted(store.read_column(S.CANDIDATES_DIR, "pair_id")) == clean_augment.candidates
    assert sorted(store.read_column(S.PAIRS_DIR, "pair_id")) == clean_augment.pairs
    assert not [f for f in files_under(out) if ".tmp-" in f]
    print(f"\nFIGURE item1: generate actor killed at its batch 2, write actor killed after its shard 2: "
          f"{len(clean_augment.candidates) + len(clean_augment.quarantined) - len(set(got))} lost, "
          f"{len(got) - len(set(got))} duplicated of {len(got)} candidates; "
          f"{len(store.read_column(S.PAIRS_DIR, 'pair_id'))} kept pairs = the clean run's")
    assert os.path.exists(os.path.join(out, S.MANIFEST_FILE))
