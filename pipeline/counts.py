"""Counts as data: plain (nested) dicts that steps emit and the job adds up to reconcile.

Beam's metrics are a view of the same numbers for monitoring (`counted` feeds both); what a job
checks before it publishes travels as data.
"""
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.files import read_text
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


def read_total(path: str) -> dict:
    """The sum a job's AddCounts wrote to `path` as JSON; {} when the job counted nothing (AddCounts
    then has no sum to write)."""
    if not FileSystems.exists(path):
        return {}
    return json.loads(read_text(path))


class SumPerBundle(beam.DoFn):
    """Count dicts -> their sum, one dict per bundle (none for a bundle without any)."""

    def start_bundle(self):
        self._dicts = []

    def process(self, counts):
        self._dicts.append(counts)
        if len(self._dicts) >= 64:  # bounded memory on a runner whose bundles are long
            self._dicts = [add_counts(self._dicts)]
        return ()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        if self._dicts:
            total, self._dicts = add_counts(self._dicts), []
            yield GlobalWindows.windowed_value(total)


class AddCounts(beam.PTransform):
    """A tuple of count-dict PCollections -> a PCollection holding their sum (empty when no input
    holds a dict: whoever reads the sum takes no dict as all zeros).

    Each input is summed per bundle where it is made (SumPerBundle is fused with the step that
    emits the dicts), then the few sums are flattened and added up. A combine over the Flatten of
    the dicts themselves would carry every dict to the combine's own stage, which the local runners
    hold in the driver's memory (at 10M pool rows the per-table label-set counts grew the driver by
    460 MB that way); a combine per input costs a stage per input, 10-40 ms each on those runners.
    """

    def expand(self, count_pcollections):
        # without_defaults: the stage that would give an empty input its default (a side input,
        # one more stage after the sum) is not built
        sums = tuple(counts | f"SumPerBundle{i}" >> beam.ParDo(SumPerBundle())
                     for i, counts in enumerate(count_pcollections))
        return (sums | "AllCounts" >> beam.Flatten()
                | "AddAll" >> beam.CombineGlobally(add_counts).without_defaults())
