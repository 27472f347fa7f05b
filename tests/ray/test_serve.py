"""The Ray Serve app over real HTTP on 127.0.0.1 with tiny models (rule rewriter, tiny SD at 32 px
and 2 steps, tiny VLP): /v1/augment with PNG and DICOM, the openai backend against
/v1/chat/completions, 4xx answers with reasons, bounded overload (503, never a hang), /healthz,
determinism (also when requests share a replica's batch). One Serve app for the module, deployed with
`serve run --non-blocking CONFIG` from a copy of jobs/configs/serve_config.yaml (test args, free
port, small queues from the file's `deployments:` entries) onto the session's 2-CPU cluster; Serve
is shut down at the end."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SERVE_CONFIG = os.path.join(ROOT, "jobs", "configs", "serve_config.yaml")
REPORT = ("FINDINGS: Moderate left pleural effusion. The heart is enlarged. No pneumothorax. "
          "IMPRESSION: Left pleural effusion and cardiomegaly.")
TINY_SD = "tiny://sd?size=32&seed=0"
APP = "pairaug-test"
PHI = {"PatientName": "Doe^Jane^Quincy", "PatientID": "MRN99887766", "PatientBirthDate": "19410203",
       "InstitutionName": "Saint Example General Hospital", "AccessionNumber": "ACC5556667",
       "ReferringPhysicianName": "Welby^Marcus"}
PHI_STRINGS = ["Doe^Jane", "Jane", "Quincy", "MRN99887766", "19410203", "Saint Example", "ACC5556667",
               "Welby", "Marcus"]
LIMITS = {"max_image_bytes": 100_000, "max_image_pixels": 250_000, "max_report_chars": 2_000,
          "max_variants": 3, "max_json_bytes": 65_536}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _test_args() -> dict:
    """The app's args (a ServeConfig): tiny models, 0.25 CPU per replica, small limits (the 4xx
    tests)."""
    quarter = {"num_cpus": 0.25}
    return {
        "rewrite": {"backend": "rule", "batch_size": 8, **quarter},
        "generate": {"model": TINY_SD, "steps": 2, "batch_size": 4, **quarter},
        "edit": {"model": TINY_SD, "steps": 2, "batch_size": 4, **quarter},
        "score": {"model": "tiny://vlp?seed=0&image_size=32", "batch_size": 8, **quarter},
        "ingress": {"num_cpus": 0.25, "request_timeout_s": 120},
        "limits": LIMITS,
    }


# Queue limits from the Serve config file's `deployments:` entries: the ingress works on 1 request
# and holds 2 waiting (the overload test); the other deployments use what build_app derives.
DEPLOYMENTS = [{"name": "Ingress", "max_ongoing_requests": 1, "max_queued_requests": 2}]


def _test_serve_config(port: int) -> dict:
    """jobs/configs/serve_config.yaml with the test's args, port, app name and DEPLOYMENTS."""
    with open(SERVE_CONFIG) as fh:
        cfg = yaml.safe_load(fh)
    cfg["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 120}
    [app] = cfg["applications"]
    app.update(name=APP, args=_test_args(), deployments=DEPLOYMENTS)
    return cfg


def _wait_healthy(base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(base + "/healthz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base}/healthz not OK after {timeout_s} s")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    """The app deployed as the README says, `serve run CONFIG_FILE`, onto the session's cluster."""
    import ray
    from ray import serve

    port = _free_port()
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "serve_config.yaml"
    config.write_text(yaml.safe_dump(_test_serve_config(port)))
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    address = ray.get_runtime_context().gcs_address
    try:
        with open(folder / "serve_run.log", "w") as log:
            done = subprocess.run([serve_cli, "run", "--non-blocking", "--address", address, str(config)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=400, check=False)
        assert done.returncode == 0, (folder / "serve_run.log").read_text()[-3000:]
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, 400)
        yield base
    finally:
        serve.shutdown()


def _png(size: int = 48, seed: int = 0) -> bytes:
    from pairaug_ray.io.dicom import encode_png

    rng = np.random.default_rng(seed)
    return encode_png(rng.random((size, size)).astype(np.float32), bits=16)


def _phi_dicom() -> bytes:
    import pydicom

    from pairaug_ray.phantom import study, to_dicom

    ds = pydicom.dcmread(io.BytesIO(to_dicom(study(0, size=64))))
    for key, value in PHI.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _post(base, body, path="/v1/augment", timeout=120):
    return requests.post(base + path, json=body, timeout=timeout)


def _check_pairs(body, branches, variants):
    pairs = body["pairs"]
    assert [(p["branch"], p["variant"]) for p in pairs] == [(b, v) for b in branches for v in range(variants)]
    for p in pairs:
        assert p["status"] == "ok", p["error"]
        assert p["report"] and p["report"] != REPORT
        assert p["change"]
        png = base64.b64decode(p["image_png"])
        from pairaug_ray.io.dicom import decode_png

        assert decode_png(png).shape == (32, 32)
        assert -1.0 <= p["scores"]["align"] <= 1.0
        prov = p["provenance"]
        assert prov["rewrite_backend"] == "rule" and prov["prompt_id"] == f"rule-{p['branch']}-v1"
        assert prov["generator_model"] == TINY_SD and prov["score_model"].startswith("tiny://vlp")
        assert prov["request_seed"] == body["seed"] and prov["code_version"] == body["code_version"]
        if p["branch"] == "intra":
            assert p["edit_source"] in ("noise", "real")
            assert p["source_image_png"] and p["scores"]["delta"] is not None
        else:
            assert p["scores"]["delta"] is None and p["edit_source"] is None
    assert len({p["seed"] for p in pairs}) == len(pairs)  # one seed per candidate


def test_healthz(server):
    r = requests.get(server + "/healthz", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["deployments"] == {n: "ok" for n in ("Ingress", "Rewriter", "Generator", "Editor", "Scorer")}


def test_augment_report_and_png_deterministic(server):
    body = {"report": REPORT, "image_base64": base64.b64encode(_png()).decode(),
            "branches": ["inter", "intra"], "variants": 2, "seed": 7}
    first = _post(server, body)
    assert first.status_code == 200, first.text
    out = first.json()
    _check_pairs(out, ["inter", "intra"], 2)
    assert out["source"]["image"]["format"] == "png"
    assert (out["source"]["image"]["width"], out["source"]["image"]["height"]) == (48, 48)
    used = out["source"]["image_used_by_editor"]
    assert used == any(p["edit_source"] == "real" for p in out["pairs"])
    if not used:
        assert any("edit_source=noise" in n for n in out["notes"])
    # Same request + seed -> the same answer, byte for byte; another seed -> other candidates.
    again = _post(server, body)
    assert again.status_code == 200 and again.json() == out
    other = _post(server, {**body, "seed": 8}).json()
    assert [p["seed"] for p in other["pairs"]] != [p["seed"] for p in out["pairs"]]
    assert other["pairs"][0]["image_png"] != out["pairs"][0]["image_png"]


def test_augment_report_and_dicom_multipart_without_phi(server, ray_cluster):
    dicom = _phi_dicom()
    request = {"report": REPORT, "branches": ["intra"], "variants": 2, "seed": 3}
    r = requests.post(server + "/v1/augment", timeout=120,
                      data={"request": json.dumps(request)},
                      files={"image": ("Doe_Jane_MRN99887766.dcm", dicom, "application/dicom")})
    assert r.status_code == 200, r.text
    out = r.json()
    _check_pairs(out, ["intra"], 2)
    info = out["source"]["image"]
    assert info["format"] == "dicom" and (info["height"], info["width"]) == (64, 64)
    assert info["modality"] in ("CR", "DX") and info["view_position"] in ("PA", "AP")
    # No header value anywhere: long values in the whole text, every value in the non-image JSON.
    for value in ["MRN99887766", "19410203", "Saint Example General", "ACC5556667", "Doe_Jane"]:
        assert value not in r.text
    no_images = json.dumps({**out, "pairs": [{k: v for k, v in p.items() if not k.endswith("png")}
                                             for p in out["pairs"]]})
    for value in PHI_STRINGS:
        assert value.lower() not in no_images.lower(), value
    # ... and none in the Serve logs (the access log, the replicas' logs).
    import ray

    logs_dir = ray._private.worker._global_node.get_logs_dir_path()
    for folder, _, names in os.walk(logs_dir):
        for name in names:
            path = os.path.join(folder, name)
            if "serve" in path or name.startswith(("worker", "python-core-worker")):
                with open(path, "rb") as fh:
                    text = fh.read()
                for value in ["MRN99887766", "19410203", "Saint Example", "ACC5556667", "Doe^Jane"]:
                    assert value.encode() not in text, (value, path)
    # The same DICOM as base64 JSON gives the same pairs as the multipart upload.
    js = _post(server, {**request, "image_base64": base64.b64encode(dicom).decode()}).json()
    assert [p["image_png"] for p in js["pairs"]] == [p["image_png"] for p in out["pairs"]]


def test_openai_backend_gets_a_rewrite(server):
    import pandas as pd

    from pairaug_ray.llm.validation import validate_rewrite
    from pairaug_ray.stages.rewrite import RewriteConfig, RewriteStage

    served = RewriteConfig(backend="openai", model="pairaug-rewriter",
                           openai={"api_base": f"{server}/v1", "max_retries": 0, "request_timeout_s": 60,
                                   "concurrency": 2})
    rows = pd.DataFrame([{"pair_id": "a", "branch": "inter", "seed": 11, "report": REPORT},
                         {"pair_id": "b", "branch": "intra", "seed": 12, "report": REPORT}])
    got = RewriteStage(served)(rows)
    assert list(got["status"]) == ["ok", "ok"], got[["error_class", "error"]]
    assert set(got["rewrite_backend"]) == {"openai"}
    for _, row in got.iterrows():
        assert validate_rewrite(REPORT, row["rewritten_report"], row["branch"], 50)[0] == ""
    # The served answer is the batch job's rule rewrite of the same row.
    local = RewriteStage(RewriteConfig(backend="rule"))(rows)
    assert list(got["rewritten_report"]) == list(local["rewritten_report"])

    # Any OpenAI client: NAME:intra with the report as the user message; unknown model -> 404.
    r = _post(server, {"model": "pairaug-rewriter:intra", "seed": 5,
                       "messages": [{"role": "user", "content": REPORT}]}, path="/v1/chat/completions")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["pairaug"]["branch"] == "intra"
    r = _post(server, {"model": "gpt-9", "messages": [{"role": "user", "content": REPORT}]},
              path="/v1/chat/completions")
    assert r.status_code == 404 and "pairaug-rewriter" in r.json()["error"]["message"]
    models = requests.get(server + "/v1/models", timeout=30).json()
    assert {m["id"] for m in models["data"]} == {"pairaug-rewriter", "pairaug-rewriter:inter",
                                                 "pairaug-rewriter:intra"}


def _big_sparse_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1000, 1000)).save(buf, format="PNG")  # 1 M pixels in ~1 KB
    return buf.getvalue()


BAD = [
    # (name, kwargs for requests.post, path, status, code, words in the reason)
    ("unknown field", {"json": {"report": REPORT, "colour": "red"}}, "/v1/augment", 422, "unknown_field",
     "colour"),
    ("missing report", {"json": {"branches": ["inter"]}}, "/v1/augment", 422, "missing_field", "report"),
    ("bad branch", {"json": {"report": REPORT, "branches": ["sideways"]}}, "/v1/augment", 422,
     "invalid_value", "branches"),
    ("malformed json", {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
     "/v1/augment", 400, "invalid_json", "JSON"),
    ("not an object", {"json": [1, 2]}, "/v1/augment", 422, "invalid_request", "object"),
    ("text body", {"data": b"report", "headers": {"Content-Type": "text/plain"}}, "/v1/augment", 415,
     "unsupported_media_type", "application/json"),
    ("too many variants", {"json": {"report": REPORT, "variants": 4}}, "/v1/augment", 422,
     "too_many_variants", "max_variants"),
    ("report too long", {"json": {"report": "effusion " * 300}}, "/v1/augment", 422, "report_too_long",
     "max_report_chars"),
    ("bad base64", {"json": {"report": REPORT, "image_base64": "not*base64!"}}, "/v1/augment", 422,
     "invalid_base64", "base64"),
    ("image bytes", {"json": {"report": REPORT, "image_base64": base64.b64encode(
        os.urandom(120_000)).decode()}}, "/v1/augment", 413, "image_too_large", "max_image_bytes"),
    ("body bytes", {"json": {"report": REPORT, "image_base64": "A" * 400_000}}, "/v1/augment", 413,
     "body_too_large", "bytes"),
    ("image pixels", {"json": {"report": REPORT, "image_base64": base64.b64encode(
        _big_sparse_png()).decode()}}, "/v1/augment", 413, "image_too_many_pixels", "1000x1000"),
    ("undecodable image", {"json": {"report": REPORT, "image_base64": base64.b64encode(
        b"this is no image at all" * 20).decode()}}, "/v1/augment", 422, "not_dicom", "decode"),
    ("multipart unknown part", {"files": {"request": (None, json.dumps({"report": REPORT})),
                                          "extra": (None, "x")}},
     "/v1/augment", 422, "unknown_field", "extra"),
    ("chat unknown field", {"json": {"model": "pairaug-rewriter", "messages": [
        {"role": "user", "content": REPORT}], "frequency_penalty": 1}}, "/v1/chat/completions", 422,
     "unknown_field", "frequency_penalty"),
    ("chat n=2", {"json": {"model": "pairaug-rewriter:inter", "n": 2, "messages": [
        {"role": "user", "content": REPORT}]}}, "/v1/chat/completions", 422, "invalid_value", "n"),
    ("chat unknown prompt", {"json": {"model": "pairaug-rewriter", "messages": [
        {"role": "user", "content": REPORT}]}}, "/v1/chat/completions", 422, "unknown_prompt",
     "pairaug-rewriter:inter"),
]


@pytest.mark.parametrize("name,kwargs,path,status,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_with_a_reason(server, name, kwargs, path, status, code, words):
    r = requests.post(server + path, timeout=60, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == code, err
    assert words.lower() in err["message"].lower(), err


def _inter_rows(n: int, seed0: int) -> list[dict]:
    return [{"pair_id": f"p{seed0 + i}", "row_id": f"p{seed0 + i}", "branch": "inter", "variant": 0,
             "seed": seed0 + i, "report": REPORT, "rewritten_report": f"Small right pneumothorax {i}."}
            for i in range(n)]


def test_replica_batches_calls_alone_or_shared(ray_cluster):
    """share_batches false: each call (one request's rows) is its own model call, so a request's
    rows come out as when it is alone; true: the calls' rows go through the model together."""
    from pairaug_ray.serve.deployments import GeneratorReplica
    from pairaug_ray.serve.options import DeploymentOptions
    from pairaug_ray.stages.generate import GenerateConfig

    cfg = GenerateConfig(model=TINY_SD, steps=2, batch_size=4, num_cpus=0.25)
    # One row alone vs. in a batch of three: on CPU the batch's shape changes the image's bits.
    mine, other = _inter_rows(1, 100), _inter_rows(2, 200)
    alone_replica = GeneratorReplica(cfg, DeploymentOptions())
    [alone] = alone_replica.run_calls([mine])
    together = alone_replica.run_calls([other, mine])
    assert [r["image_png"] for r in together[1]] == [r["image_png"] for r in alone]
    assert [r["pair_id"] for r in together[0]] == ["p200", "p201"]
    shared_replica = GeneratorReplica(cfg, DeploymentOptions(share_batches=True))
    shared = shared_replica.run_calls([other, mine])
    once = shared_replica.run_rows(other + mine)
    assert [r["image_png"] for r in shared[0] + shared[1]] == [r["image_png"] for r in once]
    assert all(r["status"] == "ok" and r["generator_model"] == TINY_SD for r in once)
    assert alone_replica.info()["image_size"] == 32 and alone_replica.device() == "cpu"
    alone_replica.check_health()


def test_full_downstream_queue_is_a_503_with_a_reason():
    """A model deployment's full queue (BackPressureError) reaches the client as 503 + Retry-After."""
    import asyncio

    from ray.serve.exceptions import BackPressureError

    from pairaug_ray.serve.api import ApiError
    from pairaug_ray.serve.app import IngressReplica, serve_config_from_args

    class FullHandle:
        def remote(self, rows):
            async def refuse():
                raise BackPressureError(num_queued_requests=3, max_queued_requests=2)
            return refuse()

    full = FullHandle()
    ingress = IngressReplica(serve_config_from_args(_test_args()), full, full, full, full)
    with pytest.raises(ApiError) as err:
        asyncio.run(ingress._call("Generator", _inter_rows(5, 0)))
    assert err.value.status == 503 and err.value.code == "overloaded"
    assert "Generator" in err.value.message and err.value.headers["Retry-After"]


def test_overload_answers_or_503_never_hangs(server):
    from ray import serve

    body = {"report": REPORT, "branches": ["inter"], "variants": 1, "seed": 1, "return_images": False}

    def one(i):
        t0 = time.perf_counter()
        try:
            r = requests.post(server + "/v1/augment", json={**body, "seed": i}, timeout=90)
            return r.status_code, r, time.perf_counter() - t0
        except requests.RequestException as exc:  # a hang shows up as a timeout here
            return type(exc).__name__, None, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    wall = time.perf_counter() - t0
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert wall < 90, wall
    for code, r, _ in results:
        if code == 200:
            assert r.json()["pairs"][0]["status"] == "ok"
    # Still up: healthy deployments, /healthz OK, a normal request answered.
    status = serve.status().applications[APP]
    assert str(status.status).endswith("RUNNING"), status
    assert all(str(d.status).endswith("HEALTHY") for d in status.deployments.values()), status.deployments
    assert requests.get(server + "/healthz", timeout=30).status_code == 200
    assert _post(server, body).status_code == 200


def test_serve_config_file_builds_the_app():
    """jobs/configs/serve_config.yaml is a valid Serve config whose args are a ServeConfig and whose
    deployment overrides name deployments the app has."""
    from ray.serve.schema import ServeDeploySchema

    from pairaug_ray.serve.app import build_app, serve_config_from_args
    from pairaug_ray.serve.config import INGRESS, MODEL_DEPLOYMENTS

    with open(SERVE_CONFIG) as fh:
        data = yaml.safe_load(fh)
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(data)
    [app] = schema.applications
    assert app.import_path == "pairaug_ray.serve.app:build_app"
    cfg = serve_config_from_args(app.args)
    assert cfg.rewrite.backend == "rule" and cfg.generate.model.startswith("tiny://sd")
    names = {d.name for d in app.deployments}
    assert names <= {INGRESS, *MODEL_DEPLOYMENTS}
    assert {d.name for d in app.deployments if d.max_queued_requests and d.max_queued_requests > 0} >= {INGRESS}
    built = build_app(app.args)
    assert built is not None
    # `serve run pairaug_ray.serve.app:build_app k=v` passes strings: dotted keys, YAML values.
    cli = serve_config_from_args({"config": SERVE_CONFIG, "generate.steps": "3", "limits.max_variants": "2"})
    assert cli.generate.steps == 3 and cli.limits.max_variants == 2
    assert cli.edit.model == cfg.edit.model
