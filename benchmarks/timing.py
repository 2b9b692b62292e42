"""Timing helper shared by the benchmarks."""

import time


def median_seconds(fn, repeats, warmup=1):
    """Median wall time of `fn()` over `repeats` runs, after `warmup` runs
    (which absorb compilation)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]
