"""Column names and pyarrow schemas of the tables the pipeline writes.

Usage::

    from pairaug_ray.schema import STUDY_SCHEMA, QUARANTINE_SCHEMA
    table = pa.Table.from_pylist(rows, schema=STUDY_SCHEMA)

A *study row* is one image of a study with its report (MIMIC keeps several images per study; the
reference trains on the frontal ones). Ids are the source's own (already de-identified, e.g. MIMIC
``p10000032``/``s50414267``) or, when the source has none, keyed hashes of the DICOM IDs/UIDs.
No other header field is ever stored (see ``io/dicom.py``).

``labels`` is a JSON object ``{observation: state}`` with CheXpert states 1 / 0 / -1 (absent key =
not mentioned); ``findings`` is the labeler's detail (laterality, severity) as JSON.
"""

from __future__ import annotations

import pyarrow as pa

STUDY_FIELDS = [
    ("row_id", pa.string()),          # stable key of the row: hash of the source URI (+ index)
    ("study_id", pa.string()),
    ("patient_id", pa.string()),
    ("image_id", pa.string()),
    ("split", pa.string()),           # train | validate | test | "" (unknown)
    ("view_position", pa.string()),
    ("modality", pa.string()),
    ("bits_stored", pa.int32()),
    ("presentation_intent", pa.string()),  # DICOM: "FOR PRESENTATION" | "FOR PROCESSING"; else ""
    ("image_png", pa.binary()),       # 16-bit (or 8-bit) grayscale PNG, bright = dense
    ("report", pa.string()),          # readable text: findings + impression
    ("findings_text", pa.string()),
    ("impression_text", pa.string()),
    ("labels", pa.string()),
    ("findings", pa.string()),
    ("source_uri", pa.string()),
]
STUDY_SCHEMA = pa.schema(STUDY_FIELDS)
STUDY_COLUMNS = [name for name, _ in STUDY_FIELDS]

QUARANTINE_FIELDS = [
    ("row_id", pa.string()),
    ("source_uri", pa.string()),
    ("stage", pa.string()),
    ("error_class", pa.string()),
    ("error", pa.string()),
]
QUARANTINE_SCHEMA = pa.schema(QUARANTINE_FIELDS)
QUARANTINE_COLUMNS = [name for name, _ in QUARANTINE_FIELDS]

# Tables under an output folder.
STUDIES_DIR = "studies"
QUARANTINE_DIR = "quarantine"
MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"              # the output settings of the candidates, written at the first commit

# A candidate / pair row: one augmented image-report pair and its provenance.
PAIR_FIELDS = [
    ("row_id", pa.string()),            # == pair_id
    ("pair_id", pa.string()),           # hash(source study row, branch, variant, config fingerprint, seed)
    ("branch", pa.string()),            # "inter" (new patient) | "intra" (same patient, changed condition)
    ("variant", pa.int32()),
    ("seed", pa.int64()),
    ("source_row_id", pa.string()),     # the studies table row it came from
    ("study_id", pa.string()),
    ("patient_id", pa.string()),
    ("split", pa.string()),
    ("view_position", pa.string()),
    ("report", pa.string()),            # the source report
    ("rewritten_report", pa.string()),  # the augmented report (the pair's text)
    ("change", pa.string()),            # JSON: what the rewrite changed, per observation
    ("labels", pa.string()),            # labeler's reading of rewritten_report ({obs: state} JSON)
    ("findings", pa.string()),
    ("image_png", pa.binary()),         # the pair's image (generated or edited)
    ("source_image_png", pa.binary()),  # intra: the p2p source branch: the reconstruction of the study
                                        # image (edit_source real) or a generation of the source report (noise)
    ("score_align", pa.float64()),      # cos(new image, new text)
    ("score_delta", pa.float64()),      # intra: cos(Δimage, Δtext)
    ("score_img", pa.float64()),        # intra: cos(new image, source image)
    ("kept", pa.bool_()),
    ("prune_reason", pa.string()),
    ("rewrite_backend", pa.string()),
    ("rewrite_model", pa.string()),
    ("prompt_id", pa.string()),
    ("generator_model", pa.string()),
    ("score_model", pa.string()),
    ("config_fingerprint", pa.string()),
    ("code_version", pa.string()),
    # added with real-image IntraAug and counted UNet work (stages/edit.py, stages/generate.py)
    ("edit_source", pa.string()),       # intra: "real" (the study image, inverted) | "noise" (the reference)
    ("sampler", pa.string()),           # the diffusers sampler that drew / edited the image (models/schedulers.py)
    ("unet_sample_steps", pa.float64()),  # UNet sample-steps counted for this row (CFG = 2 per sample and
                                          # step; its share of a shared source branch and inversion)
    ("inversion_method", pa.string()),  # intra real: direct | negative_prompt | null_text | ddim
    ("inversion_psnr", pa.float64()),   # intra real: dB, the study's reconstruction vs its real image
    ("inversion_sample_steps", pa.float64()),  # intra real: this row's share of its study's inversion
]
PAIR_SCHEMA = pa.schema(PAIR_FIELDS)
PAIR_COLUMNS = [name for name, _ in PAIR_FIELDS]

CANDIDATES_DIR = "candidates"       # every scored candidate, kept or not (pass 1)
PAIRS_DIR = "pairs"                 # the kept pairs: the training set (pass 2)

TABLE_SCHEMAS = {"study": STUDY_SCHEMA, "quarantine": QUARANTINE_SCHEMA, "pair": PAIR_SCHEMA}
