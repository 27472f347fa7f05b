"""Shared by the reliability suite: one small studies table and one clean augment run of it.

The faulty runs (tests/reliability/test_*.py) are compared with the clean one pair id by pair id.
``ray_cluster``, ``s3_server`` and ``s3_bucket`` come from tests/conftest.py.
"""

from __future__ import annotations

import pytest
from reliability_support import DEMO, FAST

from pairaug_ray import schema as S
from pairaug_ray.config import load_config
from pairaug_ray.io.store import Store
from pairaug_ray.pipeline import run_augment, run_ingest

# 4 PhantomCXR studies at 32 px, every split augmented: 4 x (1 inter + 2 intra) = 12 candidates,
# 3 batches of 4 per stage.
N_STUDIES = 4


@pytest.fixture(scope="session")
def studies(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel-ingest")
    cfg = load_config(None, [f"ingest.source=phantom://{N_STUDIES}?seed=11", f"ingest.out={out}",
                             "ingest.decode.image_size=32", "ingest.decode.num_cpus=0.25",
                             "ingest.label.num_cpus=0.25", "ingest.write.num_cpus=0.25", "ray.progress_bars=false"])
    assert run_ingest(cfg)["written"] == N_STUDIES
    return str(out)


class CleanRun:
    """An uninterrupted augment run: its folder, manifest and id sets."""

    def __init__(self, out: str, manifest: dict):
        store = Store(out)
        self.out, self.manifest = out, manifest
        self.candidates = sorted(store.read_column(S.CANDIDATES_DIR, "pair_id"))
        self.quarantined = sorted(store.read_column(S.QUARANTINE_DIR, "row_id"))
        self.pairs = sorted(store.read_column(S.PAIRS_DIR, "pair_id"))
        self.planned = len(self.candidates) + len(self.quarantined)


@pytest.fixture(scope="session")
def clean_augment(studies, tmp_path_factory) -> CleanRun:
    out = str(tmp_path_factory.mktemp("rel-clean"))
    manifest = run_augment(load_config(DEMO, [f"augment.studies={studies}", f"augment.out={out}", *FAST]))
    run = CleanRun(out, manifest)
    assert run.planned == 3 * N_STUDIES and len(set(run.candidates)) == len(run.candidates)
    assert run.pairs, "the clean run kept no pair"
    return run
