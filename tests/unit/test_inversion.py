"""Real-image IntraAug: inversion (models/inversion.py), p2p from an inversion, samplers by name,
the counted UNet work, and the edit stage's image join and fallbacks (tiny offline SD, CPU)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from pairaug_ray import schema as S
from pairaug_ray.io.dicom import decode_png, encode_png
from pairaug_ray.io.store import Store
from pairaug_ray.models.inversion import (
    InversionSettings,
    decode_gray,
    encode_images,
    invert_images,
    invert_latents,
    psnr,
)
from pairaug_ray.models.p2p import P2PSettings, p2p_edit, p2p_edit_many, p2p_edit_real, seed_latent
from pairaug_ray.models.schedulers import count_unet, make_inverse_scheduler, make_scheduler
from pairaug_ray.models.tiny import tiny_sd_pipeline
from pairaug_ray.stages.edit import EditConfig, EditStage, unet_work_summary

MODEL = "tiny://sd?size=32&seed=0"
SOURCE = "there is a small left pleural effusion. the heart is normal in size."
TARGET = "there is a large left pleural effusion. the heart is enlarged."
OTHER = "no pleural effusion. the heart is normal in size."
STEPS = 5


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0, image_size=32)


def generated_latent(pipe, seed: int, sampler: str = "ddim", guidance: float = 4.0) -> torch.Tensor:
    """A generation's clean latent [1, C, h, w] (the pipeline's own loop, not prompt-to-prompt)."""
    sp = type(pipe)(**{**pipe.components, "scheduler": make_scheduler(sampler, pipe.scheduler.config),
                       "requires_safety_checker": False})
    sp.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return sp(SOURCE, num_inference_steps=STEPS, guidance_scale=guidance, generator=g, output_type="latent").images


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_round_trip_is_far_closer_than_a_random_latent(pipe, sampler):
    z0, z_other = generated_latent(pipe, 1, sampler), generated_latent(pipe, 2, sampler)
    image, other = decode_gray(pipe, z0)[0], decode_gray(pipe, z_other)[0]
    settings = P2PSettings(steps=STEPS, sampler=sampler, guidance_scale=4.0)
    for method in ("negative_prompt", "direct"):
        inv = invert_latents(pipe, z0, [SOURCE], InversionSettings(method=method, sampler=sampler, steps=STEPS))
        assert len(inv[0].latents) == STEPS + 1 and torch.equal(inv[0].latents[0], z0)
        (rec, same), (_, edited) = p2p_edit_real(pipe, inv, [(0, SOURCE), (0, TARGET)], settings)
        # regenerating from the inverted latent with the same prompt gives the image back...
        assert psnr(rec, image) > psnr(other, image) + 12, (method, psnr(rec, image), psnr(other, image))
        # ...an identical-prompt edit returns the source, and a real edit does not
        assert psnr(same, rec) > 60
        assert np.abs(edited - rec).max() > 1e-3
    # direct inversion puts the source back on the inverted trajectory: its reconstruction is z0's
    np.testing.assert_allclose(rec, image, atol=1e-5)


def test_direct_inversion_of_an_image_reconstructs_what_the_vae_does(pipe):
    image = decode_gray(pipe, generated_latent(pipe, 3))[0]
    vae_only = decode_gray(pipe, encode_images(pipe, [image]))[0]
    inv = invert_images(pipe, [image], [SOURCE], InversionSettings(method="direct", steps=STEPS))
    ((rec, same),) = p2p_edit_real(pipe, inv, [(0, SOURCE)], P2PSettings(steps=STEPS))
    np.testing.assert_allclose(rec, vae_only, atol=1e-5)
    assert psnr(rec, inv[0].image) == pytest.approx(psnr(vae_only, image), abs=1e-3)
    # images of another size are resized to the model's (bilinear, antialiased) before encoding
    big = np.kron(image, np.ones((2, 2), np.float32))
    (inv_big,) = invert_images(pipe, [big], [SOURCE], InversionSettings(steps=STEPS))
    assert inv_big.image.shape == (32, 32)


def test_null_text_costs_about_ten_passes_and_reconstructs(pipe):
    z0 = generated_latent(pipe, 4)
    image = decode_gray(pipe, z0)[0]
    cheap = invert_latents(pipe, z0, [SOURCE], InversionSettings(method="ddim", steps=STEPS))
    nti = invert_latents(pipe, z0, [SOURCE], InversionSettings(method="null_text", steps=STEPS,
                                                                null_text_iterations=3))
    assert cheap[0].unet_sample_steps == STEPS and cheap[0].backward_sample_steps == 0
    # inversion + per step: conditional pass, <= 3 optimisation passes, the step with the result
    assert STEPS + 3 * STEPS <= nti[0].unet_sample_steps <= STEPS + 5 * STEPS
    assert 1 <= nti[0].backward_sample_steps <= 3 * STEPS
    assert len(nti[0].null_embeddings) == STEPS
    assert all(p.requires_grad for p in pipe.unet.parameters())  # the UNet's flags are restored
    settings = P2PSettings(steps=STEPS, guidance_scale=4.0)
    ((rec_nti, same),) = p2p_edit_real(pipe, nti, [(0, SOURCE)], settings)
    ((rec_plain, _),) = p2p_edit_real(pipe, cheap, [(0, SOURCE)], settings)
    assert psnr(rec_nti, image) >= psnr(rec_plain, image) - 0.5
    np.testing.assert_allclose(same, rec_nti, atol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        p2p_edit_real(pipe, nti, [(0, TARGET)], P2PSettings(steps=STEPS, guidance_scale=2.0))


def test_inversion_settings_and_samplers_are_checked(pipe):
    with pytest.raises(ValueError, match="no inverse scheduler"):
        InversionSettings(sampler="unipc")
    with pytest.raises(ValueError, match="null_text"):
        InversionSettings(method="null_text", sampler="dpm++")
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun++")
    with pytest.raises(ValueError, match="no inverse scheduler"):
        make_inverse_scheduler("euler")
    inv = invert_latents(pipe, generated_latent(pipe, 5), [SOURCE], InversionSettings(steps=STEPS))
    with pytest.raises(ValueError, match="invert again"):
        p2p_edit_real(pipe, inv, [(0, TARGET)], P2PSettings(steps=STEPS + 1))
    with pytest.raises(ValueError, match="invert again"):
        p2p_edit_real(pipe, inv, [(0, TARGET)], P2PSettings(steps=STEPS, sampler="dpm++"))


@pytest.mark.parametrize("sampler", ["dpm++", "unipc", "euler"])
def test_p2p_with_another_sampler_keeps_the_empty_edit_equal_to_the_source(pipe, sampler):
    source, (same, edited) = p2p_edit(pipe, SOURCE, [SOURCE, TARGET], steps=STEPS, seed=7, sampler=sampler)
    np.testing.assert_allclose(same, source, atol=1e-6)
    assert np.abs(edited - source).max() > 1e-3
    ddim_source, _ = p2p_edit(pipe, SOURCE, [SOURCE], steps=STEPS, seed=7)
    assert np.abs(ddim_source - source).max() > 1e-4  # the sampler really changed
    if sampler == "dpm++":
        # the source branch is the pipeline's own DPM-Solver++ generation from the same noise
        sp = type(pipe)(**{**pipe.components, "scheduler": make_scheduler(sampler, pipe.scheduler.config),
                           "requires_safety_checker": False})
        sp.set_progress_bar_config(disable=True)
        z = sp(SOURCE, num_inference_steps=STEPS, guidance_scale=4.0, latents=seed_latent(pipe, 7),
               output_type="latent").images
        np.testing.assert_allclose(decode_gray(pipe, z)[0], source, atol=1e-4)


def test_cross_attention_on_every_level_conditions_the_full_resolution_and_p2p_still_holds():
    """``tiny://sd?...&xattn=all``: the outermost UNet blocks attend to the prompt too; the
    prompt-to-prompt controller covers those layers (the empty edit stays the source, an edit
    changes the image) and every processor is restored afterwards."""
    from pairaug_ray.models.diffusion import load_sd_pipeline

    inner = tiny_sd_pipeline(seed=0, image_size=32)
    full = load_sd_pipeline("tiny://sd?size=32&seed=0&xattn=all")
    assert not hasattr(inner.unet.down_blocks[0], "attentions")
    assert all(len(b.attentions) for b in (full.unet.down_blocks[0], full.unet.up_blocks[-1]))
    cross = lambda u: sum(name.endswith("attn2.processor") for name in u.attn_processors)  # noqa: E731
    assert cross(full.unet) > cross(inner.unet)
    before = dict(full.unet.attn_processors)
    source, (same, edited) = p2p_edit(full, SOURCE, [SOURCE, TARGET], steps=STEPS, seed=7)
    np.testing.assert_allclose(same, source, atol=1e-6)
    assert np.abs(edited - source).max() > 1e-3
    assert dict(full.unet.attn_processors) == before
    with pytest.raises(ValueError, match="xattn must be inner or all"):
        load_sd_pipeline("tiny://sd?size=32&xattn=outer")


def test_text_layers_deepen_only_the_text_encoder():
    """``tiny://sd?...&text_layers=N``: an N-layer CLIP text encoder; the UNet and VAE keep the
    default's weights (the same seed draws them first), and fewer than one layer is refused."""
    from pairaug_ray.models.diffusion import load_sd_pipeline

    base = tiny_sd_pipeline(seed=0, image_size=32)
    deep = load_sd_pipeline("tiny://sd?size=32&seed=0&text_layers=4")
    assert (base.text_encoder.config.num_hidden_layers, deep.text_encoder.config.num_hidden_layers) == (2, 4)
    for a, b in zip(base.unet.state_dict().values(), deep.unet.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="text_layers must be >= 1"):
        tiny_sd_pipeline(image_size=32, text_layers=0)


