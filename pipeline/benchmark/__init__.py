"""The benchmark stage: score a trained run, or images from anywhere, into one immutable result record.

``stage`` writes the records, ``scoring`` turns image sources into metrics, ``images`` holds the image
sources, ``extractors`` the feature extractors, ``distributed`` the rank helpers.
"""

from pipeline.benchmark.scoring import BenchmarkError, ScoreOptions, parse_metrics
from pipeline.benchmark.stage import benchmark_images, benchmark_reference_rows, benchmark_run

__all__ = ["BenchmarkError", "ScoreOptions", "benchmark_images", "benchmark_reference_rows", "benchmark_run",
           "parse_metrics"]
