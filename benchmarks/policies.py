#!/usr/bin/env python
"""The step policies' speed-vs-error front (fixed intervals, DaTo presets, first-block, magcache, x Taylor, x DaTo).

    python benchmarks/policies.py --latent 32 --out docs/steps_policies_sd15_latent32_cpu
    python benchmarks/policies.py --out docs/steps_policies_sd15_latent32_cpu --resume --select taylor
    python benchmarks/policies.py --out docs/steps_policies_sd15_latent32_cpu --report-only
    python benchmarks/policies.py --quick --out /tmp/front        # tiny UNet, latent 16, 12 steps (smoke)

The same as ``graphprune bench policies`` (graphprune/cli.py); the logic lives in graphprune/bench/policies.py.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

# import the graphprune of this checkout (not another installed copy); this folder leaves the path: its profile.py
# would shadow the standard library's (cProfile, imported by torch._dynamo, reads profile.run)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from graphprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "policies", *sys.argv[1:]]))
