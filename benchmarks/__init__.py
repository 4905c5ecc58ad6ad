"""Benchmark scripts: each prints figures (and asserts nothing); the tests import them as modules.

Run one from the checkout as `python -m benchmarks.<name> …` (or `python benchmarks/<name>.py`
when dgq is installed, as `make app` / `make test` do); `bench_app` needs the former, because it
imports the app, which runs from the checkout and is not installed.
"""
