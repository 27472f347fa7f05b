"""Augmentation planning: each study becomes its InterAug and IntraAug candidates, with the
deterministic ids and seeds that make a job re-runnable and resumable.

Usage::

    planned = studies.map_batches(plan_candidates, batch_format="pandas", fn_kwargs=dict(
        inter_variants=1, intra_variants=2, seed=0, fp=output_fingerprint(...), done=frozenset()))

``pair_id = hash(study row id, branch, variant, config fingerprint, seed)`` (DESIGN.md "Contracts"):
the same study, settings and seed always give the same ids, so a re-run writes nothing new and a
resumed run drops the ids it finds already written (``done``).
"""

from __future__ import annotations

import pandas as pd

from pairaug_ray import __version__
from pairaug_ray.io.store import content_hash
from pairaug_ray.vocab import INTER, INTRA

# The studies-table columns a plan needs (no pixels).
PLAN_COLUMNS = ["row_id", "study_id", "patient_id", "split", "view_position", "report"]


def pair_seed(source_row_id: str, branch: str, variant: int, seed: int) -> int:
    """The sampling seed of one candidate: a 31-bit hash of (study row, branch, variant, job seed)."""
    return int(content_hash([source_row_id, branch, str(variant), str(seed)], n=15), 16) % (2**31 - 1)


def pair_id_of(source_row_id: str, branch: str, variant: int, fp: str, seed: int) -> str:
    """The candidate's id: 24 hex characters of hash(study row, branch, variant, fingerprint, seed)."""
    return content_hash([source_row_id, branch, str(variant), fp, str(seed)], n=24)


def plan_candidates(batch: pd.DataFrame, *, inter_variants: int, intra_variants: int, seed: int, fp: str,
                    done: frozenset = frozenset()) -> pd.DataFrame:
    """Study rows → one row per planned candidate (branch × variant), minus those in ``done``."""
    rows = []
    for study in batch.to_dict("records"):
        for branch, n in ((INTER, inter_variants), (INTRA, intra_variants)):
            for v in range(n):
                s = pair_seed(study["row_id"], branch, v, seed)
                pair_id = pair_id_of(study["row_id"], branch, v, fp, s)
                if pair_id in done:
                    continue
                rows.append({
                    "row_id": pair_id, "pair_id": pair_id, "branch": branch, "variant": v,
                    "seed": s, "source_row_id": study["row_id"], "study_id": study["study_id"],
                    "patient_id": study["patient_id"], "split": study["split"],
                    "view_position": study["view_position"], "report": study["report"],
                    "config_fingerprint": fp, "code_version": __version__, "status": "ok",
                    "error_class": "", "error": "", "stage": "",
                })
    return pd.DataFrame(rows, columns=None if rows else ["row_id", "branch", "status", "error_class",
                                                         "error", "stage"])
