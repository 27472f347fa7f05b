"""GPU checks: the diffusion stages and the scorer on CUDA (skipped without a GPU).

Run on a GPU machine: ``python -m pytest -q tests/gpu``.
"""

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_generate_on_cuda_matches_cpu_noise():
    from pairaug_ray.io.dicom import decode_png
    from pairaug_ray.stages.generate import GenerateConfig, GenerateStage

    rows = pd.DataFrame({"pair_id": ["a", "b"], "seed": [1, 2], "branch": ["inter"] * 2,
                         "rewritten_report": ["Small left pleural effusion.", "The heart is enlarged."]})
    gpu = GenerateStage(GenerateConfig(model="tiny://sd?size=64", steps=4, num_gpus=1, dtype="fp32"))(rows)
    cpu = GenerateStage(GenerateConfig(model="tiny://sd?size=64", steps=4))(rows)
    assert list(gpu.status) == ["ok", "ok"]
    # Seeds draw the initial noise on the CPU, so devices agree up to kernel rounding.
    for g, c in zip(gpu.image_png, cpu.image_png):
        assert np.abs(decode_png(g) - decode_png(c)).mean() < 0.02


def test_edit_on_cuda_fp16():
    from pairaug_ray.stages.edit import EditConfig, EditStage

    rows = pd.DataFrame({"pair_id": ["a", "b"], "seed": [1, 2], "branch": ["intra"] * 2,
                         "report": ["Small left pleural effusion."] * 2,
                         "rewritten_report": ["Large left pleural effusion.", "No pleural effusion."]})
    out = EditStage(EditConfig(model="tiny://sd?size=64", steps=6, num_gpus=1))(rows)
    assert list(out.status) == ["ok", "ok"] and all(out.image_png.map(len) > 0)
