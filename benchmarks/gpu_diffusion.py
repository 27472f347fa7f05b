"""Diffusion throughput on one GPU: a Stable-Diffusion-1.5-size UNet (random weights) at 512 px.

Usage::

    python benchmarks/gpu_diffusion.py                          # GPU: the full grid (~4-7 min on an H100/H200)
    python benchmarks/gpu_diffusion.py --compile                # + torch.compile rows (bf16)
    python benchmarks/gpu_diffusion.py --size tiny --device cpu --batches 1,2 --dtypes fp32,bf16 \\
        --steps 2 --timed-steps 1 --warmup-steps 1 --p2p-batches 2      # the CPU smoke case (seconds)

What runs (``--size sd15``, the default with CUDA): UNet2DConditionModel with Stable Diffusion
1.5's configuration (block channels 320/640/1280/1280, 2 layers per block, cross-attention dim 768,
8 heads; 860 M parameters), SD's VAE (AutoencoderKL 128/256/512/512) and a CLIP ViT-L/14-size text
encoder (12 x 768), all with random weights (throughput does not depend on the weights), at 512 px
(64 x 64 latents), DDIM ``--steps`` (50) with classifier-free guidance (UNet batch = 2 x images),
attention through PyTorch SDPA (diffusers' AttnProcessor2_0). ``--size tiny`` is the project's
``tiny://sd`` pipeline at 64 px (CPU smoke case).

Per (dtype, batch, channels_last, compile) row: images/s = batch / (steps x t_step + t_fixed), with
t_step the median time of one denoising step (UNet on the CFG batch + guidance + scheduler) over
``--timed-steps`` steps after ``--warmup-steps``, and t_fixed = text encoding + VAE decode of the
batch, timed once; ``it_per_s`` = 1 / t_step (the unit of the public anchors below);
``unet_sample_steps_per_s`` = 2 x batch / t_step (the project's UNet-work unit, CFG counted).

FLOPs: counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul, convolution and attention
FLOPs; attention through SDPA's math backend so that it decomposes into counted matmuls) for one UNet
forward, one VAE decode and one text encoding; ``unet_tflops_per_s`` = UNet FLOPs of the CFG batch /
t_step; ``unet_mfu`` = that / the device's dense bf16 peak (``PEAK_BF16_TFLOPS``; reported for every
dtype against the bf16 peak, so fp32 rows read as a fraction of what bf16 could do);
``image_mfu`` includes the fixed part.

Prompt-to-prompt (``--p2p-batches``, bf16 on CUDA): ``models.p2p.p2p_edit_many`` with batch/2 edits
of distinct seeds (UNet batch = 2 x (batch/2 sources + batch/2 targets) = the plain generation's
2 x batch) against the plain generation of ``batch`` images, both over ``--timed-steps`` sampler steps
with text encoding and decode: ``p2p_overhead_pct`` = time(p2p) / time(plain) - 1.

Public anchors for SD-1.5 at 512 px (batch 1): 54.5 it/s on an H100 with plain PyTorch and 104.6
it/s with stable-fast (https://github.com/chengzeyi/stable-fast, README benchmark table). Goal on one
H200: the batched UNet at >= 50% of the bf16 peak.

Prints one JSON line per row, one summary JSON line, then the table (Markdown). Rows that run out of
memory say so and the grid goes on; ``--budget-s`` stops starting new rows when the time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, matched as substrings of
# torch.cuda.get_device_name() in this order. Sources: NVIDIA's product pages / datasheets, which give
# the sparse figure (2x) with a footnote: H100 and H200 SXM "BF16 Tensor Core 1,979 TFLOPS*"
# (https://www.nvidia.com/en-us/data-center/h100/, https://www.nvidia.com/en-us/data-center/h200/),
# H100 NVL / H200 NVL 1,671*, H100 PCIe 1,513*; A100 "BF16 Tensor Core 312 | 624*"
# (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf);
# L40S 362.05 | 733* (https://www.nvidia.com/en-us/data-center/l40s/); L4 121 | 242*
# (https://www.nvidia.com/en-us/data-center/l4/); A10 125 | 250* (https://www.nvidia.com/en-us/data-center/products/a10-gpu/).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4),
    ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0),
]
ANCHORS = {"h100_pytorch_batch1_it_per_s": 54.5, "h100_stable_fast_batch1_it_per_s": 104.6,
           "source": "https://github.com/chengzeyi/stable-fast (README, SD 1.5 512 px benchmark)"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named like ``torch.cuda.get_device_name()``; None if unknown."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


# ----------------------------------------------------------------------------- models

def build_pipe(size: str, device, dtype):
    """A diffusers StableDiffusionPipeline with random weights: ``sd15`` (SD-1.5 shapes, 512 px) or
    ``tiny`` (the project's tiny://sd at 64 px). Weights are created on ``device`` directly."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pairaug_ray.models.schedulers import ddim_scheduler
    from pairaug_ray.models.tiny import tiny_clip_tokenizer, tiny_sd_pipeline

    if size == "tiny":
        pipe = tiny_sd_pipeline(image_size=64)
        return pipe.to(device=device, dtype=dtype), 64
    tokenizer = tiny_clip_tokenizer()  # offline BPE; CLIP's 77-token window
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=ddim_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype), 512


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _prompts(n: int) -> list[str]:
    return [f"moderate left pleural effusion and mild cardiomegaly, study {i}" for i in range(n)]


