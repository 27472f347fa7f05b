"""The local profile's stage (stages/local.py): the same rows out as the stages one after the other,
one diffusion pipeline for generate + edit, threads from the CPU share, batches of whole studies."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pairaug_ray import schema as S
from pairaug_ray.io.store import Store
from pairaug_ray.stages.edit import EditConfig, EditStage
from pairaug_ray.stages.generate import GenerateConfig, GenerateStage
from pairaug_ray.stages.local import LocalConfig, LocalStage, LocalStageArgs, local_batch_rows, torch_threads_for
from pairaug_ray.stages.plan import plan_candidates
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteStage
from pairaug_ray.stages.score import ScoreConfig, ScoreStage
from pairaug_ray.stages.write import WriteConfig, WriteStage

REPORTS = ["Moderate left pleural effusion. Heart size is normal. No pneumothorax.",
           "Mild cardiomegaly. Lungs are clear. No pleural effusion."]


def test_batch_rows_are_whole_studies_and_threads_follow_the_cpu_share():
    stages = [RewriteConfig(batch_size=16), GenerateConfig(batch_size=24), EditConfig(batch_size=24),
              ScoreConfig(batch_size=48)]
    assert local_batch_rows(LocalConfig(), stages, per_study=3) == 15       # min 16 -> 5 studies
    assert local_batch_rows(LocalConfig(batch_size=40), stages, per_study=11) == 33
    assert local_batch_rows(LocalConfig(batch_size=4), stages, per_study=11) == 11  # at least one study
    assert torch_threads_for(LocalConfig(num_cpus=0.75)) == 1
    assert torch_threads_for(LocalConfig(num_cpus=4)) == 4
    assert torch_threads_for(LocalConfig(num_cpus=0.5, torch_threads=3)) == 3


def _planned() -> pd.DataFrame:
    studies = pd.DataFrame({"row_id": ["s1", "s2"], "study_id": ["t1", "t2"], "patient_id": ["p1", "p2"],
                            "split": ["train", "train"], "view_position": ["PA", "PA"], "report": REPORTS})
    return plan_candidates(studies, inter_variants=1, intra_variants=2, seed=0, fp="test")


def test_local_stage_equals_the_stages_in_sequence(tmp_path):
    model = "tiny://sd?size=32&seed=0"
    cfgs = dict(rewrite=RewriteConfig(), generate=GenerateConfig(model=model, steps=2),
                edit=EditConfig(model=model, steps=2, source="noise"),
                score=ScoreConfig(model="tiny://vlp?seed=0&image_size=32"))
    threads = torch.get_num_threads()
    try:
        local = LocalStage(LocalStageArgs(
            local=LocalConfig(num_cpus=1), **cfgs,
            write=WriteConfig(out=str(tmp_path / "local"), table=S.CANDIDATES_DIR, schema_name="pair")))
        assert torch.get_num_threads() == 1 and local.pipelines_loaded == 1
        assert local.stages[1].generator.pipe is local.stages[2].pipe    # generate and edit share it
        summary = local(_planned())
    finally:
        torch.set_num_threads(threads)
    assert len(summary) == 6 and set(summary["status"]) == {"ok"}
    assert {f"_sec_{n}" for n in ("rewrite", "generate", "edit", "score", "write")} <= set(summary.columns)

    frame = _planned()
    for stage in (RewriteStage(cfgs["rewrite"]), GenerateStage(cfgs["generate"]), EditStage(cfgs["edit"]),
                  ScoreStage(cfgs["score"])):
        frame = stage(frame)
    WriteStage(WriteConfig(out=str(tmp_path / "seq"), table=S.CANDIDATES_DIR, schema_name="pair"))(frame)

    cols = ["pair_id", "rewritten_report", "image_png", "score_align", "score_delta", "score_img"]
    a = Store(str(tmp_path / "local")).read_table(S.CANDIDATES_DIR, cols).to_pandas().sort_values("pair_id")
    b = Store(str(tmp_path / "seq")).read_table(S.CANDIDATES_DIR, cols).to_pandas().sort_values("pair_id")
    assert list(a["pair_id"]) == list(b["pair_id"]) and list(a["rewritten_report"]) == list(b["rewritten_report"])
    from pairaug_ray.io.dicom import decode_png

    for x, y in zip(a["image_png"], b["image_png"]):  # equal up to float rounding (thread counts)
        assert abs(decode_png(x) - decode_png(y)).max() < 2e-3
    for col in ("score_align", "score_delta", "score_img"):
        assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), abs=1e-4, nan_ok=True)
