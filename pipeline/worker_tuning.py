"""Process settings for the workers that run balancebeam's per-record steps.

Those steps allocate millions of short-lived dicts, lists and tuples. CPython's cyclic garbage
collector runs a collection every 700 net container allocations by default and scans the whole heap
every 100 of those; with a worker holding a batch of several thousand records, that scanning took
about a sixth of the annotate job's time (a 100,000-row pool shard in one process: 15.2-16.7 s with
the defaults, 12.5-12.8 s with the thresholds below). Reference counting still frees everything
that is not a cycle at once; cycles are collected later, not never.
"""
import gc

GC_THRESHOLDS = (100_000, 50, 100)


def relax_gc() -> None:
    """Raise the collector's thresholds in this process (idempotent; never lowers a higher setting).
    """
    current = gc.get_threshold()
    if current[0] and current[0] < GC_THRESHOLDS[0]:
        gc.set_threshold(*GC_THRESHOLDS)
