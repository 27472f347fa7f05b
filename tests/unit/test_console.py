"""The console: one progress display per step (tqdm bar on a terminal, plain lines otherwise), Ray's
own output kept to warnings, and the noise sources removed at their cause."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path


from pairaug_ray import console
from pairaug_ray.console import StepProgress, duration, status_line

REPO = Path(__file__).resolve().parents[2]


def test_status_line_says_done_rate_errors_and_eta():
    line = status_line("augment", 48, 96, "rows", 24.0, errors=2, error_detail={"rewrite:bad_output": 2})
    assert line == "[augment] 48/96 rows (50%) · 2 rows/s · 2 errors (rewrite:bad_output 2) · ETA 24 s"
    assert status_line("train vlp", 60, 60, "steps", 125.0, initial=20, extra="loss 1.2") == \
        "[train vlp] 60/60 steps (100%) · 0.32 steps/s · done in 2 min 05 s · loss 1.2"
    assert status_line("ingest", 3, None, "rows", 1.0) == "[ingest] 3 rows · 3 rows/s"
    assert status_line("ingest", 0, 10, "rows", 0.5) == "[ingest] 0/10 rows (0%)"
    assert status_line("ingest", 0, 10, "rows", 40.0) == "[ingest] 0/10 rows (0%) · 40 s elapsed"
    assert [duration(s) for s in (7, 65, 7380)] == ["7 s", "1 min 05 s", "2 h 03 min"]


def test_plain_lines_every_interval_and_one_at_the_end():
    out = io.StringIO()
    bar = StepProgress("ingest", total=4, every_s=0.0, stream=out, interactive=False)
    bar.update(2)
    bar.update(2, errors=1, error_detail={"decode:not_dicom": 1})
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    # one line per update (interval 0); close repeats nothing already printed
    assert len(lines) == 2 and lines[0].startswith("[ingest] 2/4 rows (50%)")
    assert "1 error (decode:not_dicom 1)" in lines[1] and "done in" in lines[1]
    assert "\r" not in out.getvalue() and "\x1b[" not in out.getvalue()


def test_no_interval_prints_only_on_emit_and_close():
    out = io.StringIO()
    with StepProgress("train x", total=10, unit="steps", every_s=None, stream=out, interactive=False,
                      initial=4) as bar:
        bar.update(3)
        assert out.getvalue() == ""
        bar.emit("loss 0.5")
        bar.note("resumed from step 4")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[train x] 7/10 steps (70%)") and lines[0].endswith("loss 0.5")
    assert lines[1] == "[train x] resumed from step 4"
    assert len(lines) == 2  # close() does not repeat counts already printed


def test_a_quiet_step_still_prints_a_heartbeat():
    out = io.StringIO()
    bar = StepProgress("augment", total=8, every_s=5.0, heartbeat_s=1.0, stream=out, interactive=False)
    deadline = time.monotonic() + 10
    while not out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.2)
    bar.close()
    assert out.getvalue().startswith("[augment] 0/8 rows (0%)")


def test_a_terminal_gets_a_tqdm_bar():
    out = io.StringIO()
    bar = StepProgress("augment", total=8, stream=out, interactive=True)
    bar.update(4, errors=1, error_detail={"rewrite:no_change": 1})
    bar.close()
    text = out.getvalue()
    assert "[augment]" in text and "8" in text and "\r" in text        # redrawn in place
    assert "1 errors (rewrite:no_change 1)" in text


def test_stderr_that_is_not_a_terminal_gets_lines(monkeypatch):
    assert console.is_interactive(io.StringIO()) is False
    monkeypatch.setenv("TERM", "dumb")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert console.is_interactive(Tty()) is False
    monkeypatch.setenv("TERM", "xterm")
    assert console.is_interactive(Tty()) is True


def test_ray_init_kwargs(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert console.ray_init_kwargs(verbose=True) == {}
    kw = console.ray_init_kwargs(verbose=False)
    assert kw == {"logging_level": logging.WARNING,
                  "runtime_env": {"worker_process_setup_hook": "pairaug_ray.console.quiet_ray_worker"}}
    # a submitted job's own setup hook is kept (Ray refuses to merge two)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"worker_process_setup_hook": "mine.setup"}}))
    assert "runtime_env" not in console.ray_init_kwargs(verbose=False)


def test_ray_line_prefixes_are_plain_off_a_terminal(monkeypatch):
    """Ray's own printer of relayed worker/raylet lines: no colour escapes into a pipe or file (a
    raylet's disk-space warning in CI came out as ``\x1b[33m(raylet)\x1b[0m …``)."""
    from ray._private import worker as ray_worker

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("RAY_COLOR_PREFIX", "")        # recorded, so the test's setting is undone
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setattr(sys, "stderr", Tty())
    console.ray_init_kwargs(verbose=False)
    assert "RAY_COLOR_PREFIX" not in os.environ      # a terminal keeps Ray's colours

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    for verbose in (True, False):
        monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
        console.ray_init_kwargs(verbose=verbose)
        assert os.environ["RAY_COLOR_PREFIX"] == "0"
    out = io.StringIO()
    ray_worker.print_worker_logs({"pid": "raylet", "ip": "10.0.0.1", "localhost": "10.0.0.1",
                                  "lines": ["/tmp/ray is over 95% full"]}, out)
    ray_worker.print_worker_logs({"pid": 123, "ip": "10.0.0.1", "localhost": "10.0.0.1",
                                  "actor_name": "MapWorker", "lines": ["hello"]}, out)
    assert out.getvalue() == "(raylet) /tmp/ray is over 95% full\n(MapWorker pid=123) hello\n"

    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")       # the user's choice is kept
    console.ray_init_kwargs(verbose=False)
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_filters_drop_only_the_named_ray_notes(caplog):
    console.ray_init_kwargs(verbose=False)
    console._drop_progress_notes()
    with caplog.at_level(logging.INFO):
        logging.getLogger(console.RAY_AUTH_LOGGER).warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logging.getLogger(console.RAY_AUTH_LOGGER).warning("Token authentication is disabled for this Ray cluster.")
        logging.getLogger(console.RAY_DATA_PROGRESS_LOGGER).warning(
            "Progress bars disabled. To enable, set `ray.data.DataContext...`")
        logging.getLogger(console.RAY_DATA_PROGRESS_LOGGER).warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Token authentication is disabled for this Ray cluster.", "something else"]


