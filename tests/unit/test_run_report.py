"""The run report: example grids, score histograms, counts; local and s3, empty branches."""

import io
import os
import re

import numpy as np
import pytest
import pyarrow as pa
from PIL import Image

from pairaug_ray import schema as S
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.run_report import describe_change, write_report


def png16(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size)) * 65535).astype(np.uint16)
    img = Image.fromarray(arr)  # uint16 -> mode "I;16"
    assert img.mode == "I;16"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def studies_table() -> pa.Table:
    rows = [dict(row_id=f"r{i}", study_id=f"s{i}", patient_id=f"p{i}", image_id=f"i{i}", split="train",
                 view_position="PA", modality="CR", bits_stored=16, image_png=png16(i),
                 report=f"Study {i} report: <b>heart</b> size normal & lungs clear.",
                 findings_text="", impression_text="", labels="{}", findings="{}",
                 source_uri=f"mem://{i}") for i in range(3)]
    return pa.Table.from_pylist(rows, schema=S.STUDY_SCHEMA)


# What llm/validation.finding_change stores: {observation: [before, after]}, [state, severity, side].
CHANGE = '{"Edema": [[1, "mild", null], [0, null, null]], "Pleural Effusion": [null, [1, "moderate", "left"]]}'


def cand(src: int, branch: str, variant: int, align, delta=None, img=None, kept=None, reason=None):
    return dict(row_id=f"{branch}{src}{variant}", pair_id=f"{branch}{src}{variant}", branch=branch,
                variant=variant, seed=variant, source_row_id=f"r{src}", study_id=f"s{src}",
                patient_id=f"p{src}", split="train", view_position="PA",
                report=f"Study {src} report", change=CHANGE,
                rewritten_report=f"{branch} v{variant} of {src}: new <b>edema</b> & effusion",
                labels="{}", findings="{}", image_png=png16(100 + src * 10 + variant),
                source_image_png=png16(500 + src) if branch == "intra" else None,
                score_align=align, score_delta=delta, score_img=img, kept=kept,
                prune_reason=reason, rewrite_backend="rule", rewrite_model="labeler-flip",
                generator_model="tiny://sd", score_model="tiny://clip",
                config_fingerprint="abc123", code_version="0.1.0")


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def assert_images_exist(root, page: str) -> None:
    srcs = img_sources(page)
    assert srcs, "no images in the report"
    for src in srcs:
        assert src.startswith("report/") and src.endswith(".png")
        with Image.open(os.path.join(root, src)) as im:
            if not os.path.basename(src).startswith("hist_"):  # thumbnails: 8-bit grayscale
                assert im.mode == "L" and max(im.size) <= 192


def test_report_both_branches(tmp_path):
    store = Store(str(tmp_path / "run"))
    store.write_table(S.STUDIES_DIR, studies_table(), "part-0")
    rows = [cand(0, "inter", 0, 0.40, kept=True, reason=""),
            cand(0, "inter", 1, 0.10, kept=False, reason="align<thr"),
            cand(1, "inter", 0, 0.35, kept=True, reason=""),
            cand(0, "intra", 0, 0.50, 0.20, 0.90, kept=True, reason=""),
            cand(0, "intra", 1, 0.30, 0.10, 0.80, kept=False, reason="align<mean-m,delta<mean-m"),
            cand(2, "intra", 0, 0.45, 0.25, 0.95, kept=True, reason="")]
    store.write_table(S.CANDIDATES_DIR, pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA), "part-0")
    quarantine = pa.Table.from_pylist(
        [dict(row_id="q1", source_uri="x", stage="decode", error_class="not_dicom", error="bad")] * 2,
        schema=S.QUARANTINE_SCHEMA)
    store.write_table(S.QUARANTINE_DIR, quarantine, "part-0")

    rel = write_report(store, inter_threshold=0.25, intra_margin=0.003, max_examples=6)
    assert rel == "report.html"
    page = (tmp_path / "run" / rel).read_text()

    # Text is escaped: the raw tag never reaches the page.
    assert "Study 0 report: &lt;b&gt;heart&lt;/b&gt; size normal &amp; lungs clear." in page
    assert "inter v1 of 0: new &lt;b&gt;edema&lt;/b&gt; &amp; effusion" in page
    assert "<b>heart</b>" not in page and "<b>edema</b>" not in page
    assert_images_exist(tmp_path / "run", page)
    assert "report/hist_inter.png" in img_sources(page)
    assert "report/hist_intra.png" in img_sources(page)
    # 3 sources, each with its original; the source with both branches comes first.
    assert page.count('<b>original</b>') == 3
    assert page.index("(row r0)") < page.index("(row r1)")
    assert "branch-inter" in page and "branch-intra" in page
    assert "p2p reference" in page
    # Counts per branch and the badges.
    assert re.search(r'id="counts-inter"><td>InterAug</td><td>3</td><td>2</td><td>1</td>', page)
    assert re.search(r'id="counts-intra"><td>IntraAug</td><td>3</td><td>2</td><td>1</td>', page)
    assert page.count('class="badge pruned"') == 2
    assert "align&lt;mean-m,delta&lt;mean-m" in page
    # The requested change in words, not JSON.
    assert "change: Edema: mild → none; Pleural Effusion: not mentioned → moderate, left" in page
    assert "[[1," not in page
    assert "tiny://clip" in page  # the scorer is in the provenance table (score_model column)
    # Thresholds: the given InterAug one, IntraAug mean - margin from the candidates.
    assert "<td>0.250</td>" in page
    mean_align = np.mean([0.50, 0.30, 0.45])
    assert f"<td>{mean_align:.4f}</td>" in page and f"<td>{mean_align - 0.003:.4f}</td>" in page
    assert re.search(r'id="quarantine-run">Quarantined rows \(run folder\): 2<', page)

    # Given means replace the computed ones; max_examples caps the grid.
    write_report(store, max_examples=1,
                 intra_means={"score_align": 0.7, "score_delta": 0.6, "score_img": 0.5})
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<td>0.6970</td>" in page and "<td>0.5970</td>" in page and "<td>0.4970</td>" in page
    assert "<td>0.300</td>" in page  # PruneConfig's default InterAug threshold
    assert page.count('<b>original</b>') == 1 and "(row r0)" in page
    assert_images_exist(tmp_path / "run", page)


