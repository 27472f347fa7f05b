"""benchmarks/gpu_diffusion.py runs its CPU smoke case (tiny UNet, 64 px) and its figures add up.

The GPU figures themselves come from running the script on a GPU (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from benchmarks import gpu_diffusion  # noqa: E402


def test_peak_table_matches_device_names():
    assert gpu_diffusion.peak_bf16_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_diffusion.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_diffusion.peak_bf16_tflops("NVIDIA H100 PCIe") == pytest.approx(756.5)
    assert gpu_diffusion.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_diffusion.peak_bf16_tflops("NVIDIA A10G") == 125.0
    assert gpu_diffusion.peak_bf16_tflops("NVIDIA L40S") == pytest.approx(362.05)
    assert gpu_diffusion.peak_bf16_tflops(None) is None and gpu_diffusion.peak_bf16_tflops("Quadro X") is None


def test_cpu_smoke_case(capsys):
    out = gpu_diffusion.main(["--size", "tiny", "--device", "cpu", "--batches", "1,2", "--dtypes", "fp32,bf16",
                              "--steps", "2", "--timed-steps", "1", "--warmup-steps", "1", "--threads", "1",
                              "--channels-last-batches", "2", "--p2p-batches", "2", "--p2p-steps", "2"])
    rows = [r for r in out["rows"] if "images_per_s" in r]
    assert {(r["dtype"], r["batch"], r["channels_last"]) for r in rows} == {
        ("fp32", 1, False), ("fp32", 2, False), ("bf16", 1, False), ("bf16", 2, False), ("bf16", 2, True)}
    flops = out["summary"]["flops"]
    assert flops["unet_sample"] > 0 and flops["vae_decode"] > 0
    for r in rows:  # the rates follow from the timings and the counted FLOPs
        per_image = (r["steps"] * r["t_step_ms"] + r["t_text_ms"] + r["t_decode_ms"]) / 1000 / r["batch"]
        assert r["images_per_s"] == pytest.approx(1 / per_image, rel=0.02)
        assert r["unet_tflops_per_s"] == pytest.approx(
            2 * r["batch"] * flops["unet_sample"] / (r["t_step_ms"] / 1000) / 1e12, rel=0.02)
        assert r["unet_mfu"] is None  # no GPU, no peak
    p2p = [r for r in out["rows"] if "p2p_batch" in r]
    assert len(p2p) == 1 and p2p[0]["unet_batch"] == 4 and "p2p_overhead_pct" in p2p[0]
    printed = capsys.readouterr().out
    summary = [json.loads(line) for line in printed.splitlines() if line.startswith('{"benchmark"')]
    assert summary and summary[-1]["size"] == "tiny" and "| dtype | batch |" in printed
