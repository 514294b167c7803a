"""maskq's benchmarks: ``make bench`` (``python -m bench``) runs them all and prints a table each.

Each benchmark is a module here with ``run(options) -> rows`` and optionally
``summary(rows) -> lines``; see :mod:`bench.common` and docs/benchmarks.md.
"""
