"""Field-case kinds of ingest (issue 14, part 1): each test builds its own input at run time.

DICOM display pipeline (Presentation LUT, Pixel Padding), the JPEG-family codecs a CR/DX archive
needs, data sets without a preamble, "For Processing" images, EXIF orientation of PNG/JPEG, and
the report side: context sections never labelled, misspelled/unknown headers, text encodings.

Usage: .venv/bin/pytest tests/unit/test_ingest_fieldcases.py
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import struct

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from pairaug_ray.errors import DECODE_ERROR_CLASSES
from pairaug_ray.io.dicom import DecodeError, decode_any, decode_dicom, decode_image
from pairaug_ray.io.reports import decode_text, parse_mimic_report, parse_report
from pairaug_ray.labeler import label_report, label_states
from pairaug_ray.io.sources import list_items
from pairaug_ray.stages.decode import DecodeConfig, DecodeStage

# ----------------------------------------------------------------------------------------------
# inputs


def density(h: int = 24, w: int = 20) -> np.ndarray:
    """A 'chest' in [0, 1] (1 = dense): bone-like left band, soft centre, air right, some texture."""
    y, x = np.mgrid[0:h, 0:w]
    d = np.full((h, w), 0.5)
    d[:, : w // 3] = 0.9
    d[:, 2 * w // 3:] = 0.1
    return np.clip(d + 0.04 * np.sin(y / 2.0 + x / 5.0), 0, 1)


def dicom_bytes(stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                signed: bool = False, sop_class: str = ComputedRadiographyImageStorage,
                **tags) -> bytes:
    """A native (uncompressed) single-frame DICOM Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "DX", "P1", "1.2.3.4"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return (a - a.min()) / (a.max() - a.min())


def decoded(data: bytes, **kw) -> np.ndarray:
    return decode_dicom(data, size=None, **kw).pixels.astype(np.float64)


# ----------------------------------------------------------------------------------------------
# case03 kind: Presentation LUT Shape / Presentation LUT Sequence (PS3.3 C.11.4, C.11.6)

D = density()
STORED = np.rint(4095 * D).astype(np.int64)   # dense = high
INVERTED = 4095 - STORED                       # dense = low, as MONOCHROME1 or INVERSE store it
REF = unit(STORED)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("photometric, stored, shape", [
    ("MONOCHROME2", INVERTED, "INVERSE"),      # inverted once: dense shown bright
    ("MONOCHROME1", INVERTED, "INVERSE"),      # the same one inversion, not two
    ("MONOCHROME1", INVERTED, None),
    ("MONOCHROME1", INVERTED, "IDENTITY"),     # contradicts the DX rule: the photometric wins
    ("MONOCHROME2", STORED, "IDENTITY"),
    ("MONOCHROME2", STORED, "identity "),      # CS value padded / lower case
])
def test_presentation_lut_shape_inverts_once(photometric, stored, shape):
    tags = {"PresentationLUTShape": shape} if shape else {}
    got = decoded(dicom_bytes(stored, photometric=photometric, **tags))
    np.testing.assert_allclose(got, REF, atol=1e-6)
    assert got[:, :3].mean() > 0.8 and got[:, -3:].mean() < 0.2  # dense left bright, air dark


