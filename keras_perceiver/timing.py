"""Wall-clock timing of a call: what the export report, the demo and the benchmark share."""

import time


def timed(fn):
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_runs(fn, repeats):
    """One warm-up call, then `repeats` timed calls: their durations in seconds."""
    fn()
    return [timed(fn) for _ in range(repeats)]
