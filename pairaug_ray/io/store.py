"""Object storage: local folders or ``s3://`` through fsspec, atomic shard writes, run manifests.

Usage::

    store = Store("s3://bucket/run1", StorageConfig(endpoint_url="http://127.0.0.1:5000"))
    store.write_table("studies", table, shard_name)     # atomic: never a half-written shard
    ids = store.read_column("studies", "row_id")       # what a previous run already wrote
    store.write_json("manifest.json", {...})

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / profiles, as
boto does) and are never logged; the endpoint from the config or ``AWS_ENDPOINT_URL``.

Atomicity: a local file is written to ``<name>.tmp-<uuid>`` beside it and renamed over it
(``os.replace``); the temporary file is removed if the write fails. An S3 object is one PUT
(objects under 100 MB) or a multipart upload (larger; s3fs aborts it on failure): S3 shows either
the whole object or nothing. ``Store.remove_incomplete`` clears what a killed writer left behind
(temporary files; unfinished multipart uploads), which no reader lists.

Retries: each S3 request is tried up to ``StorageConfig.max_attempts`` times by botocore with
exponential backoff (connection errors, timeouts, throttling such as 503 SlowDown, 500/502/504);
s3fs adds a few tries of its own on throttling and broken reads. When they run out, a remote
operation raises ``errors.StorageError`` naming the operation, the object and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import uuid
from typing import Any, Iterable, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray.errors import StorageError

log = logging.getLogger(__name__)

_TMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{32}$")  # Store.write_bytes' temporary files


class StorageConfig(BaseModel):
    """How to reach object storage. Empty fields fall back to the environment."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    max_attempts: int = Field(10, ge=1, description="tries per S3 request (botocore retries connection "
                              "errors, timeouts, throttling such as 503 SlowDown and 500/502/504 with "
                              "exponential backoff); then the operation raises StorageError")
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore retry mode: standard (backoff, at most 20 s a wait) or "
        "adaptive (also slows its own request rate when throttled)")
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds to open a connection to S3")
    read_timeout_s: float = Field(60.0, gt=0, description="seconds to wait for S3 to answer")

    def storage_options(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for ``protocol`` (s3: endpoint, region, retries, timeouts)."""
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
        opts["config_kwargs"] = {"retries": {"max_attempts": self.max_attempts, "mode": self.retry_mode},
                                 "connect_timeout": self.connect_timeout_s,
                                 "read_timeout": self.read_timeout_s}
        return opts


class ObjectTooLargeError(ValueError):
    """``read_bytes(..., max_bytes=N)`` found an object longer than N bytes (it read N + 1)."""

    def __init__(self, uri: str, max_bytes: int):
        super().__init__(f"{uri} is longer than {max_bytes} bytes")
        self.max_bytes = max_bytes


def _is_remote(uri: str) -> bool:
    return split_protocol(uri)[0] != "file"


@contextlib.contextmanager
def _remote_errors(what: str, uri: str, storage: "StorageConfig", remote: bool = True):
    """Turns a remote operation's failure (after botocore's and s3fs's retries) into StorageError.

    A missing object stays ``FileNotFoundError``; local paths raise what the OS raised."""
    if not remote:
        yield
        return
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except Exception as exc:  # noqa: BLE001 - filtered below: only I/O and client failures
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, BotoCoreError, ClientError)):
            raise
        cause = exc if isinstance(exc, ClientError) else exc.__cause__
        code = cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
        raise StorageError(
            f"{what} {uri} failed: {type(exc).__name__}: {exc}{f' (S3 error {code})' if code else ''}; "
            f"each S3 request was tried up to storage.max_attempts={storage.max_attempts} times") from exc


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


def read_bytes(uri: str, storage: StorageConfig | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of ``uri``. With ``max_bytes``, at most ``max_bytes + 1`` bytes are read and a
    longer object raises ``ObjectTooLargeError`` (a 50 MB "report" costs one short read).

    Raises ``FileNotFoundError``; for remote objects ``StorageError`` once retries run out."""
    storage = storage or StorageConfig()
    with _remote_errors("reading", uri, storage, _is_remote(uri)):
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLargeError(uri, max_bytes)
    return data


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
        """Atomic write: a reader sees the whole file or nothing (local: temporary file + rename,
        removed on failure; S3: one PUT, or a multipart upload that s3fs aborts on failure).

        Raises what the OS raised (local) or ``StorageError`` (S3, after retries)."""
        dest = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            with self._errors("writing", rel):
                self.fs.pipe_file(dest, data)

    def _errors(self, what: str, rel: str = ""):
        return _remote_errors(what, self.uri_of(rel) if rel else self.uri, self.storage, not self.is_local)

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("reading", rel), self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        with self._errors("looking up", rel):
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
        """Paths of a table's Parquet shards (temporary files of writes in flight are not listed)."""
        d = self.path(table_dir)
        with self._errors("listing", table_dir):
            if not self.fs.exists(d):
                return []
            self.fs.invalidate_cache()
            return sorted(p for p in self.fs.ls(d, detail=False) if p.endswith(".parquet"))

    def read_table(self, table_dir: str, columns: list[str] | None = None) -> pa.Table | None:
        tables = []
        for p in self.shards(table_dir):
            with self._errors("reading", posixpath.relpath(p, self.root)), self.fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    def remove_incomplete(self) -> int:
        """Removes what writers killed mid-write left under this folder: local temporary files
        (``*.tmp-<uuid>``) or unfinished S3 multipart uploads. No reader lists either; call it when
        a job starts, while no other job writes to the folder. Returns how many were removed."""
        removed = 0
        if self.is_local:
            for folder, _, names in os.walk(self.root):
                for name in names:
                    if _TMP_SUFFIX.search(name):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(os.path.join(folder, name))
                            removed += 1
        else:
            bucket, _, prefix = self.root.partition("/")
            with self._errors("listing unfinished uploads under"):
                try:
                    answer = self.fs.call_s3("list_multipart_uploads", Bucket=bucket,
                                             Prefix=prefix.rstrip("/") + "/" if prefix else "")
                except FileNotFoundError:  # no bucket yet: nothing was left behind
                    return 0
                for up in answer.get("Uploads", []):
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"],
                                    UploadId=up["UploadId"])
                    removed += 1
        if removed:
            log.info("removed %d leftovers of interrupted writes under %s", removed, self.uri)
        return removed

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
