#!/usr/bin/env python
"""Speed-quality Pareto sweep: every registered method x ratios, next to unpruned Inductor and tomesd.

    python benchmarks/pareto.py --quick                                  # tiny UNet smoke run
    python benchmarks/pareto.py --arch sd15 --latent 32 --steps 20 -o results/pareto_sd15_32
    python benchmarks/pareto.py --model /path/to/local/pipeline --prompts prompts.txt -o results/real

The same as ``graphprune bench pareto`` (graphprune/cli.py); the logic lives in graphprune/bench/pareto.py.
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
    sys.exit(main(["bench", "pareto", *sys.argv[1:]]))
