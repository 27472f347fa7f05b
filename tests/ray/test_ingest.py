"""Ingest on Ray Data: good studies written, bad inputs quarantined by class, no PHI, resumable."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pairaug_ray import phantom
from pairaug_ray.cli import main as cli_main
from pairaug_ray.config import load_config
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.pipeline import run_ingest

pytestmark = pytest.mark.usefixtures("ray_cluster")

PHI = ["DOE^JANE", "19700101", "MRN123456", "ST MERCY HOSPITAL", "DR^WHO"]
REPORT = "FINAL REPORT\n FINDINGS: Small left pleural effusion. No pneumothorax.\n IMPRESSION: Left effusion.\n"


def _dicom(pixels: bool = True, sr: bool = False, truncate: bool = False, phi: bool = False) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11" if sr else "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "SR" if sr else "CR"
    ds.PatientID = "MRN123456" if phi else "anon"
    if phi:
        ds.PatientName = "DOE^JANE"
        ds.PatientBirthDate = "19700101"
        ds.InstitutionName = "ST MERCY HOSPITAL"
        ds.ReferringPhysicianName = "DR^WHO"
    ds.ViewPosition = "PA"
    if pixels and not sr:
        img = (np.random.default_rng(0).random((32, 32)) * 4095).astype(np.uint16)
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        data = img.tobytes()
        ds.PixelData = data[: len(data) // 3] if truncate else data
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _add(root, name: str, data: bytes, report: str | None = REPORT) -> None:
    sd = root / "files" / "p19" / "p19000000" / f"s{name}"
    sd.mkdir(parents=True)
    (sd / f"{name}.dcm").write_bytes(data)
    if report is not None:
        (sd.parent / f"s{name}.txt").write_text(report)


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    phantom.write_dataset(str(root), n=6, seed=1, size=64, report_source="template")
    _add(root, "90000001", b"this is not a dicom file at all" * 10)
    _add(root, "90000002", _dicom(truncate=True))
    _add(root, "90000003", _dicom(sr=True))
    _add(root, "90000004", _dicom(pixels=False))
    _add(root, "90000005", _dicom(), report=None)
    _add(root, "90000006", _dicom(phi=True))
    return root


EXPECTED_BAD = {
    "s90000001": "not_dicom",
    "s90000002": "truncated_pixel_data",
    "s90000003": "not_an_image",
    "s90000004": "no_pixel_data",
    "s90000005": "missing_report",
}


def _cfg(source, out, *extra):
    return load_config(None, [f"ingest.source={source}", f"ingest.out={out}",
                              "ingest.decode.image_size=64", "ingest.decode.num_cpus=0.25",
                              "ingest.decode.batch_size=4", *extra])


def test_ingest_good_and_bad(mixed_tree, tmp_path):
    out = tmp_path / "ingest"
    manifest = run_ingest(_cfg(str(mixed_tree), out))
    store = Store(str(out))
    studies = store.read_table("studies").to_pylist()
    quarantine = store.read_table("quarantine").to_pylist()

    good_ids = {s["study_id"] for s in studies}
    assert len(studies) == 7 and "s90000006" in good_ids  # 6 phantom + the PHI-laden one
    bad = {os.path.basename(os.path.dirname(q["source_uri"])): q["error_class"] for q in quarantine}
    assert bad == EXPECTED_BAD
    assert all(q["error"] for q in quarantine)
    assert manifest["written"] == 7 and manifest["quarantined"] == 5
    assert manifest["quarantined_by_class"] == {c: 1 for c in EXPECTED_BAD.values()}
    assert json.loads((out / "manifest.json").read_text())["listed"] == 12

    for s in studies:
        assert s["image_png"][:8] == b"\x89PNG\r\n\x1a\n"
        labels = json.loads(s["labels"])
        assert labels  # every report mentions something
    effusion = [s for s in studies if s["study_id"] == "s90000006"][0]
    assert json.loads(effusion["labels"])["Pleural Effusion"] == 1

    # No PHI in any byte of any output file.
    for dirpath, _, files in os.walk(out):
        for f in files:
            blob = open(os.path.join(dirpath, f), "rb").read()
            for s in PHI:
                assert s.encode() not in blob, (f, s)


def test_rerun_writes_nothing_new(mixed_tree, tmp_path):
    out = tmp_path / "ingest"
    run_ingest(_cfg(str(mixed_tree), out))
    before = sorted(os.listdir(out / "studies")) + sorted(os.listdir(out / "quarantine"))
    again = run_ingest(_cfg(str(mixed_tree), out))
    after = sorted(os.listdir(out / "studies")) + sorted(os.listdir(out / "quarantine"))
    assert before == after
    assert again["skipped_already_written"] == 12 and again["written"] == 0
    assert again["totals"] == {"studies": 7, "quarantined": 5}


def test_phantom_source_to_s3(s3_bucket):
    endpoint, bucket = s3_bucket
    out = f"s3://{bucket}/ingest"
    manifest = run_ingest(_cfg("phantom://5?seed=4", out, f"storage.endpoint_url={endpoint}"))
    assert manifest["written"] == 5 and manifest["quarantined"] == 0
    store = Store(out, StorageConfig(endpoint_url=endpoint))
    t = store.read_table("studies")
    assert t.num_rows == 5 and set(t.column("split").to_pylist()) <= {"train", "validate", "test"}
    assert store.read_json("manifest.json")["totals"]["studies"] == 5


def test_cli_ingest_exits_zero(mixed_tree, tmp_path, capsys):
    rc = cli_main(["ingest", str(mixed_tree), "--out", str(tmp_path / "o"),
                   "ingest.decode.image_size=64", "ingest.decode.num_cpus=0.25"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["written"] == 7 and printed["quarantined"] == 5
