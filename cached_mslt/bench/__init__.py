"""Benchmarks for `pipelines/bench.py`: the trainer's step at each preset's run shape and its
variants, the store, the inspect tools and data preparation; how ratios are timed on a
shared machine. Measures, never asserts.

The top of the layering: may import any other subpackage.
"""

from cached_mslt.bench.classifier import classifier_benchmarks
from cached_mslt.bench.data import ROOT, data_benchmarks
from cached_mslt.bench.loader import loader_benchmarks
from cached_mslt.bench.rates import measure_rates
from cached_mslt.bench.steps import all_benchmarks
from cached_mslt.bench.variants import precision_benchmarks, stage_vs_bench
from cached_mslt.bench.write_through import write_through_benchmarks

__all__ = [
    "ROOT",
    "all_benchmarks",
    "classifier_benchmarks",
    "data_benchmarks",
    "loader_benchmarks",
    "measure_rates",
    "precision_benchmarks",
    "stage_vs_bench",
    "write_through_benchmarks",
]
