"""The annotate job's last steps: duplicate keys found through files, and the rows that wait for
them.

FindDuplicateKeys groups only (key, file, place), through Arrow files (pipeline/file_shuffle.py);
SpillRows parks each table of rows as a Parquet file meanwhile (only its path crosses the runner),
and DropDuplicates reads it back, leaves out the duplicates, counts the label sets balance needs
and hands the Parquet writer tables of about ANNOTATION_ROW_GROUP_ROWS rows.
"""
from __future__ import annotations

import collections
import io
import uuid
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline import quarantine
from pipeline.errors import DataError
from pipeline.file_shuffle import GroupTablesByFile, parts_by_bucket
from pipeline.counts import counted
from pipeline.records import (ANNOTATION_SCHEMA, LabelSetMemo, distinct_label_sets,
                              label_set_parts)
from pipeline.signatures import row_signature

# Keys are spread over this many buckets to find duplicates; only (key, file, place) travels.
DEDUP_BUCKETS = 64


def _dedup_bucket(key: str) -> int:
    # stable across processes
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % DEDUP_BUCKETS


def _keys_by_bucket(table):
    """A row table -> (bucket, table of its rows' key, shard, position) for each bucket it touches.
    """
    buckets = [_dedup_bucket(key) for key in table.column("key").to_pylist()]
    return parts_by_bucket(table.select(["key", "shard", "position"]), buckets)


def _duplicates_in_bucket(bucket_and_table):
    """Of the places sharing a key, the first (smallest file, then place) stays; the others go.

    Arrow counts the keys; only the rows of a key seen more than once come to Python.
    """
    import pyarrow.compute as pc

    _, table = bucket_and_table
    counts = table.group_by("key").aggregate([("key", "count")])
    repeated = counts.filter(pc.greater(counts["key_count"], 1)).column("key")
    if not len(repeated):
        return
    places = collections.defaultdict(list)
    table = table.filter(pc.is_in(table["key"], value_set=repeated.combine_chunks()))
    for key, shard, position in zip(*(table.column(name).to_pylist()
                                      for name in ("key", "shard", "position"))):
        places[key].append((shard, position))
    for key in sorted(places):
        found = sorted(places[key])
        first_shard, first_position = found[0]
        for shard, position in found[1:]:
            yield beam.pvalue.TaggedOutput(quarantine.QUARANTINE_TAG, quarantine.quarantine_record(
                quarantine.STAGE_DEDUPLICATE, quarantine.DUPLICATE_KEY, key, shard, position,
                f"kept the copy at {first_shard} position {first_position}"))
            yield shard, position


class FindDuplicateKeys(beam.PTransform):
    """Row tables -> the places of rows whose key an earlier row has (main) and their quarantine
    entries.

    Only (key, file, place) is grouped, through files in `spill_dir` (file_shuffle), so the runner
    carries references rather than a row per record; which copy survives does not depend on order.
    """

    def __init__(self, spill_dir: str):
        super().__init__()
        self.spill_dir = spill_dir

    def expand(self, row_batches):
        return (row_batches
                | "KeysByBucket" >> beam.FlatMap(_keys_by_bucket)
                | "GroupBucket" >> GroupTablesByFile(self.spill_dir)
                | "Duplicates" >> beam.FlatMap(_duplicates_in_bucket).with_outputs(
                    quarantine.QUARANTINE_TAG, main="places"))


def label_set(attributes, concepts, utility) -> str:
    """What balance needs of a row, before its options (conditional form, utility) are applied."""
    return row_signature(attributes, concepts, utility, conditional=False, use_utility=True)


class SpillRows(beam.DoFn):
    """A table of annotation rows -> (path, rows) of the Parquet file in `spill_dir` that holds it.

    The rows wait for the duplicate keys (a side input, so a stage boundary) as files, and only
    their paths cross the runner: Beam's multi-process runner lost contiguous runs of the large
    elements it carried between stages (docs/beam-data-loss.md), 18,000 to 152,000 of 3 million
    annotated pool rows in each of three runs when the tables themselves crossed.
    """

    def __init__(self, spill_dir: str):
        self.spill_dir = spill_dir

    def process(self, table):
        import pyarrow.parquet as pq

        path = FileSystems.join(self.spill_dir, f"rows-{uuid.uuid4().hex}.parquet")
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="none")
        with FileSystems.create(path) as handle:
            handle.write(sink.getvalue())
        yield path, table.num_rows


def read_spilled(path_and_rows):
    """The table SpillRows wrote, checked against the row count it reported."""
    import pyarrow.parquet as pq

    path, rows = path_and_rows
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        table = pq.read_table(io.BytesIO(handle.read()), schema=ANNOTATION_SCHEMA)
    if table.num_rows != rows:
        raise DataError(
            f"{path} holds {table.num_rows} rows, {rows} were written: the job's work folder "
            "changed under it; re-run annotate")
    return table


# Rows per table DropDuplicates hands to the Parquet writer: each table is one row group of
# annotations-*.parquet, and every later job reads (and the runner ships) one table per row group.
ANNOTATION_ROW_GROUP_ROWS = 65_536


class DropDuplicates(beam.DoFn):
    """Spilled tables of rows -> the rows without their duplicates, in tables of about
    ANNOTATION_ROW_GROUP_ROWS rows, and per spilled table the counts of what it keeps.

    The counts: rows kept (`annotated`), rows without a usable utility, and rows per label set (what
    balance counts signatures from, without reading the annotations again).
    """

    def __init__(self, utility_field=None):
        self.utility_field = utility_field
        self._label_sets = LabelSetMemo()  # label set -> its text

    def _label_set(self, attributes, concepts, utility) -> str:
        labels = (tuple(attributes or ()), tuple(concepts or ()), utility)
        return self._label_sets.get_or_make(labels,
                                            lambda: label_set(attributes, concepts, utility))

    def _count_label_sets(self, table) -> collections.Counter:
        import numpy as np
        import pyarrow.compute as pc

        has_utility = pc.any(pc.is_valid(table.column("utility"))).as_py()
        distinct = None if has_utility else distinct_label_sets(table)
        if distinct is None:  # utilities are part of a label set: row by row
            return collections.Counter(map(self._label_set, table.column("attributes").to_pylist(),
                                           table.column("concepts").to_pylist(),
                                           table.column("utility").to_pylist()))
        codes, texts = distinct
        counts = collections.Counter()
        rows_per_set = np.bincount(codes, minlength=len(texts)).tolist()
        for text, rows in zip(texts, rows_per_set):  # memoised on the label set's text
            counts[self._label_sets.get_or_make(
                text, lambda: label_set(*label_set_parts(text), None))] += rows
        return counts

    def start_bundle(self):
        self._pending, self._pending_rows = [], 0

    def process(self, spilled, duplicate_places):
        import pyarrow as pa

        table = read_spilled(spilled)
        if duplicate_places:
            places = zip(table.column("shard").to_pylist(), table.column("position").to_pylist())
            table = table.filter(
                pa.array([place not in duplicate_places for place in places], type=pa.bool_()))
        missing = table.column("utility").null_count if self.utility_field else 0
        yield counted({
            "annotated": table.num_rows, "utility_missing": missing,
            "label_sets": dict(self._count_label_sets(table))
        })
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            if self._pending_rows >= ANNOTATION_ROW_GROUP_ROWS:
                yield self._flush()

    def finish_bundle(self):
        if self._pending:
            from apache_beam.transforms.window import GlobalWindows

            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self):
        import pyarrow as pa

        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        return table
