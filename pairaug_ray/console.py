"""What a job shows on the console: one progress display per job step, and Ray's own output kept
out of the way unless asked for.

Usage::

    from pairaug_ray.console import StepProgress
    with StepProgress("augment", total=96) as bar:          # rows by default
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            bar.update(len(batch), errors=n_bad, error_detail={"rewrite:bad_output": n_bad})

On a terminal (stderr is a TTY) the step is a tqdm bar: done/total, rows/s, ETA, errors. Otherwise
(CI, ``ray job logs``, a pipe) it is plain lines: at most one per ``every_s`` seconds (5) as rows
arrive, one after ``heartbeat_s`` (30) without any, and one at the end::

    [augment] 48/96 rows (50%) · 2.1 rows/s · 2 errors (rewrite:bad_output 2) · ETA 23 s

The display library is tqdm: transformers, huggingface_hub and Ray Data already depend on it.

Ray's console output (``ray_init_kwargs``, ``quiet_ray_data``, ``quiet_ray_worker``), unless
``ray.verbose`` (``pairaug --verbose``) is set:

- lines Ray relays from workers and raylets carry a plain prefix, without colour escapes, when the
  console is not a terminal (``plain_ray_prefixes``, also with ``verbose``);
- Ray Data's progress bars are off (``ray.progress_bars`` turns them back on) and its INFO lines
  (execution plans, "Dataset … finished") go to its session log file ``ray-data.log`` only;
- the ``ray`` logger is at WARNING on the driver and in the workers, and Ray's note that token
  authentication is on (every local start) is dropped;
- every worker runs ``quiet_ray_worker`` at start (a ``worker_process_setup_hook``), which quiets
  the same Ray Data lines in actors that run datasets (Ray Train's split coordinator) and two Ray
  Train 2.60 loggers that a ``LoggingConfig`` does not reach (see the function).

Lines go to stderr, so a command's stdout stays its JSON result.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from typing import IO, Mapping

log = logging.getLogger(__name__)

SEP = " · "
# Ray Data's own notes about its progress bars: they say how to turn bars on or point at a new UI;
# `--verbose` / `ray.progress_bars` is the switch here.
RAY_DATA_PROGRESS_NOTES = (
    "Progress bars disabled.",
    "Progress bars for operators disabled.",
    "Progress will be logged because stdout is a non-interactive terminal.",
    "[dataset]: A new progress UI is available.",
)
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Ray 2.60 turns token authentication on for every new local cluster and then says it did, on every
# start ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt
# out"): dropped. Its warning that authentication is *disabled* is kept.
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_AUTH_NOTES = ("Token authentication is enabled for this Ray cluster.",)
WORKER_SETUP_HOOK = "pairaug_ray.console.quiet_ray_worker"


def is_interactive(stream: IO | None = None) -> bool:
    """True when ``stream`` (default stderr) is a terminal that redraws a bar (not ``TERM=dumb``)."""
    stream = stream if stream is not None else sys.stderr
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def duration(seconds: float) -> str:
    """``7 s``, ``4 min 05 s``, ``2 h 03 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def status_line(label: str, done: int, total: int | None, unit: str, seconds: float, *,
                errors: int = 0, error_detail: Mapping[str, int] | None = None, initial: int = 0,
                extra: str = "") -> str:
    """One plain progress line: ``[label] done/total unit (pct) · rate unit/s · errors · ETA``.

    ``initial`` units were done before this run (a resume): they count in done/total but not in the
    rate. ``error_detail`` maps a class (e.g. ``"rewrite:bad_output"``) to its count; the first
    four are shown. ``extra`` is appended as is (e.g. a loss).
    """
    parts = [f"[{label}] {done}/{total} {unit}" + (f" ({100 * done / total:.0f}%)" if total else "")
             if total is not None else f"[{label}] {done} {unit}"]
    rate = (done - initial) / seconds if seconds > 0 else 0.0
    if done > initial:
        parts.append(f"{_rate(rate)} {unit}/s")
    elif seconds >= 1:
        parts.append(f"{duration(seconds)} elapsed")
    if errors or error_detail:
        detail = ""
        if error_detail:
            top = Counter({k: v for k, v in error_detail.items() if v}).most_common(4)
            detail = " (" + ", ".join(f"{k} {v}" for k, v in top) + (" …" if len(error_detail) > 4 else "") + ")"
        parts.append(f"{errors} error{'s' if errors != 1 else ''}{detail}")
    if total is not None and done < total and rate > 0:
        parts.append(f"ETA {duration((total - done) / rate)}")
    elif total is not None and done >= total and total:
        parts.append(f"done in {duration(seconds)}")
    if extra:
        parts.append(extra)
    return SEP.join(parts)


