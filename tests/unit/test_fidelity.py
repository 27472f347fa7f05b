"""Generation fidelity (train/fidelity.py): the paired with/without design on hand-made generators.

Oracle = PhantomCXR renders what the labeler reads from the prompt (what a perfect PhantomCXR
generator would draw); prompt-ignoring = the image depends on the seed only; laterality-swapped =
the oracle with the finding drawn on the other side. 64 px, 24 pairs, no Ray.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pydantic
import pytest

from pairaug_ray import phantom as P
from pairaug_ray.io.store import Store
from pairaug_ray.labeler import NEGATIVE, POSITIVE, label_report
from pairaug_ray.train import fidelity as F

SIZE, N = 64, 24
SWAP = {"left": "right", "right": "left"}


def oracle(prompts, seeds):
    return [P.render(label_report(p), size=SIZE, seed=s) for p, s in zip(prompts, seeds)]


def prompt_ignoring(prompts, seeds):
    # Different patients and findings per seed, nothing from the prompt.
    return [P.render(P.sample_findings(np.random.default_rng(s)), size=SIZE, seed=s) for s in seeds]


def side_swapped(prompts, seeds):
    out = []
    for p, s in zip(prompts, seeds):
        found = label_report(p)
        for obs in ("Pleural Effusion", "Pneumothorax"):
            f = found.get(obs)
            if f is not None and f.laterality in SWAP:
                evidence = re.sub(r"\b(left|right)\b", lambda m: SWAP[m.group(1)], f.evidence)
                found[obs] = replace(f, laterality=SWAP[f.laterality], evidence=evidence)
        out.append(P.render(found, size=SIZE, seed=s))
    return out


def _rows(result):
    return {(r["finding"], r["figure"]): r for r in result["rows"]}


@pytest.fixture(scope="module")
def oracle_result():
    return F.physical_fidelity(oracle, n=N, seed=0, findings=list(F.PROBES), bootstrap=100)


def test_oracle_scores_high_on_every_measurable_finding(oracle_result):
    rows = _rows(oracle_result)
    assert {f for f, _ in rows} == set(F.PROBES)
    assert {fig for (f, fig) in rows if F.PROBES[f].sided} == {"side", "present"}
    for key, r in rows.items():
        assert r["auc"] >= 0.95, (key, r)
        assert r["n"] == N and r["kind"] == "physical"
        assert r["ci_low"] <= r["auc"] <= r["ci_high"]
    assert oracle_result["images"] == 2 * N * len(F.PROBES)


def test_prompt_ignoring_generator_scores_one_half():
    res = F.physical_fidelity(prompt_ignoring, n=N, seed=1, bootstrap=50)
    assert {f for f, _ in _rows(res)} == set(F.DEFAULT_PHYSICAL)
    for key, r in _rows(res).items():
        assert 0.35 <= r["auc"] <= 0.65, (key, r)
        assert r["ci_low"] <= 0.5 <= r["ci_high"], (key, r)
        assert r["paired_win"] == pytest.approx(0.5)


def test_laterality_swapped_oracle_fails_the_side_check_only():
    res = _rows(F.physical_fidelity(side_swapped, n=N, seed=2, bootstrap=50,
                                    findings=["Pleural Effusion", "Pneumothorax"]))
    for finding in ("Pleural Effusion", "Pneumothorax"):
        assert res[finding, "side"]["auc"] < 0.2, res[finding, "side"]
        assert res[finding, "present"]["auc"] >= 0.9, res[finding, "present"]   # it is drawn, on the wrong side


def test_physical_fidelity_rejects_a_finding_without_a_probe_and_a_short_generator():
    with pytest.raises(KeyError, match="no PhantomCXR probe"):
        F.physical_fidelity(oracle, n=2, findings=["Fracture"])
    with pytest.raises(ValueError, match="returned 1 images for 2 prompts"):
        F.physical_fidelity(lambda prompts, seeds: oracle(prompts[:1], seeds[:1]), n=1,
                            findings=["Cardiomegaly"], bootstrap=0)


# ------------------------------------------------------------------------------------------------
# Pairs


@pytest.mark.parametrize("finding", ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Edema", "Atelectasis"])
def test_phantom_pairs_differ_only_in_the_finding(finding):
    pairs = F.phantom_pairs(finding, 8, seed=3)
    assert pairs == F.phantom_pairs(finding, 8, seed=3)                      # deterministic
    assert pairs != F.phantom_pairs(finding, 8, seed=4)
    probe = F.PROBES.get(finding)
    for p in pairs:
        pos, neg = label_report(p.positive), label_report(p.negative)
        assert pos[finding].state == POSITIVE and neg[finding].state == NEGATIVE
        if p.side is not None:
            assert pos[finding].laterality == p.side
        others = lambda found: {o: f.state for o, f in found.items() if o not in (finding, "No Finding")}
        assert others(pos) == others(neg)
        if probe is not None:
            assert p.severity in probe.severities
            assert not any(others(pos).get(c) in (POSITIVE, -1) for c in probe.confounders), p
        # Sentences that do not mention the finding are the same, in the same order.
        keep = lambda t: [s for s in re.split(r"(?<=[.!?])\s+|\n+", t)
                          if s and finding not in label_report(s)]
        assert keep(p.positive) == keep(p.negative)
    assert len({p.seed for p in pairs}) == len(pairs)


def test_phantom_pairs_survive_the_generators_prompt_truncation():
    cut = lambda s: " ".join(s.split()[:12])  # a tight text encoder
    for p in F.phantom_pairs("Pleural Effusion", 6, seed=0, truncate=cut):
        assert label_report(cut(p.positive))["Pleural Effusion"].state == POSITIVE
        assert label_report(cut(p.negative))["Pleural Effusion"].state == NEGATIVE


def test_negate_finding_keeps_sections_and_other_sentences():
    text = ("FINDINGS: Moderate cardiomegaly. Small left pleural effusion. No pneumothorax.\n\n"
            "IMPRESSION: Moderate cardiomegaly. The heart is enlarged. Small left pleural effusion.")
    assert F.negate_finding(text, "Cardiomegaly") == (
        "FINDINGS: The heart size is normal. Small left pleural effusion. No pneumothorax.\n\n"
        "IMPRESSION: The heart size is normal. Small left pleural effusion.")
    assert F.twin_ok(text, F.negate_finding(text, "Pleural Effusion"), "Pleural Effusion", "left")
    assert not F.twin_ok(text, F.negate_finding(text, "Pleural Effusion"), "Pleural Effusion", "right")
    with pytest.raises(ValueError):
        F.negate_finding(text, "No Finding")


def test_report_pairs_pick_positive_reports_and_skip_entangled_ones():
    reports = ["Moderate cardiomegaly. No pleural effusion.",
               "Cardiomegaly with a small right pleural effusion.",       # one sentence, two findings
               "Heart size is normal. Lungs are clear.",
               "Possible cardiomegaly.",                                  # uncertain: not a positive
               "Stable cardiomegaly. Mild pulmonary edema.",
               "Moderate cardiomegaly. No pleural effusion."]             # duplicate
    pairs, info = F.report_pairs(reports, "Cardiomegaly", n=10, seed=0)
    assert info == {"candidates": 3, "skipped": 1}
    assert sorted(p.positive for p in pairs) == ["Moderate cardiomegaly. No pleural effusion.",
                                                 "Stable cardiomegaly. Mild pulmonary edema."]
    assert {p.negative for p in pairs} == {"The heart size is normal. No pleural effusion.",
                                           "The heart size is normal. Mild pulmonary edema."}
    assert F.report_pairs(reports, "Cardiomegaly", n=1, seed=0)[0][0].positive in {p.positive for p in pairs}


# ------------------------------------------------------------------------------------------------
# Statistics


def test_paired_bootstrap_ci_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.6, 1, 40), rng.normal(0, 1, 40)
    a = F.paired_auc(pos, neg, bootstrap=200, seed=5)
    assert a == F.paired_auc(pos, neg, bootstrap=200, seed=5)
    assert a != F.paired_auc(pos, neg, bootstrap=200, seed=6)
    assert a["ci_low"] < a["auc"] < a["ci_high"] and a["n"] == 40
    from sklearn.metrics import roc_auc_score
    assert a["auc"] == pytest.approx(roc_auc_score(np.r_[np.ones(40), np.zeros(40)], np.r_[pos, neg]))
    assert F.paired_auc(pos, neg, bootstrap=0)["ci_low"] is None


def test_resampled_auc_does_not_compare_copies_of_a_pair_with_each_other():
    # In a resample, pair i drawn k times brings its own with/without comparison k times (as the
    # full sample does once per pair), not k^2 times: brute force over slots agrees with _auc.
    rng = np.random.default_rng(1)
    A, B = rng.integers(0, 4, 6).astype(float), rng.integers(0, 4, 6).astype(float)
    for _ in range(30):
        idx = rng.integers(0, 6, 6)
        a, b = A[idx], B[idx]
        kept = [(a[s] > b[t]) + 0.5 * (a[s] == b[t]) for s in range(6) for t in range(6)
                if s == t or idx[s] != idx[t]]
        assert F._auc(a, b, None, idx) == pytest.approx(np.mean(kept))
    assert F._auc(A, B, None, np.arange(6)) == F._auc(A, B)


def test_side_stratified_auc_removes_a_per_side_baseline():
    # Two strata whose baselines differ by more than the effect: pooled AUC suffers, stratified does not.
    strata = np.array(["left"] * 20 + ["right"] * 20)
    base = np.where(strata == "left", 1.0, -1.0)
    neg = base + np.linspace(0, 0.2, 40)
    pos = neg + 0.5
    assert F.paired_auc(pos, neg, bootstrap=0)["auc"] < 0.8
    assert F.paired_auc(pos, neg, strata=strata, bootstrap=0)["auc"] == 1.0


def test_body_midline_follows_the_patient():
    for seed in range(6):
        img = P.render({}, SIZE, seed)
        assert abs(F.body_midline(img) - P.Anatomy.sample(seed).cx) < 0.01
    assert F.body_midline(np.full((SIZE, SIZE), 0.5, np.float32)) is None
    noise = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    assert F.centre_on_midline(noise).shape == noise.shape


# ------------------------------------------------------------------------------------------------
# Classifier fidelity and the job


def test_classifier_fidelity_runs_end_to_end_and_is_deterministic():
    from pairaug_ray.models.vlp import load_vlp

    kwargs = {"findings": ["Cardiomegaly", "Pleural Effusion"], "n": 6, "seed": 0, "bootstrap": 20,
              "batch_size": 8}
    a = F.classifier_fidelity(oracle, "tiny://vlp?seed=0", **kwargs)
    assert a["kind"] == "classifier" and a["prompts"] == "phantom templates" and a["images"] == 24
    assert a["vlp"] == "tiny://vlp?seed=0"
    assert [r["finding"] for r in a["rows"]] == ["Cardiomegaly", "Pleural Effusion"]
    for r in a["rows"]:
        assert r["kind"] == "classifier" and r["figure"] == "present" and r["n"] == 6
        assert 0.0 <= r["ci_low"] <= r["ci_high"] <= 1.0 and 0.0 <= r["auc"] <= 1.0
        assert 0.0 < r["mean_with"] < 1.0 and 0.0 < r["mean_without"] < 1.0     # probabilities
    # A loaded model gives the same numbers as its URI; the same seed, the same rows.
    assert F.classifier_fidelity(oracle, load_vlp("tiny://vlp?seed=0"), **kwargs)["rows"] == a["rows"]


def test_run_fidelity_writes_json_and_markdown_from_a_studies_table(tmp_path):
    reports = [st.report for st in P.iter_studies(60, seed=0, size=32, report_source="template",
                                                   with_dicom=False)]
    Store(str(tmp_path / "ingest")).write_table(
        "studies", pa.table({"report": reports, "split": ["test"] * len(reports)}), "part-0")
    cfg = F.FidelityConfig(model="unused", studies=str(tmp_path / "ingest"), split="test",
                           vlp="tiny://vlp?seed=0", out=str(tmp_path / "fid"), n_pairs=4, bootstrap=10,
                           findings=["Cardiomegaly"], classifier_findings=["Pleural Effusion", "Fracture"],
                           min_pairs=3)
    res = F.run_fidelity(cfg, generate=oracle)
    saved = json.loads((tmp_path / "fid" / "fidelity.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    kinds = [(r["finding"], r["kind"]) for r in res["rows"]]
    assert kinds == [("Cardiomegaly", "physical"), ("Pleural Effusion", "classifier"), ("Fracture", "classifier")]
    assert res["classifier"]["prompts"] == "reports"
    md = (tmp_path / "fid" / "fidelity.md").read_text()
    assert md == F.fidelity_markdown(res)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + len(res["rows"]) and all(ln.count("|") == 9 for ln in lines)
    assert "| Cardiomegaly | physical | present | 1.000 |" in md
    with pytest.raises(ValueError, match="no reports in split"):
        F.studies_reports(str(tmp_path / "ingest"), split="train")


def test_config_forbids_unknown_fields_and_describes_every_field():
    with pytest.raises(pydantic.ValidationError, match="n_pair"):
        F.FidelityConfig(n_pair=3)
    assert all(f.description for f in F.FidelityConfig.model_fields.values())


def test_run_fidelity_names_bad_settings_before_loading_a_generator(tmp_path):
    def never(prompts, seeds):
        raise AssertionError("the generator must not run")

    base = {"model": str(tmp_path / "missing"), "out": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="nothing to measure"):
        F.run_fidelity(F.FidelityConfig(**base, physical=False))
    with pytest.raises(KeyError, match="no PhantomCXR probe for 'Fracture'"):
        F.run_fidelity(F.FidelityConfig(**base, findings=["Fracture"]))
    with pytest.raises(ValueError, match="unknown finding 'Cardiomegally'"):
        F.run_fidelity(F.FidelityConfig(**base, vlp="tiny://vlp?seed=0", classifier_findings=["Cardiomegally"]))
    with pytest.raises(FileNotFoundError, match="no studies table"):
        F.run_fidelity(F.FidelityConfig(**base, vlp="tiny://vlp?seed=0", studies=str(tmp_path / "none")),
                       generate=never)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        F.run_fidelity(F.FidelityConfig(**base))
    assert not (tmp_path / "out").exists()


def test_image_generator_builds_the_stage_generator_from_a_model_string():
    gen = F.image_generator("tiny://sd?size=32&seed=0", steps=2, image_size=32, device="cpu")
    a, _, c = gen(["Large left pleural effusion.", "No pleural effusion.", "Large left pleural effusion."], [1, 1, 2])
    assert a.shape == (32, 32) and a.dtype == np.float32 and 0.0 <= a.min() <= a.max() <= 1.0
    # Seeded per prompt: the same image in another batch (up to float rounding of batched maths).
    np.testing.assert_allclose(a, gen(["Large left pleural effusion."], [1])[0], atol=1e-5)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------------------------
# Kept-pair classifier fidelity (the augment manifest's table)


class BrightnessVLP:
    """A scorer that reads any finding from the image's brightness: P(finding) rises with the mean
    pixel ("{label}" and "no {label}" prompts point in opposite directions)."""

    def eval(self):
        return self

    def encode_image(self, pixels):
        import torch

        m = pixels.float().mean(dim=(1, 2)) * 2 - 1
        return torch.nn.functional.normalize(torch.stack([m, torch.full_like(m, 0.1)], 1), dim=-1)

    def encode_text(self, texts):
        import torch

        return torch.tensor([[-1.0, 0.0] if t.startswith("no ") else [1.0, 0.0] for t in texts])


def _kept_pairs(n: int, bright_means: str, branch: str = "inter"):
    from pairaug_ray.io.dicom import encode_png

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        stated = i % 2 == 0
        bright = stated if bright_means == "stated" else not stated
        img = np.clip(rng.normal(0.7 if bright else 0.3, 0.05, (16, 16)), 0, 1).astype(np.float32)
        labels = {"Cardiomegaly": POSITIVE if stated else NEGATIVE}
        if i % 3 == 0:
            labels["Edema"] = POSITIVE                   # unrelated to brightness
        if i < 2:
            labels["Pneumothorax"] = POSITIVE            # too few stated rows for an AUC
        rows.append({"branch": branch, "image_png": encode_png(img, bits=8), "labels": json.dumps(labels)})
    return pa.Table.from_pylist(rows)


def test_kept_pair_fidelity_reads_what_the_images_show():
    findings = ["Cardiomegaly", "Edema", "Pneumothorax"]
    good = F.kept_pair_fidelity(_kept_pairs(40, "stated"), BrightnessVLP(), findings, bootstrap=50)
    rows = {r["finding"]: r for r in good["branches"]["inter"]["rows"]}
    assert rows["Cardiomegaly"]["auc"] == 1.0 and rows["Cardiomegaly"]["n_with"] == 20
    assert rows["Cardiomegaly"]["ci_low"] is not None
    assert 0.3 < rows["Edema"]["auc"] < 0.7                  # unrelated to what is drawn
    assert rows["Pneumothorax"]["auc"] is None               # 2 stated rows: no AUC
    # images that show the finding where the report negates it score 0
    bad = F.kept_pair_fidelity(_kept_pairs(40, "negated"), BrightnessVLP(), findings, bootstrap=0)
    assert bad["branches"]["inter"]["rows"][0]["auc"] == 0.0
    # a sample of at most max_pairs rows per branch; branches without rows are absent
    capped = F.kept_pair_fidelity(_kept_pairs(40, "stated"), BrightnessVLP(), findings, max_pairs=10,
                                  bootstrap=0)
    assert capped["branches"]["inter"]["n_scored"] == 10 and "intra" not in capped["branches"]
    table = F.kept_fidelity_markdown(good)
    assert "| inter | Cardiomegaly | 1.000 |" in table and "Pneumothorax" not in table
