"""Ray job entry point for `pairaug augment`: the same arguments, parsed by pairaug_ray.cli.

Usage::

    python -m jobs.augment --config jobs/configs/demo.yaml --studies /tmp/pairaug/ingest \
        --out /tmp/pairaug/augment
    ray job submit --working-dir . -- python -m jobs.augment --config jobs/configs/mimic.yaml \
        augment.studies=s3://bucket/runs/ingest augment.out=s3://bucket/runs/augment

Run on a cluster with `ray job submit --working-dir . -- python -m jobs.augment ...` (see the
README's "Run on a cluster"); `section.key=value` overrides may come anywhere on the line.
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["augment", *sys.argv[1:]]))
