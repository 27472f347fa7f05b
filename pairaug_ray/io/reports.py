"""Radiology report parsing: MIMIC-CXR free text, IU/OpenI XML, plain text, and the reference's cleaning.

Usage::

    from pairaug_ray.io.reports import parse_report, iter_iu_reports, clean_report
    rep = parse_report(open("s50414267.txt").read(), name="s50414267.txt")
    rep.findings, rep.impression, rep.text          # readable text = findings + impression
    for rep in iter_iu_reports(): ...               # 3,955 IU reports, read from torchxrayvision's data
    clean_report(rep)                               # lower-case word sentences, or None when too short

The IU reports (CC BY-NC-ND 4.0) are read at run time from the installed ``torchxrayvision`` package
(``pip install --no-deps torchxrayvision==1.5.7``); their text is never stored in this repository.
"""

from __future__ import annotations

import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IU_INSTALL_HINT = "pip install --no-deps torchxrayvision==1.5.7"

# Canonical section name for each header spelling (lower-case, single spaces, no colon).
_SECTION_ALIASES = {
    "final report": "final_report",
    "examination": "examination", "exam": "examination", "type of examination": "examination",
    "procedure": "examination",
    "indication": "indication", "indications": "indication", "history": "indication",
    "clinical history": "indication", "clinical information": "indication",
    "reason for exam": "indication", "reason for examination": "indication",
    "comparison": "comparison", "comparisons": "comparison",
    "technique": "technique",
    "findings": "findings", "finding": "findings", "findings and impression": "findings",
    "impression": "impression", "impressions": "impression",
    "conclusion": "impression", "conclusions": "impression", "summary": "impression",
    "opinion": "impression",
    "recommendation": "recommendation", "recommendations": "recommendation",
    "notification": "notification", "wet read": "wet_read", "addendum": "addendum",
}
_KNOWN = "|".join(sorted((re.escape(k).replace(r"\ ", r"\s+") for k in _SECTION_ALIASES),
                         key=len, reverse=True))
# A known header at the start of a line, any case: "FINDINGS:", "Impression :", "IMPRESSION" alone on
# its line, "FINDINGS  text" (two spaces), "FINDINGS - text".
_KNOWN_HEADER = re.compile(rf"^\s*(?P<name>{_KNOWN})\s*(?::|-\s|$|(?=\s{{2,}}\S))(?P<rest>.*)$",
                           re.IGNORECASE)
# Any other ALL-CAPS header with a colon ("PA AND LATERAL CHEST:", "HISTORY OF PRESENT ILLNESS:").
_GENERIC_HEADER = re.compile(r"^\s*(?P<name>[A-Z][A-Z /&()'-]{2,40}?)\s*:(?P<rest>.*)$")
_WS = re.compile(r"\s+")


@dataclass
class Report:
    """One parsed report. ``text`` is the readable text (findings + impression, else the body)."""

    findings: str = ""
    impression: str = ""
    text: str = ""
    sections: dict[str, str] = field(default_factory=dict)
    mesh: list[str] = field(default_factory=list)            # IU: MeSH <major> terms
    mesh_automatic: list[str] = field(default_factory=list)  # IU: MeSH <automatic> terms
    report_id: str = ""                                      # IU: uId, e.g. "CXR1"
    image_ids: list[str] = field(default_factory=list)       # IU: parentImage ids


@dataclass
class CleanText:
    """The reference's cleaned text: lower-case word tokens per sentence, plus the readable text."""

    sentences: list[list[str]]
    text: str  # readable impression + findings

    @property
    def words(self) -> list[str]:
        return [w for s in self.sentences for w in s]

    @property
    def cleaned(self) -> str:
        """Sentences of space-joined tokens, each ended by a period."""
        return " ".join(" ".join(s) + "." for s in self.sentences)


def _squash(text: str) -> str:
    return _WS.sub(" ", text or "").strip()


def _readable(findings: str, impression: str) -> str:
    parts = [p for p in (findings, impression) if p]
    return " ".join(p if p.endswith((".", "!", "?")) else p + "." for p in parts)