class StepProgress:
    """The progress of one job step (ingest, augment, a training run, an evaluation).

    ``total`` may be None (unknown). ``every_s``: at most one plain line per ``every_s`` seconds
    as updates arrive, when not on a terminal (None = only ``emit`` and ``close`` print).
    ``heartbeat_s``: with ``every_s`` set, a plain line also after this many seconds without one,
    so a slow first batch still shows the step is alive (a background thread; on a terminal the bar
    is redrawn every second instead). ``initial``: units already done before this run (e.g. the
    step a training run resumes from). Writes to ``stream`` (default: stderr at construction time).
    One instance per step, closed once (``close`` or ``with``).
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "rows", *,
                 every_s: float | None = 5.0, stream: IO | None = None,
                 interactive: bool | None = None, initial: int = 0, heartbeat_s: float | None = 30.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_interactive(self.stream) if interactive is None else interactive
        self.initial = self.done = int(initial)
        self.errors = 0
        self.error_detail: Counter = Counter()
        self.t0 = self._last = time.perf_counter()
        self._last_state: tuple | None = None
        self._closed = False
        self._bar = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.heartbeat_s = heartbeat_s
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=f"[{label}]", unit=f" {unit}",
                             file=self.stream, dynamic_ncols=True, leave=True, mininterval=0.5)
        self._thread = None
        if self.tty or (every_s is not None and heartbeat_s):
            self._thread = threading.Thread(target=self._beat, name=f"progress {label}", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self._closed:
                    return
                if self._bar is not None:
                    self._bar.refresh()
                elif time.perf_counter() - self._last >= self.heartbeat_s:
                    self.emit()

    # ------------------------------------------------------------------ updates

    def update(self, n: int = 1, *, errors: int = 0, error_detail: Mapping[str, int] | None = None,
               extra: str = "") -> None:
        """``n`` more units done, ``errors`` of them failed (classes in ``error_detail``)."""
        with self._lock:
            self._update(n, errors, error_detail, extra)

    def _update(self, n: int, errors: int, error_detail: Mapping[str, int] | None, extra: str) -> None:
        self.done += int(n)
        self.errors += int(errors)
        if error_detail:
            self.error_detail.update({k: int(v) for k, v in error_detail.items()})
        if self._bar is not None:
            post = self._postfix(extra)
            if post:
                self._bar.set_postfix_str(post, refresh=False)
            self._bar.update(int(n))
            return
        now = time.perf_counter()
        if self.every_s is not None and now - self._last >= self.every_s:
            self.emit(extra)

    def emit(self, extra: str = "") -> None:
        """Print the status now (a plain line; on a terminal, refresh the bar)."""
        with self._lock:
            self._emit(extra)

    def _emit(self, extra: str) -> None:
        self._last = time.perf_counter()
        if self._bar is not None:
            post = self._postfix(extra)
            if post:
                self._bar.set_postfix_str(post, refresh=False)
            self._bar.refresh()
            return
        line = status_line(self.label, self.done, self.total, self.unit, self.seconds, errors=self.errors,
                           error_detail=self.error_detail, initial=self.initial, extra=extra)
        self._write(line)

    def close(self, extra: str = "") -> None:
        """Final status (once): the bar is left on screen; a plain line is printed unless the same
        counts were just printed."""
        self._stop.set()
        with self._lock:
            self._close(extra)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _close(self, extra: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            post = self._postfix(extra)
            if post:
                self._bar.set_postfix_str(post, refresh=False)
            self._bar.close()
            return
        line = status_line(self.label, self.done, self.total, self.unit, self.seconds, errors=self.errors,
                           error_detail=self.error_detail, initial=self.initial, extra=extra)
        if (self.done, self.errors) != self._last_state or extra:
            self._write(line)

    def note(self, text: str) -> None:
        """A one-off line about this step (above the bar on a terminal)."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(f"[{self.label}] {text}", file=self.stream)
            else:
                self._write(f"[{self.label}] {text}")

    # ------------------------------------------------------------------ helpers

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def rate(self) -> float:
        """Units per second of this run (``initial`` excluded)."""
        return (self.done - self.initial) / max(self.seconds, 1e-9)

    def _postfix(self, extra: str) -> str:
        parts = []
        if self.errors:
            top = ", ".join(f"{k} {v}" for k, v in self.error_detail.most_common(2))
            parts.append(f"{self.errors} errors" + (f" ({top})" if top else ""))
        if extra:
            parts.append(extra)
        return SEP.join(parts)

    def _write(self, line: str) -> None:
        # Written on the stream, not with print(): Ray Train patches print() in its workers and
        # would send the line to the driver twice (once through its logger, once as stdout).
        self._last_state = (self.done, self.errors)
        self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- Ray's own output