def test_unet_work_of_a_p2p_run_is_counted_and_apportioned(pipe):
    edits = [(SOURCE, TARGET, 1), (SOURCE, OTHER, 1), (OTHER, SOURCE, 2)]  # 2 sources, 3 targets
    for guidance, per_sample in ((4.0, 2), (1.0, 1)):
        work: list = []
        with count_unet(pipe.unet) as counted:
            p2p_edit_many(pipe, edits, work=work, steps=STEPS, guidance_scale=guidance)
        assert counted.calls == STEPS
        assert counted.sample_steps == STEPS * per_sample * (2 + 3)
        assert sum(work) == pytest.approx(counted.sample_steps)
        # own target samples + half of the shared source for the two edits of seed 1
        assert work[0] == pytest.approx(STEPS * per_sample * 1.5) and work[2] == pytest.approx(STEPS * per_sample * 2)
    # real image, direct: the source branch needs no unconditional half
    z = torch.cat([generated_latent(pipe, 1), generated_latent(pipe, 2)])
    with count_unet(pipe.unet) as inv_count:
        invs = invert_latents(pipe, z, [SOURCE, OTHER], InversionSettings(steps=STEPS))
    assert inv_count.sample_steps == 2 * STEPS and inv_count.calls == STEPS  # one batched pass
    assert [i.unet_sample_steps for i in invs] == [STEPS, STEPS]
    work = []
    with count_unet(pipe.unet) as counted:
        p2p_edit_real(pipe, invs, [(0, TARGET), (0, OTHER), (1, SOURCE)], P2PSettings(steps=STEPS), work=work)
    assert counted.sample_steps == STEPS * (2 * 1 + 3 * 2)
    assert work == pytest.approx([STEPS * 2.5, STEPS * 2.5, STEPS * 3])


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_edit_strength_starts_from_the_inverted_latent_at_that_noise_level(pipe, sampler):
    image = decode_gray(pipe, generated_latent(pipe, 5))[0]
    invs = invert_images(pipe, [image], [SOURCE], InversionSettings(steps=STEPS, sampler=sampler))
    full = P2PSettings(steps=STEPS, sampler=sampler)
    ((rec_full, edit_full),) = p2p_edit_real(pipe, invs, [(0, TARGET)], full)
    work: list = []
    with count_unet(pipe.unet) as counted:
        (rec, same), (_, edited) = p2p_edit_real(pipe, invs, [(0, SOURCE), (0, TARGET)],
                                                 replace(full, strength=0.4), work=work)
    # 2 of the 5 steps run: source (conditional only) + 2 targets x CFG per step
    assert counted.calls == 2 and counted.sample_steps == 2 * (1 + 2 * 2)
    assert sum(work) == pytest.approx(counted.sample_steps)
    # the source branch still lands on the reconstruction; an identical-prompt edit returns it
    np.testing.assert_allclose(rec, rec_full, atol=1e-5)
    assert psnr(same, rec) > 60
    # a changed prompt still edits, and differently from the full-strength edit (that starting
    # later keeps more of the image is a measured property of a trained model: docs/intraaug.md)
    assert np.abs(edited - rec).max() > 1e-3 and np.abs(edited - edit_full).max() > 1e-3
    with pytest.raises(ValueError, match="strength"):
        p2p_edit_real(pipe, invs, [(0, TARGET)], replace(full, strength=0.0))
    with pytest.raises(ValidationError):
        EditConfig(strength=1.5)


