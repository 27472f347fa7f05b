"""PhantomCXR studies and datasets: patients, splits, reports, images, DICOM, MIMIC-style trees.

Usage::

    st = study(5, seed=0, size=128); st.report, st.image, st.dicom
    write_dataset("/tmp/phantom", n=200, seed=0)

Study indexing (so Ray tasks can make shards in parallel): patient p owns a seeded number of
studies k_p in `studies_per_patient`; study i belongs to the patient whose block of consecutive
indices holds i (block starts are a cumulative sum of the k_p, each a hash of (seed, p)). Study i
therefore depends only on (i, seed, studies_per_patient) and `study(i)` equals the i-th item of
`iter_studies`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pairaug_ray import labeler as F
from pairaug_ray.labeler import POSITIVE, Finding
from pairaug_ray.phantom.anatomy import (
    CHEXPERT_COLUMNS,
    REPORT_SOURCES,
    Anatomy,
    _mix64,
    _rng,
    _seed_of,
)
from pairaug_ray.phantom.render import render
from pairaug_ray.phantom.text import _evolve, _template_report, sample_findings

# ------------------------------------------------------------------------------------------------
# Studies: patients, splits, reports, images, DICOM


@dataclass
class PhantomStudy:
    index: int                      # position in the (n, seed) stream
    patient_id: str                 # "p10000032"
    study_id: str                   # "s50000001"
    dicom_id: str                   # MIMIC-style "xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx"
    split: str                      # "train" | "validate" | "test", by patient
    view_position: str              # "PA" | "AP"
    report: str                     # "FINDINGS: ...\n\nIMPRESSION: ..."
    findings: dict[str, Finding]    # what the labeler reads from `report` (what the image shows)
    image: np.ndarray               # float32 HxW in [0, 1], bright = dense
    study_date: str                 # "YYYYMMDD" (synthetic, shifted to the future like MIMIC)
    modality: str                   # "CR" | "DX"
    bits_stored: int                # 12..16
    photometric: str                # "MONOCHROME1" | "MONOCHROME2"
    report_source: str              # "iu" | "template"
    study_in_patient: int = 0       # 0 = first study of the patient
    dicom: bytes = field(default=b"", repr=False)

    @property
    def subject_id(self) -> int:
        return int(self.patient_id[1:])

    @property
    def labels(self) -> dict[str, int]:
        return F.label_states(self.findings)


def _patient_starts(seed: int, lo: int, hi: int, n_patients: int) -> np.ndarray:
    """First study index of each patient (length n_patients + 1); prefix-stable in n_patients."""
    key = np.uint64(_seed_of("counts", seed))
    counts = lo + (_mix64(np.arange(n_patients, dtype=np.uint64) ^ key) % np.uint64(hi - lo + 1)).astype(np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


@functools.lru_cache(maxsize=16)
def _starts_cached(seed: int, lo: int, hi: int, n_patients: int) -> np.ndarray:
    return _patient_starts(seed, lo, hi, n_patients)


def locate(i: int, seed: int = 0, studies_per_patient: tuple[int, int] = (1, 3)) -> tuple[int, int, int]:
    """Study index -> (patient index, study number within the patient, the patient's study count)."""
    lo, hi = studies_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(f"studies_per_patient must satisfy 1 <= lo <= hi, got {studies_per_patient}")
    m = 1024
    while True:
        starts = _starts_cached(seed, lo, hi, m)
        if starts[-1] > i:
            break
        m *= 4
    p = int(np.searchsorted(starts, i, side="right") - 1)
    return p, int(i - starts[p]), int(starts[p + 1] - starts[p])


def patient_split(p: int, seed: int = 0) -> str:
    u = _seed_of("split", seed, p) / 2**32
    return "train" if u < 0.8 else "validate" if u < 0.9 else "test"


@functools.lru_cache(maxsize=1)
def _iu_texts() -> tuple[str, ...]:
    from pairaug_ray.io import reports

    texts = []
    for rep in reports.iter_iu_reports():
        parts = []
        if rep.findings.strip():
            parts.append("FINDINGS: " + rep.findings.strip())
        if rep.impression.strip():
            parts.append("IMPRESSION: " + rep.impression.strip())
        if parts:
            texts.append("\n\n".join(parts))
    return tuple(texts)


def _resolve_source(report_source: str) -> str:
    if report_source not in REPORT_SOURCES:
        raise ValueError(f"report_source must be one of {REPORT_SOURCES}, not {report_source!r}")
    if report_source == "auto":
        try:
            from pairaug_ray.io import reports
            return "iu" if reports.iu_corpus_available() else "template"
        except ImportError:
            return "template"
    return report_source


@functools.lru_cache(maxsize=256)
def _patient_course(seed: int, p: int, k: int) -> tuple[dict[str, Finding], ...]:
    r = _rng("course", seed, p)
    course = [sample_findings(r)]
    for _ in range(k - 1):
        course.append(_evolve(course[-1], r))
    return tuple(course)


def _study_findings(i: int, seed: int, p: int, j: int, k: int, source: str) -> tuple[str, dict[str, Finding]]:
    """(report text, findings to render = the labeler's reading, with template details kept)."""
    if source == "iu":
        texts = _iu_texts()
        text = texts[_seed_of("iu", seed, i) % len(texts)]
        return text, F.label_report(text)
    truth = _patient_course(seed, p, k)[j]
    text, said = _template_report(truth, _rng("phrase", seed, i), detail_seed=_seed_of("detail", seed, p))
    read = F.label_report(text)
    merged = {}
    for o, f in read.items():
        t = truth.get(o)
        if t is not None and t.state == f.state:  # the template knows side/severity/details for sure
            merged[o] = Finding(o, f.state, t.laterality or f.laterality, t.severity or f.severity,
                                said.get(o, f.evidence))
        else:
            merged[o] = f
    return text, merged


def study(i: int, seed: int = 0, size: int = 256, report_source: str = "auto",
          studies_per_patient: tuple[int, int] = (1, 3), with_dicom: bool = True) -> PhantomStudy:
    """The i-th study of the (seed) stream, made from (i, seed) alone."""
    source = _resolve_source(report_source)
    p, j, k = locate(i, seed, tuple(studies_per_patient))
    text, found = _study_findings(i, seed, p, j, k, source)
    pseed = _seed_of("patient", seed, p)
    img = render(found, size=size, seed=pseed, anatomy=Anatomy.sample(pseed), noise_seed=_seed_of("study", seed, i))
    r = _rng("study-meta", seed, i)
    devices = found.get("Support Devices")
    ap = r.random() < (0.7 if devices is not None and devices.state == POSITIVE else 0.15)
    pr = _rng("patient-meta", seed, p)
    first = _dt.date(2150, 1, 1) + _dt.timedelta(days=int(pr.integers(0, 3650)))
    gaps = np.cumsum(pr.integers(20, 400, size=k))
    date = first + _dt.timedelta(days=int(gaps[j] - gaps[0]))
    digest = hashlib.sha1(f"phantom:{seed}:{i}".encode()).hexdigest()
    st = PhantomStudy(
        index=i, patient_id=f"p{10_000_000 + p}", study_id=f"s{50_000_000 + i}",
        dicom_id="-".join(digest[n:n + 8] for n in range(0, 40, 8)), split=patient_split(p, seed),
        view_position="AP" if ap else "PA", report=text, findings=found, image=img,
        study_date=date.strftime("%Y%m%d"), modality="CR" if p % 2 == 0 else "DX",
        bits_stored=(12, 14, 15, 16)[int(pr.integers(4))],
        photometric="MONOCHROME1" if pr.random() < 0.4 else "MONOCHROME2",
        report_source=source, study_in_patient=j)
    if with_dicom:
        st.dicom = to_dicom(st)
    return st


def iter_studies(n: int, seed: int = 0, size: int = 256, report_source: str = "auto",
                 studies_per_patient: tuple[int, int] = (1, 3), with_dicom: bool = True) -> Iterator[PhantomStudy]:
    """Studies 0..n-1; a patient's studies are consecutive and their findings change over time."""
    for i in range(n):
        yield study(i, seed, size, report_source, studies_per_patient, with_dicom)


_SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def to_dicom(st: PhantomStudy, modality: str | None = None, bits_stored: int | None = None,
             photometric: str | None = None) -> bytes:
    """DICOM Part 10 bytes (Explicit VR Little Endian) of the study's image.

    Stored values use `bits_stored` bits; MONOCHROME1 stores them inverted (white = low).
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = modality or st.modality
    bits = int(bits_stored or st.bits_stored)
    photometric = photometric or st.photometric
    if modality not in _SOP_CLASS or not 8 <= bits <= 16 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported DICOM options: {modality}, {bits} bits, {photometric}")
    top = 2 ** bits - 1
    stored = np.round(np.clip(st.image, 0, 1) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)

    ent = ["pairaug-phantom", st.patient_id, st.study_id]
    sop_uid = generate_uid(entropy_srcs=ent + [st.dicom_id])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=ent)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=ent + ["series"])
    ds.PatientID = st.patient_id
    ds.PatientName = f"PHANTOM^{st.patient_id.upper()}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyID = st.study_id
    ds.AccessionNumber = st.study_id[1:]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = st.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyDescription = "CHEST (PORTABLE AP)" if st.view_position == "AP" else "CHEST (PA AND LAT)"
    ds.Modality = modality
    ds.Manufacturer = "PhantomCXR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = st.view_position
    ds.PatientOrientation = ["L", "F"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [round(430.0 / stored.shape[0], 4)] * 2   # a 43 cm detector
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = top / 2
    ds.WindowWidth = top + 1
    ds.PixelData = stored.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mimic_report_text(st: PhantomStudy) -> str:
    """The report as a MIMIC-CXR style free-text file."""
    exam = "CHEST (PORTABLE AP)" if st.view_position == "AP" else "CHEST (PA AND LAT)"
    comparison = "Prior chest radiograph." if st.study_in_patient else "None."
    sections = {}
    for block in st.report.split("\n\n"):
        head, _, body = block.partition(":")
        sections[head.strip().upper()] = body.strip()
    lines = ["                                 FINAL REPORT", f" EXAMINATION:  {exam}", " ",
             " INDICATION:  ___", " ", f" COMPARISON:  {comparison}", " "]
    for head in ("FINDINGS", "IMPRESSION"):
        if sections.get(head):
            lines += [f" {head}:", " ", " " + sections[head], " "]
    return "\n".join(lines) + "\n"


def _label_cell(v: int | None) -> str:
    return "" if v is None else f"{float(v):.1f}"


def write_dataset(out_dir: str, n: int, seed: int = 0, size: int = 256, report_source: str = "auto",
                  studies_per_patient: tuple[int, int] = (1, 3), png: bool = False) -> dict:
    """Write n studies as a MIMIC-CXR-JPG style tree (DICOM instead of JPEG) plus label CSVs.

    files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm (and .png with png=True),
    files/pXX/pNNNNNNNN/sNNNNNNNN.txt, phantom-split.csv, phantom-chexpert.csv, phantom-metadata.csv.
    """
    split_rows, chexpert_rows, meta_rows = [], [], []
    patients, splits, sources = set(), {"train": 0, "validate": 0, "test": 0}, set()
    for st in iter_studies(n, seed, size, report_source, studies_per_patient):
        pdir = os.path.join(out_dir, "files", st.patient_id[:3], st.patient_id)
        sdir = os.path.join(pdir, st.study_id)
        os.makedirs(sdir, exist_ok=True)
        with open(os.path.join(sdir, st.dicom_id + ".dcm"), "wb") as fh:
            fh.write(st.dicom)
        if png:
            from pairaug_ray.io.dicom import encode_png
            with open(os.path.join(sdir, st.dicom_id + ".png"), "wb") as fh:
                fh.write(encode_png(st.image, bits=16))
        with open(os.path.join(pdir, st.study_id + ".txt"), "w") as fh:
            fh.write(mimic_report_text(st))
        subject, study_num = st.subject_id, int(st.study_id[1:])
        split_rows.append([st.dicom_id, study_num, subject, st.split])
        states = st.labels
        chexpert_rows.append([subject, study_num] + [_label_cell(states.get(c)) for c in CHEXPERT_COLUMNS])
        meta_rows.append([st.dicom_id, subject, study_num, st.view_position, st.image.shape[0],
                          st.image.shape[1], st.study_date])
        if st.patient_id not in patients:
            splits[st.split] += 1
        patients.add(st.patient_id)
        sources.add(st.report_source)

    def write_csv(name: str, header: list[str], rows: list) -> None:
        with open(os.path.join(out_dir, name), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    os.makedirs(out_dir, exist_ok=True)
    write_csv("phantom-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    write_csv("phantom-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT_COLUMNS, chexpert_rows)
    write_csv("phantom-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns",
                                       "StudyDate"], meta_rows)
    return {"studies": len(split_rows), "images": len(split_rows), "reports": len(split_rows),
            "patients": len(patients), "patients_per_split": splits, "report_source": sorted(sources),
            "out_dir": out_dir}
