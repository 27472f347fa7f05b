"""Ray job entry point for `pairaug evaluate`: the same arguments, parsed by pairaug_ray.cli.

Usage::

    python -m jobs.evaluate --model pairaug=/tmp/pairaug/train/vlp/model --studies /tmp/pairaug/ingest \
        --out /tmp/pairaug/evaluate

Run on a cluster with `ray job submit --working-dir . -- python -m jobs.evaluate ...` (see the
README's "Run on a cluster"); `section.key=value` overrides may come anywhere on the line.
"""

import sys

from pairaug_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
