"""Ray job entry point for ingest.

Usage::

    ray job submit --working-dir . -- python -m jobs.ingest --config jobs/configs/mimic.yaml \
        ingest.source=s3://bucket/mimic-cxr-jpg ingest.out=s3://bucket/runs/ingest
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
