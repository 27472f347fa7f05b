"""Prompt-to-prompt editing (models/p2p.py) and the IntraAug edit stage, on the tiny offline SD."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pairaug_ray.io.dicom import decode_png
from pairaug_ray.models import p2p
from pairaug_ray.models.p2p import p2p_edit, p2p_edit_variants, refine_alignment, replace_alignment
from pairaug_ray.models.tiny import tiny_sd_pipeline
from pairaug_ray.stages.edit import EditConfig, EditStage

SOURCE = "there is a small left pleural effusion. the heart is normal in size."
REFINED = "there is a large left pleural effusion and mild pulmonary edema. the heart is enlarged."
STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0, image_size=64)


@pytest.fixture(scope="module")
def sharp_pipe():
    """The tiny SD with sharpened cross-attention keys.

    Random attention is near-uniform, so at random init the prompt acts almost only through the
    values and every word map is flat; sharper keys give maps that select tokens and regions, as
    trained ones do, so that attention control and LocalBlend have something to act on.
    """
    sharp = tiny_sd_pipeline(seed=0, image_size=64)
    for name, module in sharp.unet.named_modules():
        if name.endswith("attn2"):
            module.to_k.weight.data *= 30
    return sharp


def same_length_target(pipe) -> str:
    """SOURCE with one word swapped, with the same token count (edit='replace' needs it)."""
    n = len(pipe.tokenizer(SOURCE).input_ids)
    for target in (SOURCE.replace("left", "right"), SOURCE.replace("small", "large")):
        if len(pipe.tokenizer(target).input_ids) == n:
            return target
    raise AssertionError("no same-length edit of SOURCE under this tokenizer")


def processors(pipe) -> dict:
    return dict(pipe.unet.attn_processors)


def test_empty_edit_reproduces_the_source_generation(pipe):
    source, (edited,) = p2p_edit(pipe, SOURCE, [SOURCE], steps=STEPS, seed=3)
    assert source.shape == (64, 64) and source.dtype == np.float32
    assert 0.0 <= source.min() and source.max() <= 1.0
    np.testing.assert_allclose(edited, source, atol=1e-6)


def test_real_edit_changes_the_image(pipe):
    source, (edited,) = p2p_edit(pipe, SOURCE, [REFINED], steps=STEPS, seed=3)
    source_again, _ = p2p_edit(pipe, SOURCE, [SOURCE], steps=STEPS, seed=3)
    np.testing.assert_allclose(source, source_again, atol=1e-6)  # the source does not see the edit
    assert np.abs(edited - source).max() > 1e-3


def test_refine_alignment_maps_kept_tokens_and_frees_new_ones():
    src, tgt = [0, 5, 6, 7, 1], [0, 5, 8, 9, 6, 7, 1]
    a = refine_alignment(src, tgt, max_len=10)
    assert a.mapper[[0, 1, 4, 5, 6]].tolist() == [0, 1, 2, 3, 4]
    assert a.alphas[:7].tolist() == [1, 1, 0, 0, 1, 1, 1]
    # padding after the target's end takes the source's padding
    assert a.mapper[7:].tolist() == [5, 6, 7] and a.alphas[7:].tolist() == [1, 1, 1]
    ident = replace_alignment(src, [0, 5, 9, 7, 1], max_len=10)
    assert ident.mapper.tolist() == list(range(10))
    with pytest.raises(ValueError, match="same token count"):
        replace_alignment(src, tgt, max_len=10)


def test_target_attention_is_the_sources_inside_the_window_only(pipe, monkeypatch):
    """Mechanism: in the controlled steps the target's maps equal its source's; later they don't."""
    target = same_length_target(pipe)
    seen = []  # (step, is_cross, max |target - source| over the conditional half)
    original_edit = p2p.P2PController.edit

    def recording_edit(self, probs, is_cross, heads):
        out = original_edit(self, probs, is_cross, heads)
        q, k = out.shape[-2:]
        cond = out.view(2, -1, heads, q, k)[1]
        seen.append((self.cur_step, is_cross, (cond[1] - cond[0]).abs().max().item()))
        return out

    monkeypatch.setattr(p2p.P2PController, "edit", recording_edit)
    window = int(STEPS * 0.5)
    kw = dict(steps=STEPS, seed=5, edit="replace", cross_replace=0.5, self_replace=0.5)
    p2p_edit(pipe, SOURCE, [target], **kw)
    inside = [d for step, _, d in seen if step < window]
    assert {is_cross for step, is_cross, _ in seen if step < window} == {True, False}
    assert inside and max(inside) == 0.0
    # after the windows nothing is edited: attention runs through the fused kernel
    assert not [1 for step, _, _ in seen if step >= window]
    # LocalBlend reads the cross maps at every step: then they are seen, and free, after the window
    seen.clear()
    p2p_edit(pipe, SOURCE, [target], local_blend_words=["effusion"], **kw)
    cross_after = [d for step, is_cross, d in seen if step >= window and is_cross]
    assert max(d for step, _, d in seen if step < window) == 0.0
    assert cross_after and min(cross_after) > 0.0


