"""Benchmarks (``nextbest bench``): every figure a ratio to a ceiling measured in the same run."""
