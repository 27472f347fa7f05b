"""Item 3: a write that fails part way through a shard leaves nothing where readers look, on a local
folder and on S3 (moto), and an older shard of the same name stays whole.

- Local: a process whose file-size limit (RLIMIT_FSIZE) is below the shard's size writes it through
  Store.write_table; the kernel refuses the bytes past the limit (EFBIG) mid-write.
- S3: a proxy forwards the PUT's headers and half its body to moto, then closes both connections
  (every retry too); moto sees a body that ends early.
- A writer killed mid multipart upload leaves an unfinished upload; Store.remove_incomplete aborts it.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability_support import ROOT, files_under
from s3_faults import FaultProxy, MotoServer, Rule

from pairaug_ray.errors import StorageError
from pairaug_ray.io.store import StorageConfig, Store


def _table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)  # incompressible bytes: the shard is as big as its data
    return pa.table({"row_id": [f"r{seed}-{i}" for i in range(rows)],
                     "image_png": [rng.bytes(4096) for _ in range(rows)]})


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def test_local_write_refused_by_the_kernel_mid_shard_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    old = _table(4, seed=1)
    Store(str(out)).write_table("candidates", old, "0123456789abcdef")
    limit = 64 * 1024  # the new shard is ~400 kB: the write fails after 64 kB
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np, pyarrow as pa
        from pairaug_ray.io.store import Store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        rng = np.random.default_rng(2)
        t = pa.table({{"row_id": [f"r{{i}}" for i in range(100)], "image_png": [rng.bytes(4096) for _ in range(100)]}})
        store = Store({str(out)!r})
        for shard in ("0123456789abcdef", "fedcba9876543210"):   # overwrite an old shard; a new one
            try:
                store.write_table("candidates", t, shard)
            except OSError as e:
                print("refused", e.errno)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.split() == ["refused", "27", "refused", "27"], done.stdout + done.stderr  # 27 = EFBIG

    store = Store(str(out))
    assert files_under(str(out)) == ["candidates/0123456789abcdef.parquet"]  # no temporary file left
    assert store.read_table("candidates").equals(old)  # the old shard is whole, not half the new one


@pytest.fixture(scope="module")
def s3():
    """A moto server with a fault proxy in front; yields (moto, proxy, bucket)."""
    import s3fs

    moto = MotoServer().start()
    proxy = FaultProxy(moto.port).start()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.url, "region_name": "eu-west-1"}).mkdir("atomic")
    yield moto, proxy, "atomic"
    proxy.stop()
    moto.stop()


def _direct(moto):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.url, "region_name": "eu-west-1"},
                             use_listings_cache=False)


def test_s3_put_cut_mid_body_leaves_nothing_and_the_old_object_whole(s3):
    moto, proxy, bucket = s3
    storage = StorageConfig(endpoint_url=proxy.url, max_attempts=1)
    store = Store(f"s3://{bucket}/run", storage)
    old = _table(4, seed=1)
    store.write_table("candidates", old, "0123456789abcdef")
    new = _parquet(_table(100, seed=2))

    rule = proxy.add(Rule("cut", method="PUT", path_has="/candidates/"))
    try:
        for shard in ("0123456789abcdef", "fedcba9876543210"):
            with pytest.raises(StorageError, match=rf"writing s3://{bucket}/run/candidates/{shard}.parquet failed"):
                store.write_bytes(f"candidates/{shard}.parquet", new)
    finally:
        proxy.rules.remove(rule)
    cuts = proxy.counts["cut"]
    assert cuts >= 4  # every try of both writes lost half its body

    fs = _direct(moto)
    assert sorted(fs.ls(f"{bucket}/run/candidates")) == [f"{bucket}/run/candidates/0123456789abcdef.parquet"]
    assert store.read_table("candidates").equals(old)
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    print(f"\nFIGURE item3: {cuts} PUTs cut after half their body: 0 objects created, the old shard intact")


def test_s3_unfinished_multipart_upload_is_aborted_by_the_next_run(s3):
    moto, proxy, bucket = s3
    store = Store(f"s3://{bucket}/mpu", StorageConfig(endpoint_url=proxy.url))
    fs = _direct(moto)
    key = "mpu/candidates/0123456789abcdef.parquet"
    # What a writer killed during a multipart upload (shards over 100 MB) leaves: parts, no object.
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
               Body=b"x" * (5 * 2**20))
    assert store.shards("candidates") == []  # no reader sees it ...
    assert store.remove_incomplete() == 1     # ... and the next job's start removes it
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
