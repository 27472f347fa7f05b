"""Ingest stage: read an item's image and report, decode pixels to a PNG, parse the report.

Usage::

    cfg = DecodeConfig(image_size=256, id_key=os.environ["PAIRAUG_ID_KEY"])
    ds = items.map_batches(DecodeStage, **cfg.map_batches_kwargs(DecodeStage))

Errors are classified (``io/dicom.py``'s classes, ``unreadable`` for a missing file,
``missing_report``, ``non_frontal_view`` when ``frontal_only``, ``for_processing`` for a DICOM
"For Processing" image unless ``keep_for_processing``, ``image_too_large`` for a header declaring
more than ``max_image_pixels`` pixels, ``report_too_long`` for a report over ``max_report_bytes``,
of which no more than that is read) and become error rows that end in the quarantine table. Report
files are decoded with ``reports.decode_text`` (UTF-8 with or without a BOM, else cp1252): an odd
byte never fails a row. Only pixel data, ids, view position, modality, presentation intent and
report text leave here. Object storage failing after its retries (``StorageError``) is not a row's
fault: it fails the batch and so the job, and a re-run resumes.
"""

from __future__ import annotations

from pydantic import Field

from pairaug_ray.io import dicom
from pairaug_ray.io.reports import decode_text, parse_report
from pairaug_ray.labeler import sentence_text
from pairaug_ray.errors import StorageError
from pairaug_ray.io.store import ObjectTooLargeError, StorageConfig, read_bytes
from pairaug_ray.stages.base import RowStage, StageConfig, StageError

FRONTAL_VIEWS = ("PA", "AP", "PA LLD", "AP AXIAL", "AP LLD", "POSTERO_ANTERIOR", "ANTERO_POSTERIOR")


class DecodeConfig(StageConfig):
    image_size: int = Field(256, ge=16)
    id_key: str = "pairaug-change-me"
    frontal_only: bool = True
    keep_for_processing: bool = Field(
        False, description="write DICOM 'For Processing' images (raw detector data) instead of "
        "quarantining them; their presentation_intent column says FOR PROCESSING")
    png_bits: int = Field(16, description="8 or 16")
    max_image_pixels: int = Field(dicom.MAX_IMAGE_PIXELS, ge=1, description="pixels per frame an image "
                                  "header may declare (Rows x Columns); more is quarantined as "
                                  "image_too_large before decoding")
    max_report_bytes: int = Field(1_000_000, ge=1, description="longest report kept, in bytes (of a "
                                  "report file, at most this much is read); longer is report_too_long")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    num_cpus: float = 0.5


class DecodeStage(RowStage):
    name = "decode"

    def __init__(self, config: DecodeConfig):
        super().__init__(config)
        self.cfg = config

    def process(self, rows: list[dict]) -> list:
        out = []
        for row in rows:
            try:
                out.append([self._one(row)])
            except StorageError:
                raise  # the storage, not the row: stop the job rather than quarantine a good row
            except Exception as exc:  # noqa: BLE001 - classified below, never crashes the job
                out.append(exc if isinstance(exc, (StageError, dicom.DecodeError)) else
                           StageError("unreadable", f"{type(exc).__name__}: {exc}"))
        return out

    def _read(self, uri: str, max_bytes: int | None = None) -> bytes:
        try:
            return read_bytes(uri, self.cfg.storage, max_bytes=max_bytes)
        except StorageError:
            raise
        except FileNotFoundError as exc:
            raise StageError("unreadable", f"file not found: {uri}") from exc
        except OSError as exc:
            raise StageError("unreadable", f"cannot read {uri}: {exc}") from exc

    def _one(self, row: dict) -> dict:
        report_text = row.get("report") or ""
        image = None
        if int(row.get("phantom_index", -1)) >= 0:
            from pairaug_ray import phantom

            size = int(row["phantom_size"]) if int(row.get("phantom_size", -1)) > 0 else self.cfg.image_size
            st = phantom.study(int(row["phantom_index"]), seed=int(row["phantom_seed"]), size=size,
                               report_source=row.get("phantom_reports") or "auto")
            image = dicom.decode_dicom(st.dicom, size=self.cfg.image_size, id_key=self.cfg.id_key)
            report_text = st.report
            row = {**row, "study_id": st.study_id, "patient_id": st.patient_id, "split": st.split,
                   "image_id": st.dicom_id}
        elif row.get("image_uri"):
            data = self._read(row["image_uri"])
            image = dicom.decode_any(data, name=row["image_uri"], size=self.cfg.image_size,
                                     id_key=self.cfg.id_key,
                                     allow_for_processing=self.cfg.keep_for_processing,
                                     max_pixels=self.cfg.max_image_pixels)
        limit = self.cfg.max_report_bytes
        if row.get("report_uri") and not report_text:
            try:
                report_text = decode_text(self._read(row["report_uri"], max_bytes=limit))
            except ObjectTooLargeError as exc:
                raise StageError("report_too_long", f"report file is longer than {limit} bytes "
                                 "(decode.max_report_bytes)") from exc
            except StageError as exc:
                raise StageError("missing_report", f"report not found: {row['report_uri']}") from exc
        elif len(report_text) > limit and len(report_text.encode("utf-8")) > limit:
            raise StageError("report_too_long", f"report is longer than {limit} bytes (decode.max_report_bytes)")
        if not report_text.strip():
            raise StageError("missing_report", "the study has no report text")
        report = parse_report(report_text, name=row.get("report_uri", ""))

        view = (row.get("view_position") or (image.view_position if image else "") or "").upper()
        if self.cfg.frontal_only and view and view not in FRONTAL_VIEWS:
            raise StageError("non_frontal_view", f"view position {view} is not frontal (PA/AP)")
        return {
            "row_id": row["row_id"],
            "study_id": row.get("study_id") or (image.study_pid if image else "") or "",
            "patient_id": row.get("patient_id") or (image.patient_pid if image else "") or "",
            "image_id": row.get("image_id") or row["row_id"],
            "split": row.get("split", ""),
            "view_position": view,
            "modality": (image.modality or "") if image else "",
            "bits_stored": int(image.bits_stored) if image else 0,
            "presentation_intent": (image.presentation_intent or "") if image else "",
            "image_png": dicom.encode_png(image.pixels, bits=self.cfg.png_bits) if image else b"",
            "report": sentence_text(report.lines) if report.lines else report.text,
            "findings_text": report.findings,
            "impression_text": report.impression,
            "source_uri": row["source_uri"],
            "status": "ok",
        }
