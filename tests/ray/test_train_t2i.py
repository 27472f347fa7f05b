"""Text-to-image training on Ray Train (issue 11): loss, 1 vs 2 workers, stop/resume, s3, the saved
pipeline in the generate and edit stages, bad inputs, and a short training that beats random weights.

Small in rows, not in realism: a 32 px tiny pipeline on 24 PhantomCXR studies written straight into
a studies table (no ingest job). One uninterrupted reference run is shared by the module; the other
runs are compared with it step by step. The fidelity floor test (slow) trains the 64 px recipe on
600 PhantomCXR studies for about 2 minutes.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from pairaug_ray import phantom
from pairaug_ray.io.dicom import decode_png, encode_png
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.labeler import label_report, label_states
from pairaug_ray.schema import STUDIES_DIR, STUDY_SCHEMA
from pairaug_ray.train.t2i import (
    DenoiseStep,
    T2IConfig,
    T2IError,
    inspect_init,
    read_t2i_metrics,
    snr_weights,
    train_t2i,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")

SIZE = 32
INIT = f"tiny://sd?size={SIZE}&seed=0&channels=16,32&cross=32"
VAE_STEPS, STEPS = 6, 24


def write_studies(out: str, n: int, size: int, seed: int = 0, reports: str = "template",
                  all_train: bool = True) -> str:
    """A studies table of ``n`` PhantomCXR studies (the columns train-t2i reads + row ids)."""
    rows = []
    for i in range(n):
        st = phantom.study(i, seed=seed, size=size, report_source=reports, with_dicom=False)
        row = {name: None for name in STUDY_SCHEMA.names}
        row.update(row_id=f"r{seed}-{i}", study_id=st.study_id, patient_id=st.patient_id,
                   image_id=st.dicom_id, split="train" if all_train else st.split,
                   view_position=st.view_position, image_png=encode_png(st.image), report=st.report,
                   labels=json.dumps(label_states(label_report(st.report)), sort_keys=True),
                   source_uri=f"phantom://{i}?seed={seed}")
        rows.append(row)
    Store(out).write_table(STUDIES_DIR, pa.Table.from_pylist(rows, schema=STUDY_SCHEMA), "shard-0")
    return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    return write_studies(str(tmp_path_factory.mktemp("t2i") / "ingest"), 24, SIZE, seed=3)


def _cfg(studies: str, out: str, **kw) -> T2IConfig:
    base = dict(studies=studies, out=out, init=INIT, image_size=SIZE, vae_steps=VAE_STEPS, steps=STEPS,
                batch_size=8, vae_batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=12,
                report_every=6, num_workers=1, cpus_per_worker=1, torch_threads=1, seed=0)
    return T2IConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(studies, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("t2i-ref") / "run")
    result = train_t2i(_cfg(studies, out))
    return result, read_t2i_metrics(result["run_dir"])


def _curve(lines: list[dict], key: str = "loss") -> list[float]:
    return [line[key] for line in lines]


# ----------------------------------------------------------------------------------------------
# Loss, equivalence across workers, resume


def test_denoise_loss_of_a_batch_is_the_mean_of_its_halves():
    """What makes 2 workers equal 1: the per-sample loss does not depend on the batch around it."""
    from pairaug_ray.models.diffusion import load_sd_pipeline

    pipe = load_sd_pipeline(INIT)
    step = DenoiseStep(pipe.unet, pipe.text_encoder, train_text_encoder=True)
    g = torch.Generator().manual_seed(0)
    noisy, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a", "left pleural effusion", "", "cardiomegaly"], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    t, w = torch.tensor([1, 300, 600, 999]), torch.ones(4)
    with torch.no_grad():
        whole = step(noisy, t, ids, target, w)
        halves = (step(noisy[:2], t[:2], ids[:2], target[:2], w[:2])
                  + step(noisy[2:], t[2:], ids[2:], target[2:], w[2:])) / 2
    assert torch.allclose(whole, halves, rtol=1e-5, atol=1e-6)
    ac = torch.linspace(0.999, 0.001, 1000)
    w = snr_weights(ac, torch.tensor([0, 999]), 5.0, "epsilon")
    assert w[0] < 1 and w[1] == 1     # high SNR (small t) down-weighted, low SNR untouched
    v = snr_weights(ac, torch.tensor([0, 500, 999]), 5.0, "v_prediction")
    assert v[0] < 1 and v[2] < 0.01 and v[1] == pytest.approx(0.5, abs=0.01)  # SNR 1 at t 500
    floored = snr_weights(ac, torch.tensor([0, 500, 999]), 5.0, "v_prediction", floor=0.3)
    assert torch.equal(floored, torch.clamp(v, min=0.3)) and floored[2] == pytest.approx(0.3)


def test_training_lowers_the_loss_and_writes_the_run_folder(reference):
    result, lines = reference
    assert result["steps"] == STEPS and result["vae_steps"] == VAE_STEPS and result["complete"]
    assert [line["step"] for line in lines] == list(range(1, VAE_STEPS + STEPS + 1))
    vae = [line for line in lines if line["phase"] == "vae"]
    unet = _curve([line for line in lines if line["phase"] == "unet"])
    assert vae[-1]["rec"] < vae[0]["rec"]
    assert np.mean(unet[-6:]) < np.mean(unet[:3]) - 0.1, unet
    assert vae[-1]["vae_scaling_factor"] > 0
    run = Store(result["run_dir"])
    manifest = run.read_json("manifest.json")
    assert manifest["fingerprint"] == result["fingerprint"] and manifest["loss_summary"]["n"] == STEPS
    assert run.read_json("t2i_run.json")["fingerprint"] == result["fingerprint"]
    assert os.path.isfile(os.path.join(result["model_dir"], "model_index.json"))
    # the latent scale of the trained VAE travels with the model
    vae_cfg = json.loads(open(os.path.join(result["model_dir"], "vae", "config.json")).read())
    assert vae_cfg["scaling_factor"] == pytest.approx(vae[-1]["vae_scaling_factor"], rel=1e-6)


def test_two_workers_then_resume_on_one_give_the_same_loss_curve(studies, reference, tmp_path):
    """2 workers (half the global batch each) stopped after 4 UNet steps, resumed by re-running
    with 1 worker: the same steps and the same losses as the uninterrupted 1-worker run."""
    _, ref = reference
    out = str(tmp_path / "run")
    stop = VAE_STEPS + 4
    first = train_t2i(_cfg(studies, out, num_workers=2, cpus_per_worker=0.5, stop_at_step=stop))
    assert first["steps"] == 4 and not first["complete"]
    assert first["checkpoint"].endswith(f"checkpoint_{stop:07d}")
    second = train_t2i(_cfg(studies, out))
    assert second["resumed_from_step"] == stop and second["steps"] == STEPS and second["complete"]
    lines = read_t2i_metrics(out)
    assert [line["step"] for line in lines] == [line["step"] for line in ref]
    np.testing.assert_allclose(_curve(lines), _curve(ref), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(_curve(lines, "lr"), _curve(ref, "lr"), rtol=1e-9)


def test_finding_weights_reach_the_trainer_plan(studies, tmp_path):
    """``finding_weights`` through ``train_t2i``: the most common positive finding of the table,
    weighted 4, gets a larger share of the UNet draws than of the images (manifest)."""
    labels = Store(studies).read_table(STUDIES_DIR, columns=["labels"])["labels"].to_pylist()
    counts = pd.Series([o for raw in labels for o, v in json.loads(raw).items()
                        if v == 1 and o != "No Finding"]).value_counts()
    finding = str(counts.index[0])
    result = train_t2i(_cfg(studies, str(tmp_path / "run"), vae_steps=0, steps=2,
                            finding_weights={finding: 4}))
    shares = Store(result["run_dir"]).read_json("manifest.json")["finding_shares"]
    assert shares[finding]["samples"] > 1.5 * shares[finding]["images"] > 0, shares


def test_min_snr_sampling_reaches_the_trainer(studies, tmp_path):
    """``snr_sampling`` in the worker loop: inside the min-SNR span the timesteps come from the
    min-SNR weights (mean t of a batch far below the uniform ~500: v-prediction's min-SNR weighs
    the noisiest timesteps least), after it uniform again; weighted min-SNR keeps uniform draws."""
    kw = {"vae_steps": 0, "steps": 8, "snr_gamma": 20.0, "snr_stop": 0.5}
    lines = read_t2i_metrics(train_t2i(_cfg(studies, str(tmp_path / "is"), snr_sampling=True,
                                            **kw))["run_dir"])
    weighted = read_t2i_metrics(train_t2i(_cfg(studies, str(tmp_path / "w"), **kw))["run_dir"])
    t_is, t_w = _curve(lines, "timestep_mean"), _curve(weighted, "timestep_mean")
    assert np.mean(t_is[:4]) < 350 < np.mean(t_w[:4]), (t_is, t_w)
    assert np.mean(t_is[4:]) > 350 and np.all(np.isfinite(_curve(lines)))


def test_checkpoints_and_model_on_s3(studies, s3_bucket):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(endpoint_url=endpoint)
    out = f"s3://{bucket}/t2i"
    cfg = _cfg(studies, out, vae_steps=2, steps=2, checkpoint_every=2, report_every=2)
    first = train_t2i(cfg, storage)
    assert first["checkpoint"] == f"s3://{bucket}/t2i/checkpoint_0000004" and first["complete"]
    run = Store(out, storage)
    names = {p.rsplit("/", 1)[-1] for p in run.fs.ls(run.root, detail=False)}
    assert {"metrics.jsonl", "model", "manifest.json", "t2i_run.json", "checkpoint_0000004"} <= names
    assert run.exists("checkpoint_0000004/pipeline/unet/diffusion_pytorch_model.safetensors")
    assert run.exists("model/model_index.json") and run.exists("model/vae/config.json")
    again = train_t2i(cfg, storage)      # the same command again: nothing left to train
    assert again["resumed_from_step"] == 4 and again["steps"] == 2
    assert len(read_t2i_metrics(out, storage)) == 4


def test_saved_model_runs_in_generate_and_edit_stages(reference):
    from pairaug_ray.models.diffusion import load_sd_pipeline
    from pairaug_ray.stages.edit import EditConfig, EditStage
    from pairaug_ray.stages.generate import GenerateConfig, GenerateStage

    model = reference[0]["model_dir"]
    pipe = load_sd_pipeline(model)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == SIZE
    rows = pd.DataFrame({"pair_id": ["a", "b"], "seed": [1, 2], "branch": ["inter"] * 2,
                         "rewritten_report": ["Large left pleural effusion.", "Moderate cardiomegaly."]})
    out = GenerateStage(GenerateConfig(model=model, steps=3))(rows)
    assert list(out.status) == ["ok", "ok"]
    assert decode_png(out.image_png[0]).shape == (SIZE, SIZE)
    rows = pd.DataFrame({"pair_id": ["c", "d"], "seed": [3, 4], "branch": ["intra"] * 2,
                         "report": ["Small left pleural effusion."] * 2,
                         "rewritten_report": ["Large left pleural effusion.", "No pleural effusion."]})
    out = EditStage(EditConfig(model=model, steps=3))(rows)
    assert list(out.status) == ["ok", "ok"] and all(out.image_png.map(len) > 0)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem, nothing written or lost


def test_bad_inputs_give_clear_errors_and_write_nothing(studies, reference, tmp_path):
    out = str(tmp_path / "never")
    empty = str(tmp_path / "empty")
    t = Store(studies).read_table(STUDIES_DIR)
    Store(empty).write_table(STUDIES_DIR, t.slice(0, 3).set_column(
        t.schema.get_field_index("report"), "report", pa.array(["", " ", None], pa.string())), "s0")
    with pytest.raises(T2IError, match="no usable rows"):
        train_t2i(_cfg(empty, out))
    with pytest.raises(T2IError, match="no usable rows.*splits present"):
        train_t2i(_cfg(studies, out, splits=["validate"]))
    with pytest.raises(FileNotFoundError, match="no studies table"):
        train_t2i(_cfg(str(tmp_path / "nothing"), out))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_t2i(_cfg(studies, out, init=str(tmp_path / "no-such-model")))
    not_sd = tmp_path / "not-sd"
    not_sd.mkdir()
    (not_sd / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(T2IError, match="not a Stable Diffusion pipeline"):
        train_t2i(_cfg(studies, out, init=str(not_sd)))
    (not_sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(T2IError, match=r"missing component\(s\) \['unet', 'vae'"):
        inspect_init(str(not_sd))
    assert not os.path.exists(out)

    # A finished run re-run with other settings: refused, its files untouched.
    result, lines = reference
    run = Store(result["run_dir"])
    before = {rel: run.read_bytes(rel) for rel in ("t2i_run.json", "metrics.jsonl", "manifest.json")}
    with pytest.raises(T2IError, match=r"other settings \(lr: 0.002 -> 0.001"):
        train_t2i(_cfg(studies, result["run_dir"], lr=1e-3))
    assert {rel: run.read_bytes(rel) for rel in before} == before


# ----------------------------------------------------------------------------------------------
# A short CI training draws findings better than random weights (floors: see below)

# Measured with this exact configuration (docs/t2i.md, "CI floor"), 149 s on 2 CPUs: see FLOOR_* below.
CI_STUDIES, CI_SIZE = 600, 64
CI_TRAIN = dict(init="tiny://sd?size=64&seed=0&channels=32,64&cross=64", vae_steps=150, steps=200,
                batch_size=32, vae_batch_size=16, lr=2e-3, warmup_steps=20, cond_dropout=0.1,
                checkpoint_every=1000, report_every=50, num_workers=1, cpus_per_worker=2, seed=0)
CI_FID = dict(n=16, steps=10, guidance=4.0)
# 2026-11-29 (load ~2): trained 0.607, random weights 0.518 (the random figure is deterministic:
# same weights, prompts and seeds). A broken training (loss not used, prompt dropped, wrong target)
# lands at the random figure; the floors leave room for float nondeterminism between machines.
FLOOR_FINDING = "Cardiomegaly"
FLOOR_AUC = 0.57
FLOOR_GAIN = 0.05


@pytest.mark.slow
def test_short_training_beats_random_weights_on_physical_fidelity(tmp_path):
    from pairaug_ray.train.fidelity import image_generator, physical_fidelity

    data = write_studies(str(tmp_path / "ingest"), CI_STUDIES, CI_SIZE, seed=0)
    result = train_t2i(T2IConfig(studies=data, out=str(tmp_path / "run"), **CI_TRAIN))
    assert result["complete"]

    def table(model: str) -> dict:
        gen = image_generator(model, steps=CI_FID["steps"], guidance_scale=CI_FID["guidance"], device="cpu")
        res = physical_fidelity(gen, n=CI_FID["n"], seed=0, bootstrap=0, truncate=gen.__self__.prompt,
                                findings=[FLOOR_FINDING])
        return {f"{r['finding']}/{r['figure']}": r["auc"] for r in res["rows"]}

    trained, random = table(result["model_dir"]), table(CI_TRAIN["init"])
    key = f"{FLOOR_FINDING}/present"
    figures = {"trained": trained, "random": random, "train_s": result["seconds"]}
    print("t2i CI floor figures:", json.dumps(figures))
    assert trained[key] >= FLOOR_AUC, figures
    assert trained[key] >= random[key] + FLOOR_GAIN, figures
