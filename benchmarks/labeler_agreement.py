"""Agreement of the labeler with the Indiana University reports' MeSH tags (docs/labeler.md).

Usage::

    python benchmarks/labeler_agreement.py                    # main table: --uncertain probable
    python benchmarks/labeler_agreement.py --uncertain ones   # every UNCERTAIN counts (U-Ones)
    python benchmarks/labeler_agreement.py --uncertain zeros  # only POSITIVE counts
    python benchmarks/labeler_agreement.py --scaling          # labelling time vs text length

Prints a markdown table (per class precision / recall / F1 / support) and one JSON line. The IU
reports are read from the installed torchxrayvision package (CC BY-NC-ND 4.0: never committed).
``--scaling`` instead labels made-up run-on reports (no punctuation) of 14, 28 and 56 kB and prints
one JSON line per shape: best-of-3 CPU seconds of this process per size (steady on a shared
machine), best-of-3 wall seconds, and the ratio of each size's CPU time to the one before (about 2
when labelling is linear in the text length).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pairaug_ray.labeler import NEGATIVE, POSITIVE, _label  # noqa: E402

# --- Agreement with the IU reports' MeSH tags -------------------------------------------------------

def _mesh_roots(mesh: list[str]) -> set[str]:
    return {t.split("/")[0].strip().lower() for t in mesh}


# MeSH major terms (root before the first "/") that count as the observation being present.
MESH_TRUTH: dict[str, Callable[[list[str], set[str]], bool]] = {
    "Cardiomegaly": lambda m, r: "cardiomegaly" in r or any(
        t.lower().startswith("cardiac shadow/enlarged") for t in m),
    "Pleural Effusion": lambda m, r: "pleural effusion" in r,
    "Atelectasis": lambda m, r: bool({"pulmonary atelectasis", "atelectasis"} & r),
    "Edema": lambda m, r: bool({"pulmonary edema", "edema", "pulmonary congestion", "heart failure"} & r),
    "Pneumothorax": lambda m, r: bool({"pneumothorax", "hydropneumothorax", "hemopneumothorax"} & r),
    "Fracture": lambda m, r: any(x.startswith("fracture") for x in r),
    "No Finding": lambda m, r: r == {"normal"},
}
# Reported for information (no floor): MeSH indexes these less consistently with CheXpert's classes.
MESH_INFO: dict[str, Callable[[list[str], set[str]], bool]] = {
    "Edema (strict: Pulmonary Edema only)": lambda m, r: bool({"pulmonary edema", "edema"} & r),
    "Pneumonia": lambda m, r: "pneumonia" in r,
    "Consolidation": lambda m, r: "consolidation" in r,
    "Lung Lesion": lambda m, r: bool({"nodule", "mass"} & r),
    "Support Devices": lambda m, r: bool({"catheters, indwelling", "implanted medical device",
                                          "surgical instruments", "tube, inserted", "stents",
                                          "medical device", "sutures"} & r),
}

# MeSH roots that name one of CheXpert's 13 observations: the "No Finding (CheXpert-scope)" row keeps
# only reports whose MeSH terms are all of these or "normal", because MeSH also marks abnormalities
# that CheXpert's No Finding ignores by definition (granulomas, degenerative spine, hyperinflation).
CHEXPERT_MESH_ROOTS = {
    "cardiomegaly", "cardiac shadow", "mediastinum", "pleural effusion", "pulmonary atelectasis",
    "pulmonary edema", "pulmonary congestion", "heart failure", "pneumothorax", "hydropneumothorax",
    "hemopneumothorax", "fractures, bone", "pneumonia", "consolidation", "opacity",
    "airspace disease", "infiltrate", "nodule", "mass", "catheters, indwelling",
    "implanted medical device", "surgical instruments", "tube, inserted", "stents",
    "medical device", "sutures",
}
_SCOPED_NO_FINDING = "No Finding (CheXpert-scope subset)"


# MeSH major terms that name one of CheXpert's 13 observations, by root and qualifier (so
# "Costophrenic Angle/blunted" is an effusion sign and "Thickening/pleura" is Pleural Other, while
# "Thickening/bronchi" is not). The "No Finding (vs MeSH: no CheXpert-class term)" row counts a
# report as truly No Finding when its indexers tagged none of these.
_CHEXPERT_MESH_QUALIFIED = {
    "costophrenic angle": ("blunted",), "thickening": ("pleura",), "cicatrix": ("pleura",),
    "density": ("lung",), "lung": ("collapse",), "hemothorax": ("",), "pulmonary fibrosis": ("",),
}


def _names_chexpert_class(term: str) -> bool:
    root, *quals = [q.strip().lower() for q in term.split("/")]
    if root in CHEXPERT_MESH_ROOTS:
        return not (root == "cardiac shadow" and "enlarged" not in quals)
    return any(q == "" or q in quals for q in _CHEXPERT_MESH_QUALIFIED.get(root, ()))


_MESH_NO_CHEXPERT = "No Finding (vs MeSH: no CheXpert-class term)"

# How an UNCERTAIN label counts against a MeSH tag: "probable" (the default) counts hedges that
# favour the finding (uncertainty_grades() == "probable"), "ones" counts every UNCERTAIN (U-Ones),
# "zeros" none (U-Zeros).
UNCERTAIN_POLICIES = ("probable", "ones", "zeros")


def iu_agreement(count_uncertain: bool | None = None, reports=None, labels=None, *,
                 policy: str = "probable", grades=None) -> dict:
    """Labeler vs MeSH on the IU reports (findings + impression): per-class P/R/F1/support.

    A report counts as labeler-positive for a class when its state is POSITIVE, or UNCERTAIN as
    ``policy`` says (:data:`UNCERTAIN_POLICIES`; ``count_uncertain`` True / False is the older
    spelling of "ones" / "zeros"). ``reports`` defaults to all reports from
    :func:`iter_iu_reports`; ``labels`` (the :func:`label_report` output per report) and
    ``grades`` (:func:`uncertainty_grades` per report) are computed when not given.
    """
    from sklearn.metrics import precision_recall_fscore_support

    from pairaug_ray.io.reports import iter_iu_reports

    if count_uncertain is not None:
        policy = "ones" if count_uncertain else "zeros"
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
    reports = list(iter_iu_reports()) if reports is None else list(reports)
    if labels is None or (grades is None and policy == "probable"):
        labels, grades = zip(*(_label(r.text) for r in reports)) if reports else ((), ())
    labels = list(labels)

    def counts(i: int, obs: str) -> bool:
        f = labels[i].get(obs)
        if f is None or f.state == NEGATIVE:
            return False
        if f.state == POSITIVE:
            return True
        return policy == "ones" or (policy == "probable" and grades[i].get(obs) == "probable")

    rows = {}
    scoped = {_SCOPED_NO_FINDING: MESH_TRUTH["No Finding"],
              _MESH_NO_CHEXPERT: lambda m, r: not any(_names_chexpert_class(t) for t in m)}
    for name, truth_fn in {**MESH_TRUTH, **scoped, **MESH_INFO}.items():
        obs = name.split(" (")[0]
        if name == _SCOPED_NO_FINDING:
            keep = [i for i, r in enumerate(reports)
                    if _mesh_roots(r.mesh) <= CHEXPERT_MESH_ROOTS | {"normal"}]
        elif name == _MESH_NO_CHEXPERT:   # "No Indexing": the indexers left no terms to compare with
            keep = [i for i, r in enumerate(reports) if "no indexing" not in _mesh_roots(r.mesh)]
        else:
            keep = range(len(reports))
        y_true = [int(truth_fn(reports[i].mesh, _mesh_roots(reports[i].mesh))) for i in keep]
        y_pred = [int(counts(i, obs)) for i in keep]
        p, rc, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="binary",
                                                       zero_division=0)
        rows[name] = {"precision": round(float(p), 3), "recall": round(float(rc), 3),
                      "f1": round(float(f1), 3), "support": int(sum(y_true)),
                      "predicted": int(sum(y_pred)), "reports": len(keep),
                      "floor_class": name in MESH_TRUTH or name in scoped}
    return {"reports": len(reports), "policy": policy, "classes": rows}


def agreement_markdown(result: dict) -> str:
    lines = ["| class | precision | recall | F1 | support (MeSH) | labeler positive | reports |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["classes"].items():
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r['support']} | {r['predicted']} | {r['reports']} |")
    return "\n".join(lines)


# Made-up run-on reports (no end punctuation): each unit is repeated up to the size asked for.
RUN_ON_SHAPES = {
    "run-on sentence": "the heart size is within normal limits there is no focal consolidation ",
    "comma list": "no consolidation, effusion, pneumothorax, ",
    "and list": "small left pleural effusion and mild cardiomegaly and no pneumothorax ",
    "hedges": "possible pneumonia cannot be excluded no evidence of change in the effusion may represent ",
    "line list": "Small right pleural effusion\nNo pneumothorax\n",
}


def labelling_scaling(sizes: tuple[int, ...] = (14_000, 28_000, 56_000), repeats: int = 3) -> list[dict]:
    """Best-of-``repeats`` CPU and wall seconds to label each run-on shape at each size (characters)."""
    from pairaug_ray.labeler import label_report

    label_report("warm up: pneumothorax")
    rows = []
    for shape, unit in RUN_ON_SHAPES.items():
        cpu, wall = [], []
        for n in sizes:
            text = (unit * (n // len(unit) + 1))[:n]
            best_cpu = best_wall = float("inf")
            for _ in range(repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                label_report(text)
                best_cpu = min(best_cpu, time.process_time() - c0)
                best_wall = min(best_wall, time.perf_counter() - w0)
            cpu.append(round(best_cpu, 3))
            wall.append(round(best_wall, 3))
        rows.append({"shape": shape, "chars": list(sizes), "cpu_seconds": cpu, "wall_seconds": wall,
                     "ratios": [round(b / a, 2) for a, b in itertools.pairwise(cpu)]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labeler_agreement", description=__doc__.split("\n")[0])
    ap.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="probable",
                    help="how UNCERTAIN counts against MeSH: probable (default) = hedges that favour "
                         "the finding count, ones = every UNCERTAIN counts, zeros = none counts")
    ap.add_argument("--positive-only", action="store_true", help="the same as --uncertain zeros")
    ap.add_argument("--scaling", action="store_true",
                    help="time the labeler on run-on reports of 14, 28 and 56 kB instead")
    args = ap.parse_args(argv)
    if args.scaling:
        for row in labelling_scaling():
            print(json.dumps(row))
        return 0
    result = iu_agreement(policy="zeros" if args.positive_only else args.uncertain)
    print(agreement_markdown(result))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
