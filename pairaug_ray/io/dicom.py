"""Decode chest radiographs (DICOM, PNG, JPEG) to PHI-free pixels and metadata.

Pixels come out as float32 in [0, 1] with bright = dense (bone white), resized to keep the aspect
ratio with the longer side fitted to ``size`` and padded with 0 (air) to a centred square. The only
header facts that leave this module are the view position, the modality, BitsStored, the
presentation intent and keyed pseudonyms (HMAC-SHA256) of PatientID and StudyInstanceUID. Every
failure on bad input is a ``DecodeError`` whose ``error_class`` is one of ``ERROR_CLASSES``.

The DICOM grayscale pipeline (PS3.4 N.2.1): stored values -> Modality LUT / rescale -> VOI LUT or
window -> Presentation LUT -> P-values, with pydicom's ``apply_*`` helpers (the Presentation LUT
Shape by its definition, PS3.3 C.11.6.1.2); Pixel Padding Value (PS3.3 C.7.5.1.1.2) is kept out
of the range and shown as 0. JPEG baseline/extended/lossless
(pylibjpeg-libjpeg), JPEG-LS (pyjpegls) and JPEG 2000 (pylibjpeg-openjpeg) decode through
pydicom's pixel decoders. PNG/JPEG files are turned upright by their EXIF Orientation.

Usage: ``img = decode_any(open("x.dcm", "rb").read(), name="x.dcm", size=512, id_key="secret")``
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_presentation_lut,
    apply_voi_lut,
    get_decoder,
)
from pydicom.pixels.processing import apply_voi, apply_windowing
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pairaug_ray.errors import DECODE_ERROR_CLASSES, DecodeError  # noqa: F401 (re-exported)

ERROR_CLASSES = DECODE_ERROR_CLASSES

# Modalities and SOP classes of DICOM objects that carry no radiograph (reports, documents,
# presentation states, waveforms, RT plans, ...).
_NON_IMAGE_MODALITIES = frozenset(
    {"SR", "KO", "PR", "DOC", "ECG", "HD", "AU", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "PLAN", "FID"}
)
_NON_IMAGE_SOP_WORDS = ("SR Storage", "Key Object Selection", "Presentation State", "Encapsulated",
                        "Waveform", "Structure Set", "RT Plan", "Registration", "Raw Data")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_PADDING_TAG = 0xFFFCFFFC
_UNDEFINED_LENGTH = 0xFFFFFFFF
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    b"US UT UV".split()
)
_CS_VALUE = re.compile(r"^[A-Z0-9 _]{1,16}$")  # the DICOM Code String character set
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
FOR_PROCESSING = "FOR PROCESSING"
FOR_PRESENTATION = "FOR PRESENTATION"
# Pixels per frame an image header may declare (6000 x 6000; chest detectors are at most ~4300 x
# 4300): a header claiming more is refused before anything the size of the image is allocated.
MAX_IMAGE_PIXELS = 36_000_000


@dataclass
class DecodedImage:
    pixels: np.ndarray          # float32 HxW in [0,1], bright = dense, square size x size
    bits_stored: int            # 8 for 8-bit PNG/JPEG, 16 for 16-bit PNG, else DICOM BitsStored
    view_position: str | None   # "PA", "AP", "LATERAL", "LL", ...
    modality: str | None        # "CR", "DX", ...
    patient_pid: str | None     # pseudonymize(PatientID)
    study_pid: str | None       # pseudonymize(StudyInstanceUID)
    presentation_intent: str | None = None  # "FOR PRESENTATION" | "FOR PROCESSING" | None (unsaid)

    def __repr__(self) -> str:
        return (f"DecodedImage(pixels={self.pixels.dtype}{list(self.pixels.shape)}, "
                f"bits_stored={self.bits_stored}, view_position={self.view_position!r}, "
                f"modality={self.modality!r}, patient_pid={self.patient_pid!r}, "
                f"study_pid={self.study_pid!r}, presentation_intent={self.presentation_intent!r})")


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-f]+>")


def _describe(e: Exception) -> str:
    """An exception as text without the header values pydicom quotes in its messages (PHI)."""
    text = _OBJECT_REPR.sub("", _QUOTED.sub("<value>", str(e)))   # no "<_io.BytesIO object at 0x..>"
    return f"{type(e).__name__}: {text}"[:300]


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom warns and logs odd header values verbatim (names, ids): keep them out of logs."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def pseudonymize(value: str, key: str) -> str:
    """Keyed pseudonym of an identifier: HMAC-SHA256(key, value), first 16 hex characters."""
    return hmac.new(key.encode("utf-8"), value.strip().encode("utf-8"), hashlib.sha256).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# DICOM


def decode_dicom(data: bytes, size: int | None = 512, id_key: str = "pairaug",
                 allow_for_processing: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode a DICOM file's first frame and its PHI-free metadata; raises DecodeError.

    A "For Processing" image (Presentation Intent Type FOR PROCESSING or a "For Processing" SOP
    class: raw detector data, often linear in exposure, not meant for display; PS3.3 C.8.11.1.1.1)
    raises ``DecodeError("for_processing")`` unless ``allow_for_processing``; when allowed it is
    decoded like any other image and ``presentation_intent`` says what it is. A header declaring
    more than ``max_pixels`` pixels per frame (Rows x Columns) raises
    ``DecodeError("image_too_large")`` before any pixel is decoded (None: no limit).
    """
    _check_size(size)
    try:
        with _quiet_pydicom():
            ds = _read_dataset(data)
            meta = _read_metadata(ds, id_key)
            _check_is_image(ds)
            if meta["presentation_intent"] == FOR_PROCESSING and not allow_for_processing:
                raise DecodeError("for_processing", "a 'For Processing' image (raw detector data, "
                                  "not for display; PS3.3 C.8.11.1.1.1)")
            _check_pixel_count(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), max_pixels)
            arr, bits = _first_frame(ds)
            pixels = _to_unit_range(arr, ds)
    except DecodeError:
        raise
    except Exception as e:  # anything pydicom/numpy raise on a malformed header or value
        raise DecodeError("unreadable", f"unreadable DICOM: {_describe(e)}") from e
    return DecodedImage(pixels=_fit_square(pixels, size), bits_stored=bits, **meta)


