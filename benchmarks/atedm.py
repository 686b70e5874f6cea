#!/usr/bin/env python
"""AT-EDM vs ToMe and SiTo at equal FLOPs (scope="block") on the SDXL architecture, paired.

    python benchmarks/atedm.py --quick                                  # tiny SDXL-style UNet, latent 16 (smoke)
    python benchmarks/atedm.py --arch sdxl --latent 64 --out results/atedm_sdxl64_cpu.json          # -fx set
    python benchmarks/atedm.py --flops-only --arch sdxl --latent 128 --batch 1

The same as ``graphprune bench atedm`` (graphprune/cli.py); the logic lives in graphprune/bench/atedm.py.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

# benchmarks/profile.py shadows the standard library's ``profile`` (which torch imports via cProfile): drop this
# folder from the path, and import the graphprune of this checkout (not another installed copy)
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from graphprune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "atedm", *sys.argv[1:]]))
