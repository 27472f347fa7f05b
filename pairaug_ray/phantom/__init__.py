"""PhantomCXR: procedural chest radiographs whose anatomy shows the findings of a report.

Every study is a (report, labels, image, DICOM) tuple. The labels are what the project's labeler
(`pairaug_ray.labeler.label_report`) reads from the report, and the image is rendered from those
labels, so a model that learns image <-> report alignment on PhantomCXR can beat chance.

Usage::

    from pairaug_ray import phantom
    img = phantom.render(label_report("Moderate left pleural effusion."), size=256, seed=3)
    phantom.cardiothoracic_ratio(img), phantom.basal_opacity(img, "left")
    for st in phantom.iter_studies(100, seed=0): ...
    phantom.write_dataset("/tmp/phantom", n=200, seed=0)

Modules: ``anatomy`` (a patient's normal chest, seeds, geometry), ``render`` (the radiograph),
``measure`` (image probes that follow the drawn findings), ``text`` (sampled findings and template
reports), ``dataset`` (studies, patients, splits, DICOM, MIMIC-style trees).
"""

from pairaug_ray.labeler import OBSERVATIONS  # noqa: F401
from pairaug_ray.phantom.anatomy import (  # noqa: F401
    CHEXPERT_COLUMNS,
    LEFT,
    RENDERED,
    REPORT_SOURCES,
    RIGHT,
    SEVERITY_GAIN,
    UNCERTAIN_GAIN,
    Anatomy,
)
from pairaug_ray.phantom.dataset import (  # noqa: F401
    PhantomStudy,
    iter_studies,
    locate,
    mimic_report_text,
    patient_split,
    study,
    to_dicom,
    write_dataset,
)
from pairaug_ray.phantom.measure import (  # noqa: F401
    apical_lucency,
    basal_opacity,
    cardiothoracic_ratio,
    region_mean,
    thin_bright_fraction,
)
from pairaug_ray.phantom.render import render, render_with_layout  # noqa: F401
from pairaug_ray.phantom.text import _with_no_finding, sample_findings, template_report  # noqa: F401
