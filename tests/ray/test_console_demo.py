"""What a user sees: the smallest demo that runs every augment stage, with output to a pipe (not a
terminal), stays within a line budget and holds none of the noise lines of issue 16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# 8 studies through ingest and every augment stage; 32 px tiny models, 2 sampler steps.
SMALL = [
    "ingest.decode.image_size=32", "ingest.decode.num_cpus=0.25",
    "augment.generate.model=tiny://sd?size=32&seed=0", "augment.generate.steps=2",
    "augment.edit.model=tiny://sd?size=32&seed=0", "augment.edit.steps=2",
    "augment.score.model=tiny://vlp?seed=0&image_size=32",
    "augment.rewrite.batch_size=4", "augment.generate.batch_size=4", "augment.edit.batch_size=4",
    "augment.score.batch_size=4", "augment.write.batch_size=4",
    "augment.generate.num_cpus=0.25", "augment.edit.num_cpus=0.25",
]
LINE_BUDGET = 60
# Each was a line (or a flood of lines) of the demo's console before issue 16.
NOISE = [
    "requires torchvision",                        # transformers' image-processor fallback warning
    "Token indices sequence length",               # the tokenizer, on deliberately long prompts
    "Reporting training result",                   # Ray Train, every report
    "PlacementGroupCleaner", "Failed to query Ray Train Controller",
    "logging_progress", "Running Dataset", "Progress bars disabled", "A new progress UI",
    "Starting execution of Dataset", "Execution plan of Dataset", "execution finished in",
    "Token authentication is enabled", "Started a local Ray instance",
    "\x1b[",                                       # ANSI escapes (colour, bar redraws)
]


@pytest.mark.slow
@pytest.mark.ray
def test_demo_console_is_short_and_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TERM")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-m", "pairaug_ray.cli", "demo", "--n", "8", "--size", "64", "--no-train",
         "--generator", "tiny://sd?size=32&seed=0", "--out", str(tmp_path / "demo"), *SMALL],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600, env=env, cwd=REPO)
    console = out.stdout
    lines = console.splitlines()
    assert out.returncode == 0, console[-3000:]
    assert len(lines) <= LINE_BUDGET, f"{len(lines)} lines:\n{console}"
    for noise in NOISE:
        assert noise not in console, f"{noise!r} in:\n{console}"
    assert "\r" not in console                     # no bar redraws when not on a terminal
    # the one display per step, and the summary
    assert any(line.startswith("[ingest] 8/8 rows (100%)") for line in lines), console
    assert any(line.startswith("[augment] ") and "rows (100%)" in line for line in lines), console
    assert "PairAug demo finished" in console
