"""Writing stage: each batch becomes one Parquet shard of good rows + one of quarantined rows.

Usage::

    cfg = WriteConfig(out="s3://bucket/run1", table="studies", schema_name="study")
    summary = ds.map_batches(WriteStage, **cfg.map_batches_kwargs(WriteStage))

Shards are named by a hash of the row ids they hold and written atomically, so a retried batch
rewrites the same file and a crash never leaves half a shard. The stage returns one small summary
row per input row (``row_id``, ``status``, ``error_class`` + ``summary_columns``) — the pixels stay
in storage, so the driver can count and show progress without pulling images back.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
from pydantic import Field

from pairaug_ray import schema as S
from pairaug_ray.io.store import StorageConfig, Store, content_hash
from pairaug_ray.stages.base import STATUS_ERROR, TIMING_PREFIX, StageConfig

SUMMARY_BASE = ["row_id", "status", "error_class", "stage"]


class WriteConfig(StageConfig):
    out: str
    storage: StorageConfig = Field(default_factory=StorageConfig)
    table: str = S.STUDIES_DIR
    quarantine_table: str = S.QUARANTINE_DIR
    schema_name: str = "study"
    summary_columns: list[str] = Field(default_factory=list)
    batch_size: int = 64
    num_cpus: float = 0.25


def _to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    cols = {}
    for field in schema:
        if field.name in frame.columns:
            values = frame[field.name].tolist()
        else:
            values = [None] * len(frame)
        cols[field.name] = pa.array(values, type=field.type, from_pandas=True)
    return pa.table(cols, schema=schema)


class WriteStage:
    name = "write"

    def __init__(self, config: WriteConfig):
        self.cfg = config
        self.store = Store(config.out, config.storage)
        self.schema = S.TABLE_SCHEMAS[config.schema_name]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if "status" not in batch.columns:
            batch = batch.assign(status="ok", error_class="", error="", stage="")
        bad = (batch["status"] == STATUS_ERROR).to_numpy()
        good = batch[~bad]
        errors = batch[bad]
        if len(good):
            table = _to_table(good, self.schema)
            self.store.write_table(self.cfg.table, table, content_hash(sorted(good["row_id"].astype(str))))
        if len(errors):
            qtable = _to_table(errors, S.QUARANTINE_SCHEMA)
            self.store.write_table(self.cfg.quarantine_table, qtable,
                                   content_hash(sorted(errors["row_id"].astype(str))))
        cols = [c for c in batch.columns
                if c in SUMMARY_BASE or c in self.cfg.summary_columns or c.startswith(TIMING_PREFIX)]
        return batch[cols].reset_index(drop=True)