def parse_mimic_report(text: str) -> Report:
    """Split a MIMIC-CXR style report into sections; wrapped lines are joined, spaces squashed."""
    sections: dict[str, list[str]] = {}
    current = "preamble"
    for line in (text or "").splitlines():
        m = _KNOWN_HEADER.match(line)
        if m:
            current = _SECTION_ALIASES[_squash(m.group("name")).lower()]
        else:
            m = _GENERIC_HEADER.match(line)
            if m:
                name = _squash(m.group("name")).lower()
                current = _SECTION_ALIASES.get(name, name.replace(" ", "_"))
        rest = m.group("rest") if m else line
        # a repeated header (two IMPRESSION blocks) appends to the same section
        sections.setdefault(current, []).append(rest)
    out = {k: _squash(" ".join(v)) for k, v in sections.items()}
    out = {k: v for k, v in out.items() if v or k in ("findings", "impression")}
    findings, impression = out.get("findings", ""), out.get("impression", "")
    body = _squash(" ".join(v for k, v in out.items() if k != "final_report"))
    return Report(findings=findings, impression=impression,
                  text=_readable(findings, impression) or body, sections=out)


def parse_iu_xml(xml: bytes | str) -> Report:
    """Parse one IU/OpenI ``eCitation`` XML document (AbstractText sections, MeSH, ids)."""
    root = ET.fromstring(xml.encode("utf-8") if isinstance(xml, str) else xml)
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().lower()
        if label:
            sections[label] = _squash("".join(node.itertext()))
    uid = root.find("uId")
    findings, impression = sections.get("findings", ""), sections.get("impression", "")
    return Report(
        findings=findings,
        impression=impression,
        text=_readable(findings, impression),
        sections=sections,
        mesh=[_squash(m.text) for m in root.iter("major") if m.text and m.text.strip()],
        mesh_automatic=[_squash(m.text) for m in root.iter("automatic") if m.text and m.text.strip()],
        report_id=(uid.get("id") or "") if uid is not None else "",
        image_ids=[p.get("id") for p in root.iter("parentImage") if p.get("id")],
    )


def parse_plain(text: str) -> Report:
    """A report without recognisable sections: the whole text is the readable text."""
    body = _squash(text)
    return Report(text=body, sections={"body": body} if body else {})


def _has_sections(text: str) -> bool:
    return any(_KNOWN_HEADER.match(line) for line in text.splitlines())


def parse_report(data: bytes | str, name: str = "") -> Report:
    """Dispatch on extension and content: IU XML, MIMIC-style sectioned text, or plain text."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    head = text.lstrip()[:200].lower()
    if name.lower().endswith(".xml") or head.startswith(("<?xml", "<ecitation")):
        return parse_iu_xml(text)
    if _has_sections(text):
        return parse_mimic_report(text)
    return parse_plain(text)


def iu_corpus_path() -> Path | None:
    """Path of torchxrayvision's ``data/NLMCXR_reports.tgz``, found without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "NLMCXR_reports.tgz"
        if path.is_file():
            return path
    return None


def iu_corpus_available() -> bool:
    return iu_corpus_path() is not None


def iter_iu_reports() -> Iterator[Report]:
    """Yield the IU reports (3,955 in torchxrayvision 1.5.7) in file-name order."""
    path = iu_corpus_path()
    if path is None:
        raise FileNotFoundError(
            "The Indiana University report corpus (torchxrayvision/data/NLMCXR_reports.tgz) is not "
            f"installed; install it with `{IU_INSTALL_HINT}`.")
    with tarfile.open(path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                         key=lambda m: m.name)
        for member in members:
            yield parse_iu_xml(tar.extractfile(member).read())


# Reference cleaning (impression + findings, sentence split, lower-case \w+ tokens, de-id removed).
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_DEID = re.compile(r"_{2,}|\bx{3,}\b", re.IGNORECASE)


def clean_report(report: Report | str, min_words: int = 3, keep_digits: bool = True) -> CleanText | None:
    """Clean a report the way the reference prepares text for training.

    Impression first, then findings; sentences split on end punctuation; tokens are lower-case runs
    of letters/digits (punctuation dropped, de-identification ``___``/``XXXX`` removed, digits kept
    unless ``keep_digits=False``). Returns ``None`` when fewer than ``min_words`` words remain: the
    reference drops such reports.
    """
    if isinstance(report, str):
        report = parse_report(report)
    if report.impression or report.findings:
        readable = _readable(report.impression, report.findings)
    else:
        readable = report.text
    sentences = []
    for sent in _SENT_SPLIT.split(_DEID.sub(" ", readable)):
        tokens = _TOKEN.findall(sent.lower().encode("ascii", "ignore").decode())
        if not keep_digits:
            tokens = [t for t in tokens if not t.isdigit()]
        if tokens:
            sentences.append(tokens)
    clean = CleanText(sentences=sentences, text=_squash(readable))
    return clean if len(clean.words) >= min_words else None
