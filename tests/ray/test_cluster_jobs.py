"""Jobs on a real cluster: a Ray head started with `ray start --head` (its own ports, temp dir and
auth token), the README's "Run on a cluster" `ray job submit` commands run as written (ingest with
`section.key=value` overrides in the docstring's form, then augment with the demo config, no
`ray.num_cpus=null`), and Ray 2.60's token auth: a client without `RAY_AUTH_MODE=token` is refused.

The head is this test's own: started with `--block` in a new process group, stopped by signalling
that group and then any process left that names this test's temp dir (never `ray stop`, which
would kill every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pairaug_ray import schema as S
from pairaug_ray.io.store import Store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README_ADDRESS = "http://127.0.0.1:8265"
README_OUT = "/tmp/pairaug-cluster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_submit_commands() -> list[str]:
    """The `ray job submit ...` commands of the README's "Run on a cluster" section (continuation
    lines joined), in order."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Run on a cluster\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Run on a cluster' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.startswith("ray job submit")]


def _pids_naming(marker: str) -> list[int]:
    """PIDs of this user's processes whose command line contains ``marker`` (our temp dir)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(entry.name))
    return out


class Head:
    """A `ray start --head --block` process group of our own, with its own ports and token."""

    def __init__(self, root: Path):
        self.root = root
        self.token_file = root / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # The token exists and RAY_AUTH_MODE is unset: `ray start` turns token auth on by itself, as
        # it does on any machine where ~/.ray/auth_token exists (every local ray.init() writes one).
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        self.env.update(RAY_AUTH_TOKEN_PATH=str(self.token_file), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                        PYTHONUNBUFFERED="1")
        base = random.randrange(20000, 29000, 100)   # worker ports apart from other Rays' 10002-19999
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={_free_port()}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={root / 'ray'}",
               f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
               f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", f"--min-worker-port={base}",
               f"--max-worker-port={base + 99}", "--disable-usage-stats"]
        self.log = open(root / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=root)

    def wait_ready(self, timeout_s: float = 150) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.head_log()}")
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=5)
                return
            except urllib.error.HTTPError:
                return                         # the dashboard answers (401 is an answer)
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"no dashboard at {self.address} after {timeout_s} s:\n{self.head_log()}")

    def head_log(self) -> str:
        return (self.root / "head.log").read_text(errors="replace")[-4000:]

    def client_env(self, auth: bool = True) -> dict:
        env = {k: v for k, v in self.env.items() if k != "RAY_AUTH_MODE"}
        if auth:
            env["RAY_AUTH_MODE"] = "token"
        return env

    def stop(self) -> None:
        """SIGTERM our process group, then SIGKILL it and every process naming our temp dir."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for _ in range(3):
            pids = _pids_naming(str(self.root))
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(1)
        self.log.close()


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="prj", dir="/tmp"))  # short: Ray's socket paths must fit
    h = Head(root)
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()
        left = _pids_naming(str(root))
        if not left:
            shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of our head still alive: {left}"


def _submit(head: Head, command: str, out_root: Path, timeout_s: float) -> tuple[str, str]:
    """Run a README `ray job submit` command against ``head``; returns (submission id, output)."""
    cmd = command.replace(README_ADDRESS, head.address).replace(README_OUT, str(out_root))
    argv = shlex.split(cmd)
    argv[0] = str(BIN / "ray")
    try:
        res = subprocess.run(argv, cwd=REPO, env=head.client_env(), capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"job did not finish in {timeout_s} s: {cmd}\n{(exc.stdout or b'')[-3000:]!r}")
    out = res.stdout + res.stderr
    found = re.search(r"(raysubmit_\w+)", out)
    assert found, out[-3000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", found.group(1), "--address", head.address],
                            cwd=REPO, env=head.client_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "succeeded" in status.stdout.lower(), f"{cmd}\n{status.stdout}\n{out[-4000:]}"
    logs = out
    return found.group(1), logs


def test_token_auth_is_required_by_the_job_api(head):
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.address], cwd=REPO,
                             env=head.client_env(auth=False), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr or "401" in refused.stdout + refused.stderr
    allowed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.address], cwd=REPO,
                             env=head.client_env(auth=True), capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_readme_jobs_run_on_an_existing_cluster(head, tmp_path):
    commands = readme_submit_commands()
    assert [c for c in commands if "jobs.ingest" in c] and [c for c in commands if "jobs.augment" in c]
    ingest_cmd = next(c for c in commands if "jobs.ingest" in c)
    augment_cmd = next(c for c in commands if "jobs.augment" in c)
    for cmd in (ingest_cmd, augment_cmd):
        assert "ray.num_cpus" not in cmd and "--config jobs/configs/demo.yaml" in cmd
        assert README_ADDRESS in cmd and "--working-dir ." in cmd
    # overrides in the jobs/ingest.py docstring's form: right after --config, no positional source
    assert re.search(r"jobs\.ingest --config \S+ '?ingest\.source=", ingest_cmd)

    t0 = time.monotonic()
    _, logs = _submit(head, ingest_cmd, tmp_path, timeout_s=600)
    assert "ray.num_cpus=2 is a local-cluster setting and is ignored" in logs
    ingest = Store(str(tmp_path / "ingest"))
    manifest = ingest.read_json(S.MANIFEST_FILE)
    assert manifest["job"] == "ingest" and manifest["written"] == manifest["listed"] > 0
    assert manifest["source"].startswith("phantom://")

    _submit(head, augment_cmd, tmp_path, timeout_s=600)
    aug = Store(str(tmp_path / "augment"))
    manifest = aug.read_json(S.MANIFEST_FILE)
    pairs = aug.read_table(S.PAIRS_DIR)
    assert manifest["job"] == "augment" and pairs is not None and pairs.num_rows == manifest["pairs_total"] > 0
    row = pairs.slice(0, 1).to_pylist()[0]
    assert row["image_png"][:4] == b"\x89PNG" and row["generator_model"].startswith("tiny://sd?size=32")
    print(json.dumps({"jobs_seconds": round(time.monotonic() - t0, 1), "pairs": pairs.num_rows}))
