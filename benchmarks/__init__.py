"""The benchmark suite: `python -m benchmarks` (or `make bench`). Prints a table, writes JSON.

Benchmarks measure and report; they never assert a time. Every comparison is measured side by
side in the same run and reported as a ratio.
"""