def test_worker_hook_quiets_ray_train_and_ray_data(monkeypatch):
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")      # kept when set
    import ray

    reporter = logging.getLogger(os.path.join(os.path.dirname(ray.__file__),
                                              "train/v2/_internal/execution/context.py"))
    cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    levels = reporter.level, cleaner.level
    try:
        console.quiet_ray_worker()
        assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING" and os.environ["RAY_ADDRESS"] == "127.0.0.1:1"
        assert not reporter.isEnabledFor(logging.INFO) and reporter.isEnabledFor(logging.WARNING)
        assert not cleaner.isEnabledFor(logging.WARNING) and cleaner.isEnabledFor(logging.ERROR)
        # the logger Ray Train 2.60 uses really is named by that file
        import ray.train.v2._internal.execution.context as ctx

        assert logging.getLogger(ctx.__file__) is reporter
    finally:
        reporter.setLevel(levels[0])
        cleaner.setLevel(levels[1])


def test_truncating_a_long_prompt_does_not_warn(caplog):
    from pairaug_ray.models.diffusion import truncate_prompt
    from pairaug_ray.models.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    text = " ".join(["moderate left pleural effusion with adjacent atelectasis"] * 40)
    with caplog.at_level(logging.WARNING):
        cut = truncate_prompt(tok, text)
    assert "Token indices sequence length" not in caplog.text
    ids = tok(cut, add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) <= tok.model_max_length - 2 and text.startswith(cut)
    # one word more would not fit: the cut is as long as the context allows
    more = text[:len(cut) + 1 + len(text[len(cut) + 1:].split(" ", 1)[0])]
    assert len(tok(more, add_special_tokens=False)["input_ids"]) > tok.model_max_length - 2


def test_loading_the_diffusion_module_prints_no_torchvision_warning():
    code = "import pairaug_ray.models.diffusion, diffusers; from diffusers import StableDiffusionPipeline"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "requires torchvision" not in out.stderr + out.stdout
