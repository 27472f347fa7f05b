"""Heterogeneous placement on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``).

Three node types stand in for a cluster of CPU workers, LLM GPU nodes and diffusion GPU nodes: a
CPU node (``cpu_node``), an "LLM" node (1 logical GPU, ``llm_node``) and a "diffusion" node
(1 logical GPU, ``diffusion_node``), each with the label ``pairaug.io/node-type``. Ingest and
augment run on tiny settings with every pool pinned by config: decode/label/write by ``cpu_node``,
rewrite by ``llm_node`` with half a GPU, generate/edit by ``diffusion_node`` with a quarter GPU,
the scorer by ``label_selector`` alone. Ray's state API (``list_actors(detail=True)``: node id)
then shows where every stage's actors ran. A stage asking for a node type the cluster lacks fails
at once with ``PlacementError`` naming the stage and the missing resource or label.

The cluster lives in a subprocess (this file run as a script) so it never meets the session's
shared ``ray_cluster``; the subprocess prints one JSON line that the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LABEL = "pairaug.io/node-type"
FAST = ["augment.generate.model=tiny://sd?size=32&seed=0", "augment.generate.steps=2",
        "augment.edit.model=tiny://sd?size=32&seed=0", "augment.edit.steps=2",
        "augment.score.model=tiny://vlp?seed=0&image_size=32", "augment.report=false",
        "augment.inter_variants=1", "augment.intra_variants=1", "augment.limit=3",
        "augment.prune.inter_threshold=0.0", "ray.progress_bars=false"]
PLACED = [  # every pool pinned; fractional CPUs so 1-CPU nodes hold them
    "ingest.decode.num_cpus=0.25", "ingest.decode.max_actors=1", "ingest.decode.resources={cpu_node: 0.25}",
    "ingest.label.num_cpus=0.25", "ingest.label.resources={cpu_node: 0.25}",
    "ingest.write.num_cpus=0.25", "ingest.write.resources={cpu_node: 0.25}",
    "augment.rewrite.num_cpus=0.25", "augment.rewrite.num_gpus=0.5", "augment.rewrite.resources={llm_node: 0.5}",
    "augment.generate.num_cpus=0.25", "augment.generate.num_gpus=0.25",
    "augment.generate.resources={diffusion_node: 0.25}",
    "augment.edit.num_cpus=0.25", "augment.edit.num_gpus=0.25", "augment.edit.resources={diffusion_node: 0.25}",
    "augment.score.num_cpus=0.25", f"augment.score.label_selector={{{LABEL}: diffusion}}",
    "augment.write.num_cpus=0.25", "augment.write.resources={cpu_node: 0.25}",
]
EXPECTED = {"DecodeStage": "cpu", "LabelStage": "cpu", "RewriteStage": "llm", "GenerateStage": "diffusion",
            "EditStage": "diffusion", "ScoreStage": "diffusion", "WriteStage": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_naming(marker: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


def main(work: str) -> None:
    """Build the three-node-type cluster, run the jobs, print {"actors": ..., "fail_fast": ...}."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pairaug_ray.config import load_config
    from pairaug_ray.pipeline import run_augment, run_ingest
    from pairaug_ray.runtime import PlacementError

    dash = _free_port()
    temp = os.path.join(work, "ray")
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, resources={"cpu_node": 1}, labels={LABEL: "cpu"}, include_dashboard=True,
        dashboard_port=dash, dashboard_agent_listen_port=_free_port(), temp_dir=temp))
    try:
        cluster.add_node(num_cpus=1, num_gpus=1, resources={"llm_node": 1}, labels={LABEL: "llm"}, temp_dir=temp)
        cluster.add_node(num_cpus=1, num_gpus=1, resources={"diffusion_node": 1}, labels={LABEL: "diffusion"},
                         temp_dir=temp)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        t0 = time.monotonic()
        common = [f"ray.address={cluster.address}", f"ingest.out={work}/ingest", f"augment.studies={work}/ingest",
                  f"augment.out={work}/augment", "ingest.source=phantom://6?seed=0", "ingest.decode.image_size=32",
                  *FAST, *PLACED]
        ingest = run_ingest(load_config(None, common))
        aug = run_augment(load_config(None, common))
        run_s = time.monotonic() - t0

        kinds = {n["NodeID"]: n["Labels"].get(LABEL) for n in ray.nodes()}
        actors = list_actors(address=f"http://127.0.0.1:{dash}", detail=True, limit=1000, raise_on_missing_output=False)
        placed: dict[str, list[str]] = {}
        for a in actors:
            name = a.get("repr_name") or a.get("class_name") or ""
            for stage in EXPECTED:
                if stage in name or stage in (a.get("class_name") or ""):
                    placed.setdefault(stage, []).append(kinds.get(a.get("node_id"), "?"))

        fail_fast = {}
        for case, extra in {"resource": ["augment.generate.resources={tpu_node: 1}"],
                            "label": [f"augment.score.label_selector={{{LABEL}: tpu}}"],
                            "ingest": ["ingest.decode.resources={cpu_node: 2}"]}.items():
            t = time.monotonic()
            try:
                cfg = load_config(None, [*common, *extra, f"augment.out={work}/fail-{case}",
                                         f"ingest.out={work}/fail-{case}"])
                (run_ingest if case == "ingest" else run_augment)(cfg)
                fail_fast[case] = {"raised": None}
            except PlacementError as exc:
                fail_fast[case] = {"raised": str(exc), "seconds": round(time.monotonic() - t, 2),
                                   "wrote": sorted(os.listdir(f"{work}/fail-{case}"))
                                   if os.path.isdir(f"{work}/fail-{case}") else []}
        print(json.dumps({"actors": placed, "ingest_written": ingest["written"], "pairs": aug["pairs_total"],
                          "candidates": sum(b["candidates"] for b in aug["branches"].values()),
                          "run_seconds": round(run_s, 1), "fail_fast": fail_fast}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_stages_sit_on_their_node_types_and_a_missing_type_fails_fast():
    work = tempfile.mkdtemp(prefix="prp", dir="/tmp")   # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, __file__, work], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the placement run did not finish in 420 s:\n{err[-4000:]}")
    finally:
        for pid in _pids_naming(work):          # Ray processes of our cluster only (our temp dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith('{"actors"')]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    res = json.loads(lines[-1])
    print(json.dumps({**{k: res[k] for k in ("run_seconds", "pairs", "candidates")},
                      "actors": {k: len(v) for k, v in res["actors"].items()},
                      "fail_fast_s": {k: v.get("seconds") for k, v in res["fail_fast"].items()}}))

    assert res["ingest_written"] == 6 and res["candidates"] > 0
    for stage, kind in EXPECTED.items():
        where = res["actors"].get(stage)
        assert where, f"no {stage} actor found through the state API: {res['actors']}"
        assert set(where) == {kind}, f"{stage} actors ran on {where}, want only {kind} nodes"

    ff = res["fail_fast"]
    assert ff["resource"]["raised"] and "stage augment.generate: missing tpu_node" in ff["resource"]["raised"]
    assert f"stage augment.score: missing label {LABEL}=tpu" in ff["label"]["raised"]
    assert "stage ingest.decode: missing cpu_node 2 (has 1)" in ff["ingest"]["raised"]
    for case in ff.values():
        assert case["seconds"] < 30, case          # no Ray Data wait: the check runs before any work
    assert "candidates" not in ff["resource"]["wrote"]   # nothing was computed


if __name__ == "__main__":
    main(sys.argv[1])