def test_attention_control_keeps_the_edit_close_to_the_source(sharp_pipe):
    """Full control (replace, cross=self=1) vs none, from the same latent."""
    sharp = sharp_pipe
    target = same_length_target(sharp)
    for seed in (1, 2):
        kw = dict(steps=STEPS, seed=seed, edit="replace")
        source, (controlled,) = p2p_edit(sharp, SOURCE, [target], cross_replace=1.0, self_replace=1.0, **kw)
        _, (free,) = p2p_edit(sharp, SOURCE, [target], cross_replace=0.0, self_replace=0.0, **kw)
        d_controlled, d_free = np.abs(controlled - source).mean(), np.abs(free - source).mean()
        assert d_free > 0
        assert d_controlled < 0.7 * d_free, (seed, d_controlled, d_free)


def test_processors_are_restored_after_the_call(pipe):
    before = processors(pipe)
    p2p_edit(pipe, SOURCE, [REFINED], steps=2, seed=0, local_blend_words=["effusion"])
    after = processors(pipe)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_processors_are_restored_when_the_call_fails(pipe):
    before = processors(pipe)
    calls = {"n": 0}

    def fail_on_second_step(module, args, output):
        calls["n"] += 1
        active = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
        assert active == {"P2PAttnProcessor"}  # the control really was installed
        if calls["n"] == 2:
            raise RuntimeError("boom mid-call")

    handle = pipe.unet.mid_block.register_forward_hook(fail_on_second_step)
    try:
        with pytest.raises(RuntimeError, match="boom mid-call"):
            p2p_edit(pipe, SOURCE, [REFINED], steps=4, seed=0)
    finally:
        handle.remove()
    assert calls["n"] == 2
    after = processors(pipe)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_a_variant_does_not_depend_on_the_others_in_its_batch(pipe):
    variants = [(REFINED, 11), (same_length_target(pipe), 12), (SOURCE, 13), ("no pleural effusion.", 11)]
    batch = p2p_edit_variants(pipe, SOURCE, variants, steps=STEPS)
    assert len(batch) == 4
    for j in (0, 1):
        (alone,) = p2p_edit_variants(pipe, SOURCE, [variants[j]], steps=STEPS)
        np.testing.assert_allclose(batch[j][0], alone[0], atol=1e-5)
        np.testing.assert_allclose(batch[j][1], alone[1], atol=1e-5)
    np.testing.assert_allclose(batch[0][0], batch[3][0], atol=1e-6)  # same seed, same source
    assert np.abs(batch[0][0] - batch[1][0]).max() > 1e-2  # another seed, another source
    np.testing.assert_allclose(batch[2][1], batch[2][0], atol=1e-6)  # empty edit inside a batch
    # p2p_edit with one shared latent agrees with the variant of that seed
    source, (edited,) = p2p_edit(pipe, SOURCE, [REFINED], steps=STEPS, seed=11)
    np.testing.assert_allclose(source, batch[0][0], atol=1e-5)
    np.testing.assert_allclose(edited, batch[0][1], atol=1e-5)


def test_local_blend_mixes_latents_inside_the_word_region_only():
    # 2 sources, 2 targets (target j from source 1 - j); L = 4 tokens, the word at token 2
    word_masks = torch.tensor([[0, 0, 1, 0]] * 4, dtype=torch.float32)
    blend = p2p.LocalBlend(word_masks, torch.tensor([1, 0]), threshold=0.5)
    maps = torch.full((4, 16, 4), 0.01)
    maps[:, 0, 2] = 1.0  # every prompt's word attends to the top-left corner of a 4x4 grid
    blend.store(maps)
    latents = torch.randn(4, 4, 8, 8)
    out = blend(latents)
    mask = blend.mask((8, 8))[:, 0]
    assert 0 < mask.float().mean() < 0.5 and mask[:, 0, 0].all() and not mask[:, -1, -1].any()
    torch.testing.assert_close(out[:2], latents[:2])  # sources untouched
    for j, src in ((0, 1), (1, 0)):
        torch.testing.assert_close(out[2 + j][:, mask[j]], latents[2 + j][:, mask[j]])
        torch.testing.assert_close(out[2 + j][:, ~mask[j]], latents[src][:, ~mask[j]])