# VRs whose explicit-VR element header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


def _elements_parse(data: bytes, implicit: bool, little: bool, want: int = 2) -> bool:
    """Whether ``data`` starts with ``want`` well-formed data elements in this encoding.

    Well-formed (PS3.5 7.1): an even (standard) group from 0x0002 to 0x7FE0, tags ascending, a
    known VR (explicit VR), and a value length that ends inside ``data``; an undefined length,
    which cannot be skipped, ends the walk and is accepted only on SQ/UN/OB/OW elements.
    """
    end, pos, last_tag, seen = len(data), 0, -1, 0
    order = "<" if little else ">"
    while seen < want:
        if pos + 8 > end:
            return False
        group, element = struct.unpack(order + "HH", data[pos:pos + 4])
        tag = (group << 16) | element
        if group % 2 or not 0x0002 <= group <= 0x7FE0 or tag <= last_tag:
            return False
        if implicit:
            (length,) = struct.unpack(order + "I", data[pos + 4:pos + 8])
            header = 8
        elif data[pos + 4:pos + 6] not in _EXPLICIT_VRS:
            return False
        elif data[pos + 4:pos + 6] in _LONG_VRS:
            if pos + 12 > end:
                return False
            (length,) = struct.unpack(order + "I", data[pos + 8:pos + 12])
            header = 12
        else:
            (length,) = struct.unpack(order + "H", data[pos + 6:pos + 8])
            header = 8
        seen += 1
        if length == _UNDEFINED_LENGTH:  # a sequence or encapsulated pixel data: cannot skip it
            vr = _dictionary_vr(tag) if implicit else data[pos + 4:pos + 6].decode()
            return vr in ("SQ", "UN", "OB", "OW", "OB or OW")
        if pos + header + length > end:
            return False
        pos, last_tag = pos + header + length, tag
    return True


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:  # private or unknown tag
        return ""


