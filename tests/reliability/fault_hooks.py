"""Fault injection for the reliability suite: makes a stage's actor process exit abruptly (or
stall), once.

Loaded into every Ray worker of a test's job as Ray's ``worker_process_setup_hook`` (the test sets
``RAY_JOB_CONFIG_JSON_ENV_VAR`` = ``{"runtime_env": {"worker_process_setup_hook":
"fault_hooks.install"}}``, which ``ray.init`` merges into the job's runtime env, and puts this
folder on ``PYTHONPATH``); production code carries no hook. ``PAIRAUG_TEST_FAULTS`` lists the
faults as JSON::

    [{"target": "pairaug_ray.stages.generate.GenerateStage", "batch": 2, "when": "before",
      "marker": "/tmp/x/generate.fired"}]

The target class's ``__call__`` (one Ray Data batch) is wrapped when its module is imported: on
the ``batch``-th call in a process, ``before`` or ``after`` the real call, the process that creates
``marker`` first (O_CREAT | O_EXCL, so the fault fires once in the whole job) writes its PID there
and ends with ``os._exit(1)``: no exception, no cleanup, as a preempted node or an OOM kill. With
``"sleep_s": S`` it stalls S seconds instead (a slow node), so a test can act while the job is
known to be at that point.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time

FAULTS_ENV = "PAIRAUG_TEST_FAULTS"
SETUP_HOOK = "fault_hooks.install"


def job_config_env(faults: list[dict]) -> dict[str, str]:
    """Environment variables that install ``faults`` in every worker of a `pairaug` command's job."""
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"worker_process_setup_hook": SETUP_HOOK}}),
            FAULTS_ENV: json.dumps(faults)}


def _claim(marker: str) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


def _wrap(cls, fault: dict) -> None:
    original = cls.__call__
    calls = [0]

    def fire() -> None:
        if fault.get("sleep_s"):
            time.sleep(float(fault["sleep_s"]))
        else:
            os._exit(1)

    def __call__(self, batch):
        calls[0] += 1
        due = calls[0] == int(fault["batch"])
        if due and fault["when"] == "before" and _claim(fault["marker"]):
            fire()
        out = original(self, batch)
        if due and fault["when"] == "after" and _claim(fault["marker"]):
            fire()
        return out

    cls.__call__ = __call__


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps the target classes right after their modules execute, so workers that never import a
    stage (Ray Data's read and plan tasks) pay nothing."""

    def __init__(self, by_module: dict[str, list[dict]]):
        self.by_module = by_module

    def find_spec(self, name, path, target=None):
        if name not in self.by_module:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module, faults = spec.loader.exec_module, self.by_module[name]

        def exec_and_patch(module):
            exec_module(module)
            for fault in faults:
                _wrap(getattr(module, fault["target"].rsplit(".", 1)[1]), fault)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Ray's worker_process_setup_hook: arm the faults of ``PAIRAUG_TEST_FAULTS``."""
    faults = json.loads(os.environ.get(FAULTS_ENV) or "[]")
    by_module: dict[str, list[dict]] = {}
    for fault in faults:
        module, cls_name = fault["target"].rsplit(".", 1)
        if module in sys.modules:
            _wrap(getattr(sys.modules[module], cls_name), fault)
        else:
            by_module.setdefault(module, []).append(fault)
    if by_module:
        sys.meta_path.insert(0, _PatchOnImport(by_module))