def test_local_blend_keeps_the_target_near_the_source_outside_the_words(sharp_pipe):
    kw = dict(steps=STEPS, seed=4)
    source, (free,) = p2p_edit(sharp_pipe, SOURCE, [REFINED], **kw)
    _, (blended,) = p2p_edit(
        sharp_pipe, SOURCE, [REFINED], local_blend_words=["effusion"], blend_threshold=0.9, **kw
    )
    _, (absent,) = p2p_edit(sharp_pipe, SOURCE, [REFINED], local_blend_words=["pacemaker"], **kw)
    assert np.abs(blended - source).mean() < 0.6 * np.abs(free - source).mean()
    np.testing.assert_allclose(absent, free, atol=1e-6)  # words in neither prompt: no blending


def test_bad_arguments_are_rejected(pipe):
    with pytest.raises(ValueError, match="edit must be"):
        p2p_edit(pipe, SOURCE, [REFINED], steps=2, edit="swap")
    with pytest.raises(ValueError, match="same token count"):
        p2p_edit(pipe, SOURCE, [REFINED], steps=2, edit="replace")
    assert type(next(iter(pipe.unet.attn_processors.values()))).__name__ != "P2PAttnProcessor"


def test_edit_stage_batches_variants_per_report_and_passes_other_rows():
    cfg = EditConfig(model="tiny://sd?size=64&seed=0", steps=4, max_variants_per_call=2)
    stage = EditStage(cfg)
    other_report = "the lungs are clear. no pleural effusion."
    rows = [
        {"pair_id": "a", "branch": "intra", "report": SOURCE, "rewritten_report": REFINED, "seed": 1},
        {"pair_id": "b", "branch": "inter", "report": SOURCE, "rewritten_report": REFINED, "seed": 2},
        {"pair_id": "c", "branch": "intra", "report": other_report, "rewritten_report": SOURCE, "seed": 3},
        {"pair_id": "d", "branch": "intra", "report": SOURCE, "rewritten_report": "no pleural effusion.", "seed": 4},
        {"pair_id": "e", "branch": "intra", "report": SOURCE, "rewritten_report": SOURCE, "seed": 5},
        {"pair_id": "f", "branch": "intra", "report": SOURCE, "rewritten_report": REFINED, "seed": None},
    ]
    frame = stage(pd.DataFrame(rows))
    out = {r["pair_id"]: r for r in frame.to_dict("records")}
    assert list(frame["pair_id"]) == ["a", "b", "c", "d", "e", "f"]
    assert out["f"]["status"] == "error" and out["f"]["error_class"] == "missing_seed"
    assert out["b"]["status"] == "ok" and not isinstance(out["b"].get("image_png"), bytes)
    variants = [(REFINED, 1), ("no pleural effusion.", 4), (SOURCE, 5)]
    expected = p2p_edit_variants(stage.pipe, SOURCE, variants, steps=4)
    for pid, (source, edited) in zip("ade", expected):
        row = out[pid]
        assert row["status"] == "ok" and row["generator_model"] == cfg.model
        image, source_image = decode_png(row["image_png"]), decode_png(row["source_image_png"])
        assert image.shape == (64, 64)
        np.testing.assert_allclose(image, edited, atol=2e-4)  # 16-bit PNG rounding
        np.testing.assert_allclose(source_image, source, atol=2e-4)
    e = out["e"]  # the empty edit
    np.testing.assert_array_equal(decode_png(e["image_png"]), decode_png(e["source_image_png"]))


def test_edits_of_several_reports_in_one_run_match_each_alone(pipe):
    other = "the lungs are clear. no pleural effusion."
    edits = [(SOURCE, REFINED, 1), (other, SOURCE, 2), (SOURCE, "no pleural effusion.", 3), (SOURCE, SOURCE, 1)]
    batch = p2p.p2p_edit_many(pipe, edits, steps=STEPS)
    for (src, tgt, seed), (source, edited) in zip(edits, batch):
        (alone_src, alone_edit), = p2p_edit_variants(pipe, src, [(tgt, seed)], steps=STEPS)
        np.testing.assert_allclose(source, alone_src, atol=1e-5)
        np.testing.assert_allclose(edited, alone_edit, atol=1e-5)
    np.testing.assert_allclose(batch[0][0], batch[3][0], atol=1e-6)  # same report + seed: one source
    np.testing.assert_allclose(batch[3][1], batch[3][0], atol=1e-6)  # empty edit
