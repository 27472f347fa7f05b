"""DICOM / PNG / JPEG decoding: real CXR pixels, bit depths, windowing, PHI and classified errors."""

import dataclasses
import hashlib
import hmac
import io

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    generate_uid,
)

from pairaug_ray.io.dicom import (
    ERROR_CLASSES,
    DecodedImage,
    DecodeError,
    decode_any,
    decode_dicom,
    decode_image,
    decode_png,
    encode_png,
    pseudonymize,
)

# ----------------------------------------------------------------------------------------------
# fixtures


def _testdata(name: str) -> bytes:
    path = pydicom.data.get_testdata_file(name, download=False)
    assert path is not None, f"pydicom-data does not ship {name}"
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def rg1_uncr() -> bytes:
    return _testdata("RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def rg1_j2kr() -> bytes:
    return _testdata("RG1_J2KR.dcm")


def anatomy(levels: int = 4095, h: int = 96, w: int = 80) -> np.ndarray:
    """Integer 'density' image (dense = high): air, soft tissue, two dark lungs, a bright spine."""
    y, x = np.mgrid[0:h, 0:w]
    density = np.full((h, w), 0.05)
    body = ((x - w / 2) / (0.45 * w)) ** 2 + ((y - h / 2) / (0.48 * h)) ** 2 < 1
    density[body] = 0.5
    for cx in (0.3 * w, 0.7 * w):
        density[((x - cx) / (0.14 * w)) ** 2 + ((y - 0.45 * h) / (0.3 * h)) ** 2 < 1] = 0.2
    density[body & (np.abs(x - w / 2) < 0.05 * w)] = 0.9
    return np.rint(density * levels).astype(np.int64)


def make_dicom(stored: np.ndarray | None, *, bits_stored: int = 12, bits_allocated: int = 16,
               photometric: str = "MONOCHROME2", signed: bool = False,
               transfer_syntax: str = ExplicitVRLittleEndian,
               sop_class: str = ComputedRadiographyImageStorage, pixel_bytes: bytes | None = None,
               **tags) -> bytes:
    """A DICOM Part 10 file (FileDataset + file meta) written to bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "P0001"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    if stored is not None:
        frames = stored if stored.ndim == 3 and photometric not in ("RGB",) else stored[None]
        ds.Rows, ds.Columns = frames.shape[1:3]
        ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
        if photometric == "RGB":
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
        ds.PixelRepresentation = int(signed)
        if len(frames) > 1:
            ds.NumberOfFrames = len(frames)
        dtype = f"{'i' if signed else 'u'}{bits_allocated // 8}"
        ds.PixelData = frames.astype(f"<{dtype}").tobytes()
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def expect_error(error_class: str, fn, *args, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        fn(*args, **kwargs)
    assert info.value.error_class == error_class, str(info.value)
    assert info.value.error_class in ERROR_CLASSES and str(info.value)
    return info.value


def png_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# real chest radiograph (NEMA WG04 RG1: CR, PA, MONOCHROME1, 15 bits stored)


def test_real_cxr_monochrome1_shows_bone_white_and_lungs_dark(rg1_uncr):
    img = decode_dicom(rg1_uncr, size=512)
    p = img.pixels
    assert p.shape == (512, 512) and p.dtype == np.float32
    assert 0.0 <= p.min() and p.max() <= 1.0
    assert (img.bits_stored, img.view_position, img.modality) == (15, "PA", "CR")
    # 1955 x 1841 -> 512 x 482: 15 black columns of padding each side
    assert p[:, :14].max() == 0.0 and p[:, -14:].max() == 0.0 and p[:, 20:-20].min() > 0.0
    right_lung, left_lung = p[100:250, 100:180].mean(), p[100:250, 320:400].mean()
    mediastinum_and_spine = p[60:450, 240:272].mean()
    assert right_lung < mediastinum_and_spine - 0.2
    assert left_lung < mediastinum_and_spine - 0.2


def test_lossless_jpeg2000_decodes_to_the_same_pixels(rg1_uncr, rg1_j2kr):
    native = decode_dicom(rg1_uncr, size=None)
    j2k = decode_dicom(rg1_j2kr, size=None)
    assert native.pixels.shape == (1955, 1841)
    np.testing.assert_array_equal(native.pixels, j2k.pixels)
    assert (j2k.patient_pid, j2k.study_pid) == (native.patient_pid, native.study_pid)


# ----------------------------------------------------------------------------------------------
# photometric interpretation, bit depths, VOI


def test_monochrome1_and_monochrome2_of_the_same_anatomy_match():
    d = anatomy()
    m2 = decode_dicom(make_dicom(d, photometric="MONOCHROME2"), size=None).pixels
    m1 = decode_dicom(make_dicom(4095 - d, photometric="MONOCHROME1"), size=None).pixels
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    assert m2[40, 40] > m2[43, 24]  # spine brighter than lung
    # with windows that mirror each other (LINEAR: c' = 2**bits - c)
    m2w = decode_dicom(make_dicom(d, WindowCenter=1500, WindowWidth=2001), size=None).pixels
    m1w = decode_dicom(make_dicom(4095 - d, photometric="MONOCHROME1", WindowCenter=4096 - 1500,
                                  WindowWidth=2001), size=None).pixels
    np.testing.assert_allclose(m1w, m2w, atol=1e-6)


def test_bit_depths_and_signed_pixels_decode_alike():
    d12 = anatomy(4095)
    ref = decode_dicom(make_dicom(d12, bits_stored=12), size=None)
    assert ref.bits_stored == 12
    as16 = decode_dicom(make_dicom(d12 * 16, bits_stored=16), size=None)
    assert as16.bits_stored == 16
    np.testing.assert_allclose(as16.pixels, ref.pixels, atol=1e-6)
    signed = decode_dicom(make_dicom(d12 - 2048, signed=True), size=None)
    np.testing.assert_allclose(signed.pixels, ref.pixels, atol=1e-6)
    rescaled = decode_dicom(make_dicom(d12 - 2048, signed=True, RescaleSlope=2,
                                       RescaleIntercept=-1024), size=None)
    np.testing.assert_allclose(rescaled.pixels, ref.pixels, atol=1e-6)
    as8 = decode_dicom(make_dicom(anatomy(255), bits_stored=8, bits_allocated=8), size=None)
    assert as8.bits_stored == 8
    np.testing.assert_allclose(as8.pixels, ref.pixels, atol=0.01)


def test_window_center_width_is_applied_when_present():
    d = anatomy()
    plain = decode_dicom(make_dicom(d), size=None).pixels
    windowed = decode_dicom(make_dicom(d, WindowCenter=1000, WindowWidth=801), size=None).pixels
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window, output scaled to [0, 1]
    expected = np.clip((d - 999.5) / 800 + 0.5, 0, 1)
    np.testing.assert_allclose(windowed, expected, atol=1e-5)
    assert np.abs(windowed - plain).max() > 0.2
    assert windowed.max() == 1.0 and windowed.min() == 0.0  # soft tissue and spine saturate


def test_voi_lut_is_preferred_over_the_window():
    d = anatomy()
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.int64)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    got = decode_dicom(make_dicom(d, VOILUTSequence=[item], WindowCenter=1000, WindowWidth=10),
                       size=None).pixels
    expected = (lut[d] - lut.min()) / (lut.max() - lut.min())
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_multiframe_gives_the_first_frame_and_rgb_gives_luminance():
    d = anatomy()
    single = decode_dicom(make_dicom(d), size=None).pixels
    multi = decode_dicom(make_dicom(np.stack([d, 4095 - d])), size=None).pixels
    np.testing.assert_allclose(multi, single, atol=1e-6)

    d8 = anatomy(255)
    grey_rgb = decode_dicom(make_dicom(np.repeat(d8[..., None], 3, axis=2), photometric="RGB",
                                       bits_stored=8, bits_allocated=8), size=None)
    np.testing.assert_allclose(grey_rgb.pixels, d8 / 255, atol=1e-6)
    red_only = np.zeros(d8.shape + (3,), dtype=np.int64)
    red_only[..., 0] = d8
    red = decode_dicom(make_dicom(red_only, photometric="RGB", bits_stored=8, bits_allocated=8),
                       size=None)
    np.testing.assert_allclose(red.pixels, 0.299 * d8 / 255, atol=1e-6)


def test_dicom_without_preamble_or_without_file_meta_decodes():
    d = anatomy()
    full = make_dicom(d)
    ref = decode_dicom(full, size=None).pixels
    np.testing.assert_array_equal(decode_dicom(full[128:], size=None).pixels, ref)  # 'DICM' first
    ds = pydicom.dcmread(io.BytesIO(full))
    bare = Dataset()
    bare.update(ds)  # the data set alone: no preamble, no 'DICM', no file meta
    for implicit in (True, False):
        out = io.BytesIO()
        pydicom.dcmwrite(out, bare, implicit_vr=implicit, little_endian=True)
        raw = out.getvalue()
        assert raw[128:132] != b"DICM" and raw[:4] != b"DICM"
        np.testing.assert_array_equal(decode_dicom(raw, size=None).pixels, ref)
        assert decode_any(raw).pixels.shape == (512, 512)


# ----------------------------------------------------------------------------------------------
# metadata and PHI


def test_no_phi_leaves_and_pseudonyms_are_keyed_and_stable():
    phi = {
        "PatientName": "DOE^JANE", "PatientBirthDate": "19700101", "PatientID": "MRN123456",
        "InstitutionName": "St Elsewhere General Hospital", "AccessionNumber": "ACC998877",
        "ReferringPhysicianName": "HOUSE^GREGORY", "StudyDate": "20240131",
        "InstitutionAddress": "1 Hospital Road Springfield", "OtherPatientIDs": "OTHER4242",
        "SeriesDescription": "CHEST PA JANE DOE",
    }
    data = make_dicom(anatomy(), **phi)
    img = decode_dicom(data, size=64, id_key="k1")
    assert [f.name for f in dataclasses.fields(DecodedImage)] == [
        "pixels", "bits_stored", "view_position", "modality", "patient_pid", "study_pid",
        "presentation_intent"]
    texts = [repr(img), str(img)] + [str(getattr(img, f.name)) for f in dataclasses.fields(img)]
    for value in phi.values():
        for piece in {value, *value.replace("^", " ").split()} - {"CHEST"}:
            if len(piece) < 3:  # "1", "PA": too short to be told apart from other text
                continue
            assert all(piece not in text for text in texts), piece
    assert img.view_position == "PA"  # inferred from SeriesDescription: only the code leaves

    expected = hmac.new(b"k1", b"MRN123456", hashlib.sha256).hexdigest()[:16]
    assert img.patient_pid == pseudonymize("MRN123456", "k1") == expected
    assert img.study_pid == pseudonymize("1.2.826.0.1.3680043.8.498.1", "k1")
    again = decode_dicom(data, size=64, id_key="k1")
    assert (again.patient_pid, again.study_pid) == (img.patient_pid, img.study_pid)
    other_key = decode_dicom(data, size=64, id_key="k2")
    assert other_key.patient_pid != img.patient_pid and other_key.study_pid != img.study_pid
    other_patient = decode_dicom(make_dicom(anatomy(), PatientID="MRN123457"), id_key="k1")
    assert other_patient.patient_pid != img.patient_pid
    assert len(img.patient_pid) == 16 and int(img.patient_pid, 16) >= 0


def test_view_position_sources():
    d = anatomy(levels=255, h=16, w=16)
    assert decode_dicom(make_dicom(d, ViewPosition="AP"), size=None).view_position == "AP"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "R-10232", "SRT"
    code.CodeMeaning = "latero-medial left lateral"
    assert decode_dicom(make_dicom(d, ViewCodeSequence=[code]), size=None).view_position == "LL"
    assert decode_dicom(make_dicom(d, SeriesDescription="Chest LAT"), size=None).view_position == \
        "LATERAL"
    assert decode_dicom(make_dicom(d, SeriesDescription="CHEST PA AND LAT"),
                        size=None).view_position is None
    assert decode_dicom(make_dicom(d), size=None).view_position is None


# ----------------------------------------------------------------------------------------------
# classified errors


def test_not_dicom():
    rng = np.random.default_rng(0)
    expect_error("not_dicom", decode_dicom, rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    expect_error("not_dicom", decode_dicom, png_bytes(np.zeros((8, 8), np.uint8)))
    expect_error("not_dicom", decode_dicom, b"")
    expect_error("not_dicom", decode_any, b"plain text, not an image", name="x")


def test_no_pixel_data_and_not_an_image():
    expect_error("no_pixel_data", decode_dicom, make_dicom(None, Rows=10, Columns=10))
    expect_error("not_an_image", decode_dicom,
                 make_dicom(None, sop_class=BasicTextSRStorage, Modality="SR"))
    # the SOP class alone is enough (a report mislabelled with an image modality)
    expect_error("not_an_image", decode_dicom, make_dicom(None, sop_class=BasicTextSRStorage))
    expect_error("not_an_image", decode_dicom,
                 make_dicom(None, sop_class=EncapsulatedPDFStorage, Modality="DOC"))


def test_truncated_pixel_data(rg1_j2kr):
    d = anatomy()
    full_pixels = d.astype("<u2").tobytes()
    expect_error("truncated_pixel_data", decode_dicom,
                 make_dicom(None, pixel_bytes=full_pixels[:-200], Rows=96, Columns=80,
                            SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
                            BitsAllocated=16, BitsStored=12, HighBit=11, PixelRepresentation=0))
    whole = make_dicom(d)
    expect_error("truncated_pixel_data", decode_dicom, whole[: len(whole) - 1000])  # cut file
    expect_error("truncated_pixel_data", decode_dicom, rg1_j2kr[: len(rg1_j2kr) // 2])  # encapsulated


def test_unsupported_transfer_syntax_made_up_uid():
    fake = make_dicom(None, transfer_syntax="1.2.826.0.1.3680043.8.498.99999",
                      pixel_bytes=encapsulate([b"\xff\x4f" + bytes(200)]), Rows=96, Columns=80,
                      SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
                      BitsStored=12, HighBit=11, PixelRepresentation=0)
    err = expect_error("unsupported_transfer_syntax", decode_dicom, fake)
    assert "1.2.826.0.1.3680043.8.498.99999" in str(err)


def test_unsupported_transfer_syntax_when_the_decoder_plugin_is_missing(rg1_j2kr, monkeypatch):
    decoder_class = type(get_decoder(UID("1.2.840.10008.1.2.4.90")))
    monkeypatch.setattr(decoder_class, "is_available", property(lambda self: False))
    expect_error("unsupported_transfer_syntax", decode_dicom, rg1_j2kr)


@pytest.mark.parametrize("transfer_syntax", [JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
                                             JPEGLSNearLossless, JPEGExtended12Bit])
def test_unsupported_transfer_syntax_when_a_jpeg_plugin_is_missing(transfer_syntax, monkeypatch):
    monkeypatch.setattr(type(get_decoder(transfer_syntax)), "is_available",
                        property(lambda self: False))
    data = make_dicom(None, transfer_syntax=transfer_syntax,
                      pixel_bytes=encapsulate([b"\xff\xd8" + bytes(100) + b"\xff\xd9"]), Rows=8,
                      Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
                      BitsAllocated=16, BitsStored=12, HighBit=11, PixelRepresentation=0)
    err = expect_error("unsupported_transfer_syntax", decode_dicom, data)
    assert "plugin" in str(err)


def test_unreadable_corrupt_header():
    good = make_dicom(anatomy())
    meta_end = 132 + 12 + pydicom.dcmread(io.BytesIO(good)).file_meta.FileMetaInformationGroupLength
    smashed = bytearray(good)
    smashed[meta_end:meta_end + 8] = b"\xff" * 8
    expect_error("unreadable", decode_dicom, bytes(smashed))
    bad_vr = bytearray(good)
    assert bad_vr[meta_end:meta_end + 4] == b"\x08\x00\x16\x00"  # (0008,0016) SOP Class UID
    bad_vr[meta_end + 4:meta_end + 6] = b"ZZ"
    expect_error("unreadable", decode_dicom, bytes(bad_vr))
    expect_error("unreadable", decode_dicom, good[: meta_end + 40])  # cut inside the header


def test_corrupted_and_cut_files_only_ever_raise_decode_error(caplog, recwarn):
    """Random byte damage: a DecodedImage or a DecodeError, and no PHI in messages or logs."""
    phi = ("DOE^JANE", "19700101", "MRN123456", "St Elsewhere")
    good = make_dicom(anatomy(h=32, w=24), WindowCenter=1000, WindowWidth=500, ViewPosition="PA",
                      PatientName=phi[0], PatientBirthDate=phi[1], PatientID=phi[2],
                      InstitutionName=phi[3])
    rng = np.random.default_rng(1)
    seen = set()
    for trial in range(300):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: rng.integers(0, len(good))]
        else:
            for pos in rng.integers(128, len(good), rng.integers(1, 12)):
                data[pos] = rng.integers(0, 256)
        try:
            img = decode_dicom(bytes(data), size=16)
            assert img.pixels.shape == (16, 16) and np.isfinite(img.pixels).all()
            assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0
            seen.add("ok")
        except DecodeError as e:
            assert e.error_class in ERROR_CLASSES
            assert not any(p in str(e) for p in phi), str(e)
            seen.add(e.error_class)
    assert {"ok", "truncated_pixel_data", "unreadable"} <= seen
    logged = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    assert not any(p in text for text in logged for p in phi)


def test_bad_image():
    rng = np.random.default_rng(2)
    expect_error("bad_image", decode_image, rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    png = png_bytes(anatomy(255).astype(np.uint8))
    expect_error("bad_image", decode_image, png[: len(png) // 2])
    expect_error("bad_image", decode_png, png[:40])
    expect_error("bad_image", decode_any, b"\x89PNG\r\n\x1a\n" + bytes(64))
    expect_error("bad_image", decode_any, b"not a png at all", name="x.png")
    jpeg = io.BytesIO()
    Image.fromarray(anatomy(255).astype(np.uint8)).save(jpeg, format="JPEG")
    expect_error("bad_image", decode_png, jpeg.getvalue())  # decode_png reads PNG only


# ----------------------------------------------------------------------------------------------
# PNG / JPEG


def test_png_16bit_round_trip_is_exact():
    levels = np.arange(65536).reshape(256, 256)
    x = (levels / 65535).astype(np.float32)
    data = encode_png(x, bits=16)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode.startswith("I")
    back = decode_png(data)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(np.rint(back.astype(np.float64) * 65535), levels)
    np.testing.assert_array_equal(back, x)
    assert decode_image(data, size=None).bits_stored == 16
    np.testing.assert_array_equal(encode_png(back, bits=16), data)


def test_png_8bit_and_jpeg_decode():
    d8 = anatomy(255).astype(np.uint8)
    x8 = d8 / 255
    np.testing.assert_allclose(decode_png(encode_png(x8, bits=8)), x8, atol=1e-6)
    img = decode_image(png_bytes(d8), size=None)
    assert img.bits_stored == 8 and img.modality is None and img.patient_pid is None
    np.testing.assert_allclose(img.pixels, x8, atol=1e-6)

    jpeg = io.BytesIO()
    Image.fromarray(d8).save(jpeg, format="JPEG", quality=95)
    decoded = decode_any(jpeg.getvalue(), name="x.jpg", size=None)
    assert decoded.bits_stored == 8 and decoded.pixels.shape == d8.shape
    assert np.abs(decoded.pixels - x8).mean() < 0.02

    rgb = np.zeros(d8.shape + (3,), np.uint8)
    rgb[..., 1] = d8
    np.testing.assert_allclose(decode_image(png_bytes(rgb), size=None).pixels, 0.587 * x8,
                               atol=1 / 255)
    with pytest.raises(ValueError):
        encode_png(x8, bits=12)


def test_resize_keeps_aspect_and_pads_with_black():
    wide = decode_image(png_bytes(np.full((40, 80), 255, np.uint8)), size=64).pixels
    assert wide.shape == (64, 64)
    assert wide[16:48].min() == 1.0 and wide[:16].max() == 0.0 and wide[48:].max() == 0.0
    tall = decode_image(png_bytes(np.full((80, 40), 255, np.uint8)), size=64).pixels
    assert tall[:, 16:48].min() == 1.0 and tall[:, :16].max() == 0.0 and tall[:, 48:].max() == 0.0
    small = decode_image(png_bytes(anatomy(255, h=20, w=20).astype(np.uint8)), size=64).pixels
    assert small.shape == (64, 64) and small.min() >= 0 and small.max() <= 1


def test_decode_any_sniffs_the_type():
    d = anatomy()
    dicom = make_dicom(d)
    assert decode_any(dicom, name="").modality == "CR"
    assert decode_any(dicom, name="image.png").modality == "CR"  # bytes win over the name
    png = encode_png(d / 4095, bits=16)
    assert decode_any(png, name="a.dcm").bits_stored == 16
