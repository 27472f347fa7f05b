"""Config loading with overrides, the Store (local and S3), and source listing."""

import json
import os

import pyarrow as pa
import pytest

from pairaug_ray.config import PairAugConfig, fingerprint, load_config
from pairaug_ray.io.sources import SourceError, list_items
from pairaug_ray.io.store import StorageConfig, Store

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "demo.yaml")


def test_yaml_and_dotted_overrides(tmp_path):
    cfg = load_config(DEMO, ["ingest.decode.image_size=64", "ingest.source=phantom://3?seed=2",
                             "ingest.decode.resources={gpu_node: 1}"])
    assert cfg.ingest.decode.image_size == 64
    assert cfg.ingest.source == "phantom://3?seed=2"
    assert cfg.ingest.decode.resources == {"gpu_node": 1}
    assert cfg.ray.num_cpus == 2


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="image_sise"):
        load_config(None, ["ingest.decode.image_sise=64"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["nonsense"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_fingerprint_tracks_content():
    a, b = PairAugConfig(), PairAugConfig()
    assert fingerprint(a) == fingerprint(b)
    b.ingest.decode.image_size = 99
    assert fingerprint(a) != fingerprint(b)


def _roundtrip(store: Store):
    t = pa.table({"row_id": ["a", "b"], "v": [1, 2]})
    store.write_table("tbl", t, "shard1")
    store.write_table("tbl", pa.table({"row_id": ["c"], "v": [3]}), "shard2")
    store.write_table("tbl", t, "shard1")  # idempotent rewrite of the same shard
    assert sorted(store.read_column("tbl", "row_id")) == ["a", "b", "c"]
    store.write_json("manifest.json", {"n": 3})
    assert store.read_json("manifest.json") == {"n": 3}
    assert store.read_table("missing") is None


def test_store_local_atomic(tmp_path):
    store = Store(str(tmp_path / "out"))
    _roundtrip(store)
    leftovers = [f for f in os.listdir(tmp_path / "out" / "tbl") if ".tmp-" in f]
    assert leftovers == []


def test_store_s3(s3_bucket):
    endpoint, bucket = s3_bucket
    store = Store(f"s3://{bucket}/run", StorageConfig(endpoint_url=endpoint))
    _roundtrip(store)
    assert len(store.shard_uris("tbl")) == 2 and store.shard_uris("tbl")[0].startswith("s3://")


def test_phantom_source():
    items = list_items("phantom://5?seed=3")
    assert [it["phantom_index"] for it in items] == list(range(5))
    assert len({it["row_id"] for it in items}) == 5
    with pytest.raises(SourceError):
        list_items("phantom://lots")


def _mimic_tree(root):
    for p, s, d in [("p10000001", "s50000001", "d1"), ("p10000001", "s50000002", "d2"),
                    ("p10000002", "s50000003", "d3")]:
        sd = root / "files" / p[:3] / p / s
        sd.mkdir(parents=True)
        (sd / f"{d}.dcm").write_bytes(b"x")
        (sd.parent / f"{s}.txt").write_text("FINDINGS: clear lungs.")
    (root / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\nd1,50000001,10000001,train\nd3,50000003,10000002,test\n")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nd1,1,1,PA\nd2,1,2,LATERAL\n")


def test_mimic_tree_source(tmp_path):
    _mimic_tree(tmp_path)
    items = {it["image_id"]: it for it in list_items(str(tmp_path))}
    assert set(items) == {"d1", "d2", "d3"}
    assert items["d1"]["study_id"] == "s50000001" and items["d1"]["patient_id"] == "p10000001"
    assert items["d1"]["report_uri"].endswith("p10000001/s50000001.txt")
    assert items["d1"]["split"] == "train" and items["d3"]["split"] == "test"
    assert items["d2"]["view_position"] == "LATERAL" and items["d3"]["view_position"] == ""


def test_manifest_sources(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "m.csv").write_text("image_uri,report,study_id\nimg/a.png,No acute disease.,st1\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image_uri": "img/a.png", "report_uri": "r.txt"}) + "\n")
    csv_items = list_items(str(tmp_path / "m.csv"))
    assert csv_items[0]["image_uri"] == str(tmp_path / "img" / "a.png")
    assert csv_items[0]["report"] == "No acute disease." and csv_items[0]["study_id"] == "st1"
    jl = list_items(str(tmp_path / "m.jsonl"))
    assert jl[0]["report_uri"] == str(tmp_path / "r.txt")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match="image_uri"):
        list_items(str(tmp_path / "bad.csv"))
    with pytest.raises(SourceError, match="not found"):
        list_items(str(tmp_path / "nowhere"))


def test_output_fingerprint_ignores_resources_at_any_depth():
    from pairaug_ray.config import output_fingerprint
    from pairaug_ray.stages.rewrite import RewriteConfig

    base = RewriteConfig()
    moved = RewriteConfig(max_actors=9, num_cpus=3, request_timeout_s=5,
                          vllm={**base.vllm.model_dump(), "retry_max_actors": 7})
    assert output_fingerprint(base) == output_fingerprint(moved)
    assert output_fingerprint(base) != output_fingerprint(RewriteConfig(max_words=40))
