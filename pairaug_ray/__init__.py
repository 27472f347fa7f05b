"""pairaug_ray: PairAug chest X-ray image-report pair augmentation on Ray.

Usage: ``pairaug demo`` (see README.md).
"""

__version__ = "0.1.0"
