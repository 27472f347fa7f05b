"""Helpers of the reliability suite: the tiny augment settings, `pairaug` commands run as separate
processes (each with its own local Ray cluster, Ray folder and logs), and output-folder checks.

A command run here gets a private ``RAY_TMPDIR`` (so it starts its own cluster, never joins another
one on the machine, and its session logs can be read afterwards) and an environment marker; every
process it starts inherits the marker, so whatever a SIGKILL leaves running is found and ended by
PID (``end_marked_processes``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEMO = os.path.join(ROOT, "jobs", "configs", "demo.yaml")
MARKER_ENV = "PAIRAUG_RELIABILITY_RUN"

# Tiny models, 2 sampler steps, batches of 4 (so a dozen candidates make 3 batches per stage),
# fractional CPUs so five pools fit on 2 CPUs.
FAST = [
    "augment.generate.model=tiny://sd?size=32&seed=0", "augment.generate.steps=2",
    "augment.edit.model=tiny://sd?size=32&seed=0", "augment.edit.steps=2",
    "augment.score.model=tiny://vlp?seed=0&image_size=32",
    "augment.rewrite.batch_size=4", "augment.generate.batch_size=4", "augment.edit.batch_size=4",
    "augment.score.batch_size=4", "augment.write.batch_size=4",
    "augment.rewrite.num_cpus=0.25", "augment.generate.num_cpus=0.25", "augment.edit.num_cpus=0.25",
    "augment.score.num_cpus=0.25", "augment.write.num_cpus=0.25",
    "augment.prune.inter_threshold=0.0", "augment.splits=[train,validate,test]", "augment.report=false",
    "ray.progress_bars=false",
]


def augment_args(studies: str, out: str, *extra: str) -> list[str]:
    """`pairaug augment` arguments with the demo config and the FAST settings."""
    return ["augment", "--config", DEMO, "--studies", studies, "--out", out, *FAST, *extra]


@dataclass
class Command:
    """A `pairaug ...` command running in its own process, with its own Ray cluster."""

    args: list[str]
    folder: str
    env: dict = field(default_factory=dict)
    python: list[str] = field(default_factory=lambda: ["-m", "pairaug_ray.cli"])  # what runs args
    proc: subprocess.Popen | None = None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    ray_tmp: str = ""

    def start(self) -> Command:
        os.makedirs(self.folder, exist_ok=True)
        # Short: Ray's socket paths must stay under 107 characters.
        self.ray_tmp = tempfile.mkdtemp(prefix="prl-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=self.ray_tmp, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0",
                   PYTHONPATH=os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   **{MARKER_ENV: self.marker}, **self.env)
        # The child writes to its own copies of these descriptors; ours close at once.
        with open(os.path.join(self.folder, "stdout.txt"), "wb") as out, \
                open(os.path.join(self.folder, "stderr.txt"), "wb") as err:
            self.proc = subprocess.Popen([sys.executable, *self.python, *self.args], cwd=ROOT, env=env,
                                         stdout=out, stderr=err, start_new_session=True)
        return self

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the command's process group, then to every process carrying its marker."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        end_marked_processes(self.marker)

    @property
    def stdout(self) -> str:
        with open(os.path.join(self.folder, "stdout.txt"), errors="replace") as fh:
            return fh.read()

    @property
    def stderr(self) -> str:
        with open(os.path.join(self.folder, "stderr.txt"), errors="replace") as fh:
            return fh.read()

    def session_logs(self) -> list[str]:
        """Every file under this command's Ray session folders' logs/."""
        out = []
        for folder, _, names in os.walk(self.ray_tmp):
            if f"{os.sep}logs" in folder:
                out.extend(os.path.join(folder, n) for n in names)
        return out

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        end_marked_processes(self.marker)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def run_command(args: list[str], folder: str, timeout: float = 600, python: list[str] | None = None,
                **env) -> Command:
    """Runs a `pairaug` command (or ``python`` + args) to the end in its own process; returns it
    (``.proc.returncode``, ``.stdout``, ``.stderr``, ``.session_logs()``)."""
    cmd = Command(args, folder, env=env, **({"python": python} if python else {})).start()
    try:
        cmd.wait(timeout)
    finally:
        if cmd.proc.poll() is None:
            cmd.kill()
        end_marked_processes(cmd.marker)
    return cmd


def end_marked_processes(marker: str) -> int:
    """SIGKILLs, by PID, every process whose environment carries ``marker`` (those a command
    started, including Ray's own processes that a kill of the driver leaves behind)."""
    ended = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER_ENV) == marker:
                proc.kill()
                ended += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ended


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not seen within {timeout} s")


def files_under(root: str) -> list[str]:
    """Paths of every file under ``root``, relative to it, sorted."""
    out = []
    for folder, _, names in os.walk(root):
        out.extend(os.path.relpath(os.path.join(folder, n), root) for n in names)
    return sorted(out)


def id_multiset(out: str, storage=None) -> list[str]:
    """Every pair id in an augment folder's candidates and quarantine tables, duplicates kept."""
    from pairaug_ray import schema as S
    from pairaug_ray.io.store import Store

    store = Store(out, storage)
    return sorted(store.read_column(S.CANDIDATES_DIR, "pair_id") + store.read_column(S.QUARANTINE_DIR, "row_id"))