class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _drop(logger_name: str, prefixes: tuple[str, ...]) -> None:
    """Attach a ``_DropMessages`` filter to one logger (a logger's filter sees only that logger's
    own records, so nothing else is touched); idempotent."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(prefixes))


def _drop_progress_notes() -> None:
    _drop(RAY_DATA_PROGRESS_LOGGER, RAY_DATA_PROGRESS_NOTES)


def _job_runtime_env() -> dict:
    """The runtime env a ``ray job submit`` gave this driver (empty otherwise)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError):
        return {}


def ray_init_kwargs(verbose: bool) -> dict:
    """Extra ``ray.init`` keywords for the console, unless ``verbose``: the ``ray`` logger at
    WARNING ("Started a local Ray instance." and other INFO lines) and the worker setup hook
    ``quiet_ray_worker``. A job's own ``worker_process_setup_hook`` (``ray job submit
    --runtime-env``) is kept: Ray refuses to merge two. Also drops Ray's note that token
    authentication is on (``RAY_AUTH_NOTES``). Verbose or not, see ``plain_ray_prefixes``."""
    plain_ray_prefixes()
    if verbose:
        return {}
    _drop(RAY_AUTH_LOGGER, RAY_AUTH_NOTES)
    kwargs: dict = {"logging_level": logging.WARNING}
    if "worker_process_setup_hook" not in _job_runtime_env():
        kwargs["runtime_env"] = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    return kwargs


def plain_ray_prefixes() -> None:
    """Ray prints the lines its workers and raylets log on the driver's console behind a coloured
    ``(pid=…)`` prefix (ANSI escapes), terminal or not; when stdout or stderr is not a terminal
    (CI, ``ray job logs``, a pipe) the prefix is plain: ``RAY_COLOR_PREFIX=0``, which Ray's driver
    reads at each line it prints. A value the user set is kept."""
    if not (is_interactive(sys.stdout) and is_interactive(sys.stderr)):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def quiet_ray_data(progress_bars: bool, verbose: bool) -> None:
    """Driver side: Ray Data's bars per ``progress_bars`` (on when ``verbose``), and unless
    ``verbose`` its console handler at WARNING (the file handler, ``ray-data.log`` in the session's
    log folder, still gets everything) and its notes about progress bars dropped."""
    from ray.data import DataContext

    bars = progress_bars or verbose
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    if verbose:
        return
    _drop_progress_notes()
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console; the file handlers stay
            handler.setLevel(logging.WARNING)


def _ray_module_file(relative: str) -> str:
    import ray

    return os.path.join(os.path.dirname(ray.__file__), relative)


def quiet_ray_worker() -> None:
    """Ray ``worker_process_setup_hook`` (every worker, at start; see ``ray_init_kwargs``).

    - Ray Data's INFO lines at WARNING in workers that run a dataset's executor (Ray Train's split
      coordinator): ``RAY_DATA_LOG_LEVEL``, which Ray Data reads each time it configures a
      worker's logger (a handler change would be undone then); its bar notes dropped.
    - Ray Train 2.60 logs "Reporting training result N: TrainingReport(...)" at INFO on every
      report from a logger named by its file path (``logging.getLogger(__file__)`` in
      ``train/v2/_internal/execution/context.py``), which ``LoggingConfig(log_level)`` does not
      reach (it filters ``ray.train.*``): that logger is set to WARNING.
    - Ray Train's placement-group cleaner asks the State API every second whether the controller
      lives and warns "Failed to query Ray Train Controller actor state" when it cannot. The State
      API is served by the dashboard, which ``init_ray`` does not start (``include_dashboard=False``),
      so on a pairaug local cluster it warns every second; the local cluster's placement groups go
      with the driver anyway. Its logger is set to ERROR. It also finds "the" cluster by scanning
      the host when ``RAY_ADDRESS`` is unset, and with several Ray clusters on one machine (tests
      run side by side) its thread dies with a ``ConnectionError`` traceback: ``RAY_ADDRESS`` is set
      to the worker's own cluster, which is what that scan looks for.
    """
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not os.environ.get("RAY_ADDRESS"):
        try:
            import ray

            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - not connected (e.g. called outside a worker): leave it
            pass
    _drop_progress_notes()
    logging.getLogger(_ray_module_file("train/v2/_internal/execution/context.py")).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR)