def test_presentation_lut_shape_inverse_after_the_window():
    # MONOCHROME2 + INVERSE + window: the window first, then the inversion (PS3.4 N.2.1)
    got = decoded(dicom_bytes(INVERTED, PresentationLUTShape="INVERSE", WindowCenter=1800,
                              WindowWidth=2001))
    windowed = np.clip((INVERTED - 1799.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(got, 1 - windowed, atol=1e-5)


def test_presentation_lut_sequence_maps_the_voi_range_not_the_image_range():
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = (4095 - np.arange(4096)).tolist()   # an inverting Presentation LUT
    item["LUTData"].VR = "US"
    # A wide window: the VOI output spans only the middle of its range.
    got = decoded(dicom_bytes(STORED, WindowCenter=2048, WindowWidth=8192,
                              PresentationLUTSequence=[item]))
    voi = np.clip((STORED - 2047.5) / 8191 + 0.5, 0, 1)
    assert 0.2 < voi.min() and voi.max() < 0.8
    expected = (4095 - (voi * 4095).astype(np.uint16)) / 4095
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# case06 kind: Pixel Padding Value / Range Limit (PS3.3 C.7.5.1.1.2)


def padded(stored: np.ndarray, pad) -> tuple[np.ndarray, np.ndarray]:
    out = stored.copy()
    mask = np.zeros(stored.shape, bool)
    mask[:5, :] = True
    mask[:, :3] = True
    out[mask] = pad if np.isscalar(pad) else pad[: mask.sum()]
    return out, mask


def test_padding_value_is_out_of_the_range_and_black():
    body = np.rint(1000 + 2000 * D).astype(np.int64)
    stored, pad = padded(body, 0)
    got = decoded(dicom_bytes(stored, PixelPaddingValue=0))
    assert got[~pad].min() == 0.0 and got[~pad].max() == 1.0
    np.testing.assert_allclose(got[~pad], unit(body[~pad]), atol=1e-6)
    assert got[pad].max() == 0.0
    # Without the attribute the same zeros are image: the body is squeezed into the top of the range.
    assert decoded(dicom_bytes(stored))[~pad].min() > 0.3


def test_padding_of_monochrome1_at_the_top_is_black_too():
    body = np.rint(1000 + 2000 * (1 - D)).astype(np.int64)   # MONOCHROME1: dense = low
    stored, pad = padded(body, 4095)
    got = decoded(dicom_bytes(stored, photometric="MONOCHROME1", PixelPaddingValue=4095))
    np.testing.assert_allclose(got[~pad], 1 - unit(body[~pad]), atol=1e-6)
    assert got[pad].max() == 0.0 and got[~pad].max() == 1.0


def test_padding_range_limit_masks_every_value_in_between():
    rng = np.random.default_rng(0)
    body = np.rint(1000 + 2000 * D).astype(np.int64)
    stored, pad = padded(body, rng.integers(0, 51, body.size))
    got = decoded(dicom_bytes(stored, PixelPaddingValue=50, PixelPaddingRangeLimit=0))
    np.testing.assert_allclose(got[~pad], unit(body[~pad]), atol=1e-6)
    assert got[pad].max() == 0.0


def test_signed_padding_value():
    body = np.rint(-1000 + 2000 * D).astype(np.int64)
    stored, pad = padded(body, -2048)
    got = decoded(dicom_bytes(stored, signed=True, PixelPaddingValue=-2048))
    np.testing.assert_allclose(got[~pad], unit(body[~pad]), atol=1e-6)
    assert got[pad].max() == 0.0


def test_padding_with_a_window_is_black_whatever_the_polarity():
    body = np.rint(1000 + 2000 * (1 - D)).astype(np.int64)
    stored, pad = padded(body, 0)
    got = decoded(dicom_bytes(stored, photometric="MONOCHROME1", PixelPaddingValue=0,
                              WindowCenter=2000, WindowWidth=2001))
    np.testing.assert_allclose(got[~pad], 1 - np.clip((body[~pad] - 1999.5) / 2000 + 0.5, 0, 1),
                               atol=1e-5)
    assert got[pad].max() == 0.0


# ----------------------------------------------------------------------------------------------
# case07 kind: JPEG Lossless SV1 12-bit, JPEG-LS lossless, 12-bit JPEG Extended; decoder failures


def jpeg_lossless_sv1(img: np.ndarray, precision: int) -> bytes:
    """A minimal ITU T.81 process 14 codestream (predictor 1, one component): every difference
    category 0..16 gets a 5-bit Huffman code equal to the category."""
    h, w = img.shape
    bits = [0] * 16
    bits[4] = 17  # 17 codes of length 5
    dht = bytes([0x00]) + bytes(bits) + bytes(range(17))
    head = (b"\xff\xd8" + b"\xff\xc3" + struct.pack(">HBHHB", 11, precision, h, w, 1) + b"\x01\x11\x00"
            + b"\xff\xc4" + struct.pack(">H", 2 + len(dht)) + dht
            + b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x01\x00\x00")
    stream, acc, n = bytearray(), 0, 0
    x = img.astype(np.int64)
    for r in range(h):
        for c in range(w):
            pred = (1 << (precision - 1) if r == 0 and c == 0 else
                    x[r, c - 1] if c else x[r - 1, c])
            diff = int(x[r, c] - pred)
            cat = abs(diff).bit_length()
            value, length = cat, 5
            if cat:
                value = (value << cat) | ((diff if diff > 0 else diff - 1) & ((1 << cat) - 1))
                length += cat
            acc, n = (acc << length) | value, n + length
            while n >= 8:
                n -= 8
                byte = (acc >> n) & 0xFF
                stream += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    if n:
        byte = ((acc << (8 - n)) | ((1 << (8 - n)) - 1)) & 0xFF
        stream += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    return head + bytes(stream) + b"\xff\xd9"


def compressed_dicom(stored: np.ndarray, transfer_syntax: str, frames: list[bytes],
                     bits_stored: int = 12) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_jpeg_lossless_sv1_12_bit_decodes_bit_exact():
    data = compressed_dicom(STORED, JPEGLosslessSV1, [jpeg_lossless_sv1(STORED, 12)])
    img = decode_dicom(data, size=None)
    assert img.bits_stored == 12
    np.testing.assert_allclose(img.pixels, REF, atol=1e-6)


@pytest.mark.parametrize("transfer_syntax, kwargs, max_error", [
    (JPEGLSLossless, {}, 0),                      # pyjpegls encodes
    (JPEGLSNearLossless, {"jls_error": 3}, 3),
    (RLELossless, {}, 0),                         # pydicom encodes
])
def test_compressed_syntaxes_decode(transfer_syntax, kwargs, max_error):
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(STORED)))
    ds.compress(transfer_syntax, STORED.astype(np.uint16), **kwargs)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    got = decoded(out.getvalue())
    np.testing.assert_allclose(got, REF, atol=(max_error + 0.5) * 2 / 4095)
    if not max_error:
        np.testing.assert_allclose(got, REF, atol=1e-6)


def test_jpeg_extended_12_bit_decodes():
    # pydicom's own 12-bit JPEG Extended (process 4) sample: Pillow alone cannot decode it.
    path = pydicom.data.get_testdata_file("JPGExtended.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.BitsStored == 12
    with open(path, "rb") as f:
        img = decode_dicom(f.read(), size=None)
    assert img.pixels.shape == (ds.Rows, ds.Columns) and img.pixels.std() > 0.05


def test_every_needed_codec_plugin_is_installed():
    for ts in (JPEGLosslessSV1, JPEGLSLossless, JPEGExtended12Bit, JPEG2000Lossless):
        assert get_decoder(ts).is_available, UID(ts).name


@pytest.mark.parametrize("transfer_syntax", [JPEGLosslessSV1, JPEGLSLossless, JPEGExtended12Bit,
                                             JPEG2000Lossless])
def test_a_codec_failure_is_unsupported_transfer_syntax_not_unreadable(transfer_syntax):
    junk = b"\xff\xd8" + bytes(range(256)) * 2 + b"\xff\xd9"
    with pytest.raises(DecodeError) as info:
        decode_dicom(compressed_dicom(STORED, transfer_syntax, [junk]), size=None)
    assert info.value.error_class == "unsupported_transfer_syntax", str(info.value)
    assert UID(transfer_syntax).name in str(info.value)


# ----------------------------------------------------------------------------------------------
# case09 kind: a data set without preamble / 'DICM' / file meta, in any of the three encodings


def bare_dataset(stored: np.ndarray, little: bool, first_group: int = 0x0008) -> Dataset:
    ds = Dataset()
    if first_group <= 0x0008:
        ds.SOPClassUID = ComputedRadiographyImageStorage
        ds.Modality = "CR"
    if first_group <= 0x0010:
        ds.PatientID = "P1"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.astype("<u2" if little else ">u2").tobytes()
    return ds


def raw_bytes(ds: Dataset, little: bool, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("little, implicit", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("first_group", [0x0008, 0x0010, 0x0028])
def test_dataset_without_preamble_in_every_encoding(little, implicit, first_group):
    raw = raw_bytes(bare_dataset(STORED, little, first_group), little, implicit)
    assert raw[:4] != b"DICM" and raw[128:132] != b"DICM"
    np.testing.assert_allclose(decoded(raw), REF, atol=1e-6)
    np.testing.assert_allclose(decode_any(raw, name="x").pixels, decode_any(raw).pixels)
    # a zeroed 128-byte preamble but no 'DICM'
    np.testing.assert_allclose(decoded(b"\0" * 128 + raw), REF, atol=1e-6)


def test_text_and_random_bytes_are_still_not_dicom():
    rng = np.random.default_rng(3)
    for data in (b"FINDINGS: no effusion.\n" * 20, rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                 b"\x08\x00\x16\x00" + b"\xff" * 60):
        with pytest.raises(DecodeError) as info:
            decode_dicom(data)
        assert info.value.error_class == "not_dicom"


# ----------------------------------------------------------------------------------------------
# case10 kind: "For Processing" images (PS3.3 C.8.11.1.1.1)


@pytest.mark.parametrize("tags", [
    {"sop_class": DigitalXRayImageStorageForProcessing},
    {"sop_class": DigitalXRayImageStorageForProcessing, "PresentationIntentType": "FOR PROCESSING"},
    {"PresentationIntentType": "FOR PROCESSING"},               # said by the attribute only
    {"sop_class": "1.2.840.10008.5.1.4.1.1.1.2.1"},              # mammography For Processing
])
def test_for_processing_is_quarantined_unless_allowed(tags):
    data = dicom_bytes(STORED, **tags)
    with pytest.raises(DecodeError) as info:
        decode_dicom(data)
    assert info.value.error_class == "for_processing" and "for_processing" in DECODE_ERROR_CLASSES
    with pytest.raises(DecodeError):
        decode_any(data)
    kept = decode_any(data, size=None, allow_for_processing=True)
    assert kept.presentation_intent == "FOR PROCESSING"
    np.testing.assert_allclose(kept.pixels, REF, atol=1e-6)


def test_presentation_intent_of_display_images():
    assert decode_dicom(dicom_bytes(STORED, sop_class=DigitalXRayImageStorageForPresentation)
                        ).presentation_intent == "FOR PRESENTATION"
    assert decode_dicom(dicom_bytes(STORED, PresentationIntentType="FOR PRESENTATION")
                        ).presentation_intent == "FOR PRESENTATION"
    assert decode_dicom(dicom_bytes(STORED)).presentation_intent is None  # CR: not said


def _stage_rows(stage: DecodeStage, rows: list[dict]) -> list[dict]:
    return stage(pd.DataFrame(rows)).to_dict("records")


def test_decode_stage_quarantines_for_processing_and_keeps_it_on_request(tmp_path):
    (tmp_path / "proc.dcm").write_bytes(dicom_bytes(STORED, sop_class=DigitalXRayImageStorageForProcessing))
    (tmp_path / "pres.dcm").write_bytes(dicom_bytes(STORED, PresentationIntentType="FOR PRESENTATION"))
    rows = [{"row_id": n, "source_uri": str(tmp_path / f"{n}.dcm"), "image_uri": str(tmp_path / f"{n}.dcm"),
             "report": "Heart size normal. Lungs are clear.", "view_position": "PA"}
            for n in ("proc", "pres")]
    out = {r["row_id"]: r for r in _stage_rows(DecodeStage(DecodeConfig(image_size=16)), rows)}
    assert (out["proc"]["status"], out["proc"]["error_class"]) == ("error", "for_processing")
    assert (out["pres"]["status"], out["pres"]["presentation_intent"]) == ("ok", "FOR PRESENTATION")
    kept = _stage_rows(DecodeStage(DecodeConfig(image_size=16, keep_for_processing=True)), rows)
    assert [(r["status"], r["presentation_intent"]) for r in kept] == [
        ("ok", "FOR PROCESSING"), ("ok", "FOR PRESENTATION")]


# ----------------------------------------------------------------------------------------------
# case11 kind: EXIF Orientation of JPEG / PNG (PIL.ImageOps.exif_transpose)

# Orientation -> how the stored pixels were made from the displayed image (EXIF 2.3, 0x0112).
_STORE = {1: lambda a: a, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1),
          8: lambda a: np.rot90(a, -1), 2: lambda a: a[:, ::-1], 5: lambda a: np.rot90(a, 1)[::-1]}


def shown(h: int = 32, w: int = 20) -> np.ndarray:
    a = np.full((h, w), 60, np.uint8)
    a[:6, :5] = 250  # a marker at the top-left as viewers show it
    return a


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "PNG16"])
@pytest.mark.parametrize("orientation", [1, 2, 3, 5, 6, 8])
def test_exif_orientation_is_applied(fmt, orientation):
    disp = shown()
    stored = np.ascontiguousarray(_STORE[orientation](disp))
    img = Image.fromarray(stored.astype(np.uint16) * 257 if fmt == "PNG16" else stored)
    exif = img.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    img.save(out, "JPEG" if fmt == "JPEG" else "PNG", exif=exif.tobytes(),
             **({"quality": 95} if fmt == "JPEG" else {}))
    got = decode_image(out.getvalue(), size=None).pixels
    assert got.shape == disp.shape
    assert np.abs(got - disp / 255).mean() < 0.02
    assert got[:6, :5].mean() > 0.9 and got[-6:, -5:].mean() < 0.3


# ----------------------------------------------------------------------------------------------
# case14 kind: the fallback never labels INDICATION / HISTORY / COMPARISON / TECHNIQUE


@pytest.mark.parametrize("context", [
    "INDICATION:  History of CHF and pneumonia, now short of breath.",
    "HISTORY: Pneumonia.",
    "CLINICAL HISTORY: Edema?",
    "REASON FOR EXAM: rule out pneumothorax",
    "HISTORY OF PRESENT ILLNESS: CHF exacerbation.",
    "INDICATON: pneumonia",        # a misspelled context header is context too
])
def test_no_findings_or_impression_falls_back_to_the_last_paragraph(context):
    text = (f"   FINAL REPORT\n EXAMINATION:  CHEST (PORTABLE AP)\n \n {context}\n \n"
            " COMPARISON:  Chest radiograph of ___, with edema.\n TECHNIQUE: AP portable.\n\n"
            " Lungs are clear. No pleural effusion.\n Heart size is normal.\n")
    rep = parse_report(text)
    assert rep.text == "Lungs are clear. No pleural effusion. Heart size is normal."
    for word in ("CHF", "pneumonia", "Pneumonia", "Edema", "edema", "pneumothorax", "PORTABLE"):
        assert word not in rep.text


def test_only_context_sections_give_no_text():
    rep = parse_mimic_report("INDICATION: Pneumonia.\n\nCOMPARISON: None.\nTECHNIQUE: PA view.\n")
    assert rep.text == ""
    assert rep.sections["indication"] == "Pneumonia."


@pytest.mark.parametrize("header", ["FINDINGS/IMPRESSION:", "Findings/Impression:",
                                    "FINDINGS AND IMPRESSION:", "IMPRESSION/RECOMMENDATIONS:"])
def test_combined_headers_are_clinical(header):
    rep = parse_report(f"FINAL REPORT\nINDICATION: History of heart failure.\n\n{header} Right lower "
                       "lobe consolidation. No pleural effusion.\n")
    assert rep.text == "Right lower lobe consolidation. No pleural effusion."


def test_a_blank_line_ends_a_context_section_but_not_findings():
    rep = parse_mimic_report("COMPARISON: ___\n\nMild cardiomegaly.\n\nFINDINGS: Small effusion.\n\n"
                             "Trace atelectasis.\n\nIMPRESSION: Effusion.\n\nDr. ___ notified.")
    assert rep.findings == "Mild cardiomegaly. Small effusion. Trace atelectasis."
    assert rep.impression == "Effusion. Dr. ___ notified."
    assert rep.sections["comparison"] == "___"


# ----------------------------------------------------------------------------------------------
# case15 kind: misspelled main headers, title headers and organ sub-headers


@pytest.mark.parametrize("header", ["IMPRESSON:", "IMPRESION:", "Impresson:", "IMPRESSSION:",
                                    "CONCLUSSION:", "IMPRESSON"])
def test_misspelled_impression_is_recognised(header):
    rep = parse_report(f"FINDINGS: Heart size is normal. Lungs are clear.\n\n{header}\n"
                       "Small right apical pneumothorax.\n")
    assert rep.impression == "Small right apical pneumothorax."
    assert rep.text.endswith("Small right apical pneumothorax.")


@pytest.mark.parametrize("header", ["FINDNGS:", "FINIDNGS:", "Findngs:"])
def test_misspelled_findings_is_recognised(header):
    rep = parse_report(f"INDICATION: cough\n{header} Moderate cardiomegaly.\nIMPRESSION: Cardiomegaly.")
    assert rep.findings == "Moderate cardiomegaly."


@pytest.mark.parametrize("title", ["CHEST, PA AND LATERAL:", "PA AND LATERAL CHEST:",
                                   "PORTABLE CHEST, 1 VIEW:", "CHEST (PA AND LAT):"])
def test_title_headers_hold_findings(title):
    rep = parse_report(f"INDICATION: Cough.\n\n{title}\nModerate cardiomegaly. Small bilateral "
                       "pleural effusions.\n\nIMPRESSION: Findings suggest mild fluid overload.\n")
    assert "Moderate cardiomegaly. Small bilateral pleural effusions." in rep.findings
    assert "Moderate cardiomegaly" in rep.text and "Cough" not in rep.text


def test_organ_sub_headers_stay_inside_their_section():
    rep = parse_report("FINDINGS:\nLINES/TUBES: Right internal jugular catheter.\nLUNGS: Mild "
                       "bibasilar atelectasis.\nPLEURA: Small left pleural effusion.\nHEART AND "
                       "MEDIASTINUM: Normal.\nPNEUMOTHORAX: None.\n\nIMPRESSION: No acute change.\n"
                       "DEVICES: Unchanged catheter.\n")
    assert rep.findings == ("LINES/TUBES: Right internal jugular catheter. LUNGS: Mild bibasilar "
                            "atelectasis. PLEURA: Small left pleural effusion. HEART AND "
                            "MEDIASTINUM: Normal. PNEUMOTHORAX: None.")
    assert rep.impression == "No acute change. DEVICES: Unchanged catheter."
    assert set(rep.sections) == {"findings", "impression"}


def test_an_unknown_context_like_header_inside_findings_stays_there():
    rep = parse_report("FINDINGS: Lungs are clear.\nCOMPARED TO PRIOR STUDY: new right effusion.\n"
                       "IMPRESSION: Effusion.")
    assert rep.findings == "Lungs are clear. COMPARED TO PRIOR STUDY: new right effusion."


def test_no_line_is_dropped():
    text = ("EXAMINATION: Chest.\nINDICATION: Dyspnea.\nCOMPARISON: None.\nCHEST, TWO VIEWS:\nLUNGS: "
            "Clear.\nHEART: Enlarged.\nIMPRESSON: Cardiomegaly.\nRECOMMENDATION: Follow-up.\n")
    rep = parse_report(text)
    kept = " ".join(rep.sections.values())
    for piece in ("Chest.", "Dyspnea.", "None.", "CHEST, TWO VIEWS:", "LUNGS: Clear.",
                  "HEART: Enlarged.", "Cardiomegaly.", "Follow-up."):
        assert piece in kept, piece
    assert rep.text == "CHEST, TWO VIEWS: LUNGS: Clear. HEART: Enlarged. Cardiomegaly."


# ----------------------------------------------------------------------------------------------
# case16 kind: byte-order marks, cp1252, one bad byte


def test_decode_text_boms_cp1252_and_bad_bytes():
    text = "FINDINGS: Moderate\u00a0cardiomegaly \u2013 stable, 38\u00b0C."
    assert decode_text(codecs.BOM_UTF8 + text.encode("utf-8")) == text
    assert decode_text(codecs.BOM_UTF16_LE + text.encode("utf-16-le")) == text
    assert decode_text(codecs.BOM_UTF16_BE + text.encode("utf-16-be")) == text
    assert decode_text(text.encode("utf-8")) == text
    assert decode_text(text.encode("cp1252")) == text
    assert decode_text(b"Small effusion\x81 noted.") == "Small effusion\ufffd noted."  # undefined in cp1252
    assert decode_text(b"\xff\xfe") == ""


def test_report_bytes_with_bom_or_cp1252_keep_their_sections():
    rep = parse_report("\ufeffFINDINGS: Moderate right pleural effusion.\n\nIMPRESSION: No "
                       "pneumothorax.\n".encode("utf-8"))
    assert rep.findings == "Moderate right pleural effusion."
    assert parse_report("\ufeffFINDINGS: Effusion.\nIMPRESSION: None.").findings == "Effusion."
    rep = parse_report("FINDINGS: Moderate\u00a0cardiomegaly \u2013 stable.\n\nIMPRESSION: No "
                       "pneumothorax.".encode("cp1252"))
    assert rep.findings == "Moderate cardiomegaly \u2013 stable."


def test_cp1252_and_bom_manifests_are_listed(tmp_path):
    rows = "image_uri,report,image_id\n,\"Small left pleural effusion \u2013 unchanged.\",r3\n"
    (tmp_path / "m.csv").write_bytes(rows.encode("cp1252"))
    (tmp_path / "bom.csv").write_bytes(codecs.BOM_UTF8 + rows.encode("utf-8"))
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(rows.encode("cp1252")))
    (tmp_path / "m.jsonl").write_bytes(
        codecs.BOM_UTF8 + json.dumps({"report": "Effusion \u2013 small.", "image_id": "r4"},
                                     ensure_ascii=False).encode("utf-8") + b"\n")
    for name in ("m.csv", "bom.csv", "m.csv.gz"):
        [item] = list_items(str(tmp_path / name))
        assert item["report"] == "Small left pleural effusion \u2013 unchanged."
        assert item["image_id"] == "r3"  # the first column's name survives a BOM
    [item] = list_items(str(tmp_path / "m.jsonl"))
    assert (item["report"], item["image_id"]) == ("Effusion \u2013 small.", "r4")


