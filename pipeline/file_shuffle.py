"""A group-by-bucket whose rows travel as files: only references to them cross the runner.

Beam's local runners hold every shuffle in the driver's memory, so a GroupByKey of per-row tables
grows the driver with the pool: at 3 million DataComp rows the duplicate-key check alone took the
driver from 230 MB to 1.6 GB. `GroupTablesByFile` takes (bucket, Arrow table) parts, and each
worker appends them to a buffer that it writes out as one Arrow IPC file (a record batch range per
bucket) every `flush_rows` rows or `flush_bytes` bytes and at the end of its bundle. Only (bucket,
file, batch range, rows) is grouped; the bucket's reader opens each file at its batches and checks
their row count. Memory is one buffer per worker and one bucket per reader, whatever the pool's
size.

The files go to a folder the job removes when it ends (annotate's `.spill`, resample's work
folder). A retried bundle writes new files under new names and the failed attempt's references are
never grouped, so a retry neither loses nor doubles a row. The order of a bucket's rows is not
defined: consumers sort.
"""
from __future__ import annotations

import collections
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows
from apache_beam.typehints import KV, Any

from pipeline.coders import Batch
from pipeline.errors import DataError

# A worker writes its buffered parts once they hold this many rows (a few tens of MB of keys) or
# this many bytes (rows that carry payloads: resample's kept copies).
FLUSH_ROWS = 262_144
FLUSH_BYTES = 128 * 1024 * 1024
SPILL_FILE_PREFIX = "parts-"


def parts_by_bucket(table, buckets):
    """(bucket, rows of `table` in that bucket) for each bucket present, rows in table order;
    `buckets` holds each row's bucket (ints). The parts GroupTablesByFile takes."""
    import numpy as np

    buckets = np.asarray(buckets, dtype=np.int64)
    order = np.argsort(buckets, kind="stable")
    for part in np.split(order, np.flatnonzero(np.diff(buckets[order])) + 1):
        if len(part):
            yield int(buckets[part[0]]), table.take(part)


class SpillParts(beam.DoFn):
    """(bucket, table) parts -> (bucket, (path, first batch, batch count, rows)) per file written.

    A bucket is any sortable key. The first half of GroupTablesByFile, for a caller that groups the
    references with something else (resample joins each input range with its decisions' files) and
    reads them with read_bucket.
    """

    def __init__(self, spill_dir: str, flush_rows: int, flush_bytes: int = FLUSH_BYTES):
        self.spill_dir, self.flush_rows, self.flush_bytes = spill_dir, flush_rows, flush_bytes

    def start_bundle(self):
        self.parts, self.rows, self.bytes = collections.defaultdict(list), 0, 0

    def process(self, bucket_and_table):
        bucket, table = bucket_and_table
        if table.num_rows:
            self.parts[bucket].append(table)
            self.rows += table.num_rows
            self.bytes += table.nbytes
        if self.rows >= self.flush_rows or self.bytes >= self.flush_bytes:
            yield from self._flush()

    def finish_bundle(self):
        for reference in self._flush():
            yield GlobalWindows.windowed_value(reference)

    def _flush(self):
        import pyarrow as pa

        if not self.parts:
            return []
        path = FileSystems.join(self.spill_dir, f"{SPILL_FILE_PREFIX}{uuid.uuid4().hex}.arrow")
        references, first = [], 0
        schema = next(iter(self.parts.values()))[0].schema
        # Straight into the file, each part's batches as they are. A buffer of the whole file, its
        # copy as bytes and a combined copy of each bucket (three copies of up to FLUSH_BYTES, in
        # fresh pages) took 3x the write itself for 46 MB of resample's kept copies, 30x when the
        # pages were new to the process.
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle, \
                pa.ipc.new_file(pa.PythonFile(handle, mode="w"), schema) as writer:
            for bucket in sorted(self.parts):
                batches = [batch for table in self.parts[bucket] for batch in table.to_batches()
                           if batch.num_rows]
                for batch in batches:
                    writer.write_batch(batch)
                references.append((bucket, (path, first, len(batches),
                                            sum(batch.num_rows for batch in batches))))
                first += len(batches)
        self.parts, self.rows, self.bytes = collections.defaultdict(list), 0, 0
        return references


def read_bucket(bucket_and_references):
    """(bucket, references) -> (bucket, one table of the rows every reference points at)."""
    import pyarrow as pa

    bucket, references = bucket_and_references
    batches, schema = [], None
    for path, first, count, rows in sorted(references):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            reader = pa.ipc.open_file(pa.PythonFile(handle, mode="r"))
            schema = reader.schema
            part = [reader.get_batch(i) for i in range(first, first + count)]
        if sum(batch.num_rows for batch in part) != rows:
            raise DataError(
                f"{path} holds {sum(b.num_rows for b in part)} rows of bucket {bucket}, {rows} "
                "were written: the job's work folder changed under it; re-run the job")
        batches.extend(part)
    return bucket, pa.Table.from_batches(batches, schema=schema)


class GroupTablesByFile(beam.PTransform):
    """(bucket, pyarrow.Table) parts -> (bucket, all its rows as one table), the rows carried by
    Arrow files in `spill_dir` rather than by the runner's shuffle. Every part must share one
    schema."""

    def __init__(self, spill_dir: str, flush_rows: int = FLUSH_ROWS,
                 flush_bytes: int = FLUSH_BYTES):
        super().__init__()
        self.spill_dir, self.flush_rows, self.flush_bytes = spill_dir, flush_rows, flush_bytes

    def expand(self, parts):
        return (parts
                | "SpillParts" >> beam.ParDo(
                    SpillParts(self.spill_dir, self.flush_rows, self.flush_bytes))
                | "GroupReferences" >> beam.GroupByKey()
                | "ReadBucket" >> beam.Map(read_bucket).with_output_types(KV[Any, Batch]))
