"""A MIMIC-CXR style source mixing good PhantomCXR studies with one input of every bad kind ingest
knows, each made the way it turns up in real archives (tiny images: 32 px).

``build_source(root)`` writes the tree and returns ``{study folder name: expected error class or
None (written)}``.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from pairaug_ray import phantom

N_GOOD = 20
REPORT = "FINDINGS: Small left pleural effusion. The heart is enlarged. No pneumothorax.\n" \
         "IMPRESSION: Left pleural effusion and cardiomegaly.\n"
FIFTY_MB = 50 * 2**20


def _dicom(k: int, **changes) -> bytes:
    """A good PhantomCXR DICOM (32 px), with header attributes changed or deleted (value None)."""
    ds = pydicom.dcmread(io.BytesIO(phantom.to_dicom(phantom.study(100 + k, seed=7, size=32))))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _sr_document() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_dicom(90, PixelData=None)))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.Modality = "SR"
    for key in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, key)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _mpeg2() -> bytes:
    """Pixel data in a transfer syntax no installed plugin decodes (MPEG2 Main Profile)."""
    ds = pydicom.dcmread(io.BytesIO(_dicom(91)))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height 8-bit gray pixels, with one short IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def cases() -> dict[str, tuple[bytes, str, bytes | None, str | None]]:
    """name -> (image bytes, image suffix, report bytes or None for no file, expected class)."""
    rng = np.random.default_rng(0)
    good = _dicom(0)
    cut_at = len(good) - 600  # inside the 2 kB of pixel data
    report = REPORT.encode()
    return {
        "random_bytes": (rng.bytes(3000), ".dcm", report, "not_dicom"),
        "empty_file": (b"", ".dcm", report, "not_dicom"),
        "truncated_pixels": (good[:cut_at], ".dcm", report, "truncated_pixel_data"),
        "no_pixels": (_dicom(1, PixelData=None), ".dcm", report, "no_pixel_data"),
        "sr_document": (_sr_document(), ".dcm", report, "not_an_image"),
        "mpeg2_transfer_syntax": (_mpeg2(), ".dcm", report, "unsupported_transfer_syntax"),
        "cut_in_header": (good[:300], ".dcm", report, "unreadable"),
        "broken_png": (b"\x89PNG\r\n\x1a\n" + rng.bytes(500), ".png", report, "bad_image"),
        "huge_dicom_header": (_dicom(2, Rows=60000, Columns=60000), ".dcm", report, "image_too_large"),
        "huge_png_header": (_png_header(7000, 7000), ".png", report, "image_too_large"),
        "for_processing": (_dicom(3, Modality="DX", SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1.1",
                                  PresentationIntentType="FOR PROCESSING"), ".dcm", report, "for_processing"),
        "no_report_file": (_dicom(4), ".dcm", None, "missing_report"),
        "empty_report": (_dicom(5), ".dcm", b"   \n", "missing_report"),
        "no_report_sections": (_dicom(6), ".dcm", b"INDICATION: Cough.\nCOMPARISON: None.\n", "report_too_short"),
        "report_50_mb": (_dicom(7), ".dcm", b"FINDINGS: " + b"No pneumothorax. " * (FIFTY_MB // 17),
                         "report_too_long"),
        "lateral_view": (_dicom(8, ViewPosition="LL"), ".dcm", report, "non_frontal_view"),
        # Good, though unusual: a Windows cp1252 report; free text with no section headers.
        "cp1252_report": (_dicom(9), ".dcm", ("FINDINGS: Small left pleural effusion, 2 cm. Caf\u00e9-au-lait "
                                              "spots noted \u00b1.\nIMPRESSION: Left effusion.\n").encode("cp1252"),
                          None),
        "headerless_report": (_dicom(10), ".dcm", (b"The heart is enlarged. Small left pleural effusion. "
                                                   b"No pneumothorax.\n"), None),
    }


def build_source(root: str) -> dict[str, str | None]:
    """Writes N_GOOD PhantomCXR studies and every case of ``cases()`` as a MIMIC-CXR style tree
    under ``root``; returns {study folder (sNNN): expected class, None for written}."""
    import os

    counts = phantom.write_dataset(root, n=N_GOOD, seed=3, size=32, report_source="template")
    expected: dict[str, str | None] = {}
    for folder in os.listdir(os.path.join(root, "files")):
        for patient in os.listdir(os.path.join(root, "files", folder)):
            for entry in os.listdir(os.path.join(root, "files", folder, patient)):
                if not entry.endswith(".txt"):
                    expected[entry] = None
    assert len(expected) == counts["studies"] == N_GOOD
    for k, (name, (image, suffix, report, cls)) in enumerate(cases().items()):
        study = f"s9{k:07d}"
        pdir = os.path.join(root, "files", "p19", "p19000000")
        os.makedirs(os.path.join(pdir, study), exist_ok=True)
        with open(os.path.join(pdir, study, f"{name}{suffix}"), "wb") as fh:
            fh.write(image)
        if report is not None:
            with open(os.path.join(pdir, f"{study}.txt"), "wb") as fh:
                fh.write(report)
        expected[study] = cls
    return expected
