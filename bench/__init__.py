"""Benchmarks and the corpora they make (``python -m bench.corpus``, ``python -m bench.<name>``)."""
