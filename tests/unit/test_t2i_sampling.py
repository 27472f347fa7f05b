"""Class-balanced sampling of the text-to-image UNet phase (``T2IConfig.finding_balance``) and
per-finding oversampling (``finding_weights``): the groups come from the studies labels, the weights
follow n^-beta times the finding's factor, and the plan draws by them."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pairaug_ray import schema as S
from pairaug_ray.io.store import Store
from pairaug_ray.train.data import plan_weighted
from pairaug_ray.train.t2i import (
    T2IConfig,
    balanced_weights,
    cache_key,
    draw_timestep,
    finding_groups,
    finding_multipliers,
    finding_positives,
    settings_fingerprint,
    snr_sampling_distribution,
    snr_weights,
    timestep_plan,
    trained_settings,
)


def _studies(tmp_path, labels: dict[str, dict]) -> str:
    out = str(tmp_path / "ingest")
    Store(out).write_table(S.STUDIES_DIR, pa.table({
        "row_id": list(labels), "labels": [json.dumps(v) for v in labels.values()]}), "shard")
    return out


def test_each_image_joins_its_rarest_positive_finding(tmp_path):
    labels = {"a": {"Cardiomegaly": 1, "Pneumothorax": 1}, "b": {"Cardiomegaly": 1},
              "c": {"Cardiomegaly": 1, "Edema": -1}, "d": {"No Finding": 1}, "e": {"Pneumothorax": 0},
              "f": {}}
    cfg = T2IConfig(studies=_studies(tmp_path, labels))
    items = pa.table({"item_id": [f"original:{k}" for k in ("a", "b", "c", "d", "e", "f")]})
    # uncertain (-1) and negated (0) findings do not count; "No Finding" is the no-positive group
    assert finding_groups(cfg, items) == ["Pneumothorax", "Cardiomegaly", "Cardiomegaly",
                                         "No Finding", "No Finding", "No Finding"]


def test_weights_follow_the_power_of_the_group_size():
    groups = ["common"] * 8 + ["rare"] * 2
    w0, shares0 = balanced_weights(groups, 0.0)
    assert np.allclose(w0, 0.1) and shares0["rare"] == {"images": 0.2, "samples": 0.2}
    w1, shares1 = balanced_weights(groups, 1.0)
    assert shares1["rare"]["samples"] == pytest.approx(0.5) and shares1["common"]["samples"] == pytest.approx(0.5)
    _, half = balanced_weights(groups, 0.5)   # 2·2^-0.5 / (2·2^-0.5 + 8·8^-0.5) = 1/3
    assert half["rare"]["samples"] == pytest.approx(1 / 3, abs=1e-4)
    assert w1.sum() == pytest.approx(1.0) and list(shares1) == ["common", "rare"]


def test_weighted_plan_draws_by_weight_and_is_prefix_stable():
    w = np.array([0.0, 1.0, 3.0])
    plan = plan_weighted(w, 400, 32, seed=1)
    assert plan.shape == (400, 32) and not (plan == 0).any()
    assert (plan == 2).mean() == pytest.approx(0.75, abs=0.02)
    assert np.array_equal(plan_weighted(w, 100, 32, seed=1), plan[:100])      # resume = same draws
    assert not np.array_equal(plan_weighted(w, 100, 32, seed=2), plan[:100])
    for bad in ([], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            plan_weighted(np.array(bad), 2, 2, seed=0)


def test_finding_balance_off_leaves_the_fingerprint_of_earlier_runs():
    """Off (0), the new field is not in the settings: run folders and demo caches made before it
    existed keep their fingerprint; on, it changes the fingerprint."""
    items = pa.table({"item_id": ["original:a", "original:b"], "text": ["No acute disease.", "Cardiomegaly."]})
    off, settings = settings_fingerprint(T2IConfig(), items)
    assert "finding_balance" not in settings and "finding_weights" not in settings and "steps" in settings
    on, settings_on = settings_fingerprint(T2IConfig(finding_balance=0.5), items)
    assert settings_on["finding_balance"] == 0.5 and on != off
    w, settings_w = settings_fingerprint(T2IConfig(finding_weights={"Pneumothorax": 4}), items)
    assert settings_w["finding_weights"] == {"Pneumothorax": 4.0} and w not in (on, off)
    f, settings_f = settings_fingerprint(T2IConfig(snr_gamma=5.0, snr_floor=0.5), items)
    g, settings_g = settings_fingerprint(T2IConfig(snr_gamma=5.0), items)
    assert "snr_floor" not in settings_g and settings_f["snr_floor"] == 0.5 and f != g
    h, settings_h = settings_fingerprint(T2IConfig(snr_gamma=5.0, snr_start=0.5), items)
    assert "snr_start" not in settings_g and settings_h["snr_start"] == 0.5 and h not in (f, g)


def test_min_snr_span_covers_the_named_share_of_unet_steps():
    cfg = T2IConfig(steps=10, snr_gamma=5.0, snr_start=0.2, snr_stop=0.7)
    assert [cfg.snr_gamma_at(u) for u in range(10)] == [None] * 2 + [5.0] * 5 + [None] * 3
    assert {T2IConfig(steps=10, snr_gamma=5.0).snr_gamma_at(u) for u in range(10)} == {5.0}
    assert {T2IConfig(steps=10).snr_gamma_at(u) for u in range(10)} == {None}
    with pytest.raises(ValueError, match="snr_start"):
        T2IConfig(snr_start=0.6, snr_stop=0.5)


def test_min_snr_importance_sampling_keeps_the_expected_loss_and_every_sample():
    """``snr_sampling``: t drawn ∝ the min-SNR weight, every sample weighed by the mean weight. The
    expected loss is the weighted uniform one; the per-sample spread is smaller; draws follow probs."""
    import torch
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    probs, scale = snr_sampling_distribution(ac, 20.0, "v_prediction")
    w = snr_weights(ac, torch.arange(1000), 20.0, "v_prediction")
    assert probs.shape == (1000,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert scale == pytest.approx(float(w.mean()), rel=1e-6)
    assert float(w.sum() ** 2 / (w ** 2).sum() / 1000) == pytest.approx(0.56, abs=0.01)  # docstring
    loss = 0.2 + (torch.arange(1000) / 1000.0) ** 2          # a per-timestep loss that varies with t
    exact = float((w * loss).mean())
    assert scale * float((probs * loss).sum()) == pytest.approx(exact, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    t_is = torch.cat([draw_timestep(g, 1000, probs) for _ in range(4000)])
    t_u = torch.cat([draw_timestep(g, 1000, None) for _ in range(4000)])
    per_is, per_u = scale * loss[t_is], w[t_u] * loss[t_u]
    assert float(per_is.mean()) == pytest.approx(exact, rel=0.03)
    assert float(per_u.mean()) == pytest.approx(exact, rel=0.05)
    assert float(per_is.var()) < 0.7 * float(per_u.var())   # measured 0.51 of it
    # few draws where min-SNR weighs little (the noisiest timesteps), as probs says
    assert float((t_is > 900).float().mean()) == pytest.approx(float(probs[901:].sum()), abs=0.01)
    assert float((t_is > 900).float().mean()) < 0.5 * float((t_u > 900).float().mean())
    # off: the uniform draw is the one earlier versions made (same generator state, same t)
    assert torch.equal(draw_timestep(torch.Generator().manual_seed(5), 1000, None),
                       torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(5)))


def test_timestep_plan_samples_only_inside_the_min_snr_span():
    import torch

    ac = torch.linspace(0.999, 0.001, 1000)
    cfg = T2IConfig(steps=10, snr_gamma=20.0, snr_stop=0.5, snr_sampling=True)
    plans = [timestep_plan(cfg, ac, "v_prediction", u) for u in range(10)]
    assert all(p is not None and s > 0 and gm == 20.0 for p, s, gm in plans[:5])
    assert all(p is None and s is None and gm is None for p, s, gm in plans[5:])
    weighted = timestep_plan(T2IConfig(steps=10, snr_gamma=20.0), ac, "v_prediction", 0)
    assert weighted[0] is None and weighted[1] is None and weighted[2] == 20.0


def test_demo_cache_key_of_the_defaults_is_the_one_earlier_versions_wrote():
    """``cached_t2i`` (the demo) keys its folder by ``trained_settings`` + item content. Pinned:
    eb2b0d7edb1eff8d is what the code wrote before ``finding_balance`` existed (computed with
    commit fdc961b^), so demo generators trained then are still found. A new T2IConfig field must
    go into ``_ADDED_FIELDS`` (or ``_RUNTIME_FIELDS``) to keep this; a changed default that really
    trains something else changes the key on purpose (update the pin then)."""
    items = pa.table({"item_id": ["original:a", "original:b"], "text": ["No acute disease.", "Cardiomegaly."],
                      "image_png": [b"\x89PNG-a", b"\x89PNG-b"]})
    assert cache_key(T2IConfig(), items) == "eb2b0d7edb1eff8d"
    assert not {"finding_balance", "finding_weights", "snr_floor", "snr_sampling", "out", "studies"} & set(
        trained_settings(T2IConfig()))
    assert cache_key(T2IConfig(snr_gamma=20.0, snr_sampling=True), items) != cache_key(
        T2IConfig(snr_gamma=20.0), items)
    assert cache_key(T2IConfig(finding_weights={"Pneumothorax": 2}), items) != "eb2b0d7edb1eff8d"
    assert cache_key(T2IConfig(num_workers=2, out="elsewhere"), items) == "eb2b0d7edb1eff8d"


def test_finding_weights_oversample_the_images_positive_for_a_finding(tmp_path):
    labels = {"a": {"Pneumothorax": 1, "Cardiomegaly": 1}, "b": {"Pneumothorax": -1},
              "c": {"Cardiomegaly": 1, "Edema": 1}, "d": {"No Finding": 1}}
    cfg = T2IConfig(studies=_studies(tmp_path, labels), finding_weights={"Pneumothorax": 4, "Edema": 2})
    items = pa.table({"item_id": [f"original:{k}" for k in labels]})
    positives = finding_positives(cfg, items)
    assert positives == [["Pneumothorax", "Cardiomegaly"], [], ["Cardiomegaly", "Edema"], []]
    mult = finding_multipliers(positives, cfg.finding_weights)
    assert mult.tolist() == [4.0, 1.0, 2.0, 1.0]          # an uncertain finding is not oversampled
    w, shares = balanced_weights(finding_groups(cfg, items, positives=positives), 0.0, mult)
    assert w.tolist() == pytest.approx([0.5, 0.125, 0.25, 0.125])
    assert shares["Pneumothorax"] == {"images": 0.25, "samples": 0.5}
    assert (plan_weighted(w, 200, 32, seed=0) == 0).mean() == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("weights, match", [({"PTX": 2}, "unknown finding"), ({"Pneumothorax": 0}, "> 0")])
def test_finding_weights_reject_unknown_findings_and_non_positive_factors(weights, match):
    with pytest.raises(ValueError, match=match):
        T2IConfig(finding_weights=weights)
