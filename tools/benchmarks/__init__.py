"""Benchmark suites for tools/benchmark.py: one module per suite, each with
``add_args(parser)`` and ``run(args, out: common.Recorder)``."""
