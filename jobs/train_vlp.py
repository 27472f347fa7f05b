"""Ray job entry point for `pairaug train`: the same arguments, parsed by pairaug_ray.cli.

Usage::

    python -m jobs.train_vlp --config jobs/configs/demo.yaml --studies /tmp/pairaug/ingest \
        --pairs /tmp/pairaug/augment --mix original,inter,intra --out /tmp/pairaug/train

Run on a cluster with `ray job submit --working-dir . -- python -m jobs.train_vlp ...` (see the
README's "Run on a cluster"); `section.key=value` overrides may come anywhere on the line.
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
