"""Classified per-row failures: every error row of every stage carries one of these classes.

Usage::

    from pairaug_ray.errors import DecodeError, StageError
    raise StageError("missing_seed", "inter row has no seed")      # any stage, any class
    raise DecodeError("not_dicom", "no DICM marker")                # ingest: one of DECODE_ERROR_CLASSES

A ``StageError`` fails its row only; the stage wrapper (``stages.base.RowStage``) turns it into an
error row (``status="error"``, ``error_class``, ``error``, ``stage``) that is written to the
quarantine table. A ``StorageError`` is the opposite: object storage failed after its retries (an
outage, throttling that did not stop, refused credentials). That is no fault of the row, so it is
never quarantined: it stops the job, and re-running the same command resumes.
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
    "image_too_large",
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


class StorageError(OSError):
    """Object storage failed after its retries; str(e) names the operation, the object and the cause.

    An ``OSError`` (code that handles I/O errors still sees one), raised by ``io.store`` for remote
    (``s3://``) objects. Stages let it through (``stages.base.RowStage``): a transient outage must
    not turn good rows into quarantined ones, which a re-run would skip.
    """


_STORAGE_ERROR_LINE = "pairaug_ray.errors.StorageError: "


def find_storage_error(exc: BaseException) -> StorageError | None:
    """The ``StorageError`` behind ``exc``, or None.

    Looks through the ``__cause__`` / ``__context__`` chain (and ``.cause``, as Ray's task errors
    hold it); a failure in a Ray worker reaches the driver as text only (Ray Data's
    ``UserCodeException`` keeps the worker's traceback as a string), so its last
    ``pairaug_ray.errors.StorageError: ...`` line is read back into a new ``StorageError``.
    """
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, StorageError):
            return node
        text = str(node)
        if _STORAGE_ERROR_LINE in text:
            line = text.rsplit(_STORAGE_ERROR_LINE, 1)[1].split("\n", 1)[0]
            return StorageError(line.strip())
        node = node.__cause__ or node.__context__ or getattr(node, "cause", None)
    return None