# ---------------------------------------------------------------- the edit stage


def write_studies(root, images: dict[str, np.ndarray]) -> str:
    """A studies table with one shard per image (so lookups cross shards)."""
    store = Store(str(root))
    for k, (rid, image) in enumerate(images.items()):
        row = {name: None for name in S.STUDY_SCHEMA.names}
        row.update(row_id=rid, study_id=f"s-{rid}", patient_id="p", split="train", report=SOURCE,
                   image_png=encode_png(image))
        store.write_table(S.STUDIES_DIR, pa.Table.from_pylist([row], schema=S.STUDY_SCHEMA), f"part-{k}")
    return str(root)


def intra(pid: str, rid: str, rewrite: str, seed: int, report: str = SOURCE, **extra) -> dict:
    return {"pair_id": pid, "branch": "intra", "source_row_id": rid, "report": report,
            "rewritten_report": rewrite, "seed": seed, **extra}


@pytest.fixture(scope="module")
def study_images(pipe):
    return {"r1": decode_gray(pipe, generated_latent(pipe, 11))[0],
            "r2": decode_gray(pipe, generated_latent(pipe, 12))[0]}


def test_every_variant_of_a_study_reuses_one_inversion(tmp_path, study_images):
    studies = write_studies(tmp_path / "ingest", study_images)
    stage = EditStage(EditConfig(model=MODEL, steps=STEPS, studies=studies, max_variants_per_call=2))
    rows = [intra("a", "r1", TARGET, 1), intra("b", "r1", OTHER, 2), intra("c", "r2", TARGET, 3),
            {"pair_id": "i", "branch": "inter", "rewritten_report": TARGET, "seed": 4},
            intra("d", "r1", SOURCE, 5)]
    with count_unet(stage.pipe.unet) as counted:
        out = {r["pair_id"]: r for r in stage(pd.DataFrame(rows)).to_dict("records")}
    assert stage.inversions_run == 2  # two studies, five rows
    assert stage.images.shard_reads == 2
    edited = [out[p] for p in "abcd" if p != "i" and p in out and out[p]["branch"] == "intra"]
    assert {r["edit_source"] for r in edited} == {"real"} and all(r["status"] == "ok" for r in edited)
    assert "study_image_png" not in out["a"] and not isinstance(out["i"].get("image_png"), bytes)
    # r1's three variants share one source branch: one reconstruction, one PSNR, one inversion
    recs = {p: decode_png(out[p]["source_image_png"]) for p in "abd"}
    np.testing.assert_array_equal(recs["a"], recs["b"])
    np.testing.assert_array_equal(recs["a"], recs["d"])
    np.testing.assert_allclose(decode_png(out["d"]["image_png"]), recs["d"], atol=2e-3)  # empty edit
    image = decode_png(encode_png(study_images["r1"]))
    vae_psnr = psnr(decode_gray(stage.pipe, encode_images(stage.pipe, [image]))[0], image)
    assert out["a"]["inversion_psnr"] == out["b"]["inversion_psnr"] == pytest.approx(vae_psnr, abs=0.05)
    r1_inv = sum(out[p]["inversion_sample_steps"] for p in "abd")
    assert r1_inv == pytest.approx(STEPS) and out["c"]["inversion_sample_steps"] == pytest.approx(STEPS)
    # counted: 2 inversions (one batched pass) + 2 runs of <= 2 edits: [a, b] from r1's source,
    # then [d, c] from r1's and r2's (a source: 1 sample per step, no uncond half; a target: 2)
    assert counted.by_call == [2] * STEPS + [1 + 2 * 2] * STEPS + [2 + 2 * 2] * STEPS
    assert sum(out[p]["unet_sample_steps"] for p in "abcd") == pytest.approx(counted.sample_steps)
    # the next batch holds more variants of r1: served from the actor's cache, inverted no more
    again = stage(pd.DataFrame([intra("e", "r1", OTHER + " mild edema.", 6)])).iloc[0]
    assert stage.inversions_run == 2 and again["inversion_sample_steps"] == 0
    np.testing.assert_array_equal(decode_png(again["source_image_png"]), recs["a"])


