"""Where studies come from: a MIMIC-CXR style tree, a manifest, the IU corpus, or PhantomCXR.

Usage::

    items = list_items("phantom://64?seed=0")            # or "/data/mimic-cxr-jpg", "s3://b/x",
    items = list_items("manifest.csv", StorageConfig())  # "iu://", "...jsonl", "...parquet"

``list_items`` runs on the driver and returns one small dict per image (no pixels, no report text
for files): the decode stage reads and decodes them in the actor pool. Item keys are
``ITEM_KEYS``; missing strings are ``""`` and missing ints ``-1``.

Sources:
- ``phantom://N?seed=S[&size=P&reports=auto|iu|template]``: N PhantomCXR studies, rendered and
  written as DICOM inside the decode stage, so they take the real DICOM decoding path.
- a MIMIC-CXR(-JPG) tree: ``files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm|.jpg|.png`` with the
  report ``files/pNN/pNNNNNNNN/sNNNNNNNN.txt``; ``*split.csv[.gz]`` and ``*metadata.csv[.gz]`` at
  the root give the split and ViewPosition when present.
- a manifest ``.csv``/``.jsonl``/``.parquet`` with ``image_uri`` and ``report`` or ``report_uri``
  (relative paths are relative to the manifest), optional ``study_id``, ``patient_id``,
  ``image_id``, ``split``, ``view_position``. Text manifests may be UTF-8 (with or without a
  BOM) or Windows cp1252.
- ``iu://``: the Indiana University reports shipped by torchxrayvision (reports only, no images).
"""

from __future__ import annotations

import gzip
import io
import posixpath
import re
from typing import Any
from urllib.parse import parse_qs, urlparse

import pandas as pd

from pairaug_ray.io.reports import decode_text
from pairaug_ray.io.store import StorageConfig, content_hash, filesystem, split_protocol

ITEM_KEYS = (
    "row_id", "source_uri", "image_uri", "report_uri", "report", "study_id", "patient_id",
    "image_id", "split", "view_position", "phantom_index", "phantom_seed", "phantom_size",
    "phantom_reports",
)
IMAGE_EXTENSIONS = (".dcm", ".dicom", ".jpg", ".jpeg", ".png")
MANIFEST_EXTENSIONS = (".csv", ".csv.gz", ".jsonl", ".json", ".parquet")


class SourceError(ValueError):
    """The source cannot be listed (missing folder, bad manifest, unknown scheme)."""


def _item(**kw: Any) -> dict:
    item = {k: "" for k in ITEM_KEYS}
    item.update(phantom_index=-1, phantom_seed=-1, phantom_size=-1)
    item.update({k: v for k, v in kw.items() if v is not None})
    if not item["row_id"]:
        item["row_id"] = content_hash([item["source_uri"], item["image_uri"], item["report_uri"]])
    return item


def list_items(source: str, storage: StorageConfig | None = None) -> list[dict]:
    """All items of ``source`` (see the module docstring for the kinds)."""
    storage = storage or StorageConfig()
    proto = split_protocol(source)[0]
    if proto == "phantom":
        return _phantom_items(source)
    if proto == "iu":
        return _iu_items()
    lower = source.lower()
    if lower.endswith(MANIFEST_EXTENSIONS):
        return _manifest_items(source, storage)
    return _tree_items(source, storage)


def _phantom_items(source: str) -> list[dict]:
    parsed = urlparse(source)
    try:
        n = int(parsed.netloc or parsed.path.strip("/"))
    except ValueError as exc:
        raise SourceError(f"phantom source needs a count: phantom://N?seed=S, got {source!r}") from exc
    q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    seed = int(q.get("seed", 0))
    size = int(q.get("size", -1))
    reports = q.get("reports", "auto")
    if n < 0:
        raise SourceError(f"phantom count must be >= 0, got {n}")
    return [
        _item(
            row_id=f"phantom-{seed}-{i}",
            source_uri=f"phantom://{i}?seed={seed}",
            phantom_index=i,
            phantom_seed=seed,
            phantom_size=size,
            phantom_reports=reports,
        )
        for i in range(n)
    ]


def _iu_items() -> list[dict]:
    from pairaug_ray.io.reports import iter_iu_reports

    items = []
    for rep in iter_iu_reports():
        rid = str(getattr(rep, "report_id", "") or content_hash([rep.text]))
        items.append(
            _item(row_id=f"iu-{rid}", source_uri=f"iu://{rid}", report=rep.text, study_id=rid,
                  patient_id=rid)
        )
    return items


def _read_csv_like(uri: str, storage: StorageConfig) -> pd.DataFrame:
    """A manifest or table as a DataFrame. Text formats are decoded with
    ``reports.decode_text`` (a BOM dropped; UTF-8, else cp1252 as Excel on Windows writes it),
    so one non-UTF-8 byte does not stop the listing."""
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        data = f.read()
    lower = path.lower()
    if lower.endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(data))
    if lower.endswith(".gz"):
        data = gzip.decompress(data)
    text = decode_text(data)
    if lower.endswith((".jsonl", ".json")):
        return pd.read_json(io.StringIO(text), lines=lower.endswith(".jsonl"))
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