def test_decode_stage_reads_any_report_encoding_and_one_bad_byte_fails_nothing(tmp_path):
    files = {
        "bom": codecs.BOM_UTF8 + b"FINDINGS: Moderate right pleural effusion.\nIMPRESSION: Stable.",
        "cp1252": "FINDINGS: Mild cardiomegaly \u2013 stable.\nIMPRESSION: None.".encode("cp1252"),
        "bad": b"FINDINGS: Small effusion\x81\x8d.\nIMPRESSION: Stable.",
        "utf8": "FINDINGS: Cardiomegaly \u2013 mild.".encode("utf-8"),
    }
    rows = []
    for name, data in files.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
        rows.append({"row_id": name, "source_uri": name, "report_uri": str(tmp_path / f"{name}.txt")})
    out = {r["row_id"]: r for r in _stage_rows(DecodeStage(DecodeConfig()), rows)}
    assert all(r["status"] == "ok" for r in out.values()), out
    assert out["bom"]["findings_text"] == "Moderate right pleural effusion."
    assert out["cp1252"]["findings_text"] == "Mild cardiomegaly \u2013 stable."
    assert out["bad"]["findings_text"].startswith("Small effusion")
    assert out["utf8"]["report"] == "Cardiomegaly \u2013 mild."


def test_a_line_list_report_keeps_one_statement_per_line(tmp_path):
    # aphp/edsnlp#176 through ingest: the section's lines used to be joined with spaces, so "No
    # pneumothorax Mild cardiomegaly" negated the cardiomegaly after it.
    text = ("FINAL REPORT\n INDICATION: CHF.\n\n FINDINGS:\n Small right pleural effusion\n No pneumothorax\n"
            " Mild cardiomegaly\n\n IMPRESSION:\n - Effusion\n - No pneumothorax\n")
    rep = parse_report(text)
    assert rep.lines.splitlines()[:3] == ["Small right pleural effusion", "No pneumothorax", "Mild cardiomegaly"]
    (tmp_path / "r.txt").write_text(text)
    [row] = _stage_rows(DecodeStage(DecodeConfig()), [{"row_id": "r", "source_uri": "r",
                                                         "report_uri": str(tmp_path / "r.txt")}])
    assert row["report"] == ("Small right pleural effusion. No pneumothorax. Mild cardiomegaly. Effusion. "
                             "No pneumothorax.")
    states = label_states(label_report(row["report"]))
    assert states["Cardiomegaly"] == 1 and states["Pneumothorax"] == 0 and states["Pleural Effusion"] == 1
    # a report written in sentences is stored as it was
    plain = "FINDINGS: Heart size is normal. No pleural effusion.\n\nIMPRESSION: No acute process."
    (tmp_path / "p.txt").write_text(plain)
    [row] = _stage_rows(DecodeStage(DecodeConfig()), [{"row_id": "p", "source_uri": "p",
                                                         "report_uri": str(tmp_path / "p.txt")}])
    assert row["report"] == parse_report(plain).text
