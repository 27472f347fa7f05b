"""Labeling stage: the rule-based CheXpert-style labeler over each study's report.

Usage::

    ds = ds.map_batches(LabelStage, **LabelConfig().map_batches_kwargs(LabelStage))

Adds ``labels`` ({observation: 1/0/-1} as JSON) and ``findings`` (with laterality and severity).
Reports shorter than ``min_words`` words become ``report_too_short`` error rows, as the reference
drops them.
"""

from __future__ import annotations

import json

from pydantic import Field

from pairaug_ray.labeler import findings_to_json, label_report, label_states
from pairaug_ray.stages.base import RowStage, StageConfig, StageError


class LabelConfig(StageConfig):
    min_words: int = Field(3, ge=0)
    batch_size: int = 64
    num_cpus: float = 0.25


class LabelStage(RowStage):
    name = "label"

    def __init__(self, config: LabelConfig):
        super().__init__(config)
        self.cfg = config

    def process(self, rows: list[dict]) -> list:
        out = []
        for row in rows:
            text = row.get("report") or ""
            if len(text.split()) < self.cfg.min_words:
                out.append(StageError("report_too_short",
                                      f"report has {len(text.split())} words (< {self.cfg.min_words})"))
                continue
            found = label_report(text)
            out.append([{**row, "labels": json.dumps(label_states(found), sort_keys=True),
                         "findings": findings_to_json(found)}])
        return out
