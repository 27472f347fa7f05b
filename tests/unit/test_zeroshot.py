"""Zero-shot scoring on constructed embeddings, AUC + CI, label policy, patient-level fractions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pairaug_ray.labeler import OBSERVATIONS
from pairaug_ray.train.finetune import fraction_index, sample_patients
from pairaug_ray.train.zeroshot import (
    LabeledSet, auc_with_ci, label_matrix, parse_templates, prompt_embeddings, score_classes,
    zeroshot_eval, zeroshot_scores)

CLASSES = ["Cardiomegaly", "Pleural Effusion"]


class FakeVLP:
    """Image embeddings built to point at the positive (or negative) prompt of each class.

    Text: "{label}" -> e_{2j}, "no {label}" -> e_{2j+1}. An image whose pixel [0, j] is 1 gets
    embedding e_{2j} for class j (with `reverse`, e_{2j+1}) plus the negative axes of the other
    classes, so its similarity to the positive prompt of class j is high exactly when labeled.
    """

    def __init__(self, classes, reverse=False):
        from pairaug_ray.models.vlp import VLPConfig

        self.classes = [c.lower() for c in classes]
        self.dim = 2 * len(classes) + 1
        self.reverse = reverse
        self.config = VLPConfig(vision_config={}, text_config={}, embed_dim=self.dim, image_size=16)
        self.texts_seen = []

    def eval(self):
        return self

    def encode_text(self, texts):
        self.texts_seen += list(texts)
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            neg = t not in self.classes   # "no finding" is a class name; "no no finding" its negation
            name = t[3:] if neg else t
            out[i, 2 * self.classes.index(name) + int(neg)] = 1.0
        return out

    def encode_image(self, pixels):
        x = torch.as_tensor(pixels)
        out = torch.zeros(len(x), self.dim)
        for j in range(len(self.classes)):
            on = x[:, 0, j] > 0.5
            pos_axis = on ^ self.reverse
            out[:, 2 * j] = pos_axis.float()
            out[:, 2 * j + 1] = (~pos_axis).float()
        out[:, -1] = 0.1
        return F.normalize(out, dim=-1)


def _labeled(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 16, 16), np.float32)
    labels = []
    for i in range(n):
        lab = {}
        for j, c in enumerate(CLASSES):
            if rng.random() < 0.4:
                images[i, 0, j] = 1.0
                lab[c] = 1
            elif rng.random() < 0.5:
                lab[c] = 0          # else: not mentioned (counts as negative)
        labels.append(lab)
    return LabeledSet(images, labels, [f"p{i // 2}" for i in range(n)])


def test_aligned_embeddings_give_auc_one_and_reversed_zero():
    data = _labeled()
    res = zeroshot_eval(FakeVLP(CLASSES), data, classes=CLASSES, bootstrap=50)
    assert all(res["classes"][c]["auc"] == pytest.approx(1.0) for c in CLASSES)
    assert res["mean_auc"] == pytest.approx(1.0)
    rev = zeroshot_eval(FakeVLP(CLASSES, reverse=True), data, classes=CLASSES, bootstrap=50)
    assert all(rev["classes"][c]["auc"] == pytest.approx(0.0) for c in CLASSES)


def test_prompts_are_label_and_no_label():
    fake = FakeVLP(CLASSES)
    zeroshot_eval(fake, _labeled(), classes=CLASSES, bootstrap=0)
    assert fake.texts_seen == ["cardiomegaly", "pleural effusion", "no cardiomegaly", "no pleural effusion"]


def test_scores_are_softmax_of_positive_vs_negative_similarity():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    s = zeroshot_scores(img, pos, neg)
    e = np.exp(1.0)
    assert s[:, 0] == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-6)


def test_template_ensemble_averages_and_renormalizes():
    fake = FakeVLP(CLASSES)
    pos, neg = prompt_embeddings(fake, CLASSES, parse_templates("{}|no {};{label}|no {label}"))
    assert torch.allclose(pos.norm(dim=-1), torch.ones(2))
    assert pos[0, 0] == pytest.approx(1.0) and neg[1, 3] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        parse_templates("effusion|no effusion")


def test_auc_ci_contains_point_estimate_and_is_seeded():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.3).astype(np.float32)
    score = y * 0.8 + rng.normal(0, 0.6, 200)
    a = auc_with_ci(y, score, bootstrap=200, seed=1)
    assert 0.5 < a["auc"] < 1.0
    assert a["ci_low"] <= a["auc"] <= a["ci_high"] and a["ci_low"] < a["ci_high"]
    assert a == auc_with_ci(y, score, bootstrap=200, seed=1)
    assert a["n"] == 200 and a["n_pos"] == int(y.sum())


def test_single_valued_class_is_na_and_left_out_of_the_mean():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], np.float32)
    s = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.5], [0.1, 0.7]], np.float32)
    res = score_classes(y, s, ["A", "B"], bootstrap=10)
    assert res["classes"]["B"]["auc"] is None and res["classes"]["B"]["ci_low"] is None
    assert res["classes"]["A"]["auc"] == pytest.approx(1.0)
    assert res["mean_auc"] == pytest.approx(1.0) and res["n_classes_scored"] == 1


def test_label_policy_not_mentioned_is_negative_uncertain_per_policy():
    labels = [{"Edema": 1}, {"Edema": 0}, {}, {"Edema": -1}]
    assert label_matrix(labels, ["Edema"], "zeros")[:, 0].tolist() == [1, 0, 0, 0]
    assert label_matrix(labels, ["Edema"], "ones")[:, 0].tolist() == [1, 0, 0, 1]
    ignored = label_matrix(labels, ["Edema"], "ignore")[:, 0]
    assert ignored[:3].tolist() == [1, 0, 0] and np.isnan(ignored[3])
    # ignored rows are left out of the AUC
    r = auc_with_ci(ignored, np.array([0.9, 0.1, 0.2, 0.0]), bootstrap=0)
    assert r["n"] == 3 and r["auc"] == pytest.approx(1.0)


def test_patient_fractions_keep_patients_whole_nested_and_deterministic():
    patients = [f"p{i % 137}" for i in range(500)]  # 137 patients, 3-4 rows each
    for f in (0.01, 0.1, 0.5, 1.0):
        idx = fraction_index(patients, f, seed=0)
        chosen = {patients[i] for i in idx}
        rest = {p for i, p in enumerate(patients) if i not in set(idx)}
        assert chosen and not chosen & rest          # no patient on both sides
        assert idx == fraction_index(patients, f, seed=0)
    assert len(sample_patients(patients, 0.01)) == 1   # 1% of 137 rounds to 1, never 0
    assert len(sample_patients(patients, 0.001)) == 1
    assert len(sample_patients(patients, 0.1)) == 14
    assert len(sample_patients(patients, 1.0)) == 137
    assert sample_patients(patients, 0.01) <= sample_patients(patients, 0.1) <= sample_patients(patients, 1.0)
    assert sample_patients(patients, 0.1, seed=0) != sample_patients(patients, 0.1, seed=1)


def test_default_classes_are_the_14_observations():
    data = _labeled(10)
    res = zeroshot_eval(FakeVLP(OBSERVATIONS), data, bootstrap=0)
    assert list(res["classes"]) == OBSERVATIONS


def test_chexpert_style_manifest_csv(tmp_path):
    from pairaug_ray.io.dicom import encode_png
    from pairaug_ray.train.zeroshot import load_labeled

    root = tmp_path / "CheXpert-v1.0-small"
    rows = ["Path,Sex,Cardiomegaly,Pleural Effusion,Edema"]
    for i, (card, eff) in enumerate([("1.0", "0.0"), ("", "-1.0"), ("0.0", "1.0")]):
        rel = f"CheXpert-v1.0-small/valid/patient{640 + i // 2}/study1/view1_frontal.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        img = np.zeros((20, 10), np.float32)
        img[:, i] = 1.0
        (tmp_path / rel).write_bytes(encode_png(img, bits=8))
        rows.append(f"{rel},Female,{card},{eff},")
    (root / "valid.csv").write_text("\n".join(rows) + "\n")
    data = load_labeled(str(root / "valid.csv"), split=None, image_size=16)
    assert data.images.shape == (3, 16, 16)
    assert data.labels == [{"Cardiomegaly": 1, "Pleural Effusion": 0}, {"Pleural Effusion": -1},
                           {"Cardiomegaly": 0, "Pleural Effusion": 1}]
    assert data.patient_ids == ["patient640", "patient640", "patient641"]
    y = label_matrix(data.labels, ["Cardiomegaly", "Pleural Effusion", "Edema"])
    assert y[:, 0].tolist() == [1, 0, 0] and np.isnan(y[1, 1]) and y[:, 2].tolist() == [0, 0, 0]


def test_mean_auc_ci_and_the_paired_difference():
    from pairaug_ray.train.zeroshot import mean_auc_ci, paired_mean_auc_diff, score_classes

    rng = np.random.default_rng(0)
    y = (rng.random((300, 3)) < 0.4).astype(np.float32)
    y[:10, 2] = np.nan                                   # uncertain: left out
    good = y + rng.normal(0, 0.6, y.shape)               # informative scores
    better = y + rng.normal(0, 0.3, y.shape)
    noise = rng.normal(0, 1, y.shape)
    res = score_classes(y, np.nan_to_num(good), ["a", "b", "c"], bootstrap=100, seed=0)
    lo, hi = res["mean_auc_ci"]
    assert lo < res["mean_auc"] < hi and hi - lo < 0.15
    d = paired_mean_auc_diff(y, np.nan_to_num(better), np.nan_to_num(good), bootstrap=100)
    assert d["diff"] > 0 and d["ci_low"] > 0 and d["p_b_better"] == 1.0     # clearly better
    d = paired_mean_auc_diff(y, noise, np.nan_to_num(good), bootstrap=100)
    assert d["diff"] < 0 and d["ci_high"] < 0                                 # clearly worse
    same = paired_mean_auc_diff(y, np.nan_to_num(good), np.nan_to_num(good), bootstrap=50)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0       # paired: no spread
    assert mean_auc_ci(y[:, :0], good[:, :0], 10) is None
    one_label = np.zeros((20, 1), np.float32)
    assert paired_mean_auc_diff(one_label, good[:20, :1], good[:20, :1])["diff"] is None
