"""Item 2: the driver is killed (SIGKILL, with its Ray cluster) after some pairs are committed, and a
writer is killed between writing a shard and renaming it; the same command then finishes the work and
the output folder holds nothing but the tables, the manifest and run.json.

The WriteStage actor of the killed run stalls after its first shard (fault_hooks, ``sleep_s``), so
the kill lands with exactly that shard committed, however fast the machine.

The killed command runs as its own process with its own Ray cluster (killed together, as a lost
head node); the re-run is the same command line through ``pairaug_ray.cli.main`` in the test's
process (on the session's cluster: a process start saved, nothing of the first run reused).
tests/ray/test_augment.py::test_kill_and_resume_matches_clean_run resumes through run_augment; this
one also audits every file of the folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from fault_hooks import job_config_env
from reliability_support import ROOT, Command, augment_args, files_under, id_multiset, wait_for

from pairaug_ray import schema as S
from pairaug_ray.cli import main as cli_main
from pairaug_ray.io.store import Store

pytestmark = pytest.mark.slow

# What an augment folder may hold (report=false here): the tables' shards, and at its top level the
# job's JSON records (manifest.json, run.json and the like), each a whole JSON document.
ALLOWED = re.compile(r"^(candidates|pairs|quarantine)/[0-9a-f]{16}\.parquet$|^[a-z_]+\.json$")


def _kill_a_writer_mid_write(out: str, tmp_path) -> str:
    """A process writes a shard through Store.write_bytes and is SIGKILLed after the bytes are in
    its temporary file and before the rename (its fsync never returns). Returns the leftover."""
    shard = next(f for f in os.listdir(os.path.join(out, S.CANDIDATES_DIR)) if f.endswith(".parquet"))
    script = textwrap.dedent(f"""
        import os, time
        from pairaug_ray.io.store import Store
        data = open({os.path.join(out, S.CANDIDATES_DIR, shard)!r}, "rb").read()
        def stalled(fd):
            print("writing", flush=True)
            time.sleep(3600)
        os.fsync = stalled
        Store({out!r}).write_bytes("candidates/ffffffffffffffff.parquet", data)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.kill()
    finally:
        child.wait(30)
    leftovers = [f for f in files_under(out) if ".tmp-" in f]
    assert len(leftovers) == 1, leftovers
    return leftovers[0]


def test_driver_killed_then_same_command_finishes_with_no_orphans(studies, clean_augment, tmp_path, capsys):
    out = str(tmp_path / "augment")
    args = augment_args(studies, out)
    stall = [{"target": "pairaug_ray.stages.write.WriteStage", "batch": 1, "when": "after", "sleep_s": 600,
              "marker": str(tmp_path / "write.stalled")}]
    first = Command(args, str(tmp_path / "killed"), env=job_config_env(stall)).start()
    try:
        wait_for(lambda: first.proc.poll() is not None or (tmp_path / "write.stalled").exists(), 600,
                 "a committed candidates shard")
        assert first.proc.poll() is None, "the job finished before it could be killed:\n" + first.stderr[-3000:]
        first.kill()  # the driver and every process of its Ray cluster, SIGKILL
    finally:
        first.cleanup()
    committed = id_multiset(out)
    assert committed and len(committed) < clean_augment.planned
    leftover = _kill_a_writer_mid_write(out, tmp_path)

    capsys.readouterr()
    rc = cli_main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-4000:]
    manifest = json.loads(captured.out.strip().splitlines()[-1])

    # The work: every planned candidate once, the same kept pairs as the clean run.
    got = id_multiset(out)
    assert len(got) == len(set(got)), "a pair id was written twice"
    assert got == sorted(clean_augment.candidates + clean_augment.quarantined)
    store = Store(out)
    assert sorted(store.read_column(S.PAIRS_DIR, "pair_id")) == clean_augment.pairs
    assert manifest["skipped_already_written"] == len(committed)

    # No orphans: every file is a shard of a table, the manifest or run.json; the leftover of the
    # killed writer is gone; the manifest's counts are the tables' rows.
    files = files_under(out)
    assert leftover not in files
    assert [f for f in files if not ALLOWED.match(f)] == []
    for f in files:
        if f.endswith(".json"):
            with open(os.path.join(out, f)) as fh:
                json.load(fh)
    rows = {t: sum(pq.read_metadata(os.path.join(out, f)).num_rows for f in files if f.startswith(t + "/"))
            for t in (S.CANDIDATES_DIR, S.PAIRS_DIR, S.QUARANTINE_DIR)}
    assert rows[S.CANDIDATES_DIR] == sum(b["candidates"] for b in manifest["branches"].values())
    assert rows[S.PAIRS_DIR] == manifest["pairs_total"]
    assert rows[S.QUARANTINE_DIR] == sum(manifest["errors_by_stage_class"].values())
    print(f"\nFIGURE item2: driver SIGKILLed after {len(committed)} of {clean_augment.planned} candidates "
          f"committed + a writer killed before its rename; the same command wrote the other "
          f"{clean_augment.planned - len(committed)}: 0 lost, 0 duplicated, 0 orphan files "
          f"({len(files)} files: table shards + the job's JSON records)")