def test_only_inter_and_unpruned_candidates(tmp_path):
    """Studies in another folder; candidates not pruned yet (kept null): rules applied here."""
    studies = Store(str(tmp_path / "ingest"))
    studies.write_table(S.STUDIES_DIR, studies_table(), "part-0")
    store = Store(str(tmp_path / "run"))
    rows = [cand(1, "inter", 0, 0.40), cand(1, "inter", 1, 0.20), cand(2, "inter", 0, float("nan"))]
    store.write_table(S.CANDIDATES_DIR, pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA), "part-0")

    write_report(store, studies_store=studies, inter_threshold=0.3)
    page = (tmp_path / "run" / "report.html").read_text()
    assert "IntraAug: no candidates" in page and "report/hist_intra.png" not in page
    assert re.search(r'id="counts-inter"><td>InterAug</td><td>3</td><td>1</td><td>2</td>', page)
    assert "score_align 0.200 ≤ threshold 0.300" in page and "missing score_align" in page
    assert "Study 1 report: &lt;b&gt;heart" in page
    assert_images_exist(tmp_path / "run", page)
    assert "no quarantine table" in page


def test_missing_tables(tmp_path):
    store = Store(str(tmp_path / "empty"))
    write_report(store)
    page = (tmp_path / "empty" / "report.html").read_text()
    assert "InterAug: no candidates" in page and "IntraAug: no candidates" in page
    assert img_sources(page) == []


def test_report_on_s3(s3_bucket):
    endpoint, bucket = s3_bucket
    store = Store(f"s3://{bucket}/run", StorageConfig(endpoint_url=endpoint))
    store.write_table(S.STUDIES_DIR, studies_table(), "part-0")
    rows = [cand(0, "inter", 0, 0.4, kept=True, reason=""),
            cand(0, "intra", 0, 0.5, 0.2, 0.9, kept=True, reason="")]
    store.write_table(S.CANDIDATES_DIR, pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA), "part-0")
    rel = write_report(store)
    page = store.read_bytes(rel).decode()
    srcs = img_sources(page)
    assert len(srcs) == 6  # 2 histograms, original, inter, intra, p2p reference
    for src in srcs:
        assert store.read_bytes(src)[:8] == b"\x89PNG\r\n\x1a\n"


def test_pruned_reasons_come_from_the_rules_when_pairs_exist(tmp_path):
    """The pipeline writes candidates before pruning (kept null) and the kept ones to pairs: the
    report names why each other one was pruned, with its score and the cutoff."""
    store = Store(str(tmp_path / "run"))
    store.write_table(S.STUDIES_DIR, studies_table(), "part-0")
    rows = [cand(0, "inter", 0, 0.40), cand(0, "inter", 1, 0.12),
            cand(1, "intra", 0, 0.50, 0.20, 0.90), cand(1, "intra", 1, 0.30, 0.10, 0.95)]
    store.write_table(S.CANDIDATES_DIR, pa.Table.from_pylist(rows, schema=S.PAIR_SCHEMA), "part-0")
    kept = [dict(r, kept=True, prune_reason="") for r in rows if r["pair_id"] in ("inter00", "intra10")]
    store.write_table(S.PAIRS_DIR, pa.Table.from_pylist(kept, schema=S.PAIR_SCHEMA), "part-0")
    means = {"score_align": 0.4, "score_delta": 0.15, "score_img": 0.925}
    write_report(store, inter_threshold=0.2, intra_margin=0.003, intra_means=means)
    page = (tmp_path / "run" / "report.html").read_text()
    assert "not in pairs" not in page
    assert "score_align 0.120 ≤ threshold 0.200" in page
    assert "score_align 0.3000 ≤ mean − margin 0.3970; score_delta 0.1000 ≤ mean − margin 0.1470" in page
    # The summary counts reasons by kind (numbers dropped).
    assert "score_align ≤ threshold ×1" in page
    assert re.search(r'id="counts-inter"><td>InterAug</td><td>2</td><td>1</td><td>1</td>', page)


@pytest.mark.parametrize("change,words", [
    ('{"Edema": [[1, "mild", null], [0, null, null]]}', ["Edema: mild → none"]),
    ('{"Pleural Effusion": [[0, null, null], [1, "moderate", "left"]]}',
     ["Pleural Effusion: none → moderate, left"]),
    ('{"Pneumothorax": [null, [-1, null, "right"]], "Cardiomegaly": [[1, null, null], [1, "severe", null]]}',
     ["Cardiomegaly: present → severe", "Pneumothorax: not mentioned → possible, right"]),
    ("{}", []), (None, []), ("free text", ["free text"]),
])
def test_describe_change(change, words):
    assert describe_change(change) == words