def _join(base_uri: str, rel: str) -> str:
    if not rel or "://" in rel or rel.startswith("/"):
        return rel
    proto, base = split_protocol(base_uri)
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(base), rel))
    return joined if proto == "file" else f"{proto}://{joined}"


def _manifest_items(source: str, storage: StorageConfig) -> list[dict]:
    try:
        df = _read_csv_like(source, storage)
    except FileNotFoundError as exc:
        raise SourceError(f"manifest not found: {source}") from exc
    if "image_uri" not in df.columns and "report" not in df.columns and "report_uri" not in df.columns:
        raise SourceError(
            f"manifest {source} needs an image_uri column and a report or report_uri column; "
            f"it has {list(df.columns)}"
        )
    if "report" not in df.columns and "report_uri" not in df.columns:
        raise SourceError(f"manifest {source} has no report or report_uri column")
    items = []
    for i, rec in enumerate(df.fillna("").astype(str).to_dict("records")):
        image_uri = _join(source, rec.get("image_uri", ""))
        report_uri = _join(source, rec.get("report_uri", ""))
        items.append(
            _item(
                row_id=content_hash([source, str(i), image_uri, report_uri]),
                source_uri=image_uri or report_uri or f"{source}#{i}",
                image_uri=image_uri,
                report_uri=report_uri,
                report=rec.get("report", ""),
                study_id=rec.get("study_id", ""),
                patient_id=rec.get("patient_id", "") or rec.get("subject_id", ""),
                image_id=rec.get("image_id", "") or rec.get("dicom_id", ""),
                split=rec.get("split", ""),
                view_position=rec.get("view_position", "") or rec.get("ViewPosition", ""),
            )
        )
    return items


_STUDY_DIR = re.compile(r"/p(\d+)/(p\d+)/(s\d+)/([^/]+)$")


def _tree_items(source: str, storage: StorageConfig) -> list[dict]:
    fs, root = filesystem(source, storage)
    proto = split_protocol(source)[0]
    if not fs.exists(root):
        raise SourceError(f"source folder not found: {source}")
    files_root = posixpath.join(root, "files") if fs.exists(posixpath.join(root, "files")) else root
    paths = sorted(p for p in fs.find(files_root) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SourceError(f"no images (*.dcm, *.jpg, *.png) under {source}")
    split_of, view_of = _tree_tables(fs, root, storage)

    def uri(p: str) -> str:
        return p if proto == "file" else f"{proto}://{p}"

    items = []
    for p in paths:
        m = _STUDY_DIR.search(p)
        stem = posixpath.splitext(posixpath.basename(p))[0]
        if m:
            patient, study = m.group(2), m.group(3)
            report_path = posixpath.join(posixpath.dirname(posixpath.dirname(p)), f"{study}.txt")
        else:  # a flat folder: report beside the image with the same stem
            patient, study = "", ""
            report_path = posixpath.splitext(p)[0] + ".txt"
        items.append(
            _item(
                row_id=content_hash([uri(p)]),
                source_uri=uri(p),
                image_uri=uri(p),
                report_uri=uri(report_path),
                study_id=study,
                patient_id=patient,
                image_id=stem,
                split=split_of.get(stem, ""),
                view_position=view_of.get(stem, ""),
            )
        )
    return items


def _tree_tables(fs, root: str, storage: StorageConfig) -> tuple[dict, dict]:
    split_of: dict[str, str] = {}
    view_of: dict[str, str] = {}
    for p in fs.ls(root, detail=False):
        name = posixpath.basename(p).lower()
        if not name.endswith((".csv", ".csv.gz")):
            continue
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        df = _read_csv_like(p if proto == "file" else f"{proto}://{p}", storage)
        if "dicom_id" not in df.columns:
            continue
        if "split" in name and "split" in df.columns:
            split_of.update(zip(df["dicom_id"], df["split"]))
        if "metadata" in name and "ViewPosition" in df.columns:
            view_of.update(zip(df["dicom_id"], df["ViewPosition"]))
    return split_of, view_of


DEFAULT_SPLIT_FRACTIONS = {"train": 0.8, "validate": 0.1, "test": 0.1}


def hash_split(key: str, fractions: dict[str, float] | None = None) -> str:
    """The split of ``key`` (a patient id) by a SHA-256 hash: the same key always lands in the same
    split, on any machine, in ``fractions`` proportions (default 80/10/10 train/validate/test)."""
    import hashlib

    fractions = fractions or DEFAULT_SPLIT_FRACTIONS
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {fractions}")
    u = int.from_bytes(hashlib.sha256(f"pairaug-split\0{key}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, frac in fractions.items():
        edge += frac / total
        if u < edge:
            return name
    return list(fractions)[-1]


def assign_hash_splits(items: list[dict], fractions: dict[str, float] | None = None) -> int:
    """Give each item without a split one by ``hash_split`` of its patient id (else study id, else
    row id), so all studies of a patient share a split. Items that have a split keep it. Returns
    how many were assigned."""
    n = 0
    for it in items:
        if not it.get("split"):
            it["split"] = hash_split(it.get("patient_id") or it.get("study_id") or it["row_id"], fractions)
            n += 1
    return n
