"""GPU checks of text-to-image training (skipped without a GPU): the train-t2i step under autocast
(bf16 and fp16 + GradScaler) with channels_last, and a Ray Train run on one GPU worker whose saved
pipeline generates on CUDA.

Run on a GPU machine: ``python -m pytest -q -s tests/gpu/test_gpu_t2i.py`` (prints step times).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

INIT = "tiny://sd?size=64&seed=0&channels=32,64&cross=64"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_denoise_step_under_autocast_channels_last(dtype):
    from diffusers import DDPMScheduler

    from pairaug_ray.models.diffusion import load_sd_pipeline
    from pairaug_ray.train.t2i import DenoiseStep, VAEStep, to_vae_input

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if amp == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    pipe = load_sd_pipeline(INIT)
    dev = torch.device("cuda")
    unet = pipe.unet.to(dev, memory_format=torch.channels_last).train()
    te = pipe.text_encoder.to(dev).train()
    vae = pipe.vae.to(dev, memory_format=torch.channels_last)
    step = DenoiseStep(unet, te, train_text_encoder=True)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = pipe.tokenizer(["Large left pleural effusion."] * 32, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids.to(dev)
    pixels = torch.rand(32, 1, 64, 64, device=dev)
    with torch.no_grad():
        lat = vae.encode(to_vae_input(pixels).to(memory_format=torch.channels_last)).latent_dist.mean
    losses, times = [], []
    for _ in range(12):
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (32,), device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=amp):
            loss = step(sched.add_noise(lat, noise, t), t, ids, noise, torch.ones(32, device=dev))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    # the VAE step too, under the same autocast
    vstep = VAEStep(vae.train(), kl_weight=1e-4)
    with torch.autocast("cuda", dtype=amp):
        vloss, rec, kl = vstep(to_vae_input(pixels).to(memory_format=torch.channels_last),
                               torch.randn_like(lat))
    vloss.backward()
    assert torch.isfinite(vloss)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "dtype": dtype, "batch": 32,
                      "ms_per_step": round(1000 * float(np.median(times[2:])), 2),
                      "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}))


def test_train_t2i_on_one_gpu_worker_then_generate_on_cuda(tmp_path):
    import ray

    from pairaug_ray import phantom
    from pairaug_ray.io.dicom import encode_png
    from pairaug_ray.io.store import Store
    from pairaug_ray.schema import STUDIES_DIR, STUDY_SCHEMA
    from pairaug_ray.stages.generate import GenerateConfig, ImageGenerator
    from pairaug_ray.train.t2i import T2IConfig, read_t2i_metrics, train_t2i

    rows = []
    for i in range(32):
        st = phantom.study(i, seed=0, size=64, report_source="template", with_dicom=False)
        row = {name: None for name in STUDY_SCHEMA.names}
        row.update(row_id=f"r{i}", split="train", image_png=encode_png(st.image), report=st.report,
                   source_uri=f"phantom://{i}")
        rows.append(row)
    studies = str(tmp_path / "ingest")
    Store(studies).write_table(STUDIES_DIR, pa.Table.from_pylist(rows, schema=STUDY_SCHEMA), "s0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = train_t2i(T2IConfig(studies=studies, out=str(tmp_path / "run"), init=INIT, vae_steps=10,
                                     steps=20, batch_size=16, vae_batch_size=8, use_gpu=True,
                                     num_workers=1, cpus_per_worker=1, mixed_precision="bf16"
                                     if torch.cuda.is_bf16_supported() else "fp16",
                                     checkpoint_every=15, report_every=5))
    finally:
        ray.shutdown()
    lines = read_t2i_metrics(result["run_dir"])
    assert result["complete"] and len(lines) == 30 and all(np.isfinite([x["loss"] for x in lines]))
    gen = ImageGenerator(GenerateConfig(model=result["model_dir"], steps=8, device="cuda", num_gpus=1))
    images = gen.generate(["Large left pleural effusion.", "Moderate cardiomegaly."], [1, 2])
    assert [im.shape for im in images] == [(64, 64), (64, 64)]
    assert all(np.isfinite(im).all() for im in images)
    print(json.dumps({"gpu_train_fit_s": result["seconds"],
                      "samples_per_s": [round(x["samples_per_s"], 1) for x in lines[-3:]]}))