def test_a_row_image_is_used_and_matches_the_table_join(tmp_path, study_images):
    studies = write_studies(tmp_path / "ingest", study_images)
    joined = EditStage(EditConfig(model=MODEL, steps=STEPS, studies=studies))
    served = EditStage(EditConfig(model=MODEL, steps=STEPS))  # the Serve app's editor: no table
    png = encode_png(study_images["r2"])
    a = joined(pd.DataFrame([intra("a", "r2", TARGET, 1)])).iloc[0]
    b = served(pd.DataFrame([intra("a", None, TARGET, 1, study_image_png=png)])).iloc[0]
    assert a["edit_source"] == b["edit_source"] == "real"
    assert a["image_png"] == b["image_png"] and a["source_image_png"] == b["source_image_png"]


def test_real_source_without_an_image_falls_back_or_errors_as_configured(tmp_path, study_images, caplog):
    studies = write_studies(tmp_path / "ingest", study_images)
    rows = pd.DataFrame([intra("a", "r-missing", TARGET, 1), intra("b", "r1", TARGET, 2)])
    fallback = EditStage(EditConfig(model=MODEL, steps=STEPS, studies=studies))
    with caplog.at_level("WARNING", logger="pairaug_ray.stages.edit"):
        out = fallback(rows).set_index("pair_id")
    assert out.loc["a", "status"] == "ok" and out.loc["a", "edit_source"] == "noise"
    assert out.loc["b", "edit_source"] == "real"
    assert "edited from noise" in caplog.text and "r-missing" in caplog.text
    # the noise fallback is the reference's edit of that row
    (ref_src, ref_edit), = p2p_edit_many(fallback.pipe, [(SOURCE, TARGET, 1)], steps=STEPS)
    np.testing.assert_allclose(decode_png(out.loc["a", "image_png"]), ref_edit, atol=2e-4)

    strict = EditStage(EditConfig(model=MODEL, steps=STEPS, studies=studies, missing_image="error"))
    out = strict(rows).set_index("pair_id")
    assert out.loc["a", "status"] == "error" and out.loc["a", "error_class"] == "missing_study_image"
    assert "r-missing" in out.loc["a", "error"] and "missing_image: error" in out.loc["a", "error"]
    assert out.loc["b", "status"] == "ok" and out.loc["b", "edit_source"] == "real"
    no_table = EditStage(EditConfig(model=MODEL, steps=STEPS, missing_image="error"))
    err = no_table(pd.DataFrame([intra("c", "r1", TARGET, 3)])).iloc[0]
    assert err["error_class"] == "missing_study_image" and "no studies table" in err["error"]


