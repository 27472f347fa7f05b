"""InterAug generation: tiny offline SD factory, pipeline loading, the generate stage."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pairaug_ray.models.diffusion import load_sd_pipeline, parse_tiny_uri, to_grayscale
from pairaug_ray.models.tiny import save_tiny_sd, tiny_clip_tokenizer, tiny_sd_pipeline
from pairaug_ray.stages.generate import (
    GenerateConfig,
    GenerateStage,
    ImageGenerator,
    truncate_prompt,
)

REPORTS = [
    "Mild cardiomegaly. No pleural effusion or pneumothorax.",
    "Large right pleural effusion with adjacent atelectasis.",
    "No acute cardiopulmonary process.",
]


def _state(pipe):
    return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


@pytest.fixture(scope="module")
def generator():
    return ImageGenerator(GenerateConfig(model="tiny://sd?size=64&seed=0", steps=4))


def test_tiny_pipeline_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dtype.is_floating_point)
    assert a.safety_checker is None and type(a.scheduler).__name__ == "DDIMScheduler"
    assert a.vae_scale_factor == 4 and a.unet.config.sample_size == 16


def test_tokenizer_encodes_any_text_deterministically():
    tok1, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text = "Small L pleural-effusion (3 cm), ✓ Héllo; ETT 4.5cm above carina"
    ids = tok1(text).input_ids
    assert ids == tok2(text).input_ids
    assert ids[0] == tok1.bos_token_id and ids[-1] == tok1.eos_token_id
    assert tok1.unk_token_id not in ids[1:-1] and max(ids) < len(tok1)
    # report words learned as whole tokens; case-insensitive like CLIP
    assert tok1.tokenize("Pneumothorax effusion") == ["pneumothorax</w>", "effusion</w>"]


def test_truncate_prompt_fits_context_and_cuts_at_word_boundary():
    tok = tiny_clip_tokenizer()
    short = "No  acute\nprocess."
    assert truncate_prompt(tok, short) == "No acute process."
    long = " ".join(["bilateral pleural effusions, unchanged"] * 40)
    cut = truncate_prompt(tok, long)
    n = len(tok(cut, add_special_tokens=False).input_ids)
    assert 60 <= n <= tok.model_max_length - 2
    assert long.startswith(cut) and long[len(cut)] == " "
    assert truncate_prompt(tok, long, max_words=3) == "bilateral pleural effusions,"


def test_parse_tiny_uri():
    assert parse_tiny_uri("tiny://sd") == {"seed": 0, "image_size": 64}
    assert parse_tiny_uri("tiny://sd?size=32&channels=16,32&cross=32", seed=5) == {
        "seed": 5, "image_size": 32, "unet_channels": (16, 32), "cross_attention_dim": 32}
    with pytest.raises(ValueError, match="unknown parameters"):
        parse_tiny_uri("tiny://sd?sise=64")
    with pytest.raises(ValueError):
        parse_tiny_uri("tiny://gpt2")


def test_image_independent_of_batch_neighbours(generator):
    alone = generator.generate([REPORTS[1]], [7])[0]
    batch = generator.generate(REPORTS, [3, 7, 11])
    assert alone.shape == (64, 64) and alone.dtype == np.float32
    np.testing.assert_allclose(batch[1], alone, atol=1e-5)
    again = generator.generate([REPORTS[1]], [7])[0]
    np.testing.assert_allclose(again, alone, atol=1e-6)
    other_seed = generator.generate([REPORTS[1]], [8])[0]
    assert np.abs(other_seed - alone).mean() > 0.01
    assert np.abs(batch[0] - batch[1]).mean() > 0.01
    assert 0.0 <= alone.min() and alone.max() <= 1.0 and alone.std() > 0.01


def test_same_seed_same_image_in_a_fresh_pipeline(generator):
    fresh = ImageGenerator(GenerateConfig(model="tiny://sd?size=64&seed=0", steps=4))
    np.testing.assert_allclose(
        fresh.generate([REPORTS[0]], [42])[0], generator.generate([REPORTS[0]], [42])[0], atol=1e-6)


def test_save_and_load_local_folder_round_trip(tmp_path, generator):
    path = save_tiny_sd(tmp_path / "tiny_sd", seed=0, image_size=64)
    loaded = load_sd_pipeline(str(path))
    original = _state(generator.pipe)
    reloaded = _state(loaded)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    text = "Mild cardiomegaly, small left effusion."
    assert loaded.tokenizer(text).input_ids == generator.pipe.tokenizer(text).input_ids
    from_folder = ImageGenerator(GenerateConfig(model=str(path), steps=4))
    np.testing.assert_allclose(
        from_folder.generate([REPORTS[2]], [5])[0], generator.generate([REPORTS[2]], [5])[0],
        atol=1e-5)


def test_missing_folder_and_offline_hub_id_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_sd_pipeline(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="cannot load Stable Diffusion hub model"):
        load_sd_pipeline("pairaug-test/no-such-model")


def test_to_grayscale():
    rgb = np.stack([np.full((4, 5), v, np.float32) for v in (0.0, 0.5, 1.0)], axis=-1)
    gray = to_grayscale(rgb)
    assert gray.shape == (4, 5) and gray.dtype == np.float32
    np.testing.assert_allclose(gray, 0.5)
    assert to_grayscale(np.full((2, 2), 1.7)).max() == 1.0


def test_stage_call_on_a_batch():
    cfg = GenerateConfig(model="tiny://sd?size=64", steps=3, image_size=32)
    stage = GenerateStage(cfg)
    rows = [
        {"pair_id": "p0", "seed": 1, "branch": "inter", "rewritten_report": REPORTS[0]},
        {"pair_id": "p1", "seed": 2, "branch": "intra", "rewritten_report": REPORTS[1]},
        {"pair_id": "p2", "seed": 3, "branch": "inter", "rewritten_report": "  "},
        {"pair_id": "p3", "seed": 4, "branch": "inter", "rewritten_report": REPORTS[2]},
    ]
    out = stage(pd.DataFrame(rows))
    assert list(out["pair_id"]) == ["p0", "p1", "p2", "p3"]
    assert list(out["status"]) == ["ok", "ok", "error", "ok"]
    assert out.loc[2, "error_class"] == "missing_report" and out.loc[2, "stage"] == "generate"
    passed = out.loc[1]
    assert pd.isna(passed.get("image_png")) and pd.isna(passed.get("generator_model"))
    for i in (0, 3):
        assert out.loc[i, "generator_model"] == "tiny://sd?size=64"
        png = Image.open(io.BytesIO(out.loc[i, "image_png"]))
        assert png.format == "PNG" and png.size == (32, 32) and png.mode.startswith("I")
    # the stage's image of p3 is the one p3 gets when generated alone
    alone = stage.generator.generate([REPORTS[2]], [4])[0]
    pixels = np.asarray(Image.open(io.BytesIO(out.loc[3, "image_png"])), np.float32) / 65535.0
    np.testing.assert_allclose(pixels, alone, atol=2 / 65535)


@pytest.mark.parametrize("guidance, per_sample", [(4.0, 2), (1.0, 1)])
def test_stage_counts_the_unet_work_it_ran(guidance, per_sample):
    """unet_sample_steps = batch x steps, x 2 with classifier-free guidance (counted by a UNet hook)."""
    from pairaug_ray.models.schedulers import count_unet

    cfg = GenerateConfig(model="tiny://sd?size=32", steps=3, guidance_scale=guidance, sampler="dpm++")
    stage = GenerateStage(cfg)
    rows = [{"pair_id": f"p{i}", "seed": i, "branch": "inter", "rewritten_report": REPORTS[i]} for i in range(3)]
    with count_unet(stage.generator.pipe.unet) as counted:
        out = stage(pd.DataFrame(rows))
    assert counted.sample_steps == 3 * 3 * per_sample
    assert list(out["unet_sample_steps"]) == [3 * per_sample] * 3
    assert set(out["sampler"]) == {"dpm++"}
    # the stage samples with its own scheduler: the (possibly shared) pipeline keeps its DDIM
    assert type(stage.generator.pipe.scheduler).__name__ == "DDIMScheduler"
    assert type(stage.generator.sampling_pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_samplers_by_name_draw_differently_and_unknown_ones_are_refused():
    images = {name: ImageGenerator(GenerateConfig(model="tiny://sd?size=32", steps=4, sampler=name))
              .generate([REPORTS[0]], [3])[0] for name in ("ddim", "dpm++", "unipc", "euler")}
    assert all(im.shape == (32, 32) for im in images.values())
    assert np.abs(images["ddim"] - images["dpm++"]).max() > 1e-4
    with pytest.raises(ValueError, match="unknown sampler"):
        GenerateConfig(sampler="plms")
