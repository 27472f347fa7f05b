"""Object storage: local folders or ``s3://`` through fsspec, atomic shard writes, run manifests.

Usage::

    store = Store("s3://bucket/run1", StorageConfig(endpoint_url="http://127.0.0.1:5000"))
    store.write_table("studies", table, shard_name)     # atomic: never a half-written shard
    ids = store.read_column("studies", "row_id")       # what a previous run already wrote
    store.write_json("manifest.json", {...})

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / profiles, as
boto does) and are never logged; the endpoint from the config or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import uuid
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict


class StorageConfig(BaseModel):
    """How to reach object storage. Empty fields fall back to the environment."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False

    def storage_options(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        client: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client["endpoint_url"] = endpoint
        region = self.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            client["region_name"] = region
        opts: dict[str, Any] = {"client_kwargs": client} if client else {}
        if self.anon:
            opts["anon"] = True
        # Shards are written by many processes; s3fs's listing cache would hide new ones.
        opts["use_listings_cache"] = False
        return opts


def split_protocol(uri: str) -> tuple[str, str]:
    if "://" in uri:
        proto, path = uri.split("://", 1)
        return proto, path
    return "file", os.path.abspath(uri)


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    proto, path = split_protocol(uri)
    fs = fsspec.filesystem(proto, **(storage or StorageConfig()).storage_options(proto))
    return fs, path.rstrip("/") if proto != "file" else path


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        return f.read()


def content_hash(parts: Iterable[str], n: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


class Store:
    """An output folder (local or s3) holding Parquet tables, one sub-folder each."""

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri = uri.rstrip("/")
        self.storage = storage or StorageConfig()
        self.fs, self.root = filesystem(self.uri, self.storage)
        self.is_local = split_protocol(self.uri)[0] == "file"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        return posixpath.join(self.uri if not self.is_local else self.root, *parts)

    def makedirs(self, *parts: str) -> None:
        if self.is_local:
            os.makedirs(self.path(*parts), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: a reader sees the whole file or nothing (local: rename; S3: one PUT)."""
        dest = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        else:
            self.fs.pipe_file(dest, data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, table_dir: str, table: pa.Table, shard: str) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        rel = posixpath.join(table_dir, f"{shard}.parquet")
        self.write_bytes(rel, buf.getvalue())
        return rel

    def shards(self, table_dir: str) -> list[str]:
        d = self.path(table_dir)
        if not self.fs.exists(d):
            return []
        self.fs.invalidate_cache()
        return sorted(p for p in self.fs.ls(d, detail=False) if p.endswith(".parquet"))

    def read_table(self, table_dir: str, columns: list[str] | None = None) -> pa.Table | None:
        tables = []
        for p in self.shards(table_dir):
            with self.fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    def read_column(self, table_dir: str, column: str) -> list:
        t = self.read_table(table_dir, columns=[column])
        return [] if t is None else t.column(column).to_pylist()

    def shard_uris(self, table_dir: str) -> list[str]:
        proto = split_protocol(self.uri)[0]
        return [p if proto == "file" else f"{proto}://{p}" for p in self.shards(table_dir)]

    def pyarrow_filesystem(self):
        """A pyarrow filesystem for ``ray.data.read_parquet(..., filesystem=...)``."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return None if self.is_local else PyFileSystem(FSSpecHandler(self.fs))

    def ray_dataset(self, table_dir: str, columns: list[str] | None = None):
        """A streaming Ray Dataset over a table's shards (None when the table is empty)."""
        import ray.data

        paths = self.shards(table_dir)
        if not paths:
            return None
        ds = ray.data.read_parquet(paths, filesystem=self.pyarrow_filesystem())
        return ds.select_columns(columns) if columns else ds