def _raw_dataset_encoding(data: bytes) -> tuple[bool, bool] | None:
    """``(implicit_vr, little_endian)`` of a data set written without the 128-byte preamble,
    'DICM' prefix and file meta, or None when the bytes do not start like one.

    The three encodings of PS3.5 7.1 are tried: explicit VR little endian, explicit VR big endian
    and implicit VR little endian; pydicom's ``dcmread(force=True)`` then reads the data set.
    """
    data = bytes(data)
    for implicit, little in ((False, True), (False, False), (True, True)):
        if _elements_parse(data, implicit, little):
            return implicit, little
    return None


def _looks_like_raw_dataset(data: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble and 'DICM' prefix."""
    return _raw_dataset_encoding(data) is not None


def _dcmread(data: bytes, force: bool, stop_before_pixels: bool = False) -> tuple[Dataset, bool]:
    """pydicom's reader; also says whether the file ended before an element's end delimiter."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError as e:
            raise DecodeError("not_dicom", f"not a DICOM file: {_describe(e)}") from e
        except Exception as e:
            raise DecodeError("unreadable", f"corrupt DICOM header: {_describe(e)}") from e
    return ds, any("End of file" in str(w.message) for w in caught)


def _read_dataset(data: bytes) -> Dataset:
    data = bytes(data)
    force = False
    if data[128:132] != b"DICM":
        if data[:4] == b"DICM":  # prefix without the preamble
            data = b"\0" * 128 + data
        elif _looks_like_raw_dataset(data):
            force = True
        elif not any(data[:128]) and _looks_like_raw_dataset(data[128:]):  # preamble, no 'DICM'
            data, force = data[128:], True
        else:
            raise DecodeError("not_dicom", "not a DICOM file (no 'DICM' prefix, no data set)")
    ds, hit_eof = _dcmread(data, force)
    if hit_eof:
        # pydicom drops the whole data set when the file ends inside an undefined-length value;
        # if the header alone reads cleanly, the file was cut inside its (encapsulated) pixel data.
        header, header_eof = _dcmread(data, force, stop_before_pixels=True)
        if not header_eof and len(header) and "PixelData" not in header and len(header) >= len(ds):
            raise DecodeError("truncated_pixel_data", "file ends inside its pixel data")

    tags = [int(t) for t in ds.keys()]
    if not tags:
        raise DecodeError("unreadable", "corrupt DICOM header: no data set after the file meta")
    # A file cut short ends inside its last element: a value shorter than its declared length,
    # or an undefined-length value (encapsulated pixel data) with no closing delimiter.
    last = tags[-1] if tags[-1] != _PADDING_TAG or len(tags) == 1 else tags[-2]
    raw = ds.get_item(last)
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    cut = (length == _UNDEFINED_LENGTH and hit_eof) or (
        isinstance(value, bytes) and length is not None and length != _UNDEFINED_LENGTH
        and len(value) < length
    )
    if cut:
        if last in _PIXEL_TAGS:
            raise DecodeError("truncated_pixel_data", "pixel data ends before its declared length")
        raise DecodeError("unreadable", f"file ends inside element {pydicom.tag.Tag(last)}")
    if not any(t in tags for t in (0x00080016, 0x00080060, 0x0020000D, 0x00280010, *_PIXEL_TAGS)):
        raise DecodeError("unreadable", "corrupt DICOM header: no SOP class, modality, study or image")
    if not any(t in tags for t in _PIXEL_TAGS) and _unparsed_tail(ds, tags[-1], len(data)):
        raise DecodeError("unreadable", "file ends inside an element header")
    return ds


def _unparsed_tail(ds: Dataset, last_tag: int, size: int) -> bool:
    """Bytes after the last element that pydicom could not read as an element (a cut header)."""
    tsyntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if tsyntax and UID(str(tsyntax)).is_deflated:  # positions are in the inflated stream
        return False
    raw = ds.get_item(last_tag)
    tell, value = getattr(raw, "value_tell", None), getattr(raw, "value", None)
    if tell is None or not isinstance(value, bytes):
        return False
    end = tell + len(value) + (8 if getattr(raw, "length", None) == _UNDEFINED_LENGTH else 0)
    return size > end


def _code_string(value) -> str | None:
    """A CS value if it is one (upper-case letters, digits, space, underscore), else None."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text if _CS_VALUE.match(text) else None


def _read_metadata(ds: Dataset, id_key: str) -> dict:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    return {
        "view_position": _view_position(ds),
        "modality": _code_string(ds.get("Modality")),
        "patient_pid": pseudonymize(patient_id, id_key) if patient_id else None,
        "study_pid": pseudonymize(study_uid, id_key) if study_uid else None,
        "presentation_intent": _presentation_intent(ds),
    }


def _presentation_intent(ds: Dataset) -> str | None:
    """FOR_PROCESSING or FOR_PRESENTATION from Presentation Intent Type (0008,0068) or the SOP
    class ("Digital X-Ray Image Storage - For Processing", ...; PS3.3 C.8.11.1.1.1, PS3.4 B.5);
    either one saying "For Processing" wins. None when neither says."""
    intent = _code_string(ds.get("PresentationIntentType"))
    sop_class = ds.get("SOPClassUID")
    if not sop_class and hasattr(ds, "file_meta"):
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID")
    sop_name = UID(str(sop_class)).name.upper() if sop_class else ""
    said = {intent, *(v for v in (FOR_PROCESSING, FOR_PRESENTATION) if v in sop_name)}
    if FOR_PROCESSING in said:
        return FOR_PROCESSING
    return FOR_PRESENTATION if FOR_PRESENTATION in said else None


_VIEW_WORDS = {"PA": "PA", "AP": "AP", "LL": "LL", "RL": "RL", "LAT": "LATERAL", "LATERAL": "LATERAL"}
_VIEW_MEANINGS = (("postero-anterior", "PA"), ("posteroanterior", "PA"), ("antero-posterior", "AP"),
                  ("anteroposterior", "AP"), ("left lateral", "LL"), ("right lateral", "RL"),
                  ("lateral", "LATERAL"))


def _view_position(ds: Dataset) -> str | None:
    """ViewPosition, else inferred from ViewCodeSequence or a description; only a code leaves."""
    try:
        view = _code_string(ds.get("ViewPosition"))
        if view:
            return view
        for item in ds.get("ViewCodeSequence") or []:
            meaning = str(item.get("CodeMeaning", "")).lower()
            for words, code in _VIEW_MEANINGS:
                if words in meaning:
                    return code
        for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
            words = re.split(r"[^A-Z0-9]+", str(ds.get(keyword, "") or "").upper())
            found = {_VIEW_WORDS[w] for w in words if w in _VIEW_WORDS}
            if len(found) == 1:  # "PA AND LAT" names two views: no answer
                return found.pop()
    except Exception:  # a malformed descriptive tag only costs the view
        return None
    return None


def _check_is_image(ds: Dataset) -> None:
    modality = _code_string(ds.get("Modality"))
    sop_class = ds.get("SOPClassUID")
    if not sop_class and hasattr(ds, "file_meta"):
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID")
    sop_name = UID(str(sop_class)).name if sop_class else ""
    if modality in _NON_IMAGE_MODALITIES or any(w in sop_name for w in _NON_IMAGE_SOP_WORDS):
        what = sop_name if sop_name and sop_name != str(sop_class) else f"modality {modality}"
        raise DecodeError("not_an_image", f"DICOM object is not an image ({what})")
    if not any(t in ds for t in _PIXEL_TAGS):
        raise DecodeError("no_pixel_data", "DICOM file has no pixel data")


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    tsyntax = meta.get("TransferSyntaxUID")
    if tsyntax:
        return UID(str(tsyntax))
    # No file meta (preamble-less data set): native pixel data in the encoding pydicom read it in.
    raw = ds.get_item(0x7FE00010)
    if raw is not None and getattr(raw, "length", None) == _UNDEFINED_LENGTH:
        raise DecodeError("unsupported_transfer_syntax",
                          "compressed pixel data without a Transfer Syntax UID")
    implicit, little = getattr(ds, "original_encoding", (True, True))
    tsyntax = (ImplicitVRLittleEndian if implicit else
               ExplicitVRLittleEndian if little or little is None else ExplicitVRBigEndian)
    meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _first_frame(ds: Dataset) -> tuple[np.ndarray, int]:
    tsyntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise DecodeError("unsupported_transfer_syntax",
                          f"no pixel decoder for transfer syntax {tsyntax} ({tsyntax.name})") from e
    if not decoder.is_available:
        raise DecodeError(
            "unsupported_transfer_syntax",
            f"no installed plugin decodes {tsyntax.name}: {'; '.join(decoder.missing_dependencies)}",
        )
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise DecodeError("unreadable", f"image header lacks {keyword}")
    if decoder.is_native and "PixelData" in ds:
        expected = get_expected_length(ds, unit="bytes")
        actual = len(ds.PixelData)
        if actual < expected:
            raise DecodeError("truncated_pixel_data",
                              f"pixel data holds {actual} bytes, the header needs {expected}")
    try:
        arr, _ = decoder.as_array(ds, index=0)
    except DecodeError:
        raise
    except Exception as e:
        if decoder.is_native:  # plain pixel data the header does not describe
            raise DecodeError("unreadable", f"pixel data could not be decoded: {_describe(e)}") from e
        # Every installed plugin for this transfer syntax failed on the codestream (a variant it
        # cannot do, e.g. 12-bit or lossless JPEG in Pillow, or a damaged stream).
        raise DecodeError(
            "unsupported_transfer_syntax",
            f"no installed plugin could decode this {tsyntax.name} pixel data "
            f"(plugins: {', '.join(decoder.available_plugins) or 'none'}): {_describe(e)}",
        ) from e
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    return arr, bits


def _lut_output_range(ds: Dataset) -> tuple[float, float]:
    """Lowest and highest output of the first VOI LUT, read by running pydicom over its domain."""
    nr_entries, first_map, _ = ds.VOILUTSequence[0].LUTDescriptor
    domain = np.arange(first_map, first_map + (nr_entries or 2**16))
    out = apply_voi(domain, ds)
    return float(out.min()), float(out.max())


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """pydicom maps values far below / above the window to its output limits."""
    with np.errstate(over="ignore"):
        lo, hi = apply_windowing(np.array([-1e300, 1e300]), ds)
    return float(min(lo, hi)), float(max(lo, hi))


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _padding_mask(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """True where a stored value is padding, not image (PS3.3 C.7.5.1.1.2), else None.

    Padding is Pixel Padding Value (0028,0120) or, with Pixel Padding Range Limit (0028,0121),
    every stored value between the two, inclusive; both are stored values (before the Modality
    LUT) with the Pixel Representation's sign.
    """
    if ds.get("PixelPaddingValue") is None:
        return None
    value = _stored_int(ds, "PixelPaddingValue")
    limit = _stored_int(ds, "PixelPaddingRangeLimit") if "PixelPaddingRangeLimit" in ds else None
    if value is None:
        return None
    if limit is None:
        mask = arr == value
    else:
        mask = (arr >= min(value, limit)) & (arr <= max(value, limit))
    return mask if mask.any() else None


def _stored_int(ds: Dataset, keyword: str) -> int | None:
    """A US-or-SS attribute as an int; raw bytes (an unresolved ambiguous VR) read with the
    data set's Pixel Representation and byte order."""
    value = ds.get(keyword)
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 2:
            return None
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        return int.from_bytes(value, "little" if little else "big", signed=signed)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _to_p_values(unit: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """VOI output scaled to [0, 1] -> P-values in [0, 1] (bright = dense).

    - A Presentation LUT Sequence (PS3.3 C.11.4) maps the VOI output to P-values with pydicom's
      ``apply_presentation_lut``; its output is divided by 2**(LUT bits) - 1.
    - Otherwise the image is inverted (min shown white) once when Photometric Interpretation is
      MONOCHROME1 *or* Presentation LUT Shape (2050,0020) is INVERSE: in an image the shape
      "shall be" INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2 (General Image Module,
      PS3.3 C.7.6.1; DX Image Module C.8.11.3), so MONOCHROME1 + INVERSE state the same single
      inversion, and MONOCHROME2 + INVERSE shows min white (P-value = max - value, C.11.6.1.2).
      MONOCHROME1 + IDENTITY breaks that rule; the Photometric Interpretation, which describes
      the pixel data itself, wins.
    """
    seq = ds.get("PresentationLUTSequence")
    if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        try:
            bits = int(seq[0].LUTDescriptor[2])
            # pydicom rescales its input from min..max to the LUT's entries: pin the ends to the
            # VOI output range with two extra samples, so an image's own range does not stretch.
            pinned = np.concatenate([unit.ravel(), [0.0, 1.0]])
            p_values = apply_presentation_lut(pinned, ds)[:-2].reshape(unit.shape)
            return np.clip(p_values.astype(np.float64) / (2**bits - 1), 0.0, 1.0)
        except (ValueError, IndexError, TypeError, ZeroDivisionError, OverflowError):
            pass  # an unusable LUT: fall back to the shape rule
    shape = _code_string(ds.get("PresentationLUTShape"))
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        return 1.0 - unit
    return unit


def _to_unit_range(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> [0, 1] display values, bright = dense, padding 0."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return (arr.astype(np.float64) @ _LUMA / np.iinfo(arr.dtype).max).astype(np.float32)
    if arr.ndim == 3:  # colour: the decoder already converted YBR to RGB
        top = 2 ** int(ds.get("BitsStored") or ds.BitsAllocated) - 1
        return np.clip(arr[..., :3].astype(np.float64) @ _LUMA / top, 0, 1).astype(np.float32)

    padding = _padding_mask(arr, ds)
    values = apply_modality_lut(arr, ds)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        values = values.astype(np.int64)  # VOI LUTs index with integers
    out, lo, hi = None, 0.0, 0.0
    try:
        if _has_voi_lut(ds):
            out, (lo, hi) = apply_voi_lut(values, ds), _lut_output_range(ds)
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            out, (lo, hi) = apply_voi_lut(values, ds), _window_output_range(ds)
    except (ValueError, NotImplementedError, IndexError, TypeError):
        out = None  # an unusable window or LUT: fall back to the stored range
    if out is None or not hi > lo:
        out = values.astype(np.float64)
        real = np.isfinite(out) if padding is None else np.isfinite(out) & ~padding
        lo, hi = (float(out[real].min()), float(out[real].max())) if real.any() else (0.0, 0.0)
    unit = (out.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(out.shape)
    unit = _to_p_values(np.clip(np.nan_to_num(unit), 0.0, 1.0), ds, photometric)
    if padding is not None:
        unit[padding] = 0.0  # not anatomy: black, like the letterbox around the image
    return unit.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# PNG / JPEG


def _upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: EXIF/TIFF Orientation (0x0112) applied with Pillow's
    ``ImageOps.exif_transpose`` (phone photos of films, images rotated in a file browser). An
    unreadable EXIF block leaves the stored orientation."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a damaged EXIF block costs the orientation, not the image
        return img


def _check_pixel_count(rows: int, columns: int, max_pixels: int | None) -> None:
    """Raises DecodeError('image_too_large') when a header declares more than ``max_pixels``."""
    if max_pixels is not None and rows * columns > max_pixels:
        raise DecodeError("image_too_large", f"the header declares {columns} x {rows} = {rows * columns} "
                          f"pixels, more than the limit of {max_pixels} (decode.max_image_pixels)")


def _load_pillow(data: bytes, formats: tuple[str, ...] | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, int]:
    """Image bytes -> (float32 [0,1] grayscale upright, bits per sample); raises
    DecodeError('bad_image'), or DecodeError('image_too_large') when the header declares more than
    ``max_pixels`` pixels (checked before the pixels are decoded)."""
    try:
        with Image.open(io.BytesIO(bytes(data)), formats=formats) as stored:
            _check_pixel_count(stored.height, stored.width, max_pixels)
            stored.load()
            img = _upright(stored)
            mode = img.mode
            if mode.startswith("I;16"):
                return (np.asarray(img).astype(np.float64) / 65535.0).astype(np.float32), 16
            if mode == "I":  # 16-bit grayscale as Pillow's 32-bit integer mode
                arr = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
                return (arr / 65535.0).astype(np.float32), 16
            if mode == "F":
                return np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0, 1), 32
            if mode in ("L", "LA", "1", "P") and (mode != "P" or _palette_is_gray(img)):
                arr = np.asarray(img.convert("L"), dtype=np.float64)
                return (arr / 255.0).astype(np.float32), 8
            rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
            return (rgb @ _LUMA / 255.0).astype(np.float32), 8
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, hit inside Image.open
        raise DecodeError("image_too_large", f"image header declares too many pixels: {_describe(e)}") from e
    except Exception as e:
        raise DecodeError("bad_image", f"undecodable image: {_describe(e)}") from e


def _palette_is_gray(img: Image.Image) -> bool:
    rgb = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def decode_image(data: bytes, size: int | None = 512,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode a PNG or JPEG (8 or 16-bit grayscale, or RGB -> luminance), turned upright by its
    EXIF Orientation; raises DecodeError (``image_too_large`` above ``max_pixels``)."""
    _check_size(size)
    pixels, bits = _load_pillow(data, max_pixels=max_pixels)
    return DecodedImage(pixels=_fit_square(pixels, size), bits_stored=bits, view_position=None,
                        modality=None, patient_pid=None, study_pid=None)


def encode_png(pixels: np.ndarray, bits: int = 16) -> bytes:
    """Float [0,1] HxW -> 8 or 16-bit grayscale PNG bytes (values rounded to the nearest level)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    arr = np.asarray(pixels, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    top = 2**bits - 1
    levels = np.rint(np.clip(np.nan_to_num(arr), 0.0, 1.0) * top)
    img = Image.fromarray(levels.astype(np.uint8 if bits == 8 else np.uint16))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> float32 [0,1] grayscale at native size; raises DecodeError('bad_image')."""
    return _load_pillow(data, formats=("PNG",))[0]


# ----------------------------------------------------------------------------------------------
# Dispatch and geometry

_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def decode_any(data: bytes, name: str = "", size: int | None = 512, id_key: str = "pairaug",
               allow_for_processing: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS) -> DecodedImage:
    """Sniff DICOM vs PNG/JPEG from the bytes (the file name breaks ties) and decode.

    DICOM is recognised by its 'DICM' prefix (with or without the preamble) or by a data set
    written without one in any of the three DICOM encodings (``_raw_dataset_encoding``).
    ``allow_for_processing`` is passed to ``decode_dicom``; ``max_pixels`` to both decoders.
    """
    head = bytes(data[:132])
    lower = name.lower()

    def dicom() -> DecodedImage:
        return decode_dicom(data, size=size, id_key=id_key, allow_for_processing=allow_for_processing,
                            max_pixels=max_pixels)

    def image() -> DecodedImage:
        return decode_image(data, size=size, max_pixels=max_pixels)

    if head[128:132] == b"DICM" or head[:4] == b"DICM":
        return dicom()
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return image()
    if lower.endswith(_DICOM_SUFFIXES) or _looks_like_raw_dataset(data):
        return dicom()
    if lower.endswith(_IMAGE_SUFFIXES):
        return image()
    try:
        Image.open(io.BytesIO(bytes(data))).close()
    except Exception:
        return dicom()  # raises not_dicom on unknown bytes
    return image()


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, not {size!r}")


def _fit_square(pixels: np.ndarray, size: int | None) -> np.ndarray:
    """Resize keeping the aspect ratio (longer side = size) and centre on a size x size black square."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if size is None:
        return pixels
    h, w = pixels.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        img = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BILINEAR)
        pixels = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = pixels
    return out
