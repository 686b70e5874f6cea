"""The benchmarks that ship with the package: ``graphprune bench <name>`` and ``benchmarks/<name>.py`` run them.

One job per module, top to bottom (the import-linter contract in pyproject.toml checks the order):

* the benchmarks, each ``run(options) -> result`` (logs, never prints; the result holds its ``table``):
  :mod:`~graphprune.bench.pareto` (speed vs quality, every method x ratios; :mod:`~graphprune.bench.realweights`
  for a local pipeline), :mod:`~graphprune.bench.speed` (per call), :mod:`~graphprune.bench.steps` (whole
  loops: step caching), :mod:`~graphprune.bench.atedm` (AT-EDM at equal FLOPs), :mod:`~graphprune.bench.export`
  (onnxruntime / TensorRT);
* :mod:`~graphprune.bench.sweep` (a sweep point's steps) and :mod:`~graphprune.bench.frontier` (its Pareto front,
  table, plot);
* measuring: :mod:`~graphprune.bench.timing` (the one paired timer), :mod:`~graphprune.bench.ddim` (quality
  loops), :mod:`~graphprune.bench.flops` (FLOP / Amdahl bounds); :mod:`~graphprune.bench.variants` (every
  variant and how it builds its callable); :mod:`~graphprune.bench.output` (tables, JSON, plots);
* :mod:`~graphprune.bench.options` (every benchmark's options and the timing protocol),
  :mod:`~graphprune.bench.calls` (one model call), :mod:`~graphprune.bench.env` (the environment header).
"""
