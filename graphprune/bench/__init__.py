"""Benchmark harnesses that ship with the package (``graphprune bench ...``); the scripts in ``benchmarks/`` wrap them.

:mod:`graphprune.bench.common` holds the measurement helpers (timing hygiene, FLOP bounds) shared with
``benchmarks/speed.py``; :mod:`graphprune.bench.pareto` is the speed-quality sweep.
"""
