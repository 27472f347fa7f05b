"""Item 4: S3 trouble during `pairaug augment` writing to s3:// (moto behind a fault proxy).

One folder, two runs of the same command:

Both with ``storage.max_attempts=5`` (tries per S3 request, botocore's standard mode):

1. From the 2nd candidates shard on, S3 answers 500 InternalError to every request: the command
   stops with a clear error (exit 3, ``storage error: writing s3://... failed ... tried up to
   storage.max_attempts=5 times``), and every object written before is whole.
2. The same command, with S3 back but throttling (2 x 503 SlowDown, 2 x 500 InternalError: fewer in
   a row than the tries a request gets) and then the moto server stopped for 3 s as the next
   candidates shard is PUT, and started again: every request is retried with backoff and the run
   finishes the work with the clean run's candidates and pairs.
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability_support import augment_args, id_multiset
from s3_faults import FaultProxy, MotoServer, Rule

from pairaug_ray import schema as S
from pairaug_ray.cli import main as cli_main
from pairaug_ray.io.store import StorageConfig, Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
BUCKET = "pairaug-faults"


@pytest.fixture(scope="module")
def s3env():
    import s3fs

    moto = MotoServer().start()
    proxy = FaultProxy(moto.port).start()
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.url, "region_name": "eu-west-1"}).mkdir(BUCKET)
    yield moto, proxy
    proxy.stop()
    moto.stop()


def _objects(moto, prefix: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.url, "region_name": "eu-west-1"},
                           use_listings_cache=False)
    return {p: fs.cat_file(p) for p in fs.find(f"{BUCKET}/{prefix}")}


def _settled(read, quiet_s: float = 3.0, timeout_s: float = 60.0):
    """``read()`` once it has returned the same value for ``quiet_s``: batches already running in
    other actors when the job failed may still land (whole) a moment after the driver gave up."""
    last, since, deadline = read(), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def _on_nth_shard_put(prefix: str, n: int, action) -> callable:
    """A proxy hook calling ``action()`` once, as the n-th PUT of a candidates shard arrives."""
    seen = [0]

    def hook(method: str, path: str) -> None:
        if method == "PUT" and f"/{prefix}/candidates/" in path:
            seen[0] += 1
            if seen[0] == n:
                action()
    return hook


def test_s3_failing_is_a_clear_error_then_throttling_and_an_outage_are_retried_to_the_end(
        studies, clean_augment, s3env, capsys):
    moto, proxy = s3env
    out = f"s3://{BUCKET}/augment"
    storage = StorageConfig(endpoint_url=moto.url)  # the tests' own view, past the proxy

    # 1. S3 failing for good from the 2nd shard on: a clear error, nothing half-written.
    args = augment_args(studies, out, f"storage.endpoint_url={proxy.url}", "storage.max_attempts=5")
    broken = Rule("internal", path_has="/augment")
    proxy.on_request = _on_nth_shard_put("augment", 2, lambda: proxy.add(broken))
    capsys.readouterr()
    try:
        rc = cli_main(args)
    finally:
        proxy.on_request = None
        proxy.clear()
    err = capsys.readouterr().err
    assert rc == 3, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("pairaug augment: storage error:"))
    assert f"s3://{BUCKET}/augment/" in line and "InternalError" in line
    assert "storage.max_attempts=5" in line and "run the same command again" in line
    for key, data in _objects(moto, "augment").items():
        if key.endswith(".parquet"):
            pq.read_metadata(pa.BufferReader(data))
        else:
            json.loads(data)
    committed = _settled(lambda: id_multiset(out, storage))
    assert committed and len(set(committed)) == len(committed) < clean_augment.planned

    # 2. The same command while S3 goes down for 3 s mid-run, then throttles: retried to the end.
    #    The outage starts as the first candidates PUT arrives, so that request meets it (with the
    #    throttling rules first, their 4 answers could outlast the 3 s and no request met it); the
    #    rules start when S3 is back. max_attempts 10 (the default): one request may meet the
    #    outage and then all 4 rules.
    restarted = threading.Event()

    def back_up():
        proxy.add(Rule("slowdown", path_has="/augment", times=2))
        proxy.add(Rule("internal", path_has="/augment", times=2))
        moto.start()
        restarted.set()

    def outage():
        moto.stop()
        threading.Timer(3.0, back_up).start()

    proxy.on_request = _on_nth_shard_put("augment", 1, outage)
    before = dict(proxy.counts)
    args = augment_args(studies, out, f"storage.endpoint_url={proxy.url}", "storage.max_attempts=10")
    try:
        rc = cli_main(args)
    finally:
        proxy.on_request = None
        proxy.clear()
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert restarted.wait(30)
    counts = {k: proxy.counts[k] - before.get(k, 0) for k in ("slowdown", "internal", "down")}
    assert counts["slowdown"] == 2 and counts["internal"] == 2
    assert counts["down"] >= 1, "no request met the outage"
    manifest = json.loads(captured.out.strip().splitlines()[-1])
    assert manifest["skipped_already_written"] >= len(committed)
    got = id_multiset(out, storage)
    assert got == sorted(clean_augment.candidates + clean_augment.quarantined)
    assert sorted(Store(out, storage).read_column(S.PAIRS_DIR, "pair_id")) == clean_augment.pairs
    print(f"\nFIGURE item4b: S3 answering 500 from the 2nd shard on: exit 3 with '{line}'; "
          f"{len(committed)} candidates committed, every object whole")
    print(f"FIGURE item4a: the same command through moto stopped 3 s mid-run ({counts['down']} requests "
          f"met the outage), then 2 x 503 SlowDown + 2 x 500 InternalError, wrote the other "
          f"{clean_augment.planned - len(committed)}: 0 lost, 0 duplicated of {len(got)} candidates")