def test_edit_config_rejects_what_cannot_run():
    with pytest.raises(ValidationError, match="no inverse scheduler"):
        EditConfig(sampler="unipc")  # source: real is the default
    EditConfig(sampler="unipc", source="noise")
    with pytest.raises(ValidationError, match="sampler: ddim"):
        EditConfig(sampler="dpm++", inversion="null_text")
    with pytest.raises(ValidationError, match="unknown sampler"):
        EditConfig(sampler="plms", source="noise")
    # where images are read from is not an output setting
    a, b = EditConfig(studies="/a"), EditConfig(studies="/b", inversion_cache=3)
    assert a.fingerprint_dump() == b.fingerprint_dump() != EditConfig(sampler="dpm++").fingerprint_dump()


def test_unet_work_summary_per_kept_pair_against_the_reference(tmp_path):
    store = Store(str(tmp_path / "run"))
    rows = []
    for k in range(4):
        row = {name: None for name in S.PAIR_SCHEMA.names}
        row.update(row_id=f"i{k}", pair_id=f"i{k}", branch="intra", unet_sample_steps=30.0,
                   edit_source="real", inversion_psnr=30.0 + k, inversion_sample_steps=5.0)
        rows.append(row)
    row = {name: None for name in S.PAIR_SCHEMA.names}
    row.update(row_id="x", pair_id="x", branch="inter", unet_sample_steps=20.0)
    rows.append(row)
    store.write_table(S.CANDIDATES_DIR, pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA), "part-0")
    # an older shard without the new columns still reads (its rows count as uncounted)
    old = pa.table({"pair_id": ["o"], "branch": ["inter"]})
    store.write_table(S.CANDIDATES_DIR, old, "part-1")
    fig = unet_work_summary(store, {"intra": 2, "inter": 1})
    intra_fig, inter_fig = fig["intra"], fig["inter"]
    assert intra_fig["per_candidate"] == 30.0 and intra_fig["per_kept_pair"] == 60.0
    assert intra_fig["reference"]["per_candidate"] == 300 and intra_fig["reference"]["per_study"] == 3000
    assert intra_fig["reference"]["per_kept_pair"] == 600.0 and intra_fig["ratio_per_kept_pair"] == 0.1
    assert intra_fig["edit_source"] == {"real": 4} and intra_fig["inversion_psnr_mean_db"] == 31.5
    assert inter_fig["candidates"] == 2 and inter_fig["candidates_counted"] == 1
    assert inter_fig["reference"]["per_candidate"] == 100
