"""Benchmarks and experiments, reached by `python fgvc/benchmark.py COMMAND`.

They use the library (data, models, engine, analysis); nothing in the library imports them.
"""
