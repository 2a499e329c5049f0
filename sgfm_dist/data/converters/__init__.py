"""Corpus converters behind ``tools/convert_*.py`` and ``tools/simulate_ns.py`` (MPI-parallel, fsspec output)."""
