"""Ray job entry point for `pairaug ingest`: the same arguments, parsed by pairaug_ray.cli.

Usage::

    python -m jobs.ingest --config jobs/configs/demo.yaml ingest.source=phantom://16?seed=0 \
        ingest.out=/tmp/pairaug/ingest
    ray job submit --working-dir . -- python -m jobs.ingest --config jobs/configs/mimic.yaml \
        ingest.source=s3://bucket/mimic-cxr-jpg ingest.out=s3://bucket/runs/ingest

Run on a cluster with `ray job submit --working-dir . -- python -m jobs.ingest ...` (see the
README's "Run on a cluster"); `section.key=value` overrides may come anywhere on the line.
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
