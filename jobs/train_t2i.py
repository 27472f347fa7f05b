"""Ray job entry point for `pairaug train-t2i`: the same arguments, parsed by pairaug_ray.cli.

Usage::

    python -m jobs.train_t2i --config jobs/configs/demo.yaml --studies /tmp/pairaug/ingest \
        --out /tmp/pairaug/t2i
    ray job submit --working-dir . -- python -m jobs.train_t2i --config jobs/configs/mimic.yaml \
        t2i.studies=s3://bucket/runs/ingest t2i.out=s3://bucket/runs/t2i t2i.init=/models/sd-v1-5

Run on a cluster with `ray job submit --working-dir . -- python -m jobs.train_t2i ...` (see the
README's "Run on a cluster"); `section.key=value` overrides may come anywhere on the line.
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-t2i", *sys.argv[1:]]))
