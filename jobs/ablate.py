"""Ray job entry point for `pairaug ablate`: the same arguments, parsed by pairaug_ray.cli.

Usage::

    python -m jobs.ablate --config jobs/configs/demo.yaml --studies /tmp/pairaug/ingest \
        --pairs /tmp/pairaug/augment --out /tmp/pairaug/ablate --steps 200

Run on a cluster with `ray job submit --working-dir . -- python -m jobs.ablate ...` (see the
README's "Run on a cluster"); `section.key=value` overrides may come anywhere on the line.
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