def _encode(pipe, prompts: list[str]):
    import torch

    tok = pipe.tokenizer
    ids = tok(prompts + [""] * len(prompts), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(pipe.unet.device)
    emb = pipe.text_encoder(ids)[0].to(pipe.unet.dtype)
    n = len(prompts)
    return torch.cat([emb[n:], emb[:n]])  # [uncond..., cond...]


def _latents(pipe, n: int, image_size: int, channels_last: bool):
    import torch

    h = image_size // pipe.vae_scale_factor
    x = torch.randn((n, pipe.unet.config.in_channels, h, h), generator=torch.Generator("cpu").manual_seed(0))
    x = x.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _step(unet, scheduler, latents, t, context, guidance: float):
    import torch

    noise = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
    uncond, cond = noise.chunk(2)
    return scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample


def _decode(pipe, latents):
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample


# ----------------------------------------------------------------------------- measurements

def count_flops(pipe, image_size: int) -> dict[str, float]:
    """FLOPs of one UNet sample (forward at batch 1), one VAE decode and one text encoding,
    with torch's FLOP counter; attention through SDPA's math backend (decomposed into counted
    matmuls)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        ctx = _encode(pipe, _prompts(1))[:1]
        lat = _latents(pipe, 1, image_size, False)
        t = pipe.scheduler.timesteps[0] if len(pipe.scheduler.timesteps) else torch.tensor(999)
        for name, fn in (("unet_sample", lambda: pipe.unet(lat, t, encoder_hidden_states=ctx)),
                         ("vae_decode", lambda: _decode(pipe, lat)),
                         ("text_encode", lambda: _encode(pipe, _prompts(1)))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = float(counter.get_total_flops())
    out["text_encode"] /= 2  # _encode runs the prompt and its unconditional twin
    return out


def time_generation(pipe, batch: int, image_size: int, steps: int, timed: int, warmup: int,
                    guidance: float, channels_last: bool, unet=None) -> dict:
    """Seconds per denoising step (median of ``timed`` after ``warmup``) and of the fixed part
    (text encoding + VAE decode) for ``batch`` images."""
    import torch

    device = pipe.unet.device
    unet = unet or pipe.unet
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps, device=device)
    ts = list(sched.timesteps)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        context = _encode(pipe, _prompts(batch))
        _sync(device)
        t_text = time.perf_counter() - t0
        latents = _latents(pipe, batch, image_size, channels_last)
        times = []
        for k in range(warmup + timed):
            _sync(device)
            t0 = time.perf_counter()
            latents = _step(unet, sched, latents, ts[k % len(ts)], context, guidance)
            _sync(device)
            if k >= warmup:
                times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _decode(pipe, latents.contiguous())
        _sync(device)
        t_decode = time.perf_counter() - t0
    return {"t_step": statistics.median(times), "t_text": t_text, "t_decode": t_decode}


def time_p2p_vs_plain(pipe, batch: int, image_size: int, steps: int, guidance: float) -> dict:
    """Seconds of ``p2p_edit_many`` (batch/2 edits, distinct seeds) and of the plain generation of
    ``batch`` images, each over ``steps`` sampler steps including text encoding and decode, after
    one warm-up call of each."""
    import torch

    from pairaug_ray.models.p2p import P2PSettings, p2p_edit_many

    n = max(1, batch // 2)
    edits = [(f"small left pleural effusion, study {i}", f"large left pleural effusion, study {i}", i)
             for i in range(n)]
    settings = P2PSettings(steps=steps, guidance_scale=guidance, image_size=image_size)
    device = pipe.unet.device

    def plain():
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(steps, device=device)
        with torch.inference_mode():
            context = _encode(pipe, _prompts(2 * n))
            lat = _latents(pipe, 2 * n, image_size, False)
            for t in sched.timesteps:
                lat = _step(pipe.unet, sched, lat, t, context, guidance)
            _decode(pipe, lat)

    def p2p():
        with torch.inference_mode():
            p2p_edit_many(pipe, edits, settings)

    out = {}
    for name, fn in (("plain", plain), ("p2p", p2p)):
        fn()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out[f"t_{name}"] = time.perf_counter() - t0
    out["unet_batch"] = 4 * n
    return out


# ----------------------------------------------------------------------------- the grid

def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["auto", "sd15", "tiny"], default="auto",
                   help="auto = sd15 with CUDA, else tiny")
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="images per batch")
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--steps", type=int, default=50, help="sampler steps per image (the reference: 50)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--timed-steps", type=int, default=8, help="denoising steps timed per row")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--channels-last-batches", default="1,8,32,64",
                   help="bf16 rows also run with channels_last at these batches ('' = none)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (bf16, channels_last)")
    p.add_argument("--compile-batches", default="16", help="batches of the compile rows")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (max-autotune-no-cudagraphs: minutes more)")
    p.add_argument("--p2p-batches", default="2,8,32", help="prompt-to-prompt overhead at these batches")
    p.add_argument("--p2p-steps", type=int, default=10, help="sampler steps of the p2p comparison")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in the fp32 rows")
    p.add_argument("--budget-s", type=float, default=420, help="start no new row after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cuda" if cuda else "cpu")
    size = args.size if args.size != "auto" else ("sd15" if device == "cuda" else "tiny")
    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = peak_bf16_tflops(gpu_name)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    batches = [int(x) for x in args.batches.split(",") if x]
    cl_batches = {int(x) for x in args.channels_last_batches.split(",") if x}
    dtypes = [d for d in args.dtypes.split(",") if d]
    rows: list[dict] = []
    flops: dict[str, dict] = {}
    params_m = None

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    for dname in dtypes:
        dtype = getattr(torch, DTYPES[dname])
        try:
            t0 = time.perf_counter()
            pipe, image_size = build_pipe(size, device, dtype)
            build_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - e.g. a dtype the device cannot run
            emit({"dtype": dname, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        if "unet_sample" not in flops.get("any", {}):
            flops["any"] = count_flops(pipe, image_size)
            params_m = round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)
        f = flops["any"]
        variants = [(b, False, False) for b in batches]
        if dname == "bf16":
            variants += [(b, True, False) for b in batches if b in cl_batches]
            if args.compile:
                variants += [(int(b), True, True) for b in args.compile_batches.split(",") if b]
        compiled = None
        for batch, channels_last, use_compile in variants:
            row = {"dtype": dname, "batch": batch, "channels_last": channels_last, "compile": use_compile,
                   "size": size, "image_px": image_size, "steps": args.steps}
            if over_budget():
                emit({**row, "skipped": "time budget"})
                continue
            try:
                unet = pipe.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                if use_compile:
                    compiled = compiled or torch.compile(unet, mode=args.compile_mode)
                    unet = compiled
                t0 = time.perf_counter()
                m = time_generation(pipe, batch, image_size, args.steps, args.timed_steps,
                                    args.warmup_steps + (2 if use_compile else 0), args.guidance,
                                    channels_last, unet)
                per_image_s = (args.steps * m["t_step"] + m["t_text"] + m["t_decode"]) / batch
                unet_flops_step = 2 * batch * f["unet_sample"]
                image_flops = args.steps * 2 * f["unet_sample"] + f["vae_decode"] + f["text_encode"]
                row.update({
                    "images_per_s": round(1 / per_image_s, 4),
                    "it_per_s": round(1 / m["t_step"], 2),
                    "unet_sample_steps_per_s": round(2 * batch / m["t_step"], 1),
                    "t_step_ms": round(1000 * m["t_step"], 2),
                    "t_text_ms": round(1000 * m["t_text"], 2), "t_decode_ms": round(1000 * m["t_decode"], 2),
                    "unet_tflops_per_s": _sig(unet_flops_step / m["t_step"] / 1e12),
                    "image_tflops_per_s": _sig(image_flops / per_image_s / 1e12),
                    "unet_mfu": round(unet_flops_step / m["t_step"] / 1e12 / peak, 4) if peak else None,
                    "image_mfu": round(image_flops / per_image_s / 1e12 / peak, 4) if peak else None,
                    "row_s": round(time.perf_counter() - t0, 1),
                    "max_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                       if device == "cuda" else None),
                })
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                pipe.unet.to(memory_format=torch.contiguous_format)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            emit(row)
        # prompt-to-prompt overhead, once, in the cheapest half-precision dtype available
        p2p_dtype = "bf16" if "bf16" in dtypes else dtypes[-1]
        if dname == p2p_dtype:
            for batch in [int(x) for x in args.p2p_batches.split(",") if x]:
                row = {"dtype": dname, "p2p_batch": batch, "p2p_steps": args.p2p_steps, "size": size}
                if over_budget():
                    emit({**row, "skipped": "time budget"})
                    continue
                try:
                    m = time_p2p_vs_plain(pipe, batch, image_size, args.p2p_steps, args.guidance)
                    row.update({"t_plain_s": round(m["t_plain"], 3), "t_p2p_s": round(m["t_p2p"], 3),
                                "unet_batch": m["unet_batch"],
                                "p2p_overhead_pct": round(100 * (m["t_p2p"] / m["t_plain"] - 1), 1)})
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                emit(row)
        row_build = {"dtype": dname, "build_s": round(build_s, 1)}
        del pipe, compiled
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row_build)

    gen = [r for r in rows if "images_per_s" in r]
    best = max(gen, key=lambda r: r["images_per_s"], default=None)
    summary = {
        "benchmark": "gpu_diffusion", "summary": True, "device": device, "gpu": gpu_name, "size": size,
        "torch": torch.__version__, "peak_bf16_tflops": peak, "flops": flops.get("any"),
        "unet_params_m": params_m if flops else None, "steps": args.steps, "guidance": args.guidance, "tf32": args.tf32,
        "best": {k: best[k] for k in ("dtype", "batch", "channels_last", "compile", "images_per_s", "unet_mfu")}
        if best else None,
        "max_unet_mfu": max((r["unet_mfu"] for r in gen if r.get("unet_mfu") is not None), default=None),
        "anchors": ANCHORS, "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary), flush=True)
    print(markdown(rows), flush=True)
    return {"rows": rows, "summary": summary}


def markdown(rows: list[dict]) -> str:
    head = ("| dtype | batch | channels_last | compile | images/s | it/s | UNet sample-steps/s | "
            "UNet TFLOP/s | UNet MFU | image MFU | note |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "batch" not in r:
            continue
        note = r.get("error") or r.get("skipped") or ""
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['channels_last']} | {r['compile']} | "
                     f"{r.get('images_per_s', '-')} | {r.get('it_per_s', '-')} | "
                     f"{r.get('unet_sample_steps_per_s', '-')} | {r.get('unet_tflops_per_s', '-')} | "
                     f"{r.get('unet_mfu', '-')} | {r.get('image_mfu', '-')} | {note} |")
    p2p = [r for r in rows if "p2p_batch" in r]
    if p2p:
        lines += ["", "| dtype | p2p batch (edits x 2) | UNet batch | plain s | p2p s | p2p overhead % | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in p2p:
            lines.append(f"| {r['dtype']} | {r['p2p_batch']} | {r.get('unet_batch', '-')} | "
                         f"{r.get('t_plain_s', '-')} | {r.get('t_p2p_s', '-')} | "
                         f"{r.get('p2p_overhead_pct', '-')} | {r.get('error') or r.get('skipped') or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
