#!/usr/bin/env python
"""The one-command GPU run: SD1.5 (512x512) and SDXL (1024x1024) in fp16, per call and 50 steps, paired vs Inductor.

    benchmarks/gpu.sh --wheels wheels/                          # on the GPU machine (installs the carried wheels)
    python benchmarks/gpu.py --quick -o /tmp/gpu                # dry run on CPU (tiny UNet, eager, 2 steps)

The same as ``graphprune bench gpu`` (graphprune/cli.py); the logic lives in graphprune/bench/gpu.py.
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
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
