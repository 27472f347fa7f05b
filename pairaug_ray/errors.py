"""Classified per-row failures: every error row of every stage carries one of these classes.

Usage::

    from pairaug_ray.errors import DecodeError, StageError
    raise StageError("missing_seed", "inter row has no seed")      # any stage, any class
    raise DecodeError("not_dicom", "no DICM marker")                # ingest: one of DECODE_ERROR_CLASSES

A ``StageError`` fails its row only; the stage wrapper (``stages.base.RowStage``) turns it into an
error row (``status="error"``, ``error_class``, ``error``, ``stage``) that is written to the
quarantine table.
"""

from __future__ import annotations

# Classes of inputs that ingest cannot decode (the README's ingest section lists them).
DECODE_ERROR_CLASSES = (
    "not_dicom",
    "no_pixel_data",
    "truncated_pixel_data",
    "unsupported_transfer_syntax",
    "not_an_image",
    "unreadable",
    "bad_image",
    "for_processing",
)


class StageError(Exception):
    """A classified, expected per-row failure (bad input, rejected output)."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


class DecodeError(StageError):
    """Bad image input, classified: ``error_class`` is one of DECODE_ERROR_CLASSES; str(e) says why."""

    def __init__(self, error_class: str, message: str):
        if error_class not in DECODE_ERROR_CLASSES:
            raise ValueError(f"unknown error class {error_class!r}")
        super().__init__(error_class, message)
