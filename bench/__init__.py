"""Benchmarks of moebius-jax: `python -m bench` (see bench/__main__.py), `python -m bench.report`.

`harness` holds the one measurement helper and the result schema; `inference` the student,
VAE and sampler cases.
"""
