#!/usr/bin/env python
"""Deployment latency: onnxruntime pruned vs unpruned sessions (paired), TensorRT vs Inductor on CUDA.

    python benchmarks/export.py --latents 32 --out results/export_cpu.json          # SD1.5 architecture, batch 2
    python benchmarks/export.py --quick                                             # tiny UNet, latent 16
    python benchmarks/export.py --tensorrt                                          # + TensorRT/Inductor (CUDA)

The same as ``graphprune bench export`` (graphprune/cli.py); the logic lives in graphprune/bench/export.py.
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
    sys.exit(main(["bench", "export", *sys.argv[1:]]))
