"""Counts as data: plain (nested) dicts that steps emit and the job adds up to reconcile.

Beam's metrics are a view of the same numbers for monitoring (`counted` feeds both); what a job
checks before it publishes travels as data.
"""
import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.quarantine import METRICS_NAMESPACE

COUNTS_TAG = "counts"


def counted(counts: dict) -> beam.pvalue.TaggedOutput:
    """A step's count dict as its COUNTS_TAG output (the data the job adds up and reconciles) and,
    as a view of the same numbers, Beam counters: each top-level whole number adds to the counter of
    its name in the `balancebeam` namespace (nested dicts, by reason or by signature, stay data)."""
    for name, value in counts.items():
        if isinstance(value, int) and not isinstance(value, bool) and value:
            Metrics.counter(METRICS_NAMESPACE, name).inc(value)
    return beam.pvalue.TaggedOutput(COUNTS_TAG, counts)


def add_counts(dicts) -> dict:
    """Sum of count dicts; nested dicts (by reason, by signature) add up key by key."""
    total: dict = {}
    for counts in dicts:
        for name, value in counts.items():
            if isinstance(value, dict):
                inner = total.setdefault(name, {})
                for key, amount in value.items():
                    inner[key] = inner.get(key, 0) + amount
            else:
                total[name] = total.get(name, 0) + value
    return total


class AddCounts(beam.PTransform):
    """A tuple of count-dict PCollections -> one PCollection holding their sum.

    Each input is summed on its own before the Flatten, so combiner lifting adds its dicts up in the
    workers that make them. One combine after a Flatten would carry every dict to the combine's own
    stage, which the local runners hold in the driver's memory: at 10M pool rows the per-table
    label-set counts grew the driver by 460 MB that way.
    """

    def expand(self, count_pcollections):
        # without_defaults: an input with no dicts adds nothing, and the stage that would give it an
        # empty default (a side input, so one more stage to run after each) is not built
        sums = tuple(counts | f"Add{i}" >> beam.CombineGlobally(add_counts).without_defaults()
                     for i, counts in enumerate(count_pcollections))
        return sums | "AllCounts" >> beam.Flatten() | "AddAll" >> beam.CombineGlobally(add_counts)
