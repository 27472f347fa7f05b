"""Ray job entry point for augmentation.

Usage::

    ray job submit --working-dir . -- python -m jobs.augment --config jobs/configs/mimic.yaml \
        augment.studies=s3://bucket/runs/ingest augment.out=s3://bucket/runs/augment
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["augment", *sys.argv[1:]]))
