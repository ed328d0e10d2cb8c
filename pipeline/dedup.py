"""The annotate job's last steps: the rows written where they are made, duplicate keys found
through files, and the few written rows that turn out to be duplicates taken out afterwards.

RowGroups gathers the rows into row groups and counts the label sets balance needs, in the stage
that labels them, so the Parquet writer writes them there and no table of rows crosses the runner
(docs/beam-data-loss.md). FindDuplicateKeys groups only (key, file, place), through Arrow files
(pipeline/file_shuffle.py); DropDuplicateRows then rewrites the written files that hold a
duplicate (none, on most data) and subtracts what it took out from the counts.
"""
from __future__ import annotations

import collections
import uuid
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.typehints import KV

from pipeline import quarantine
from pipeline.coders import Batch
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
    if len(pc.unique(table["key"])) == table.num_rows:  # most buckets: a hash pass, no grouping
        return
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
                | "KeysByBucket" >> beam.FlatMap(_keys_by_bucket).with_output_types(KV[int, Batch])
                | "GroupBucket" >> GroupTablesByFile(self.spill_dir)
                | "Duplicates" >> beam.FlatMap(_duplicates_in_bucket).with_outputs(
                    quarantine.QUARANTINE_TAG, main="places"))


def label_set(attributes, concepts, utility) -> str:
    """What balance needs of a row, before its options (conditional form, utility) are applied."""
    return row_signature(attributes, concepts, utility, conditional=False, use_utility=True)


class LabelSetCounts:
    """Rows per label set of annotation tables (what balance counts signatures from), memoised on
    the label set's text so a label set met before costs one lookup."""

    def __init__(self):
        self._label_sets = LabelSetMemo()  # label set -> its text

    def _label_set(self, attributes, concepts, utility) -> str:
        labels = (tuple(attributes or ()), tuple(concepts or ()), utility)
        return self._label_sets.get_or_make(labels,
                                            lambda: label_set(attributes, concepts, utility))

    def __call__(self, table) -> collections.Counter:
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
        for text, rows in zip(texts, rows_per_set):
            counts[self._label_sets.get_or_make(
                text, lambda: label_set(*label_set_parts(text), None))] += rows
        return counts


def _table_counts(table, label_sets: LabelSetCounts, utility_field, sign: int = 1) -> dict:
    """What balance and the reconciliation count of a table of annotation rows (negated: sign -1).
    """
    missing = table.column("utility").null_count if utility_field else 0
    return {"annotated": sign * table.num_rows, "utility_missing": sign * missing,
            "label_sets": {text: sign * n for text, n in label_sets(table).items()}}


# Rows per table RowGroups hands to the Parquet writer: each table is one row group of
# annotations-*.parquet, and every later job reads (and the runner ships) one table per row group.
ANNOTATION_ROW_GROUP_ROWS = 65_536


class RowGroups(beam.DoFn):
    """Tables of annotation rows -> tables of about ANNOTATION_ROW_GROUP_ROWS rows for the Parquet
    writer, fused with the steps that make them (the rows never cross the runner), and per table
    the counts of what it holds.

    Duplicate keys are found meanwhile and taken out of the written files afterwards
    (DropDuplicateRows): the counts here include them, and DropDuplicateRows subtracts them.
    """

    def __init__(self, utility_field=None):
        self.utility_field = utility_field
        self._label_sets = LabelSetCounts()

    def start_bundle(self):
        self._pending, self._pending_rows = [], 0

    def process(self, table):
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            if self._pending_rows >= ANNOTATION_ROW_GROUP_ROWS:
                yield from self._flush()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        for output in self._flush():  # outside process(), each output names its window
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag,
                                               GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)

    def _flush(self):
        import pyarrow as pa

        if not self._pending:
            return []
        table = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._pending_rows = [], 0
        return [counted(_table_counts(table, self._label_sets, self.utility_field)), table]


class DropDuplicateRows(beam.DoFn):
    """A written annotations file -> the same file without the rows at duplicate places (a side
    input: (shard, position) of every copy but the first), and the counts of the rows taken out, as
    negative numbers.

    Most files hold no duplicate and are not opened; a file that does is rewritten one row group at
    a time beside it and renamed over it, so memory is one row group whatever the file's size.
    """

    def __init__(self, spill_dir: str, utility_field=None):
        self.spill_dir, self.utility_field = spill_dir, utility_field
        self._label_sets = LabelSetCounts()

    def process(self, path, duplicate_places):
        if not duplicate_places:
            return
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type="uncompressed") as handle:
            places = pq.read_table(handle, columns=["shard", "position"])
        drop = pa.array([place in duplicate_places for place in zip(
            places.column("shard").to_pylist(), places.column("position").to_pylist())],
                        type=pa.bool_())
        if not pc.any(drop).as_py():
            return
        rewritten = FileSystems.join(self.spill_dir, f"rewrite-{uuid.uuid4().hex}.parquet")
        dropped, first = [], 0
        with FileSystems.open(path, compression_type="uncompressed") as source, \
                FileSystems.create(rewritten, compression_type="uncompressed") as sink:
            reader = pq.ParquetFile(source)
            with pq.ParquetWriter(sink, ANNOTATION_SCHEMA, compression="none") as writer:
                for group in range(reader.num_row_groups):
                    table = reader.read_row_group(group)
                    mask = drop.slice(first, table.num_rows)
                    first += table.num_rows
                    dropped.append(table.filter(mask))
                    table = table.filter(pc.invert(mask))
                    if table.num_rows:
                        writer.write_table(table, row_group_size=ANNOTATION_ROW_GROUP_ROWS)
        if first != len(drop):  # the rows read are not the rows the places were read from
            raise DataError(f"{path} changed while its duplicate rows were taken out; re-run "
                            "annotate")
        FileSystems.rename([rewritten], [path])
        yield counted(_table_counts(pa.concat_tables(dropped), self._label_sets,
                                    self.utility_field, sign=-1))
